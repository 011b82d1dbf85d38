"""Write what the frontends load: a kohya-format LoRA, A1111 embeddings, their metadata; and read them back.

LoRA (kohya ``networks.lora`` format, read by A1111, ComfyUI, Forge, InvokeAI and diffusers):
    ``<module>.lora_down.weight`` [r, in] (1x1 conv: [r, in, 1, 1]), ``<module>.lora_up.weight`` [out, r]
    (1x1 conv: [out, r, 1, 1]), ``<module>.alpha`` 0-dim; the weight delta is ``alpha / r * up @ down``.
    ``<module>`` = ``lora_unet_`` + the diffusers UNet module path with "." -> "_", or ``lora_te_`` +
    ``text_model_`` + the CLIP text-encoder module path. The ``text_model`` level is written whatever the
    installed transformers says (transformers 5 dropped it from CLIPTextModel; every frontend, and kohya
    on transformers 4, expect it), and the SD 1.x prefix is ``lora_te_`` (diffusers' SDXL-style
    ``lora_te1_`` is not used).

Embeddings (A1111 format): ``<token>.safetensors`` holding one tensor ``emb_params`` [n, dim]; or the legacy
``.pt`` pickle ``{"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name", "step",
"sd_checkpoint", "sd_checkpoint_name"}``. A1111 names an embedding after its file name.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from library.files.atomic import write_atomic
from library.files.weights import load_pickled_weights, open_safetensors
from library.export.metadata import (  # re-exported: the metadata is part of the file format
    build_metadata,
    default_composed_prompt,
    file_sha256,
    precalculate_safetensors_hashes,
    safetensors_file_hash,
)

# Listed so the metadata re-exports above count as used (pyflakes) and `import *` gets the whole format.
__all__ = [
    "BUNDLE_PREFIX", "DEFAULT_ADAPTER", "TE_PREFIX", "UNET_PREFIX",
    "apply_kohya_lora", "kohya_module_name", "load_embedding", "load_lora", "lora_module_names",
    "lora_state_dict", "save_embedding", "save_lora",
    # from library.export.metadata
    "build_metadata", "default_composed_prompt", "file_sha256", "precalculate_safetensors_hashes",
    "safetensors_file_hash",
]

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"
BUNDLE_PREFIX = "bundle_emb."
DEFAULT_ADAPTER = "default"


# A1111 writes this fixed token id into every legacy .pt embedding (the id of "*").
_A1111_STAR_TOKEN = 265


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


def _normalise_prefix(prefix: str) -> str:
    p = prefix.rstrip("_")
    if p in ("lora_te1", "te1"):
        raise ValueError("SD 1.x LoRAs use the prefix 'lora_te_', not diffusers' SDXL-style 'lora_te1_'")
    aliases = {"unet": UNET_PREFIX, "te": TE_PREFIX, "text_encoder": TE_PREFIX}
    p = aliases.get(p, p)
    if p not in (UNET_PREFIX, TE_PREFIX):
        raise ValueError(f"unknown kohya prefix {prefix!r}; expected 'lora_unet_' or 'lora_te_'")
    return p


def kohya_module_name(prefix: str, module_path: str) -> str:
    """kohya's module name: ``lora_unet_`` / ``lora_te_text_model_`` + the module path with "." -> "_".

    >>> kohya_module_name("lora_unet_", "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k")
    'lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k'
    >>> kohya_module_name("lora_te_", "encoder.layers.0.self_attn.q_proj")
    'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
    """
    p = _normalise_prefix(prefix)
    path = _clean_module_path(module_path)
    if p == TE_PREFIX and not path.startswith("text_model."):
        path = "text_model." + path  # transformers 5 CLIPTextModel has no text_model level; frontends expect it
    return f"{p}_{path.replace('.', '_')}"


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
    text_encoder: nn.Module | None,
    dtype: torch.dtype = torch.float16,
    adapter_name: str = DEFAULT_ADAPTER,
) -> dict[str, torch.Tensor]:
    """kohya-format tensors of the peft LoRA layers (`adapter_name`) of the UNet and the text encoder."""
    out: dict[str, torch.Tensor] = {}
    for prefix, model in ((UNET_PREFIX, unet), (TE_PREFIX, text_encoder)):
        if model is None:
            continue
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
            name = kohya_module_name(prefix, path)
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
    bundle_embeddings: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the LoRA (.safetensors with metadata) atomically; optionally bundle embeddings (A1111 only).

    The sshs_* hashes are recomputed over the tensors actually written (bundled embeddings included), so
    they always match the file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    for token, vec in (bundle_embeddings or {}).items():
        vec = vec.detach().to("cpu")
        tensors[f"{BUNDLE_PREFIX}{token}.emb_params"] = (vec[None] if vec.ndim == 1 else vec).contiguous()
    meta = {str(k): v for k, v in (metadata or {}).items()}
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    if meta:
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, meta)
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta or None))


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors LoRA; WeightsFileError (one line) for an unreadable file."""
    with open_safetensors(path) as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def save_embedding(
    path: str | os.PathLike,
    token: str,
    vectors: torch.Tensor,
    legacy_pt: bool = False,
    step: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write one embedding, atomically; returns the file written.

    `path` is the file (or a folder, where ``<token>.safetensors`` / ``<token>.pt`` is written). A1111 names
    an embedding after its file, so a file stem other than the token gets a warning.
    """
    path = Path(path)
    suffix = ".pt" if legacy_pt else ".safetensors"
    if path.is_dir():
        path = path / f"{token}{suffix}"
    if path.stem != token:
        warnings.warn(f"A1111 will call this embedding {path.stem!r}, not {token!r}", stacklevel=2)
    vec = vectors.detach().to(device="cpu", dtype=dtype)
    if vec.ndim == 1:
        vec = vec[None]
    if vec.ndim != 2:
        raise ValueError(f"embedding vectors must be [n, dim], got {tuple(vectors.shape)}")
    vec = vec.clone().contiguous()
    if legacy_pt:
        data = {
            "string_to_token": {"*": _A1111_STAR_TOKEN},
            "string_to_param": {"*": vec},
            "name": token,
            "step": int(step),
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        }
        return write_atomic(path, lambda tmp: torch.save(data, str(tmp)))
    from safetensors.torch import save_file

    meta = {"name": token, "step": str(int(step)), "vectors": str(vec.shape[0]), "dim": str(vec.shape[1])}
    return write_atomic(path, lambda tmp: save_file({"emb_params": vec}, str(tmp), metadata=meta))


def load_embedding(path: str | os.PathLike) -> tuple[str, torch.Tensor]:
    """(name, vectors [n, dim]) of an A1111 / kohya / diffusers embedding file (.safetensors, .pt, .bin).

    Pickled files are read as plain tensors only. Raises ValueError (one line naming the file; a
    WeightsFileError for a file that cannot be read safely) when the file holds no embedding.
    """
    path = Path(path)
    name = path.stem
    if path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if "emb_params" in keys:
                key = "emb_params"
            elif "string_to_param.*" in keys:
                key = "string_to_param.*"
            elif len(keys) == 1:
                key = keys[0]
                name = meta.get("name", key)
            else:
                raise ValueError(f"{path.name}: not an embedding (tensors {keys})")
            vec = f.get_tensor(key)
        name = meta.get("name", name)
    else:
        data = load_pickled_weights(path)
        if isinstance(data, torch.Tensor):
            vec = data
        elif isinstance(data, dict) and "string_to_param" in data:
            vec = data["string_to_param"]["*"]
            name = data.get("name") or name
        elif isinstance(data, dict) and "emb_params" in data:
            vec = data["emb_params"]
        elif isinstance(data, dict) and len(data) == 1:
            name, vec = next(iter(data.items()))
        else:
            raise ValueError(f"{path.name}: not an embedding")
    if not isinstance(vec, torch.Tensor) or not vec.is_floating_point() or vec.ndim not in (1, 2):
        raise ValueError(f"{path.name}: not an embedding (expected float vectors [n, dim])")
    if vec.ndim == 1:
        vec = vec[None]
    return str(name), vec


# --------------------------------------------------------------------------------------------------
# the inverse: merge a kohya LoRA into plain modules


def _merge_targets(model: nn.Module, prefix: str) -> dict[str, nn.Module]:
    targets: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(p.startswith("lora_") for p in path.split(".")):
            continue
        targets[kohya_module_name(prefix, path)] = module
    return targets


def apply_kohya_lora(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    state_dict: Mapping[str, torch.Tensor],
    unet_scale: float = 1.0,
    te_scale: float = 1.0,
) -> int:
    """Merge a kohya LoRA into the weights: W += scale * alpha / r * up @ down. Returns modules patched.

    Module names are matched exactly (``lora_te1_`` is read as ``lora_te_``); a key that matches no module,
    a missing up/down, or a shape that does not fit raises ValueError (one line) before any weight
    changes. ``bundle_emb.*`` tensors are embeddings, not modules, and are skipped.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith(BUNDLE_PREFIX):
            continue
        name, _, part = key.partition(".")
        if name.startswith("lora_te1_"):
            name = "lora_te_" + name[len("lora_te1_") :]
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise ValueError(f"unsupported LoRA tensor {key!r} (only lora_down / lora_up / alpha)")
        groups.setdefault(name, {})[part] = value

    unet_targets = _merge_targets(unet, UNET_PREFIX) if unet is not None else {}
    te_targets = _merge_targets(text_encoder, TE_PREFIX) if text_encoder is not None else {}

    plan = []
    missing = []
    for name, parts in groups.items():
        if name.startswith(UNET_PREFIX + "_"):
            module, scale = unet_targets.get(name), unet_scale
        elif name.startswith(TE_PREFIX + "_"):
            module, scale = te_targets.get(name), te_scale
        else:
            module, scale = None, 0.0
        if module is None:
            missing.append(name)
            continue
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
        raise ValueError(f"{len(missing)} LoRA modules match no module of the model: {sorted(missing)[:5]}")
    with torch.no_grad():
        for module, delta in plan:
            module.weight.add_(delta.to(device=module.weight.device, dtype=module.weight.dtype))
    return len(plan)
