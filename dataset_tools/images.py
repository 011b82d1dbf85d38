"""What the dataset tools add to the shared image reader (`library.files.images`): which file names
they read, the smallest photo worth training on, and a fast PNG encoder for their outputs."""

from __future__ import annotations

import os

import numpy as np

from library.files.images import IMAGE_EXTENSIONS, IMAGE_EXTENSIONS_TEXT, ImageLoadError, LoadedImage, read_image

MIN_SHORT_SIDE = 64

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_EXTENSIONS_TEXT", "MIN_SHORT_SIDE", "ImageLoadError", "LoadedImage", "encode_png", "is_image_name",
           "load_image"]


def is_image_name(name: str) -> bool:
    """Whether the dataset tools read a file of this name (by extension, case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike, max_short_side: int = 1024) -> LoadedImage:
    """Read one photo for training: RGB, EXIF-rotated, short side capped at `max_short_side` (px).

    Raises ImageLoadError (one line) when it is unusable, including a short side under MIN_SHORT_SIDE.
    """
    return read_image(path, max_short_side=max_short_side, min_short_side=MIN_SHORT_SIDE)


def encode_png(arr: np.ndarray) -> bytes:
    """8-bit RGB [H, W, 3] or gray [H, W] -> PNG bytes, fast.

    zlib at level 1 through libpng's adaptive filters costs ~90 ms for a 1024 px RGB photo; the "Up"
    filter (one vectorised subtraction) with Huffman-only deflate gives files as small in ~25 ms.
    Masks (long runs of 0 and 255) use no filter and run-length deflate.
    """
    import zlib

    arr = np.ascontiguousarray(arr)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"encode_png wants uint8 [H, W] or [H, W, 3], got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    rows = arr.reshape(h, -1)
    out = np.empty((h, rows.shape[1] + 1), np.uint8)
    if arr.ndim == 3:
        color_type, strategy = 2, zlib.Z_HUFFMAN_ONLY
        out[:, 0] = 2  # Up
        out[0, 1:] = rows[0]
        np.subtract(rows[1:], rows[:-1], out=out[1:, 1:])  # uint8 arithmetic wraps mod 256, as PNG wants
    else:
        color_type, strategy = 0, zlib.Z_RLE
        out[:, 0] = 0  # None
        out[:, 1:] = rows
    comp = zlib.compressobj(1, zlib.DEFLATED, 15, 9, strategy)
    idat = comp.compress(out.data) + comp.flush()

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (
            len(payload).to_bytes(4, "big") + tag + payload
            + (zlib.crc32(payload, zlib.crc32(tag)) & 0xFFFFFFFF).to_bytes(4, "big")
        )

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, color_type, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
