"""Demo photos from images that ship inside installed packages (no download).

    python -m dataset_tools.demo_photos DEST      # writes DEST/source/*.jpg and DEST/reference/*.jpg

source: one person (scikit-image's astronaut, Eileen Collins) in 5 variants: the full photo, a close
crop, an off-centre crop stored sideways with an EXIF orientation tag (as phones do), a mirrored crop
and a slightly rotated one. reference: 4 other people, one face each: insightface's Tom Hanks sample
and single faces cropped out of its group photo t1.jpg.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from library.files.atomic import write_bytes
from library.files.images import read_image

# (name, crop box in t1.jpg (1280 x 886)): each holds one whole face, well inside the crop
T1_CROPS = (
    ("t1_left", (0, 192, 262, 492)),
    ("t1_centre_right", (633, 255, 963, 585)),
    ("t1_right", (1010, 187, 1280, 497)),
)


def _insightface_images() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("insightface is not installed (its sample images are the demo's reference photos)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "images"


def _save_jpeg(im: Image.Image, path: Path, exif: bytes | None = None) -> None:
    buf = io.BytesIO()
    kw = {"quality": 95}
    if exif is not None:
        kw["exif"] = exif
    im.convert("RGB").save(buf, "JPEG", **kw)
    write_bytes(path, buf.getvalue())


def _to_short_side(im: Image.Image, short: int) -> Image.Image:
    w, h = im.size
    s = short / min(w, h)
    return im.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS)


def source_images() -> dict[str, tuple[Image.Image, bytes | None]]:
    from skimage import data

    astro = Image.fromarray(data.astronaut())  # 512 x 512, face near (225, 130)
    out: dict[str, tuple[Image.Image, bytes | None]] = {}
    out["astronaut_full"] = (astro, None)
    out["astronaut_close"] = (_to_short_side(astro.crop((95, 10, 355, 270)), 512), None)
    # off-centre crop, stored rotated 90 degrees clockwise with EXIF Orientation 8 (rotate 90 CW to view)
    offset = _to_short_side(astro.crop((20, 0, 440, 420)), 480)
    exif = Image.Exif()
    exif[0x0112] = 8
    out["astronaut_offset_exif"] = (offset.transpose(Image.Transpose.ROTATE_270), exif.tobytes())
    out["astronaut_mirror"] = (
        _to_short_side(astro.crop((60, 0, 420, 360)), 512).transpose(Image.Transpose.FLIP_LEFT_RIGHT), None
    )
    rotated = astro.rotate(9, resample=Image.Resampling.BICUBIC, center=(225, 140), fillcolor=(128, 128, 128))
    out["astronaut_tilted"] = (_to_short_side(rotated.crop((50, 0, 400, 350)), 512), None)
    return out


def reference_images() -> dict[str, Image.Image]:
    folder = _insightface_images()
    out = {"tom_hanks": read_image(folder / "Tom_Hanks_54745.png").image}
    t1 = read_image(folder / "t1.jpg").image
    for name, box in T1_CROPS:
        out[name] = t1.crop(box)
    return out


def write_demo_photos(dest) -> tuple[Path, Path]:
    """Write DEST/source and DEST/reference; returns the two folders."""
    dest = Path(dest)
    src_dir, ref_dir = dest / "source", dest / "reference"
    src_dir.mkdir(parents=True, exist_ok=True)
    ref_dir.mkdir(parents=True, exist_ok=True)
    for name, (im, exif) in source_images().items():
        _save_jpeg(im, src_dir / f"{name}.jpg", exif)
    for name, im in reference_images().items():
        _save_jpeg(im, ref_dir / f"{name}.jpg")
    return src_dir, ref_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m dataset_tools.demo_photos DEST", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        src, ref = write_demo_photos(argv[0])
    except Exception as exc:  # noqa: BLE001 - one line, no traceback
        print(f"error: cannot write demo photos: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"demo photos: {len(list(src.glob('*.jpg')))} source in {src}, {len(list(ref.glob('*.jpg')))} reference in {ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
