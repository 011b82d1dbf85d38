"""One image reader for every entry point (library.files.images).

Each odd storage of an image (16-bit RGB / RGBA PNG, 16-bit grayscale I;16, palette with and without a
transparent index, LA, RGBA, CMYK JPEG) is built here together with the 8-bit RGB it shows, and read
through the reading path of each entry point: dataset_tools.prepare's loader, the training data loader
(library.training.data.load_prepared_folder) and the post-processing CLI (python -m library.postprocess). Each must
give the 8-bit RGB: identical, or within 1 level where 16 -> 8 bit or alpha blending rounds.
Transparency is composited on white everywhere (the documented choice), masks included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
S = 64  # square, at the training resolution: the training loader's crop and resize are then the identity


def _rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _alpha() -> np.ndarray:
    """Fully transparent left strip, opaque middle, random partial alpha on the right."""
    a = np.full((S, S), 255, np.uint8)
    a[:, :16] = 0
    a[:, 40:] = _rng().integers(1, 255, (S, S - 40), dtype=np.uint8)
    return a


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Float composite of `rgb` over white (what each pixel shows on a white page)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def _png16(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit RGB(A) PNG (PIL cannot write one; OpenCV wants BGR order)."""
    order = [2, 1, 0, 3][: rgb16.shape[2]]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb16[..., order]))
    assert ok
    path.write_bytes(buf.tobytes())


# Each builder writes its file and returns (path, the 8-bit RGB it shows as float, where rounding may differ by 1)
Built = tuple[Path, np.ndarray, np.ndarray]


def rgb8(folder: Path) -> Built:
    rgb = _rng().integers(0, 256, (S, S, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb8.png")
    return folder / "rgb8.png", rgb.astype(np.float64), np.zeros((S, S), bool)


def rgb16(folder: Path) -> Built:
    rgb = _rng().integers(0, 256, (S, S, 3), dtype=np.uint8)
    noise = _rng().integers(-100, 101, rgb.shape)  # anything that rounds back to the same 8-bit level
    _png16(folder / "rgb16.png", np.clip(rgb.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16))
    return folder / "rgb16.png", rgb.astype(np.float64), np.ones((S, S), bool)


def rgba16(folder: Path) -> Built:
    rgb, alpha = _rng().integers(0, 256, (S, S, 3), dtype=np.uint8), _alpha()
    _png16(folder / "rgba16.png", np.dstack([rgb, alpha]).astype(np.uint16) * 257)
    return folder / "rgba16.png", _on_white(rgb, alpha), (alpha > 0) & (alpha < 255)


def gray16(folder: Path) -> Built:
    gray = _rng().integers(0, 256, (S, S), dtype=np.uint8)
    noise = _rng().integers(-120, 121, gray.shape)
    Image.fromarray(np.clip(gray.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)).save(folder / "gray16.png")
    with Image.open(folder / "gray16.png") as im:
        assert im.mode.startswith("I"), im.mode
    return folder / "gray16.png", np.repeat(gray[..., None], 3, 2).astype(np.float64), np.zeros((S, S), bool)


def _palette_image() -> tuple[Image.Image, np.ndarray, np.ndarray]:
    palette = _rng().integers(0, 256, (16, 3), dtype=np.uint8)
    index = _rng().integers(0, 16, (S, S), dtype=np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.flatten().tolist())
    return im, palette, index


def palette(folder: Path) -> Built:
    im, pal, index = _palette_image()
    im.save(folder / "palette.png")
    return folder / "palette.png", pal[index].astype(np.float64), np.zeros((S, S), bool)


def palette_transparent(folder: Path) -> Built:
    im, pal, index = _palette_image()
    im.save(folder / "palette_trns.png", transparency=3)  # colour index 3 is see-through
    expected = pal[index].astype(np.float64)
    expected[index == 3] = 255.0
    return folder / "palette_trns.png", expected, np.zeros((S, S), bool)


def la(folder: Path) -> Built:
    gray, alpha = _rng().integers(0, 256, (S, S), dtype=np.uint8), _alpha()
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(folder / "la.png")
    return folder / "la.png", _on_white(np.repeat(gray[..., None], 3, 2), alpha), (alpha > 0) & (alpha < 255)


def rgba(folder: Path) -> Built:
    rgb, alpha = _rng().integers(0, 256, (S, S, 3), dtype=np.uint8), _alpha()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "rgba.png")
    return folder / "rgba.png", _on_white(rgb, alpha), (alpha > 0) & (alpha < 255)


CMYK_PATCHES = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 200, 40, 0), (30, 60, 90, 20), (0, 0, 0, 128), (100, 0, 255, 60),
                (10, 250, 10, 5), (60, 60, 60, 200)]


