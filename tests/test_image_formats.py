"""Phone and web formats through the one image reader (issue 16, kind 8): HEIC/HEIF (iPhone photos) via
pillow-heif, AVIF via Pillow's own plugin, animated GIF/WebP and multi-image HEIC (first frame, one note).

Every file is written here from skimage's astronaut and compared with the PNG of the same pixels: lossy
codecs within their tolerance (mean and 99th-percentile difference in 8-bit levels, measured below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pillow_heif = pytest.importorskip("pillow_heif")

from library.files import images as reader  # noqa: E402  (registers the openers)
from library.files.images import IMAGE_EXTENSIONS, ImageLoadError, read_image  # noqa: E402

FIRST_FRAME = "animated/multi-frame file: using the first frame"


def _astronaut(size: tuple[int, int] = (256, 192)) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).crop((0, 0, 512, 384)).resize(size, Image.Resampling.LANCZOS)


def _close(got: np.ndarray, expected: np.ndarray, mean: float, p99: float) -> None:
    """Same shape, and within a lossy codec's tolerance (levels of 255)."""
    assert got.shape == expected.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.mean() <= mean and np.percentile(diff, 99) <= p99, (diff.mean(), np.percentile(diff, 99))


def test_the_one_list_has_the_phone_formats():
    from dataset_tools.images import is_image_name
    from library.files.images import IMAGE_EXTENSIONS_TEXT

    assert {".heic", ".heif", ".avif"} <= set(IMAGE_EXTENSIONS)
    assert IMAGE_EXTENSIONS_TEXT == "jpg, jpeg, png, webp, bmp, heic, heif, avif"
    assert all(is_image_name(n) for n in ("IMG_0001.HEIC", "a.heif", "b.avif"))
    assert reader.READABLE == {"heif": True, "avif": True}


@pytest.mark.parametrize("ext, save, mean, p99", [
    (".heic", {"quality": 95}, 2.5, 20),  # measured mean 1.5, p99 15 (4:2:0 chroma on sharp colour edges)
    (".avif", {"quality": 95}, 2.5, 20),  # measured mean 1.8, p99 14
])
def test_heic_and_avif_read_as_their_png(tmp_path, ext, save, mean, p99):
    im = _astronaut()
    im.save(tmp_path / "a.png")
    im.save(tmp_path / f"a{ext}", **save)
    png = read_image(tmp_path / "a.png")
    got = read_image(tmp_path / f"a{ext}")
    assert got.warnings == [] and got.original_size == (256, 192) and got.image.mode == "RGB"
    _close(np.asarray(got.image), np.asarray(png.image), mean, p99)


@pytest.mark.parametrize("orientation, stored", [(6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180),
                                                 (8, Image.Transpose.ROTATE_270)])
def test_heic_orientation_is_applied_once(tmp_path, orientation, stored):
    """A phone stores the sensor's pixels and an orientation; the reader shows them upright, like the
    JPEG with the same tag. pillow-heif moves the EXIF tag into HEIF's rotation box, which libheif applies
    on decoding; applying the EXIF tag as well would turn the photo twice."""
    upright = _astronaut()
    exif = Image.Exif()
    exif[0x0112] = orientation
    sensor = upright.transpose(stored)
    sensor.save(tmp_path / "a.heic", quality=95, exif=exif.tobytes())
    sensor.save(tmp_path / "a.jpg", quality=95, exif=exif.tobytes())
    heic, jpeg = read_image(tmp_path / "a.heic"), read_image(tmp_path / "a.jpg")
    assert heic.original_size == jpeg.original_size == (256, 192)
    _close(np.asarray(jpeg.image), np.asarray(upright), 3.0, 24)
    _close(np.asarray(heic.image), np.asarray(upright), 3.0, 20)  # measured mean 1.5, p99 15 (JPEG 2.1, 14)


def _frames() -> list[Image.Image]:
    a = _astronaut((128, 96))
    return [a, a.transpose(Image.Transpose.FLIP_LEFT_RIGHT), a.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]


