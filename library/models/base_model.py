"""Load the base model a run trains, whichever family it is: the kind is read from the files
(library/models/kind.py), then SD 1.x / SDXL load through :func:`library.models.loading.load_stable_diffusion`
and Z-Image / FLUX.2 Klein through :func:`library.models.dit_loading.load_dit`. Both give the same
:class:`~library.models.loading.StableDiffusionParts` ("unet" is the denoiser: a UNet or a transformer),
whose ``family`` answers every difference (library/models/family.py, library/models/dit_model_family.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from library.models.dit_model_family import DIT_MODEL_FAMILIES
from library.models.kind import check_trainable, local_model_path
from library.models.loading import StableDiffusionParts, identify, load_stable_diffusion

__all__ = ["family_named", "load_base_model"]


def family_named(name: str):
    """The family object of a ``ModelKind.family`` string: SD 1.x / SDXL's ModelFamily or a DitModelFamily.
    ValueError naming the trainable families otherwise."""
    from library.models.family import FAMILIES

    found = FAMILIES.get(name) or DIT_MODEL_FAMILIES.get(name)
    if found is None:
        labels = [f.label for f in (*FAMILIES.values(), *DIT_MODEL_FAMILIES.values())]
        raise ValueError(f"no trainable model family {name!r}; trainable: {', '.join(labels)}")
    return found


def load_base_model(model_cfg, dtype: torch.dtype = torch.float32) -> StableDiffusionParts:
    """The [model] section's base: ``pretrained`` (a diffusers folder, a single checkpoint, a DiT
    transformer file with ``text_encoder``, ``vae`` and ``tokenizer``, or a hub id when not ``offline``),
    ``config_dir`` and ``vae``. Raises ModelLoadError in one line for anything that cannot train."""
    local = local_model_path(model_cfg.pretrained, model_cfg.offline)
    if local is not None and (local.is_dir() or local.suffix.lower() == ".safetensors"):
        kind, _ = identify(local)  # headers and configs only
        if kind.family in DIT_MODEL_FAMILIES:
            from library.models.dit_loading import load_dit

            check_trainable(kind, str(model_cfg.pretrained))
            parts = load_dit(local, model_cfg.text_encoder or None, model_cfg.vae or None,
                             model_cfg.tokenizer or None, model_cfg.config_dir or None, dtype)
            return StableDiffusionParts(
                unet=parts.transformer, vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                noise_scheduler=parts.scheduler, name=parts.name, kind=parts.kind,
                vae_name=Path(model_cfg.vae).name if model_cfg.vae and local.is_file() else None,
                family=DIT_MODEL_FAMILIES[parts.family.name])
    return load_stable_diffusion(model_cfg.pretrained, model_cfg.config_dir or None, model_cfg.offline, dtype,
                                 vae=model_cfg.vae)