def cmyk_jpeg(folder: Path) -> Built:
    """Flat 16 x 32 patches: JPEG keeps flat blocks to within a level, so the designed colours survive."""
    cmyk = np.zeros((S, S, 4), np.uint8)
    for i, colour in enumerate(CMYK_PATCHES):
        y, x = divmod(i, 4)
        cmyk[y * 32:(y + 1) * 32, x * 16:(x + 1) * 16] = colour
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.jpg", quality=100)
    with Image.open(folder / "cmyk.jpg") as im:  # the decoder's CMYK (not under test), converted by hand
        assert im.mode == "CMYK"
        c, m, y, k = (np.asarray(im).astype(np.float64)[..., i] for i in range(4))
    # PIL's CMYK -> RGB without a colour profile: each channel (255 - ink) (255 - K) / 255
    expected = np.dstack([(255 - ink) * (255 - k) / 255 for ink in (c, m, y)])
    designed = np.dstack([(255.0 - cmyk[..., i]) * (255.0 - cmyk[..., 3]) / 255 for i in range(3)])
    assert np.abs(expected - designed).max() <= 3  # the file shows the patches it was made of
    return folder / "cmyk.jpg", expected, np.ones((S, S), bool)


VARIANTS: dict[str, Callable[[Path], Built]] = {f.__name__: f for f in (
    rgb8, rgb16, rgba16, gray16, palette, palette_transparent, la, rgba, cmyk_jpeg)}


# ------------------------------------------------------------------------- each entry point's reading


def read_for_prepare(path: Path, tmp_path: Path) -> np.ndarray:
    from dataset_tools.images import load_image  # what prepare_folder calls per photo

    return np.asarray(load_image(path).image)


def _prepared_folder(tmp_path: Path, image_src: Path | None, mask_src: Path | None) -> Path:
    """A folder in dataset_tools.prepare's layout around the given image and mask files."""
    folder = tmp_path / "prepared"
    folder.mkdir()
    if image_src is None:
        Image.new("RGB", (S, S), (90, 120, 150)).save(folder / "x.png")
    else:
        (folder / "x.png").write_bytes(image_src.read_bytes())
    if mask_src is None:
        Image.new("L", (S, S), 255).save(folder / "x.mask.png")
    else:
        (folder / "x.mask.png").write_bytes(mask_src.read_bytes())
    (folder / "x.json").write_text(json.dumps({"image": "x.png", "kind": "reference", "face_box": None,
                                               "landmarks": None}))
    return folder


def read_for_training(path: Path, tmp_path: Path) -> np.ndarray:
    from library.training.data import load_prepared_folder

    (item,) = load_prepared_folder(_prepared_folder(tmp_path, path, None), "reference", S)
    return item.image


def read_for_postprocess(path: Path, tmp_path: Path) -> np.ndarray:
    from library.postprocess import __main__ as postprocess_cli

    out = tmp_path / "post" / "out.png"
    assert postprocess_cli.main([str(path), str(out), "--restore", "none", "--upscale", "1"]) == 0
    with Image.open(out) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


READERS = {"prepare": read_for_prepare, "training": read_for_training, "postprocess": read_for_postprocess}


def _check(got: np.ndarray, expected: np.ndarray, rounding: np.ndarray) -> None:
    assert got.shape == (S, S, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(np.float64) - expected)
    exact = ~rounding
    assert diff[exact].max(initial=0) <= 0.5, f"{int((diff[exact] > 0.5).sum())} pixels differ where no rounding is allowed"
    assert diff.max() <= 1.0 + 1e-9, f"max difference {diff.max():.2f} levels"


