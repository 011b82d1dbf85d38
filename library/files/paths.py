"""How a path value is read: the one rule for telling a Hugging Face hub id from a path on disk."""

from __future__ import annotations

from pathlib import Path


def looks_like_hub_id(value: str) -> bool:
    """Whether `value` names a hub repository ("runwayml/stable-diffusion-v1-5", or a bare "gpt2") rather
    than a path: nothing of that name on disk, no file suffix, at most one "/", and not written as a path
    (a leading ".", "/" or "~")."""
    text = str(value)
    return (bool(text) and text.count("/") <= 1 and not Path(text).suffix
            and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists())
