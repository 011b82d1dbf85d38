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

Hashes (kohya ``train_util.precalculate_safetensors_hashes``, what sd-webui-additional-networks and A1111
compare against): the tensors are serialised with ``safetensors.torch.save(tensors, metadata)`` where
metadata keeps only the ``ss_*`` keys;

- ``sshs_model_hash`` = sha256 hex of the bytes after the header (``8 + header length`` to the end), i.e.
  of the tensor data alone -- the same for the file written with the full metadata, so A1111's
  ``addnet_hash_safetensors`` of the written file reproduces it;
- ``sshs_legacy_hash`` = first 8 hex digits of sha256 of the 0x10000 bytes at offset 0x100000 of that
  serialisation (sha256 of b"" -- "e3b0c442" -- for files under 1 MiB, as in kohya).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"
BUNDLE_PREFIX = "bundle_emb."
DEFAULT_ADAPTER = "default"

MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
MODELSPEC_ARCHITECTURE = "stable-diffusion-v1/lora"

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
# hashes (kohya train_util)


def _addnet_hash_safetensors(b: io.BytesIO) -> str:
    h = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(8 + n)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        h.update(chunk)
    return h.hexdigest()


def _addnet_hash_legacy(b: io.BytesIO) -> str:
    h = hashlib.sha256()
    b.seek(0x100000)
    h.update(b.read(0x10000))
    return h.hexdigest()[0:8]


def precalculate_safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them before saving (see the module docstring)."""
    from safetensors.torch import save

    ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in tensors.items()}, ss_meta)
    b = io.BytesIO(data)
    return _addnet_hash_safetensors(b), _addnet_hash_legacy(b)


def safetensors_file_hash(path: str | os.PathLike) -> str:
    """A1111 / additional-networks' hash of a .safetensors file: sha256 of everything after the header."""
    with open(path, "rb") as f:
        return _addnet_hash_safetensors(io.BytesIO(f.read()))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a whole file (A1111's full model hash; what ss_new_sd_model_hash holds for the base model)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# metadata


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _model_name(name: str) -> str:
    """File name only: never a directory of the user's machine (a hub id "owner/name" is kept)."""
    s = str(name)
    if _HUB_ID.match(s) and not os.path.exists(s):
        return s
    return Path(s.replace("\\", "/")).name


def _looks_like_local_path(s: str) -> bool:
    return os.path.isabs(s) or s.startswith("~") or bool(re.match(r"^[A-Za-z]:[\\/]", s)) or s.startswith("./") or s.startswith("../")


def _sanitise(value: Any) -> Any:
    """Replace local paths (anywhere in nested settings) by their file names."""
    if isinstance(value, os.PathLike):
        return Path(value).name
    if isinstance(value, str):
        return Path(value.replace("\\", "/")).name if _looks_like_local_path(value) else value
    if isinstance(value, Mapping):
        return {str(k): _sanitise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitise(v) for v in value]
    return value


def _to_str(value: Any) -> str:
    value = _sanitise(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)  # None -> "None", as kohya writes unset settings


def _resolution(value: Any) -> tuple[int, int]:
    if value is None:
        return (512, 512)
    if isinstance(value, (int, float)):
        return (int(value), int(value))
    if isinstance(value, str):
        nums = [int(x) for x in re.findall(r"\d+", value)]
        return (nums[0], nums[-1]) if nums else (512, 512)
    w, h = list(value)[:2]
    return (int(w), int(h))


def default_composed_prompt(tokens: Mapping[str, str]) -> str:
    """The composed prompt of METHOD.md from the token words (roles "source" and "reference")."""
    src, ref = tokens.get("source"), tokens.get("reference")
    if src and ref:
        return f"a photo of a {src} person in the style of {ref}"
    return " ".join(tokens.values())


_TRAINING_KEYS = {
    # training dict key -> ss_ key (kohya's names); each may be given under any of its aliases
    "learning_rate": "ss_learning_rate",
    "lr": "ss_learning_rate",
    "unet_lr": "ss_unet_lr",
    "text_encoder_lr": "ss_text_encoder_lr",
    "max_train_steps": "ss_max_train_steps",
    "steps": "ss_max_train_steps",
    "seed": "ss_seed",
    "mixed_precision": "ss_mixed_precision",
}
_REQUIRED_TRAINING = ("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_max_train_steps", "ss_seed",
                      "ss_resolution", "ss_network_args", "ss_mixed_precision")


def build_metadata(
    *,
    output_name: str,
    rank: int,
    alpha: float,
    unet_targets_preset: str,
    train_text_encoder: bool,
    tokens: Mapping[str, str],
    base_model_name: str | None,
    base_model_hash: str | None,
    training: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    composed_prompt: str | None = None,
    tag_frequency: Mapping[str, int] | None = None,
    date: str | None = None,
) -> dict[str, str]:
    """kohya / modelspec metadata for a LoRA file; every value a string, no path of the user's machine.

    `tokens` maps role -> token word ("source" -> the subject word, "reference" -> the style word).
    `training` holds the run's settings: learning_rate, unet_lr, text_encoder_lr, max_train_steps (or
    steps), seed, resolution (int, "512x512" or (w, h)), mixed_precision, network_args (dict), and any other
    key, written as ``ss_<key>`` (without max_train_steps, ss_max_train_steps is phase1_steps +
    phase2_steps when given). `composed_prompt` (or ``training["composed_prompt"]``; default METHOD.md's
    composed template) is the training comment and the trigger phrase. `tag_frequency` maps token word -> count (default 1 each). `date`
    (ISO 8601) defaults to now, UTC.
    """
    training = dict(training)
    res = _resolution(training.pop("resolution", None))
    prompt = composed_prompt or training.pop("composed_prompt", None) or default_composed_prompt(tokens)
    training.pop("composed_prompt", None)
    if not any(k in training for k in ("max_train_steps", "steps")):
        phases = [training[k] for k in ("phase1_steps", "phase2_steps") if training.get(k) is not None]
        if phases:
            training["max_train_steps"] = sum(int(n) for n in phases)
    freq = {w: int((tag_frequency or {}).get(w, 1)) for w in tokens.values()}
    network_args = {"unet_targets": unet_targets_preset}
    if train_text_encoder:
        network_args["text_encoder_targets"] = "q_proj,k_proj,v_proj,out_proj"
    network_args.update(dict(training.pop("network_args", {}) or {}))
    if date is None:
        date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()

    meta: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": int(rank),
        "ss_network_alpha": float(alpha),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": output_name,
        "ss_network_train_unet_only": str(not train_text_encoder),
        "ss_tag_frequency": {"magicapture": freq},
        "ss_training_comment": prompt,
        "ss_sd_model_name": _model_name(base_model_name) if base_model_name else None,
        "ss_resolution": str(res),
        "ss_network_args": network_args,
    }
    if base_model_hash:
        meta["ss_new_sd_model_hash"] = base_model_hash
    for key, value in training.items():
        ss_key = _TRAINING_KEYS.get(key, key if key.startswith("ss_") else f"ss_{key}")
        meta[ss_key] = value
    for ss_key in _REQUIRED_TRAINING:
        meta.setdefault(ss_key, None)

    meta.update(
        {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": MODELSPEC_ARCHITECTURE,
            "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
            "modelspec.title": output_name,
            "modelspec.resolution": f"{res[0]}x{res[1]}",
            "modelspec.date": date,
            "modelspec.trigger_phrase": prompt,
        }
    )
    out = {k: _to_str(v) for k, v in meta.items()}
    model_hash, legacy_hash = precalculate_safetensors_hashes(state_dict, out)
    out["sshs_model_hash"] = model_hash
    out["sshs_legacy_hash"] = legacy_hash
    return out