@pytest.mark.parametrize("ext, mean, p99", [(".gif", 4.0, 24), (".webp", 0.0, 0), (".heic", 3.0, 24)])
def test_animated_and_multi_image_files_give_the_first_frame(tmp_path, ext, mean, p99):
    frames = _frames()
    path = tmp_path / f"anim{ext}"
    if ext == ".heic":
        heif = pillow_heif.from_pillow(frames[0])
        for f in frames[1:]:
            heif.add_from_pillow(f)
        heif.save(path, quality=95)
    else:
        extra = {"lossless": True} if ext == ".webp" else {}
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    with Image.open(path) as im:
        assert im.n_frames == 3
    got = read_image(path)
    assert got.warnings == [FIRST_FRAME]
    # measured: GIF (frame 0 in a 256-colour palette) mean 2.7, p99 17; WebP lossless exact; HEIC 2.0, 21
    _close(np.asarray(got.image), np.asarray(frames[0]), mean, p99)
    flipped = np.asarray(frames[1])
    assert np.abs(np.asarray(got.image).astype(int) - flipped).mean() > 20  # not another frame


def test_without_pillow_heif_a_heic_is_one_line(tmp_path, monkeypatch):
    """What a user without pillow-heif sees: one line naming the package, not 'unsupported format'."""
    _astronaut().save(tmp_path / "a.heic")
    monkeypatch.setitem(reader.READABLE, "heif", False)
    monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(
        __import__("PIL").UnidentifiedImageError("cannot identify image file")))
    with pytest.raises(ImageLoadError) as err:
        read_image(tmp_path / "a.heic")
    assert str(err.value) == "HEIC/HEIF needs pillow-heif ; pip install pillow-heif==1.9.0"


def test_prepare_reads_a_heic_photo(tmp_path):
    """`python -m dataset_tools.prepare` on an iPhone-style folder: HEIC (stored turned, with its EXIF
    tag), AVIF and JPEG photos are all prepared, each face found upright."""
    from dataset_tools.prepare import prepare_folder
    from skimage import data

    src = tmp_path / "in"
    src.mkdir()
    astro = Image.fromarray(data.astronaut())
    exif = Image.Exif()
    exif[0x0112] = 6
    astro.transpose(Image.Transpose.ROTATE_90).save(src / "IMG_0001.HEIC", quality=95, exif=exif.tobytes())
    astro.save(src / "IMG_0002.avif", quality=95)
    summary = prepare_folder("source", src, tmp_path / "out", identity_check=False)
    assert summary.used == ["IMG_0001.HEIC", "IMG_0002.avif"] and summary.skipped == [] and summary.ignored == []
    for stem in ("IMG_0001", "IMG_0002"):
        for name in (f"{stem}.png", f"{stem}.mask.png", f"{stem}.txt", f"{stem}.json", f"preview/{stem}.jpg"):
            assert (tmp_path / "out" / name).is_file(), name
        rec = json.loads((tmp_path / "out" / f"{stem}.json").read_text("utf-8"))
        assert (rec["width"], rec["height"]) == (512, 512) and rec["rotation"] == 0 and rec["num_faces"] == 1
        # the astronaut's face as the face mesh boxes it in skimage's photo: (178, 83)-(273, 178)
        assert rec["face_box"] == pytest.approx([178, 83, 273, 178], abs=8), rec["face_box"]
        assert abs(rec["face_angle"]) < 10
        with Image.open(tmp_path / "out" / f"{stem}.png") as im:
            _close(np.asarray(im), np.asarray(astro), 3.0, 24)


def test_evaluation_lists_and_reads_heic_and_avif(tmp_path):
    from library.evaluation.folders import image_files, read_folder

    im = _astronaut()
    for ext in (".png", ".heic", ".heif", ".avif"):
        im.save(tmp_path / f"a{ext}", **({} if ext == ".png" else {"quality": 95}))
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in image_files(tmp_path)] == ["a.avif", "a.heic", "a.heif", "a.png"]
    items = read_folder(tmp_path, warn=pytest.fail)
    for item in items:
        _close(item.rgb, np.asarray(im), 3.0, 24)


def test_the_page_accepts_heic_uploads(tmp_path):
    pytest.importorskip("gradio")
    from library.app.photos import add_uploads
    from library.app.state import Workspace

    up = tmp_path / "upload"
    up.mkdir()
    _astronaut().save(up / "IMG_0003.HEIC", quality=95)
    (up / "clip.mov").write_bytes(b"\0" * 16)
    ws = Workspace(tmp_path / "data")
    added, refused = add_uploads(ws, "source", [up / "IMG_0003.HEIC", up / "clip.mov"])
    assert added == ["IMG_0003.HEIC"]
    assert refused == ["clip.mov: not a photo the dataset tools read (jpg, jpeg, png, webp, bmp, heic, heif, avif)"]
