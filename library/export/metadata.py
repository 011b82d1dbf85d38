"""kohya / modelspec metadata of a LoRA file, and the hashes A1111 and kohya compare.

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
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from library import config
from library.models.family import FAMILIES, SD1, ModelFamily

MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
# kohya's ss_base_model_version -> the family (architecture, default resolution); SD 2.x is identified
# but not trained: its modelspec architecture (kohya's sai_model_spec name; 768 v-prediction is "-v") here
_FAMILY_OF_VERSION: dict[str, ModelFamily] = {f.base_model_version: f for f in FAMILIES.values()}
_OTHER_ARCHITECTURES = {"sd_v2": "stable-diffusion-v2-512"}

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


def _resolution(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, (int, float)):
        return (int(value), int(value))
    if isinstance(value, str):
        nums = [int(x) for x in re.findall(r"\d+", value)]
        return (nums[0], nums[-1]) if nums else (default, default)
    w, h = list(value)[:2]
    return (int(w), int(h))


def default_composed_prompt(tokens: Mapping[str, str]) -> str:
    """The composed prompt of docs/method.md from the token words (roles "source" and "reference")."""
    src, ref = tokens.get("source"), tokens.get("reference")
    if src and ref:
        return config.composed_prompt(src, ref)
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
    base_model_version: str = "sd_v1",
    v_parameterization: bool = False,
    vae_name: str | None = None,
    vae_hash: str | None = None,
) -> dict[str, str]:
    """kohya / modelspec metadata for a LoRA file; every value a string, no path of the user's machine.

    `tokens` maps role -> token word ("source" -> the subject word, "reference" -> the style word).
    `training` holds the run's settings: learning_rate, unet_lr, text_encoder_lr, max_train_steps (or
    steps), seed, resolution (int, "512x512" or (w, h)), mixed_precision, network_args (dict), and any other
    key, written as ``ss_<key>`` (without max_train_steps, ss_max_train_steps is phase1_steps +
    phase2_steps when given). `composed_prompt` (or ``training["composed_prompt"]``; default docs/method.md's
    composed template) is the training comment and the trigger phrase. `tag_frequency` maps token word -> count (default 1 each). `date`
    (ISO 8601) defaults to now, UTC. `base_model_version` (kohya's: sd_v1, sd_v2, sdxl_base_v1-0) and
    `v_parameterization` are what the base model was identified as (ss_base_model_version, ss_v2,
    ss_v_parameterization, modelspec.architecture, modelspec.prediction_type); the family of that
    version (:class:`ModelFamily`: ``architecture``, ``resolution``) gives modelspec.architecture and the
    resolution when `training` has none ("(1024, 1024)" / "1024x1024" for SDXL); `vae_name` / `vae_hash`
    (sha256 of the file) name a VAE that replaced the checkpoint's (ss_vae_name, ss_new_vae_hash).
    """
    known = [*_FAMILY_OF_VERSION, *_OTHER_ARCHITECTURES]
    if base_model_version not in known:
        raise ValueError(f"unknown base_model_version {base_model_version!r}; one of {', '.join(known)}")
    family = _FAMILY_OF_VERSION.get(base_model_version, SD1)
    architecture = _OTHER_ARCHITECTURES.get(base_model_version, family.architecture)
    if base_model_version == "sd_v2" and v_parameterization:
        architecture = "stable-diffusion-v2-768-v"
    training = dict(training)
    res = _resolution(training.pop("resolution", None), family.resolution)
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
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version == "sd_v2"),
        "ss_v_parameterization": str(bool(v_parameterization)),
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
    if vae_name:
        meta["ss_vae_name"] = _model_name(vae_name)
    if vae_hash:
        meta["ss_new_vae_hash"] = vae_hash
    for key, value in training.items():
        ss_key = _TRAINING_KEYS.get(key, key if key.startswith("ss_") else f"ss_{key}")
        meta[ss_key] = value
    for ss_key in _REQUIRED_TRAINING:
        meta.setdefault(ss_key, None)

    meta.update(
        {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{architecture}/lora",
            "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
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
