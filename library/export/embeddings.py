"""A1111 embedding files, per model family, and embeddings bundled in a LoRA.

One file per token, named after the token (A1111 names an embedding after its file):

* SD 1.x: ``<token>.safetensors`` holding one tensor ``emb_params`` [n, 768]; or the legacy ``.pt`` pickle
  ``{"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name", "step", "sd_checkpoint",
  "sd_checkpoint_name"}``.
* SDXL: ``<token>.safetensors`` holding ``clip_l`` [n, 768] (the CLIP-L text encoder's rows) and ``clip_g``
  [n, 1280] (OpenCLIP-G's), what A1111, Forge, ComfyUI and InvokeAI read. No .pt form.

The tensor names come from the family (:attr:`ModelFamily.embedding_keys`); vectors travel as a mapping
``{embedding key: tensor [n, dim]}`` in the family's text-encoder order.

Bundled in a LoRA (opt-in; diffusers' kohya loader refuses such files): ``bundle_emb.<token>.<key>`` with
the family's :attr:`ModelFamily.bundle_embedding_keys` -- ``string_to_param.*`` for SD 1.x (kohya's name;
A1111's networks.py takes a bundle's single tensor, ComfyUI's sd1_clip.py looks for exactly this name and
otherwise falls back to the file's first tensor), ``clip_l`` / ``clip_g`` for SDXL (both read them). Files
this project wrote before used ``bundle_emb.<token>.emb_params`` for SD 1.x; readers accept it too.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping

import torch

from library.files.atomic import write_safetensors, write_torch
from library.files.weights import load_pickled_weights, open_safetensors
from library.models.family import FAMILIES, SD1, ModelFamily

BUNDLE_PREFIX = "bundle_emb."
# A1111 writes this fixed token id into every legacy .pt embedding (the id of "*").
_A1111_STAR_TOKEN = 265
# bundle names this project wrote before (read, never written): SD 1.x's "emb_params"
_OLD_BUNDLE_KEYS = {"string_to_param.*": ("emb_params",)}


def family_of_vectors(vectors: Mapping[str, torch.Tensor]) -> ModelFamily:
    """The family whose ``embedding_keys`` are exactly the mapping's keys; ValueError (one line) otherwise."""
    for family in FAMILIES.values():
        if set(vectors) == set(family.embedding_keys):
            return family
    expected = " or ".join(f"{f.label}: ({', '.join(f.embedding_keys)})" for f in FAMILIES.values())
    raise ValueError(f"embedding vectors keyed ({', '.join(vectors)}); expected {expected}")


def as_vectors(vectors: torch.Tensor | Mapping[str, torch.Tensor], family: ModelFamily = SD1) -> dict[str, torch.Tensor]:
    """``{embedding key: [n, dim]}``: a bare tensor is the one text encoder's rows of a one-encoder family."""
    if isinstance(vectors, torch.Tensor):
        if len(family.embedding_keys) != 1:
            raise ValueError(f"{family.label} embeddings need vectors for {', '.join(family.embedding_keys)}, not one tensor")
        vectors = {family.embedding_keys[0]: vectors}
    out = {}
    for key, vec in vectors.items():
        vec = vec[None] if vec.ndim == 1 else vec
        if vec.ndim != 2:
            raise ValueError(f"embedding vectors must be [n, dim], got {tuple(vec.shape)} for {key}")
        out[key] = vec
    if len({v.shape[0] for v in out.values()}) > 1:
        raise ValueError(f"every text encoder needs the same number of vectors, got {[tuple(v.shape) for v in out.values()]}")
    return out


