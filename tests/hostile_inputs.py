"""Hostile files built in memory for test_hostile_files.py and test_fuzz.py (no binary fixtures).

- pickles whose unpickling would create a marker file: the payload object's ``__reduce__`` returns
  ``(open, (marker, "w"))`` or ``(exec, ("open(marker, 'w').close()",))``; written as torch.save's zip
  format, its legacy format, and a bare pickle (what an old ``.ckpt`` / ``.pth`` / ``.pt`` can be);
- safetensors files whose header lies: data offsets past the end of the file (1 GiB claimed), a shape of
  [2**40, 2**40], a header-length field of 2**60, a header-length field past the end of the file;
- images whose header claims 100000 x 100000 pixels with a few bytes of data (PNG, BMP).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PICKLE_FORMS = ("zip", "legacy", "raw")
PAYLOADS = ("open", "exec")


class _OpenMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _ExecMarker(_OpenMarker):
    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def write_hostile_pickle(path: Path, marker: Path, form: str = "zip", payload: str = "open") -> Path:
    """A weights-looking file (a state_dict with one tensor) that also carries the marker payload."""
    import torch

    evil = (_OpenMarker if payload == "open" else _ExecMarker)(marker)
    obj = {"state_dict": {"weight": torch.zeros(2)}, "params_ema": evil, "string_to_param": {"*": evil}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "zip":
        torch.save(obj, path)
    elif form == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, as very old checkpoints are
        path.write_bytes(pickle.dumps({"weight": [0.0, 0.0], "x": evil}, protocol=2))
    return path


# ---------------------------------------------------------------------------------------- safetensors


def safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """An 8-byte little-endian header length (the real one unless `length`), the header, then `data`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GIB = 2**30


def lying_safetensors(name: str) -> dict[str, tuple[bytes, str]]:
    """{lie: (file bytes, what it claims)} for one tensor called `name`."""
    honest = {name: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    body = safetensors_bytes(honest, bytes(16))
    return {
        # a consistent 1 GiB tensor whose bytes are not there: a reader that trusted it would allocate 1 GiB
        "offsets_past_end": (safetensors_bytes({name: {"dtype": "F32", "shape": [2**28], "data_offsets": [0, GIB]}},
                                               bytes(16)), "1 GiB of data"),
        "absurd_shape": (safetensors_bytes({name: {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},
                                           bytes(16)), "a [2**40, 2**40] tensor"),
        "header_length_2_60": (struct.pack("<Q", 2**60) + body[8:], "a 2**60-byte header"),
        "header_length_past_end": (struct.pack("<Q", len(body) + 4096) + body[8:], "a header longer than the file"),
    }


# ---------------------------------------------------------------------------------------------- images


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(tag)) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR says width x height RGB and whose IDAT holds one short row: ~70 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + bytes(30))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bmp_claiming(width: int, height: int) -> bytes:
    """A 24-bit BMP whose header says width x height and which carries 64 bytes of pixels."""
    pixels = bytes(64)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    head = struct.pack("<2sIHHI", b"BM", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return head + info + pixels


BOMBS = {"bomb.png": png_claiming(100_000, 100_000), "bomb.bmp": bmp_claiming(100_000, 100_000)}


def photo_like(size: tuple[int, int] = (96, 80), seed: int = 0) -> Image.Image:
    """A smooth RGB picture (gradients and a disc) that encodes small and decodes exactly in PNG."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(40, 200, 3)
    arr = np.stack([(base[c] + 40 * np.sin(xx / (7 + c) + yy / 11)) for c in range(3)], -1)
    disc = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 4) ** 2
    arr[disc] = (224, 172, 140)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()
