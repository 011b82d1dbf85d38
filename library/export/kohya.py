"""Write what the frontends load: a kohya-format LoRA, A1111 embeddings, their metadata; and read them back.

LoRA (kohya ``networks.lora`` format, read by A1111, ComfyUI, Forge, InvokeAI and diffusers):
    ``<module>.lora_down.weight`` [r, in] (1x1 conv: [r, in, 1, 1]), ``<module>.lora_up.weight`` [out, r]
    (1x1 conv: [out, r, 1, 1]), ``<module>.alpha`` 0-dim; the weight delta is ``alpha / r * up @ down``.
    ``<module>`` = ``lora_unet_`` + the UNet module path, or a text encoder's prefix + ``text_model_`` +
    its module path, with "." -> "_". What differs per family comes from :class:`ModelFamily`:

    * UNet paths (``unet_key_style``): SD 1.x keeps diffusers' paths (``lora_unet_down_blocks_2_...``);
      SDXL uses the original (SGM) paths kohya trains SDXL on (``lora_unet_input_blocks_4_1_...``,
      ``lora_unet_middle_block_1_...``, ``lora_unet_output_blocks_0_1_...``; :mod:`library.models.sgm_keys`).
    * text-encoder prefixes (``kohya_te_prefixes``): ``lora_te_`` for SD 1.x's CLIP-L; ``lora_te1_``
      (CLIP-L) and ``lora_te2_`` (OpenCLIP-G) for SDXL. kohya loads OpenCLIP-G as transformers'
      ``CLIPTextModelWithProjection``, so both SDXL encoders use transformers' module names
      (``lora_te2_text_model_encoder_layers_0_self_attn_q_proj``).

    The ``text_model`` level is written whatever the installed transformers says (transformers 5 dropped
    it from CLIPTextModel; every frontend, and kohya on transformers 4, expect it), and the SD 1.x prefix
    is ``lora_te_`` (diffusers' SDXL-style ``lora_te1_`` is read, never written, for SD 1.x).

Embeddings (A1111 format; :mod:`library.export.embeddings`, re-exported here): one file per token,
``emb_params`` for SD 1.x, ``clip_l`` + ``clip_g`` for SDXL.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from library.files.atomic import write_safetensors
from library.files.weights import open_safetensors
from library.models.family import SD1, ModelFamily
from library.models.sgm_keys import sgm_unet_module_path
from library.export.embeddings import (  # re-exported: the embeddings are part of the format
    BUNDLE_PREFIX,
    bundle_tensors,
    load_embedding,
    load_embedding_vectors,
    save_embedding,
)
from library.export.metadata import (  # re-exported: the metadata is part of the file format
    build_metadata,
    default_composed_prompt,
    file_sha256,
    precalculate_safetensors_hashes,
    safetensors_file_hash,
)

# Listed so the re-exports above count as used (pyflakes) and `import *` gets the whole format.
__all__ = [
    "BUNDLE_PREFIX", "DEFAULT_ADAPTER", "TE_PREFIX", "UNET_PREFIX",
    "apply_kohya_lora", "kohya_module_name", "load_lora", "lora_module_names",
    "lora_state_dict", "save_lora",
    # from library.export.embeddings
    "load_embedding", "load_embedding_vectors", "save_embedding",
    # from library.export.metadata
    "build_metadata", "default_composed_prompt", "file_sha256", "precalculate_safetensors_hashes",
    "safetensors_file_hash",
]

UNET_PREFIX = "lora_unet"
TE_PREFIX = SD1.kohya_te_prefixes[0]
DEFAULT_ADAPTER = "default"


# --------------------------------------------------------------------------------------------------
# names


def _clean_module_path(module_path: str) -> str:
    path = module_path
    # wrappers that add a level to module names: torch.compile, DistributedDataParallel, peft.get_peft_model
    path = path.replace("_orig_mod.", "")
    for wrapper in ("module.", "base_model.model."):
        if path.startswith(wrapper):
            path = path[len(wrapper) :]
    if path.endswith(".base_layer"):
        path = path[: -len(".base_layer")]
    return path


def _normalise_prefix(prefix: str, family: ModelFamily) -> str:
    p = prefix.rstrip("_")
    aliases = {"unet": UNET_PREFIX}
    if len(family.kohya_te_prefixes) == 1:
        aliases.update({"te": family.kohya_te_prefixes[0], "text_encoder": family.kohya_te_prefixes[0]})
    p = aliases.get(p, p)
    valid = (UNET_PREFIX, *family.kohya_te_prefixes)
    if p not in valid:
        raise ValueError(f"{family.label} LoRAs use the prefixes {', '.join(v + '_' for v in valid)}, not {prefix!r}")
    return p


def kohya_module_name(prefix: str, module_path: str, family: ModelFamily = SD1, unet_config: Any = None) -> str:
    """kohya's module name: the prefix + the module path with "." -> "_" (see the module docstring).

    `prefix`: ``lora_unet`` or one of ``family.kohya_te_prefixes`` (trailing "_" optional). For a family
    with SGM UNet names, `unet_config` (``unet.config``) gives the block layout. ValueError for a prefix
    the family does not use or a UNet path with no original-layout place.

    >>> kohya_module_name("lora_unet_", "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k")
    'lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k'
    >>> kohya_module_name("lora_te_", "encoder.layers.0.self_attn.q_proj")
    'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
    """
    p = _normalise_prefix(prefix, family)
    path = _clean_module_path(module_path)
    if p == UNET_PREFIX:
        if family.unet_key_style == "sgm":
            if unet_config is None:
                raise ValueError(f"{family.label} UNet LoRA names need the UNet config (its block layout)")
            path = sgm_unet_module_path(path, unet_config)
    elif not path.startswith("text_model."):
        path = "text_model." + path  # transformers 5 CLIPTextModel has no text_model level; frontends expect it
    return f"{p}_{path.replace('.', '_')}"


def _text_encoder_slots(
    text_encoders: nn.Module | Sequence[nn.Module | None] | None, family: ModelFamily
) -> list[tuple[str, nn.Module]]:
    """(kohya prefix, module) per given text encoder, in family order; a bare module is the first one."""
    if text_encoders is None:
        return []
    if isinstance(text_encoders, nn.Module):
        text_encoders = (text_encoders,)
    if len(text_encoders) > len(family.kohya_te_prefixes):
        raise ValueError(f"{family.label} has {len(family.kohya_te_prefixes)} text encoder(s), got {len(text_encoders)}")
    return [(p, m) for p, m in zip(family.kohya_te_prefixes, text_encoders) if m is not None]


# --------------------------------------------------------------------------------------------------
# LoRA state dict


def _peft_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A
    ]


def _effective_alpha(layer: nn.Module, adapter_name: str) -> float:
    """kohya's alpha for this layer: scale = alpha / r, so alpha = (peft's base scale) x r."""
    r = layer.r[adapter_name]
    alpha = float(layer.lora_alpha[adapter_name])
    if layer.use_rslora.get(adapter_name, False):
        alpha = alpha / math.sqrt(r) * r
    return alpha


def _export_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to(dtype=dtype)
    if t.device.type != "meta":  # meta tensors (shape-only models) stay meta
        t = t.cpu()
    return t.clone().contiguous()


def lora_state_dict(
    unet: nn.Module | None,
    text_encoders: nn.Module | Sequence[nn.Module | None] | None = None,
    family: ModelFamily = SD1,
    dtype: torch.dtype = torch.float16,
    adapter_name: str = DEFAULT_ADAPTER,
) -> dict[str, torch.Tensor]:
    """kohya-format tensors of the peft LoRA layers (`adapter_name`) of the UNet and the text encoders.

    `text_encoders`: in family order (``(CLIP-L, OpenCLIP-G)`` for SDXL; None entries are skipped; a bare
    module is the first encoder, as SD 1.x callers pass it). Names follow `family` (module docstring).
    Raises ValueError when nothing is found or two layers map to one name, NotImplementedError for LoRA
    kinds kohya's format cannot hold (DoRA, LoRA bias, other base layers).
    """
    out: dict[str, torch.Tensor] = {}
    models = ([(UNET_PREFIX, unet)] if unet is not None else []) + _text_encoder_slots(text_encoders, family)
    for prefix, model in models:
        config = getattr(model, "config", None)
        for path, layer in _peft_layers(model, adapter_name):
            if layer.use_dora.get(adapter_name, False):
                raise NotImplementedError(f"{path}: DoRA layers have no kohya LoRA equivalent here")
            if getattr(layer, "lora_bias", {}).get(adapter_name, False):
                raise NotImplementedError(f"{path}: LoRA bias has no kohya LoRA equivalent")
            down = layer.lora_A[adapter_name].weight
            up = layer.lora_B[adapter_name].weight
            base = layer.get_base_layer()
            if isinstance(base, nn.Conv2d):
                if down.ndim != 4 or up.ndim != 4:
                    raise ValueError(f"{path}: conv LoRA with weights {tuple(down.shape)}, {tuple(up.shape)}")
            elif not isinstance(base, nn.Linear):
                raise NotImplementedError(f"{path}: LoRA on {type(base).__name__} is not exported")
            name = kohya_module_name(prefix, path, family, config)
            if name + ".lora_down.weight" in out:
                raise ValueError(f"two LoRA layers map to the kohya name {name}")
            out[name + ".lora_down.weight"] = _export_tensor(down, dtype)
            out[name + ".lora_up.weight"] = _export_tensor(up, dtype)
            out[name + ".alpha"] = torch.tensor(_effective_alpha(layer, adapter_name), dtype=dtype)
    if not out:
        raise ValueError(f"no LoRA layers of adapter {adapter_name!r} found to export")
    return out


def lora_module_names(state_dict: Mapping[str, Any]) -> list[str]:
    """The kohya module names of a LoRA state dict (bundled embeddings excluded), sorted."""
    return sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith(BUNDLE_PREFIX)})


# --------------------------------------------------------------------------------------------------
# files


def save_lora(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    bundle_embeddings: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]] | None = None,
    family: ModelFamily = SD1,
) -> None:
    """Write the LoRA (.safetensors with metadata) atomically; optionally bundle embeddings.

    `bundle_embeddings`: token -> vectors ([n, dim] for SD 1.x, or ``{embedding key: [n, dim]}``), written
    as ``bundle_emb.<token>.<key>`` with ``family.bundle_embedding_keys`` (A1111 and ComfyUI read them;
    diffusers' kohya loader refuses such a file). The sshs_* hashes are recomputed over the tensors
    actually written (bundled embeddings included), so they always match the file.
    """

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tensors.update(bundle_tensors(bundle_embeddings or {}, family))
    meta = {str(k): v for k, v in (metadata or {}).items()}
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    if meta:
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, meta)
    write_safetensors(path, tensors, meta or None)


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors LoRA; WeightsFileError (one line) for an unreadable file."""
    with open_safetensors(path) as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


# --------------------------------------------------------------------------------------------------
# the inverse: merge a kohya LoRA into plain modules


def _merge_targets(model: nn.Module, prefix: str, family: ModelFamily) -> dict[str, nn.Module]:
    targets: dict[str, nn.Module] = {}
    config = getattr(model, "config", None)
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(p.startswith("lora_") for p in path.split(".")):
            continue
        try:
            targets[kohya_module_name(prefix, path, family, config)] = module
        except ValueError:  # a module kohya's layout has no name for: no LoRA can address it
            continue
    return targets


def _other_family_hint(names: list[str], family: ModelFamily) -> str:
    """" (a LoRA for SDXL?)" when the names use a text-encoder prefix only another family has."""
    from library.models.family import FAMILIES

    for other in FAMILIES.values():
        own = [p for p in other.kohya_te_prefixes if p not in family.kohya_te_prefixes]
        if other != family and any(n.startswith(p + "_") for n in names for p in own):
            return f" (a LoRA for {other.label}?)"
    return ""


def apply_kohya_lora(
    unet: nn.Module | None,
    text_encoders: nn.Module | Sequence[nn.Module | None] | None,
    state_dict: Mapping[str, torch.Tensor],
    unet_scale: float = 1.0,
    te_scale: float = 1.0,
    family: ModelFamily = SD1,
) -> int:
    """Merge a kohya LoRA into the weights: W += scale * alpha / r * up @ down. Returns modules patched.

    `text_encoders` as for :func:`lora_state_dict` (family order; a bare module is the first). Module
    names are matched exactly under `family`'s naming (for a one-encoder family ``lora_te1_`` is read as
    its ``lora_te_``); a key that matches no module (a LoRA for the other family, say), a missing
    up/down, or a shape that does not fit raises ValueError (one line) before any weight changes.
    ``bundle_emb.*`` tensors are embeddings, not modules, and are skipped.
    """
    one_te = family.kohya_te_prefixes[0] if len(family.kohya_te_prefixes) == 1 else None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith(BUNDLE_PREFIX):
            continue
        name, _, part = key.partition(".")
        if one_te and name.startswith("lora_te1_"):  # diffusers' name for the only text encoder
            name = f"{one_te}_{name[len('lora_te1_') :]}"
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise ValueError(f"unsupported LoRA tensor {key!r} (only lora_down / lora_up / alpha)")
        groups.setdefault(name, {})[part] = value

    targets: dict[str, tuple[nn.Module, float]] = {}
    if unet is not None:
        targets.update({n: (m, unet_scale) for n, m in _merge_targets(unet, UNET_PREFIX, family).items()})
    for prefix, model in _text_encoder_slots(text_encoders, family):
        targets.update({n: (m, te_scale) for n, m in _merge_targets(model, prefix, family).items()})

    plan = []
    missing = []
    for name, parts in groups.items():
        if name not in targets:
            missing.append(name)
            continue
        module, scale = targets[name]
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{name}: needs both lora_down.weight and lora_up.weight")
        down = parts["lora_down.weight"].float()
        up = parts["lora_up.weight"].float()
        r = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(r)
        delta = up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
        w = module.weight
        if delta.numel() != w.numel() or delta.shape[0] != w.shape[0]:
            raise ValueError(f"{name}: LoRA delta {tuple(delta.shape)} does not fit weight {tuple(w.shape)}")
        plan.append((module, delta.reshape(w.shape) * (scale * alpha / r)))
    if missing:
        # ValueError, not KeyError: str(KeyError) wraps the message in quotes
        raise ValueError(f"{len(missing)} LoRA modules match no module of this {family.label} model"
                         f"{_other_family_hint(missing, family)}: {sorted(missing)[:5]}")
    with torch.no_grad():
        for module, delta in plan:
            module.weight.add_(delta.to(device=module.weight.device, dtype=module.weight.dtype))
    return len(plan)
