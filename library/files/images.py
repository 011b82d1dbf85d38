"""The one image reader: every entry point (dataset tools, training data, post-processing) reads through it.

`read_image` turns whatever a user gives into an 8-bit RGB (or gray) PIL image, the same pixels whatever
the file's storage: its EXIF orientation applied; CMYK and colour-profiled RGB converted to sRGB; 16-bit
and float images scaled to 8 bits (rounded, 65535 -> 255); palette images expanded; **transparency
composited on white** (the page colour a viewer shows, and what A1111 flattens onto by default), also for
masks, where a transparent pixel therefore reads as white (trains). Optionally its short side is capped.
A file that cannot be used raises `ImageLoadError` whose text is one human-readable line (the caller adds
the file name). Nothing here changes the input file. Decompression bombs (over PIL's pixel limit) are
refused before decoding, except JPEGs read with a `max_short_side` (under twice the limit, where PIL stops),
which are decoded at reduced scale where PIL's draft allows.

Formats: what Pillow reads, plus HEIC/HEIF (iPhone photos) through pillow-heif's opener, registered once
here; AVIF through Pillow's own plugin (Pillow >= 11.3 wheels), else pillow-heif's where its version has
one. libheif turns a HEIC upright itself (its rotation and mirror boxes) and pillow-heif then reports EXIF
orientation 1, so the orientation is applied once. An animated GIF/WebP/AVIF or a HEIC holding several
images gives its first frame (a HEIC's primary image), with the note "animated/multi-frame file: using the
first frame".
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
from PIL import Image, ImageOps, UnidentifiedImageError, features

from library.files.messages import UserError, one_line

ALPHA_BACKGROUND = (255, 255, 255)  # transparency is composited on white, everywhere
# what a folder of photos is read for, everywhere (prepare, the page's uploads, evaluation)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".heic", ".heif", ".avif")
IMAGE_EXTENSIONS_TEXT = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)  # "jpg, jpeg, png, ...", for messages
HEIF_EXTENSIONS = (".heic", ".heif")
PILLOW_HEIF_PIN = "pillow-heif==1.9.0"  # requirements.txt's pin, named in the one-line error


def _register_openers() -> dict[str, bool]:
    """Register pillow-heif's HEIF opener (and its AVIF one when Pillow has no AVIF plugin) with PIL, once
    per process; {"heif": readable, "avif": readable}. Thumbnails, depth and auxiliary images are not
    decoded: only the primary image is used."""
    avif = bool(features.check("avif"))
    try:
        import pillow_heif
    except ImportError:
        return {"heif": False, "avif": avif}
    options = {"thumbnails": False, "depth_images": False, "aux_images": False}
    pillow_heif.register_heif_opener(**options)
    if not avif and hasattr(pillow_heif, "register_avif_opener"):  # pillow-heif < 1.0 only
        pillow_heif.register_avif_opener(**options)
        avif = True
    return {"heif": True, "avif": avif}


READABLE = _register_openers()


def _format_missing(path: Path) -> str | None:
    """Why a file of this extension cannot be read in this install (a package to add), else None."""
    ext = path.suffix.lower()
    if ext in HEIF_EXTENSIONS and not READABLE["heif"]:
        return f"HEIC/HEIF needs pillow-heif ; pip install {PILLOW_HEIF_PIN}"
    if ext == ".avif" and not READABLE["avif"]:
        return "AVIF needs Pillow >= 11.3 (its wheels read AVIF) ; pip install -U pillow"
    return None


class ImageLoadError(UserError, ValueError):
    """A file that cannot be used; str(exc) is the reason, one line, without the file name."""


@dataclass
class LoadedImage:
    """What `read_image` returns."""

    image: Image.Image  # "RGB" (or "L" when asked), 8 bits, EXIF-rotated, resized
    original_size: tuple[int, int]  # (width, height) after EXIF rotation, before resizing
    warnings: list[str] = field(default_factory=list)  # one-line notes (first frame used, profile unreadable)


def _megapixels(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}, {size[0] * size[1] / 1e6:.0f} MP"


def _open(path: Path, max_short_side: int | None) -> tuple[Image.Image, list[str]]:
    """Open (not decode) `path`. Between PIL's pixel limit and twice it (where PIL itself stops) only a
    JPEG that will be shrunk (`max_short_side`) is kept, to be decoded at reduced scale where PIL's draft
    allows; anything else over the limit is refused before it is decoded."""
    notes: list[str] = []
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(f"cannot read file ({exc.strerror or exc})") from exc
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
            ) from exc
        except UnidentifiedImageError as err:
            raise ImageLoadError(_format_missing(path) or "not an image, or an unsupported/corrupt format") from err
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError(f"cannot open image ({one_line(exc, 160)})") from exc
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        # a JPEG draft decodes at 1/2 to 1/8 scale: enough to stay far below the limit
        if im.format == "JPEG" and max_short_side is not None:
            notes.append(f"very large image ({_megapixels(im.size)})")  # read_image says at which scale
        else:
            fmt = im.format
            im.close()
            raise ImageLoadError(
                f"image too large ({_megapixels(im.size)} > "
                f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP decompression-bomb limit for a {fmt}); "
                "downscale it first"
            )
    return im, notes


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
    """Any PIL image -> 8-bit "RGB" with the same look; transparency is composited on `ALPHA_BACKGROUND`.

    16-bit and 32-bit integer images are scaled 65535 -> 255 with rounding; float images in [0, 1] are
    scaled to [0, 255]; CMYK and RGB with an ICC profile are converted to sRGB (CMYK without a profile:
    R = (255 - C)(255 - K) / 255, PIL's naive formula). Notes about what could not be honoured are
    appended to `notes`. The input is not modified; an "RGB" image without a profile is returned as is.
    """
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
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def target_size(size: tuple[int, int], max_short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at most `max_short_side` pixels, aspect kept (never enlarged)."""
    w, h = size
    short = min(w, h)
    if short <= max_short_side:
        return w, h
    s = max_short_side / short
    # the short side lands exactly on max_short_side
    if w <= h:
        return max_short_side, max(1, round(h * s))
    return max(1, round(w * s)), max_short_side


def read_image(
    path: str | os.PathLike, *, mode: str = "RGB", max_short_side: int | None = None, min_short_side: int = 1
) -> LoadedImage:
    """Read one image file as 8-bit `mode` ("RGB", or "L" for masks: gray of the RGB reading).

    `max_short_side`: shrink (LANCZOS) so the short side is at most this many pixels; None keeps the
    size. `min_short_side`: a smaller image is refused. Multi-frame files give their first frame.
    Raises ImageLoadError (one line: empty, not an image, truncated, too large, too small, ...).
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"read_image: mode must be 'RGB' or 'L', not {mode!r}")
    path = Path(path)
    im, notes = _open(path, max_short_side)
    try:
        w0, h0 = im.size
        if min(w0, h0) < min_short_side:
            raise ImageLoadError(
                f"too small ({w0}x{h0}; the short side must be at least {min_short_side} px)"
            )
        try:  # counting frames reads every frame's header (TIFF: a later IFD without a size is a TypeError)
            frames = getattr(im, "n_frames", 1)
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, TypeError, KeyError) as exc:
            raise ImageLoadError(f"corrupt image data ({one_line(exc, 160)})") from exc
        if frames > 1:
            notes.append("animated/multi-frame file: using the first frame")
        # JPEG: decode at 1/2, 1/4 or 1/8 scale straight away when the photo is much bigger than needed.
        if max_short_side is not None and im.format == "JPEG" and min(w0, h0) > max_short_side:
            s = max_short_side / min(w0, h0)
            try:
                im.draft(None, (max(1, math.ceil(w0 * s)), max(1, math.ceil(h0 * s))))
            except Exception:
                pass
        if notes and notes[0].startswith("very large image"):
            notes[0] += ": decoded at reduced scale" if im.size != (w0, h0) else ": decoded at full size"
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
            msg = one_line(exc, 160)
            if "truncated" in msg.lower():
                raise ImageLoadError(f"truncated image file ({msg})") from exc
            raise ImageLoadError(f"corrupt image data ({msg})") from exc
        except MemoryError as err:
            raise ImageLoadError("not enough memory to decode this image") from err
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
        try:
            rgb = to_rgb(rotated, notes)
        except (ValueError, OSError) as exc:  # modes PIL decodes but cannot convert (LAB, odd rawmodes)
            raise ImageLoadError(f"unsupported colour mode {rotated.mode} ({one_line(exc, 160)})") from exc
        # JPEG drafts scale both sides alike, so original_size here is the drafted size; report the true one.
        if im.format == "JPEG" and (w0, h0) != (im.size[0], im.size[1]):
            scale = w0 / im.size[0]
            original_size = (round(original_size[0] * scale), round(original_size[1] * scale))
        if max_short_side is not None:
            tw, th = target_size(rgb.size, max_short_side)
            if (tw, th) != rgb.size:
                rgb = rgb.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
        if rgb.mode != "RGB":
            rgb = rgb.convert("RGB")
        if mode == "L":  # equal channels (gray files) come back exactly: PIL's luma weights sum to 1
            rgb = rgb.convert("L")
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


def png_text(path: str | os.PathLike, key: str = "parameters") -> str:
    """A PNG's text chunk `key` (A1111 and generate.py write the generation settings as "parameters");
    "" when the file has none or cannot be read."""
    try:
        with Image.open(path) as im:
            return str(im.info.get(key, "") or "")
    except (OSError, ValueError, Image.DecompressionBombError):
        return ""
