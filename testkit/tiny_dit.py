"""Writing a tiny Z-Image or FLUX.2 Klein model both ways users have it (testkit/tiny_zimage.py and
testkit/tiny_klein.py build the components):

* ``DEST/``: a diffusers pipeline folder (``ZImagePipeline`` / ``Flux2KleinPipeline``), what
  ``from_pretrained`` loads;
* ``DEST_comfy/``: ComfyUI's split files, each in the original key layout, with the folder a config names
  for what the files do not hold::

      DEST_comfy/diffusion_models/<name>.safetensors   transformer, no prefix (library/models/dit_keys.py)
      DEST_comfy/text_encoders/<name>.safetensors      Qwen3, transformers' names under ``model.``
      DEST_comfy/vae/<name>.safetensors                the original autoencoder layout, no prefix
      DEST_comfy/config/                               model_index.json, the component configs and the
                                                       Qwen2 tokenizer folder (tokenizer/), no weights
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from library.files.atomic import atomic_folder, write_safetensors
from library.models.dit_keys import transformer_to_native
from library.models.sgm_keys import vae_to_original
from testkit.tiny_qwen3 import qwen3_to_comfy


@dataclass(frozen=True)
class SplitFiles:
    """Where save_dit_model wrote ComfyUI's split files."""

    transformer: Path
    text_encoder: Path
    vae: Path
    config_dir: Path  # component configs; its tokenizer/ is the tokenizer folder

    @property
    def tokenizer(self) -> Path:
        return self.config_dir / "tokenizer"


def vae_to_comfy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL / AutoencoderKLFlux2 state dict in the original layout without prefix
    (FLUX.1's ``ae.safetensors``, which Z-Image uses, and FLUX.2's VAE file): the encoder and decoder
    renamed as SD's (library/models/sgm_keys.py), ``quant_conv`` / ``post_quant_conv`` / FLUX.2's ``bn``
    statistics under their own names."""
    coder = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
    out = {k[len("first_stage_model."):]: v for k, v in vae_to_original(coder).items()}
    out.update({k: v for k, v in state.items() if not k.startswith(("encoder.", "decoder."))})
    return {k: v.contiguous() for k, v in out.items()}


def save_dit_model(dest: Path, components: dict, pipeline_class: str, arch: str, names: dict[str, str],
                   pipeline_kwargs: dict | None = None) -> tuple[Path, SplitFiles]:
    """Write `components` (transformer, vae, text_encoder, tokenizer, scheduler) as the diffusers folder
    `dest` and as split files under ``dest_comfy`` (module docstring); `names` gives the three files'
    names ({"transformer", "text_encoder", "vae"}); `arch` is the transformer's (dit_keys ZIMAGE / FLUX2).
    Returns (folder, SplitFiles). Everything is written atomically."""
    import diffusers

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    pipe = getattr(diffusers, pipeline_class)(**components, **(pipeline_kwargs or {}))
    with atomic_folder(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    comfy = dest.parent / f"{dest.name}_comfy"
    with atomic_folder(comfy) as tmp:
        files = SplitFiles(transformer=tmp / "diffusion_models" / names["transformer"],
                           text_encoder=tmp / "text_encoders" / names["text_encoder"],
                           vae=tmp / "vae" / names["vae"], config_dir=tmp / "config")
        for path in (files.transformer, files.text_encoder, files.vae):
            path.parent.mkdir()
        write_safetensors(files.transformer, transformer_to_native(components["transformer"].state_dict(), arch))
        write_safetensors(files.text_encoder, qwen3_to_comfy(components["text_encoder"].state_dict()))
        write_safetensors(files.vae, vae_to_comfy(components["vae"].state_dict()))
        # the configs without weights: the diffusers folder's small files
        for item in sorted(dest.rglob("*")):
            if item.is_file() and item.suffix != ".safetensors":
                target = files.config_dir / item.relative_to(dest)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(item.read_bytes())
    final = SplitFiles(*(comfy / p.relative_to(tmp) for p in (files.transformer, files.text_encoder, files.vae, files.config_dir)))
    return dest, final