def save_embedding(
    path: str | os.PathLike,
    token: str,
    vectors: torch.Tensor | Mapping[str, torch.Tensor],
    legacy_pt: bool = False,
    step: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write one token's embedding, atomically; returns the file written.

    `vectors`: [n, dim] (SD 1.x) or ``{embedding key: [n, dim]}`` keyed by a family's ``embedding_keys``
    (``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` for SDXL), which also decides the family. `path` is
    the file (or a folder, where ``<token>.safetensors`` / ``<token>.pt`` is written). A1111 names an
    embedding after its file, so a file stem other than the token gets a warning. `legacy_pt` (SD 1.x
    only) writes A1111's pickle. ValueError for vectors of no family's shape.
    """
    vecs = as_vectors(vectors)
    family = family_of_vectors(vecs)
    path = Path(path)
    suffix = ".pt" if legacy_pt else ".safetensors"
    if path.is_dir():
        path = path / f"{token}{suffix}"
    if path.stem != token:
        warnings.warn(f"A1111 will call this embedding {path.stem!r}, not {token!r}", stacklevel=2)
    vecs = {k: v.detach().to(device="cpu", dtype=dtype).clone().contiguous() for k, v in vecs.items()}
    if legacy_pt:
        if len(vecs) != 1:
            raise ValueError(f"A1111's .pt embeddings hold one text encoder's vectors; {family.label} embeddings are .safetensors only")
        data = {
            "string_to_token": {"*": _A1111_STAR_TOKEN},
            "string_to_param": {"*": next(iter(vecs.values()))},
            "name": token,
            "step": int(step),
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
        }
        return write_torch(path, data)

    first = next(iter(vecs.values()))
    meta = {"name": token, "step": str(int(step)), "vectors": str(first.shape[0]),
            "dim": ",".join(str(v.shape[1]) for v in vecs.values())}
    return write_safetensors(path, vecs, meta)


def _file_vectors(path: Path) -> tuple[str, dict[str, torch.Tensor] | torch.Tensor]:
    """(name, one tensor or the multi-encoder tensors by name) as the file holds them."""
    name = path.stem
    multi = [f.embedding_keys for f in FAMILIES.values() if len(f.embedding_keys) > 1]
    if path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            name = meta.get("name", name)
            for names in multi:
                if set(names) <= set(keys):
                    return name, {k: f.get_tensor(k) for k in names}
            if "emb_params" in keys:
                key = "emb_params"
            elif "string_to_param.*" in keys:
                key = "string_to_param.*"
            elif len(keys) == 1:
                key = keys[0]
                name = meta.get("name", key)
            else:
                raise ValueError(f"{path.name}: not an embedding (tensors {keys})")
            return name, f.get_tensor(key)
    data = load_pickled_weights(path)
    if isinstance(data, torch.Tensor):
        return name, data
    if isinstance(data, dict):
        for names in multi:
            if set(names) <= set(data):
                return name, {k: data[k] for k in names}
        if "string_to_param" in data and isinstance(data["string_to_param"], dict) and "*" in data["string_to_param"]:
            return str(data.get("name") or name), data["string_to_param"]["*"]
        if "emb_params" in data:
            return name, data["emb_params"]
        if len(data) == 1:
            return next(iter(data.items()))
    raise ValueError(f"{path.name}: not an embedding")


def load_embedding_vectors(path: str | os.PathLike, family: ModelFamily) -> tuple[str, dict[str, torch.Tensor]]:
    """(name, ``{embedding key: [n, dim]}`` keyed by ``family.embedding_keys``) of an embedding file.

    Reads A1111 / kohya / diffusers embeddings (.safetensors, .pt, .bin; pickles as plain tensors only).
    ValueError, one line naming the file: no embedding in it, or an embedding of the other family (an SDXL
    ``clip_l`` / ``clip_g`` file for an SD 1.x model or the reverse); a WeightsFileError for a file that
    cannot be read safely.
    """
    path = Path(path)
    name, found = _file_vectors(path)
    file_family = family_of_vectors(found) if isinstance(found, dict) else SD1
    if file_family != family:
        held = ", ".join(found) if isinstance(found, dict) else "one tensor"
        raise ValueError(f"{path.name}: an {file_family.label} embedding ({held}) but the model is {family.label}: "
                         f"use the embedding trained for this base model")
    tensors = found if isinstance(found, dict) else {family.embedding_keys[0]: found}
    for key, vec in tensors.items():
        if not isinstance(vec, torch.Tensor) or not vec.is_floating_point() or vec.ndim not in (1, 2):
            raise ValueError(f"{path.name}: not an embedding (expected float vectors [n, dim] for {key})")
    try:
        return str(name), as_vectors(tensors, family)
    except ValueError as err:
        raise ValueError(f"{path.name}: {err}") from err


def load_embedding(path: str | os.PathLike) -> tuple[str, torch.Tensor]:
    """(name, vectors [n, dim]) of an SD 1.x embedding file; see :func:`load_embedding_vectors`."""
    name, vectors = load_embedding_vectors(path, SD1)
    return name, vectors[SD1.embedding_keys[0]]


# --------------------------------------------------------------------------------------------------
# bundled in a LoRA


def bundle_tensor_names(token: str, family: ModelFamily) -> dict[str, tuple[str, ...]]:
    """``{embedding key: tensor names in a LoRA}`` for a bundled embedding; the first name is the one written."""
    return {
        key: tuple(f"{BUNDLE_PREFIX}{token}.{k}" for k in (bundle_key, *_OLD_BUNDLE_KEYS.get(bundle_key, ())))
        for key, bundle_key in zip(family.embedding_keys, family.bundle_embedding_keys)
    }


def bundle_tensors(
    bundle: Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]], family: ModelFamily = SD1
) -> dict[str, torch.Tensor]:
    """The ``bundle_emb.*`` tensors for `bundle` (token -> vectors, as :func:`save_embedding` takes them)."""
    out = {}
    for token, vectors in bundle.items():
        vecs = as_vectors(vectors, family)
        names = bundle_tensor_names(token, family)
        if set(vecs) != set(names):
            raise ValueError(f"bundled embedding {token!r}: vectors for ({', '.join(vecs)}), {family.label} needs ({', '.join(names)})")
        for key, vec in vecs.items():
            out[names[key][0]] = vec.detach().to("cpu").contiguous()
    return out


def bundled_tokens(tensor_names: list[str], family: ModelFamily) -> set[str]:
    """Token words whose whole embedding (every text encoder's tensor) the LoRA's tensors carry."""
    candidates = {k[len(BUNDLE_PREFIX) :].split(".", 1)[0] for k in tensor_names if k.startswith(BUNDLE_PREFIX)}
    present = set(tensor_names)
    return {
        token for token in candidates
        if all(any(n in present for n in names) for names in bundle_tensor_names(token, family).values())
    }