@pytest.mark.parametrize("entry", READERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_entry_point_reads_the_8bit_rgb(variant, entry, tmp_path):
    if entry == "training" and variant == "cmyk_jpeg":
        pytest.skip("the training loader reads prepared NAME.png files; PNG has no CMYK")
    src = tmp_path / "src"
    src.mkdir()
    path, expected, rounding = VARIANTS[variant](src)
    _check(READERS[entry](path, tmp_path), expected, rounding)


# ------------------------------------------------------------------------------------- training masks


def _mask_values() -> np.ndarray:
    m = np.zeros((S, S), np.uint8)
    m[8:56, 12:52] = 255
    m[30:34, :] = 128  # a soft band: its level must survive
    return m


def _masks(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Mask files in odd storages with the gray levels they show (transparent: white, i.e. trains)."""
    m = _mask_values()
    out = {}
    Image.fromarray(m).save(folder / "l.png")
    out["L"] = (folder / "l.png", m)
    Image.fromarray(m.astype(np.uint16) * 257).save(folder / "i16.png")
    out["I;16"] = (folder / "i16.png", m)
    Image.fromarray(np.repeat(m[..., None], 3, 2)).save(folder / "rgb.png")
    out["RGB"] = (folder / "rgb.png", m)
    p = Image.fromarray((m // 127).astype(np.uint8), "P")  # indices 0, 1, 2 -> black, gray, white
    p.putpalette([0, 0, 0, 128, 128, 128, 255, 255, 255])
    p.save(folder / "p.png")
    out["P"] = (folder / "p.png", m)
    alpha = np.where(m == 255, 0, 255).astype(np.uint8)  # the face painted as a hole: reads as white
    Image.fromarray(np.dstack([np.zeros_like(m) + np.where(m == 128, 128, 0).astype(np.uint8), alpha]), "LA").save(
        folder / "la.png")
    out["LA"] = (folder / "la.png", m)
    return out


@pytest.mark.parametrize("storage", ["L", "I;16", "RGB", "P", "LA"])
def test_training_masks_in_any_storage(storage, tmp_path):
    from library.training.data import load_prepared_folder

    src = tmp_path / "src"
    src.mkdir()
    path, levels = _masks(src)[storage]
    (item,) = load_prepared_folder(_prepared_folder(tmp_path, None, path), "reference", S)
    np.testing.assert_array_equal(item.mask, levels.astype(np.float32) / 255.0)


# ------------------------------------------------------------------------------ decompression bombs


def test_a_jpeg_over_the_pixel_limit_is_read_only_where_it_is_shrunk(tmp_path, monkeypatch):
    """Over PIL's limit (set to 3500 px here; the file has 96 x 64 = 6144, under twice the limit, where PIL
    only warns) a JPEG is read by the photo loader, which shrinks it anyway (decoded at reduced scale where
    PIL's draft can), and refused by the readers that keep full size (training, post-processing)."""
    from dataset_tools.images import load_image
    from library.postprocess import __main__ as postprocess_cli
    from library.files.images import ImageLoadError, read_image

    src = tmp_path / "big.jpg"
    Image.new("RGB", (96, 64), (200, 100, 50)).save(src, quality=95)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3500)
    with pytest.raises(ImageLoadError, match=r"^image too large \(96x64, 0 MP > 0 MP decompression-bomb limit for a JPEG"):
        read_image(src)
    small = load_image(src, max_short_side=8)
    assert small.image.size == (12, 8) and small.warnings == ["very large image (96x64, 0 MP): decoded at reduced scale"]
    assert load_image(src, max_short_side=40).warnings == ["very large image (96x64, 0 MP): decoded at full size"]
    assert postprocess_cli.main([str(src), str(tmp_path / "out.png"), "--restore", "none", "--upscale", "1"]) == 1
    assert not (tmp_path / "out.png").exists()
