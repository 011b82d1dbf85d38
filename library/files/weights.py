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

from library.files.messages import UserError, one_line

__all__ = ["WeightsFileError", "check_weights_file", "describe_load_error", "load_pickled_weights", "load_safetensors",
           "non_finite_summary", "not_weights", "open_safetensors"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_UNSUPPORTED = re.compile(r"WeightsUnpickler error:\s*(\S.*?)\s*(?:\n|$)")


class WeightsFileError(UserError, ValueError):
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
    except MemoryError as err:
        raise WeightsFileError(path, "not enough memory to read it") from err
    except Exception as err:  # noqa: BLE001 - every failure of a weights file is one line
        refused, why = _load_failure(err)
        raise WeightsFileError(path, not_weights(path) or why, refused=refused) from err


def _safetensors_error(path: Path, err: BaseException) -> WeightsFileError:
    instead = not_weights(path)
    if instead:
        return WeightsFileError(path, instead)
    text = one_line(err, 200).removeprefix("Error while deserializing header: ")
    if "header too large" in text.lower():
        try:
            with open(path, "rb") as f:
                claimed = int.from_bytes(f.read(8), "little")
            text = f"its header claims {claimed / 2**20:,.0f} MiB, over the 100 MB a header may have"
        except OSError:
            pass
        return WeightsFileError(path, f"not a readable .safetensors file ({text}): damaged, or not a .safetensors file")
    if "not fully covered" in text or "incomplete" in text.lower():
        return WeightsFileError(path, f"not a readable .safetensors file (truncated: it ends before the tensors its "
                                      f"header lists, at {os.path.getsize(path):,} bytes); download it again")
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
        raise _safetensors_error(path, err) from err
    try:
        with handle as f:
            yield f
    except (SafetensorError, OverflowError) as err:  # a tensor the header admitted but torch cannot build
        raise _safetensors_error(path, err) from err


def load_safetensors(path: str | os.PathLike) -> dict:
    """Every tensor of a .safetensors file on the CPU, {name: tensor}; errors as `open_safetensors`."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --------------------------------------------------------------------------------------------------
# what a file is when it is not weights, and the cheap check a run makes of every weights file it needs

_SNIFF_BYTES = 1024
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def not_weights(path: str | os.PathLike) -> str | None:
    """What `path` is when its first bytes show it cannot be weights, as one line with the fix; None when
    they could be.

    Reads at most 1 KiB. Recognised: an empty file; a Git LFS pointer (a clone without ``git lfs pull``,
    or a download of the pointer: ``version https://git-lfs.github.com/spec/v1``, ``oid``, ``size``); a web
    page (a download that saved the site's HTML, e.g. a login or an error page); any other text file
    (weights files are binary: safetensors start with a little-endian length, pickles with ``0x80``, torch
    zips with ``PK``).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return None  # the caller's own reader says why it cannot be read
    if not head:
        return "an empty file (0 bytes); download it again"
    if head.startswith(_LFS_POINTER):
        size = re.search(rb"\nsize (\d+)", head)
        real = f" of a {int(size.group(1)) / 2**30:.2f} GiB file" if size else ""
        return (f"a Git LFS pointer{real} ({os.path.getsize(path)} bytes), not the weights; run `git lfs pull` "
                f"in the repository it came from, or download the file itself")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in text[:256]:
        return ("a web page (HTML), not weights: the download saved a page (a login, an error or the model's "
                "page) instead of the file; download the file itself (on Hugging Face the 'download' link, /resolve/)")
    if text and all(32 <= b < 127 or b in b"\t\r\n" for b in head[:256]) and not head.startswith((b"PK", b"\x80")):
        # a safetensors header length would need 8 printable bytes: a header of over 2**61 bytes
        return f"a text file ({one_line(head[:40].decode('ascii'), 60)!r}...), not weights; download the file itself"
    return None


COMPONENT_SUFFIXES = (".safetensors", ".bin")  # what diffusers and transformers read from a component folder


def check_weights_in(path: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """The weights files `path` stands for, each checked by :func:`check_weights_file`: `path` itself when
    it is a file, else the ``.safetensors`` / ``.bin`` files in the folder (and its sub-folders when
    `recursive`), sorted. Raises FileNotFoundError when `path` does not exist, WeightsFileError (one line
    naming the file) for the first file that could not be read."""
    path = Path(path)
    if not path.is_dir():
        check_weights_file(path)
        return [path]
    found = path.rglob("*") if recursive else path.iterdir()
    files = sorted(p for p in found if p.suffix in COMPONENT_SUFFIXES and p.is_file())
    for file in files:
        check_weights_file(file)
    return files


def check_weights_file(path: str | os.PathLike) -> None:
    """Check, cheaply, that a weights file could be read, before anything is built from it.

    Reads the first KiB (:func:`not_weights`), and by suffix: a ``.safetensors`` header through
    ``safe_open`` (its length against 100 MB and the file size, every tensor's byte range inside the
    file: a truncated file fails here), a torch zip's central directory (a truncated ``.ckpt`` / ``.pt`` /
    ``.pth`` / ``.bin`` fails here). No tensor data is read: memory stays at the header's size.
    Raises FileNotFoundError for a missing file and WeightsFileError (one line naming the file) otherwise.
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    instead = not_weights(path)
    if instead:
        raise WeightsFileError(path, instead)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        with open_safetensors(path):
            pass
    elif suffix in _PICKLE_SUFFIXES:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK"):
            try:
                with zipfile.ZipFile(path) as archive:  # reads the central directory at the file's end only
                    archive.infolist()
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
                raise WeightsFileError(path, f"truncated or corrupt (its zip archive is incomplete: {one_line(err, 80)}); "
                                             "download it again") from err
        elif not magic.startswith(b"\x80"):  # neither torch's zip format nor a legacy pickle
            raise WeightsFileError(path, "not a PyTorch weights file (neither a zip archive nor a pickle); "
                                         "download it again")


def non_finite_summary(tensors: dict[str, Any]) -> str | None:
    """None when every floating-point tensor in `tensors` (nested dicts and lists are searched, e.g. an
    optimiser state) is finite; else one line such as ``23104 NaN and 0 infinite values in 12 tensors
    (first: lora_unet_...)``."""
    import torch

    nan = inf = count = 0
    first = ""

    def visit(name: str, value: Any) -> None:
        nonlocal nan, inf, count, first
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel():
                bad_nan = int(torch.isnan(value).sum())
                bad_inf = int(torch.isinf(value).sum())
                if bad_nan or bad_inf:
                    nan, inf, count = nan + bad_nan, inf + bad_inf, count + 1
                    first = first or name
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{name}.{key}" if name else str(key), item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{name}.{i}" if name else str(i), item)

    visit("", tensors)
    if not count:
        return None
    return f"{nan} NaN and {inf} infinite values in {count} tensor{'s' if count > 1 else ''} (first: {one_line(first, 120)})"
