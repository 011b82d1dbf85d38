"""Photo sets that cannot mean what the config says (issue 16, kind 4 and the data part of kind 6).

Swapped, identical, missing and unprepared data folders are refused by `train_magicapture.main` in one
line with exit code 2 before any model loads (a counter on `load_stable_diffusion` proves "before");
photos upscaled more than 2x, and square crops that drop more than a third of a photo, are named once
each by `load_prepared_folder`, and the crop keeps the face.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from testkit.tiny import write_prepared
from library.training.data import DatasetError, check_prepared_sets, load_prepared_folder

ROOT = Path(__file__).resolve().parent.parent
PREPARE = "`python -m dataset_tools.prepare"


def _train(capsys, tmp_path: Path, source: Path, reference: Path) -> tuple[int, list[str]]:
    """train_magicapture.main on the tiny config -> (exit code, the stderr lines that start with error:)."""
    import train_magicapture

    capsys.readouterr()
    rc = train_magicapture.main([
        "--config", str(ROOT / "configs" / "test_tiny.toml"), 'model.pretrained="unused-model"',
        f'data.source_dir="{source}"', f'data.reference_dir="{reference}"', f'output.dir="{tmp_path / "out"}"',
    ])
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _person_and_style(tmp_path: Path) -> tuple[Path, Path]:
    return (write_prepared(tmp_path / "person", "source", "mcv1", seed=1),
            write_prepared(tmp_path / "style", "reference", "mcv2", seed=2))


def test_swapped_folders_are_refused_before_the_model_loads(tmp_path, capsys, model_loads):
    person, style = _person_and_style(tmp_path)
    rc, errors = _train(capsys, tmp_path, style, person)
    assert (rc, model_loads["n"]) == (2, 0)
    assert errors == [
        f"error: data.source_dir ('{style}') holds reference photos and data.reference_dir ('{person}') source "
        "photos (their NAME.json \"kind\"): the two folders are swapped; exchange the two settings"]
    assert not (tmp_path / "out").exists()


def test_the_same_folder_as_both_sets_is_refused_before_the_model_loads(tmp_path, capsys, model_loads):
    person, _ = _person_and_style(tmp_path)
    rc, errors = _train(capsys, tmp_path, person, person)
    assert (rc, model_loads["n"]) == (2, 0)
    assert errors == [
        f"error: data.source_dir and data.reference_dir are the same folder ('{person}'): the person's photos and "
        f"the style's photos are two sets; prepare each into its own folder with {PREPARE} source|reference "
        "PHOTOS OUT`"]


@pytest.mark.parametrize("spelling", ["symlink", "dotdot"])
def test_the_same_folder_spelled_otherwise_is_still_the_same(tmp_path, spelling):
    person, _ = _person_and_style(tmp_path)
    if spelling == "symlink":
        other = tmp_path / "link"
        other.symlink_to(person, target_is_directory=True)
    else:
        other = tmp_path / "style" / ".." / "person"
    with pytest.raises(DatasetError) as err:
        check_prepared_sets(person, other)
    assert str(err.value).startswith(
        f"data.source_dir and data.reference_dir are the same folder ('{person}' and '{other}'): ")


def test_a_missing_folder_is_refused_before_the_model_loads(tmp_path, capsys, model_loads):
    person, style = _person_and_style(tmp_path)
    missing = tmp_path / "stlye"
    rc, errors = _train(capsys, tmp_path, person, missing)
    assert (rc, model_loads["n"]) == (2, 0)  # the config's own path check answers first
    assert errors == [f"error: {ROOT / 'configs' / 'test_tiny.toml'}: data.reference_dir = '{missing}' is not a folder"]
    with pytest.raises(DatasetError) as err:  # the check alone, for a caller without the config's check
        check_prepared_sets(person, missing)
    assert str(err.value) == (f"data.reference_dir = '{missing}' does not exist; point it at a folder made by "
                              f"{PREPARE} reference PHOTOS OUT`")


def test_a_folder_of_unprepared_photos_is_refused_before_the_model_loads(tmp_path, capsys, model_loads):
    _, style = _person_and_style(tmp_path)
    photos = tmp_path / "selfies"
    photos.mkdir()
    for name in ("IMG_0001.JPG", "IMG_0002.jpeg", "notes.txt"):
        (photos / name).write_bytes(b"not decoded")  # the check reads names only
    rc, errors = _train(capsys, tmp_path, photos, style)
    assert (rc, model_loads["n"]) == (2, 0)
    assert errors == [
        f"error: data.source_dir = '{photos}': 2 photo(s) but no prepared files (NAME.png + NAME.mask.png + "
        f"NAME.json); run {PREPARE} source {photos} {photos}_prepared` and set data.source_dir to the new folder"]


def test_style_photos_given_as_the_person_are_named(tmp_path):
    _, style = _person_and_style(tmp_path)
    other_style = write_prepared(tmp_path / "style2", "reference", "mcv2", seed=3)
    with pytest.raises(DatasetError) as err:
        check_prepared_sets(other_style, style)
    assert str(err.value) == (
        f"data.source_dir = '{other_style}': 3 of 3 prepared photos were prepared as reference (img0.json, "
        f"img1.json, img2.json: \"kind\": \"reference\"); set data.source_dir to a folder made by {PREPARE} "
        "source PHOTOS OUT`")


def test_one_stray_style_photo_in_the_person_set_is_named(tmp_path):
    person, style = _person_and_style(tmp_path)
    for suffix in (".png", ".mask.png", ".json"):
        (person / f"stray{suffix}").write_bytes((style / f"img0{suffix}").read_bytes())
    with pytest.raises(DatasetError) as err:
        check_prepared_sets(person, style)
    assert str(err.value) == (
        f"data.source_dir = '{person}': 1 of 4 prepared photos were prepared as reference (stray.json: \"kind\": "
        "\"reference\"); move those photos to the reference set or delete their NAME.* files")


def test_sidecars_without_kind_and_right_sets_are_accepted(tmp_path):
    person, style = _person_and_style(tmp_path)
    assert check_prepared_sets(person, style) is None
    for meta in [*person.glob("*.json"), *style.glob("*.json")]:  # sidecars written before "kind" existed
        record = json.loads(meta.read_text())
        del record["kind"]
        meta.write_text(json.dumps(record))
    assert check_prepared_sets(style, person) is None


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "library.training.data" and r.levelno == logging.WARNING]


def test_a_small_photo_upscaled_4x_is_named_with_its_factor(tmp_path, caplog):
    folder = write_prepared(tmp_path / "person", "source", "mcv1", n=2, size=128)
    write_prepared(tmp_path / "big", "source", "mcv1", n=1, size=300)  # 1.7x: not named
    (folder / "img9.png").write_bytes((tmp_path / "big" / "img0.png").read_bytes())
    (folder / "img9.mask.png").write_bytes((tmp_path / "big" / "img0.mask.png").read_bytes())
    (folder / "img9.json").write_bytes((tmp_path / "big" / "img0.json").read_bytes())
    with caplog.at_level(logging.WARNING, logger="library.training.data"):
        items = load_prepared_folder(folder, "source", 512)
    assert len(items) == 3
    assert _warnings(caplog) == [
        f"{folder / 'img0.png'}: 128x128 photo is upscaled 4.0x to 512 px and will train soft; use a photo at "
        "least 256 px on its short side",
        f"{folder / 'img1.png'}: 128x128 photo is upscaled 4.0x to 512 px and will train soft; use a photo at "
        "least 256 px on its short side",
        f"{folder}: 2 of 3 source photos are upscaled more than 2x to 512 px (named above)",
    ]


def _write_photo(folder: Path, name: str, kind: str, size: tuple[int, int], face_box: list[float] | None) -> Path:
    """One prepared photo as dataset_tools.prepare writes it, with a drawn face at `face_box`."""
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (90, 120, 160))
    face = Image.new("L", size, 0)
    lms = None
    if face_box is not None:
        ImageDraw.Draw(img).ellipse(face_box, fill=(224, 172, 140))
        ImageDraw.Draw(face).ellipse(face_box, fill=255)
        x0, y0, x1, y1 = face_box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        lms = [[cx - 30, cy - 20], [cx + 30, cy - 20], [cx, cy + 5], [cx - 25, cy + 40], [cx + 25, cy + 40]]
    mask = face if kind == "source" else (Image.eval(face, lambda v: 255 - v) if face_box else Image.new("L", size, 255))
    img.save(folder / f"{name}.png")
    mask.save(folder / f"{name}.mask.png")
    meta = {"image": f"{name}.png", "kind": kind, "width": size[0], "height": size[1], "face_box": face_box,
            "landmarks": lms}
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return folder / f"{name}.png"


def _crop_line(path: Path, size: str, kept: str, side: int, where: str, kind: str) -> str:
    return (f"{path}: {size} photo; the square crop keeps {kept} of it ({side}x{side} px {where}); crop it yourself "
            f"to the part that should train and prepare it again with {PREPARE} {kind} PHOTOS OUT`")


@pytest.mark.parametrize("kind", ["source", "reference"])
def test_a_panorama_keeps_its_face_and_says_it_keeps_a_third(tmp_path, caplog, kind):
    face_box = [1100.0, 150.0, 1250.0, 330.0]  # near the right end of a 1500 x 500 panorama
    path = _write_photo(tmp_path / kind, "pano", kind, (1500, 500), face_box)
    with caplog.at_level(logging.WARNING, logger="library.training.data"):
        (item,) = load_prepared_folder(tmp_path / kind, kind, 512)
    assert _warnings(caplog) == [_crop_line(path, "1500x500", "0.33", 500, "around the face", kind)]
    left, top, side = item.crop_box
    assert (left, top, side) == (925, 0, 500)  # centred on the face box: x 925..1425 holds 1100..1250
    assert left <= face_box[0] and face_box[2] <= left + side
    assert item.landmarks is not None and (0 <= item.landmarks).all() and (item.landmarks <= 512).all()
    # the face (x 179..333, y 154..338 of the 512 square) is where the face mask is set, and only there
    assert (item.face_mask[236:256, 246:266].min(), item.face_mask[:, :150].max()) == (1.0, 0.0)


def test_a_full_length_portrait_without_a_face_is_centred_and_named(tmp_path, caplog):
    path = _write_photo(tmp_path / "style", "standing", "reference", (400, 1400), None)
    with caplog.at_level(logging.WARNING, logger="library.training.data"):
        (item,) = load_prepared_folder(tmp_path / "style", "reference", 256)
    assert item.crop_box == (0, 500, 400)
    assert _warnings(caplog) == [_crop_line(path, "400x1400", "0.29", 400, "from the centre", "reference")]


def test_a_3_by_2_photo_drops_exactly_a_third_and_is_not_named(tmp_path, caplog):
    _write_photo(tmp_path / "person", "landscape", "source", (600, 400), [250.0, 100.0, 350.0, 240.0])
    with caplog.at_level(logging.WARNING, logger="library.training.data"):
        (item,) = load_prepared_folder(tmp_path / "person", "source", 256)
    assert _warnings(caplog) == []
    assert item.crop_box == (100, 0, 400) and np.isclose(item.mask.mean(), item.face_mask.mean())
