"""Weights files read without running code in them; every failure is one line that names the file.

Pickle-based files (.ckpt, .pt, .pth, .bin) go through torch's weights_only unpickler, which builds
tensors and plain containers and refuses every other global: a file whose unpickling would call
``open``, ``exec`` or import anything is refused before any of it runs. torch's own refusal is a
multi-paragraph message with terminal escapes that advises ``weights_only=False``, which is exactly what
must not be done with a file from elsewhere; here it becomes "refused: unpickling it would call X".

Safetensors files go through ``safe_open``, which checks the header before it maps any data (header
length against 100 MB and the file size, every tensor's offsets against the file, shape times dtype size
against its byte range), so a header that lies is refused without allocating what it claims. Its error
text can quote tensor names, which may hold newlines: it is flattened to one line here too.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from library.files.messages import one_line

__all__ = ["WeightsFileError", "describe_load_error", "load_pickled_weights", "load_safetensors", "open_safetensors"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_UNSUPPORTED = re.compile(r"WeightsUnpickler error:\s*(\S.*?)\s*(?:\n|$)")


class WeightsFileError(ValueError):
    """A weights file that cannot be read safely or at all; str() is one line naming the file.

    `reason` is the message without the file name; `refused` is true when the file was refused for what
    unpickling it would do (not merely broken)."""

    def __init__(self, path: Path, reason: str, refused: bool = False):
        super().__init__(f"{path}: {reason}")
        self.reason = reason
        self.refused = refused


def _causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and what it was raised from or during (libraries wrap torch.load's error in their own)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _load_failure(err: BaseException) -> tuple[bool, str]:
    """(refused, why) for a failed torch.load(weights_only=True), `why` one line without the path."""
    for cause in _causes(err):
        text = str(cause)
        if isinstance(cause, pickle.UnpicklingError) and "WeightsUnpickler error" in text:
            found = _GLOBAL.search(text)
            if found:
                return True, (f"refused: unpickling it would call {found.group(1)} (code, not weights; nothing ran); "
                              "use a .safetensors file from a source you trust")
            detail = _UNSUPPORTED.search(text)
            return True, (f"refused: not a plain-tensor pickle ({one_line(detail.group(1) if detail else text, 120)}); "
                          "only tensors and plain containers are read")
        if isinstance(cause, RuntimeError) and "zip archive" in text:
            return False, "truncated or corrupt (its zip archive is incomplete)"
        if isinstance(cause, EOFError):
            return False, "empty or truncated"
    return False, f"not a PyTorch weights file ({type(err).__name__}: {one_line(err, 160)})"


def describe_load_error(err: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in one line without the path (the caller adds it);
    starts with "refused" when the file was refused for what unpickling it would do."""
    return _load_failure(err)[1]


def load_pickled_weights(path: str | os.PathLike) -> Any:
    """Read a .ckpt/.pt/.pth/.bin with ``torch.load(map_location="cpu", weights_only=True)``.

    Returns what the file holds (tensors in plain dicts, lists, numbers, strings). Raises
    FileNotFoundError for a missing file and WeightsFileError (one line, naming the file) for anything
    that cannot be read as plain tensors, a pickle that would run code among them.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise WeightsFileError(path, "not enough memory to read it") from None
    except Exception as err:  # noqa: BLE001 - every failure of a weights file is one line
        refused, why = _load_failure(err)
        raise WeightsFileError(path, why, refused=refused) from None


def _safetensors_error(path: Path, err: BaseException) -> WeightsFileError:
    text = one_line(err, 200).removeprefix("Error while deserializing header: ")
    return WeightsFileError(path, f"not a readable .safetensors file ({text})")


@contextmanager
def open_safetensors(path: str | os.PathLike, device: str = "cpu") -> Iterator[Any]:
    """``safe_open(path, framework="pt")`` whose header errors (and tensor read errors inside the block)
    are one-line WeightsFileErrors naming the file; FileNotFoundError for a missing file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError, ValueError, TypeError, OverflowError) as err:
        raise _safetensors_error(path, err) from None
    try:
        with handle as f:
            yield f
    except (SafetensorError, OverflowError) as err:  # a tensor the header admitted but torch cannot build
        raise _safetensors_error(path, err) from None


def load_safetensors(path: str | os.PathLike) -> dict:
    """Every tensor of a .safetensors file on the CPU, {name: tensor}; errors as `open_safetensors`."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}
