"""Robust image loading for the dataset tools.

`load_image` turns whatever a user drops in a folder into an RGB PIL image with its EXIF orientation
applied, its short side at most `max_short_side` (never upscaled), or raises `ImageLoadError` with a
one-line, human-readable reason. Nothing here touches the input file beyond reading it.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MIN_SHORT_SIDE = 64


class ImageLoadError(Exception):
    """A file that cannot be used; str(exc) is the reason, one line."""


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, EXIF-rotated, resized
    original_size: tuple[int, int]  # (width, height) after EXIF rotation, before resizing
    warnings: list[str] = field(default_factory=list)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _megapixels(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}, {size[0] * size[1] / 1e6:.0f} MP"


def _open(path: Path) -> tuple[Image.Image, list[str]]:
    notes: list[str] = []
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(f"cannot read file ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageLoadError("empty file (0 bytes)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            m = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(m.group(1)) / 1e6:.0f} MP, " if m else ""
            raise ImageLoadError(
                f"image too large ({size}over the {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP "
                "decompression-bomb limit); downscale it first"
            ) from None
        except UnidentifiedImageError:
            raise ImageLoadError("not an image, or an unsupported/corrupt format") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(f"cannot open image ({_short(exc)})") from None
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        if im.format == "JPEG":
            notes.append(
                f"very large image ({_megapixels(im.size)}): decoded at reduced scale"
            )
        else:
            fmt = im.format
            im.close()
            raise ImageLoadError(
                f"image too large ({_megapixels(im.size)} > "
                f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP decompression-bomb limit for a {fmt}); "
                "downscale it first"
            )
    return im, notes


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        hi = float(arr.max()) if arr.size else 0.0
        if hi <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    arr = arr.astype(np.int64)
    hi = int(arr.max()) if arr.size else 0
    if im.mode.startswith("I;16") or hi > 255:
        arr = (arr + 128) // 257  # 16-bit range -> 8-bit
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def _icc_to_srgb(im: Image.Image, notes: list[str]) -> Image.Image:
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "CMYK"):
        return im
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        desc = (ImageCms.getProfileDescription(src) or "").lower()
        if im.mode == "RGB" and "srgb" in desc:
            return im
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # a broken profile is not worth losing the photo for
        notes.append("colour profile unreadable; colours used as stored")
        return im


def to_rgb(im: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    notes = notes if notes is not None else []
    mode = im.mode
    if mode == "RGB":
        return _icc_to_srgb(im, notes)
    if mode == "CMYK":
        out = _icc_to_srgb(im, notes)
        return out if out.mode == "RGB" else out.convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _to_8bit_gray(im).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def target_size(size: tuple[int, int], max_short_side: int) -> tuple[int, int]:
    w, h = size
    short = min(w, h)
    if short <= max_short_side:
        return w, h
    s = max_short_side / short
    # the short side lands exactly on max_short_side
    if w <= h:
        return max_short_side, max(1, round(h * s))
    return max(1, round(w * s)), max_short_side


def load_image(path: str | os.PathLike, max_short_side: int = 1024) -> LoadedImage:
    """Read one image file for training; raise ImageLoadError with the reason when it is unusable."""
    path = Path(path)
    im, notes = _open(path)
    try:
        w0, h0 = im.size
        if min(w0, h0) < MIN_SHORT_SIDE:
            raise ImageLoadError(
                f"too small ({w0}x{h0}; the short side must be at least {MIN_SHORT_SIDE} px)"
            )
        if getattr(im, "n_frames", 1) > 1:
            notes.append("animated/multi-frame file: using the first frame")
        # JPEG: decode at 1/2, 1/4 or 1/8 scale straight away when the photo is much bigger than needed.
        if im.format == "JPEG" and min(w0, h0) > max_short_side:
            s = max_short_side / min(w0, h0)
            try:
                im.draft(None, (max(1, math.ceil(w0 * s)), max(1, math.ceil(h0 * s))))
            except Exception:
                pass
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
            msg = _short(exc)
            if "truncated" in msg.lower():
                raise ImageLoadError(f"truncated image file ({msg})") from None
            raise ImageLoadError(f"corrupt image data ({msg})") from None
        except MemoryError:
            raise ImageLoadError("not enough memory to decode this image") from None
        rotated = im
        try:
            orientation = int(im.getexif().get(0x0112, 1) or 1)
        except Exception:
            orientation = 1
            notes.append("EXIF data unreadable: orientation not applied")
        if orientation != 1:  # exif_transpose copies the image even when there is nothing to do
            try:
                rotated = ImageOps.exif_transpose(im) or im
            except Exception:
                notes.append("EXIF orientation could not be applied")
        original_size = rotated.size
        rgb = to_rgb(rotated, notes)
        # JPEG drafts scale both sides alike, so original_size here is the drafted size; report the true one.
        if im.format == "JPEG" and (w0, h0) != (im.size[0], im.size[1]):
            scale = w0 / im.size[0]
            original_size = (round(original_size[0] * scale), round(original_size[1] * scale))
        tw, th = target_size(rgb.size, max_short_side)
        if (tw, th) != rgb.size:
            rgb = rgb.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
        if rgb.mode != "RGB":
            rgb = rgb.convert("RGB")
        result = LoadedImage(rgb, original_size, notes)
    except BaseException:
        im.close()
        raise
    if result.image is not im:
        im.close()
    else:  # the decoded file object is the result: drop its file handle, keep its pixels
        fp = getattr(im, "fp", None)
        if fp is not None and getattr(im, "_exclusive_fp", False):
            try:
                fp.close()
            except Exception:
                pass
        im.fp = None
    return result



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
