"""Textual-inversion embeddings of the Qwen3 text encoder (Z-Image, FLUX.2 Klein), one file per token, as
ComfyUI reads them (``embedding:NAME`` in a prompt).

ComfyUI's ``sd1_clip.load_embed`` opens ``NAME.safetensors`` and takes the tensor under the tokenizer's
``embedding_key`` (falling back to the file's only tensor), [n, embedding_size]; the Qwen3 tokenizers of
these families say ``embedding_key='qwen3_4b'``, ``embedding_size=2560`` (Qwen3-4B: Z-Image, Klein 4B)
and ``'qwen3_8b'``, ``4096`` (Qwen3-8B: Klein 9B) -- comfy/text_encoders/z_image.py and flux.py; the
family's :attr:`~library.models.dit_family.DitFamily.embedding_key`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from library.files.atomic import write_safetensors
from library.models.dit_family import DitFamily


def dit_embedding_tensors(vectors: torch.Tensor, family: DitFamily, width: int | None = None) -> dict[str, torch.Tensor]:
    """``{family.embedding_key: vectors}`` for one token's rows [n, width] (a 1-D vector is one row), fp32,
    contiguous. `width`: the text encoder's hidden size the rows must have (default the real encoder's,
    ``family.text_width``). ValueError (one line) for other shapes."""
    rows = vectors[None] if vectors.ndim == 1 else vectors
    width = family.text_width if width is None else width
    if rows.ndim != 2 or rows.shape[1] != width or rows.shape[0] == 0:
        raise ValueError(f"{family.label} embedding rows must be [n, {width}] (n >= 1), got {tuple(vectors.shape)}")
    return {family.embedding_key: rows.detach().to(device="cpu", dtype=torch.float32).contiguous()}


def save_dit_embedding(folder: str | os.PathLike, token: str, vectors: torch.Tensor, family: DitFamily,
                       width: int | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write ``folder/<token>.safetensors`` (:func:`dit_embedding_tensors`) atomically; returns its path.
    ComfyUI names an embedding after its file, so the file is named after the token."""
    path = Path(folder) / f"{token}.safetensors"
    write_safetensors(path, dit_embedding_tensors(vectors, family, width), metadata=metadata)
    return path