# --------------------------------------------------------------------------------------------------
# files


def _atomic_replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


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
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta or None)
        _atomic_replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors LoRA."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
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
    tmp = path.with_name(path.name + ".tmp")
    try:
        if legacy_pt:
            data = {
                "string_to_token": {"*": _A1111_STAR_TOKEN},
                "string_to_param": {"*": vec},
                "name": token,
                "step": int(step),
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
            }
            torch.save(data, str(tmp))
        else:
            from safetensors.torch import save_file

            meta = {"name": token, "step": str(int(step)), "vectors": str(vec.shape[0]), "dim": str(vec.shape[1])}
            save_file({"emb_params": vec}, str(tmp), metadata=meta)
        _atomic_replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_embedding(path: str | os.PathLike) -> tuple[str, torch.Tensor]:
    """(name, vectors [n, dim]) of an A1111 / kohya / diffusers embedding file (.safetensors, .pt, .bin)."""
    path = Path(path)
    name = path.stem
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
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
        data = torch.load(str(path), map_location="cpu", weights_only=True)
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
    a missing up/down, or a shape that does not fit raises before any weight changes. ``bundle_emb.*``
    tensors are embeddings, not modules, and are skipped.
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
        raise KeyError(f"{len(missing)} LoRA modules match no module of the model: {sorted(missing)[:5]}")
    with torch.no_grad():
        for module, delta in plan:
            module.weight.add_(delta.to(device=module.weight.device, dtype=module.weight.dtype))
    return len(plan)
