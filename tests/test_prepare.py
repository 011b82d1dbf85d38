"""dataset_tools.prepare: the prepared-folder format, bad input, exit codes (real photos only)."""

from __future__ import annotations

import io
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_dataset import (  # noqa: E402
    ASTRO_LANDMARKS,
    astronaut,
    box_mean,
    coffee,
    far_from_box,
    group_photo,
    hashes,
    leftovers,
    read_mask,
    run_cli,
    tom_hanks,
)

from dataset_tools.prepare import CAPTIONS, PrepareError, Summary, main, prepare_folder  # noqa: E402

SCHEMA = {
    "image": str, "kind": str, "token": str, "width": int, "height": int, "face_box": (list, type(None)),
    "score": (float, type(None)), "landmarks": (list, type(None)), "mask_coverage": float, "num_faces": int,
    "detector": (str, type(None)), "rotation": int, "face_angle": (float, type(None)), "warnings": list,
}


def _record(out: Path, stem: str) -> dict:
    rec = json.loads((out / f"{stem}.json").read_text("utf-8"))
    for key, typ in SCHEMA.items():
        assert isinstance(rec[key], typ), (key, rec[key])
    return rec


def _check_item(out: Path, stem: str, kind: str, token: str) -> tuple[dict, np.ndarray, np.ndarray]:
    rec = _record(out, stem)
    assert rec["image"] == f"{stem}.png" and rec["kind"] == kind and rec["token"] == token
    with Image.open(out / f"{stem}.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (rec["width"], rec["height"])
        img = np.asarray(im).copy()
    mask = read_mask(out / f"{stem}.mask.png")
    assert mask.shape == img.shape[:2]
    assert set(np.unique(mask)) <= {0, 255}
    assert abs((mask == 255).mean() - rec["mask_coverage"]) < 1e-4
    assert 0.0 <= rec["mask_coverage"] <= 1.0
    assert (out / f"{stem}.txt").read_text("utf-8") == CAPTIONS[kind].format(token=token)
    with Image.open(out / "preview" / f"{stem}.jpg") as pv:
        assert pv.format == "JPEG"
    if rec["face_box"] is not None:
        x0, y0, x1, y1 = rec["face_box"]
        assert 0 <= x0 < x1 <= rec["width"] and 0 <= y0 < y1 <= rec["height"]
        assert len(rec["landmarks"]) == 5 and all(len(p) == 2 for p in rec["landmarks"])
        assert rec["detector"] in ("short_range", "full_range") and 0 < rec["score"] <= 1
    return rec, img, mask


def test_source_folder(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    astronaut().save(src / "astro.jpg", quality=95)
    tom_hanks().save(src / "tom.png")
    coffee().save(src / "coffee.jpg")
    before = hashes(src)
    s = prepare_folder("source", src, out)
    assert isinstance(s, Summary)
    assert s.read == ["astro.jpg", "coffee.jpg", "tom.png"]
    assert s.used == ["astro.jpg", "tom.png"]
    assert [n for n, _ in s.skipped] == ["coffee.jpg"] and "no face" in s.skipped[0][1]
    rec, img, mask = _check_item(out, "astro", "source", "mcv1")
    assert (rec["width"], rec["height"]) == (512, 512), "never upscaled"
    assert rec["num_faces"] == 1 and rec["detector"] == "short_range" and rec["warnings"] == []
    assert box_mean(mask, rec["face_box"], shrink=0.15) > 0.95
    assert far_from_box(mask, rec["face_box"]).max() == 0
    assert 0.015 < rec["mask_coverage"] < 0.06
    eye_l, eye_r, nose, mouth_l, mouth_r = np.array(rec["landmarks"])
    assert eye_l[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
    rec, _, mask = _check_item(out, "tom", "source", "mcv1")
    assert (rec["width"], rec["height"]) == (112, 112)
    assert 0.3 < rec["mask_coverage"] < 0.75
    assert not (out / "coffee.json").exists() and not (out / "coffee.png").exists()
    with Image.open(out / "preview" / "contact.jpg") as sheet:
        assert sheet.size[0] >= 2 * 150
    assert hashes(src) == before, "inputs are never modified"
    assert leftovers(out) == []


def test_reference_folder_and_token(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    astronaut().save(src / "astro.png")
    coffee().save(src / "coffee.jpg")
    s = prepare_folder("reference", src, out, token="zq7style")
    assert s.used == ["astro.png", "coffee.jpg"] and s.skipped == []
    rec, _, mask = _check_item(out, "astro", "reference", "zq7style")
    x0, y0, x1, y1 = rec["face_box"]
    assert box_mean(mask, rec["face_box"], shrink=0.15) < 0.05, "the face does not train as style"
    assert far_from_box(mask, rec["face_box"]).min() == 255
    assert 0.94 < rec["mask_coverage"] < 0.985
    rec, _, mask = _check_item(out, "coffee", "reference", "zq7style")
    assert mask.min() == 255 and rec["mask_coverage"] == 1.0
    assert rec["face_box"] is None and rec["landmarks"] is None and rec["num_faces"] == 0 and rec["detector"] is None
    assert any("no face" in w for w in rec["warnings"])
    assert any(n == "coffee.jpg" and "no face" in m for n, m in s.warnings)


def test_exif_rotation(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    upright = astronaut().crop((0, 0, 512, 400))  # not square, so a missed rotation shows in the size
    upright.save(src / "upright.jpg", quality=95)
    # the camera stored the pixels turned 90 degrees counter-clockwise; Orientation 6 says "turn 90 clockwise"
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(src / "sideways.jpg", quality=95, exif=exif.tobytes())
    s = prepare_folder("source", src, out)
    assert s.used == ["sideways.jpg", "upright.jpg"]
    a, img_a, mask_a = _check_item(out, "upright", "source", "mcv1")
    b, img_b, mask_b = _check_item(out, "sideways", "source", "mcv1")
    assert (b["width"], b["height"]) == (512, 400)
    assert a["rotation"] == b["rotation"] == 0 and b["warnings"] == [], "EXIF turned it; nothing more to do"
    assert np.abs(img_a.astype(int) - img_b.astype(int)).mean() < 4
    assert np.allclose(a["face_box"], b["face_box"], atol=5)
    assert np.allclose(a["landmarks"], b["landmarks"], atol=4)
    assert (mask_a != mask_b).mean() < 0.005
    assert box_mean(mask_b, b["face_box"], shrink=0.15) > 0.95


def test_turned_source_photos_come_out_upright(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    upright = astronaut().crop((0, 0, 512, 400))  # not square: a missed turn shows in the size
    upright.save(src / "upright.jpg", quality=95)
    # turned by hand and saved without an EXIF tag (PIL's ROTATE_* turn counter-clockwise)
    turned = {"left.jpg": (Image.Transpose.ROTATE_90, 90), "down.jpg": (Image.Transpose.ROTATE_180, 180),
              "right.jpg": (Image.Transpose.ROTATE_270, 270)}
    for name, (transpose, _) in turned.items():
        upright.transpose(transpose).save(src / name, quality=95)
    s = prepare_folder("source", src, out)
    assert sorted(s.used) == ["down.jpg", "left.jpg", "right.jpg", "upright.jpg"] and s.skipped == []
    a, img_a, mask_a = _check_item(out, "upright", "source", "mcv1")
    assert a["rotation"] == 0 and a["warnings"] == [] and abs(a["face_angle"]) < 6
    assert np.abs(np.array(a["landmarks"]) - ASTRO_LANDMARKS).max() < 1.5
    words = {90: "rotated 90 degrees clockwise to upright", 180: "rotated 180 degrees to upright",
             270: "rotated 90 degrees counter-clockwise to upright"}
    for name, (_, turn) in turned.items():
        stem = name[:-4]
        b, img_b, mask_b = _check_item(out, stem, "source", "mcv1")
        assert b["rotation"] == turn and (b["width"], b["height"]) == (512, 400)
        assert abs(b["face_angle"]) < 6
        assert np.abs(img_a.astype(int) - img_b.astype(int)).mean() < 4, "the written image is upright"
        assert np.abs(np.array(b["landmarks"]) - ASTRO_LANDMARKS).max() < 2.5, (name, b["landmarks"])
        assert np.allclose(a["face_box"], b["face_box"], atol=5)
        assert (mask_a != mask_b).mean() < 0.005
        lines = [ln for ln in s.lines() if name in ln]
        assert lines == [f"warning  {name}: {b['warnings'][0]}"] and words[turn] in lines[0], lines
    with Image.open(out / "preview" / "down.jpg") as pv:
        assert pv.size == (512, 400)


def test_turned_reference_photo_is_reported_not_rotated(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    astronaut().crop((0, 0, 512, 400)).transpose(Image.Transpose.ROTATE_180).save(src / "down.jpg", quality=95)
    s = prepare_folder("reference", src, out)
    assert s.used == ["down.jpg"]
    rec, _, mask = _check_item(out, "down", "reference", "mcv2")
    assert rec["rotation"] == 0 and (rec["width"], rec["height"]) == (512, 400)
    assert abs(abs(rec["face_angle"]) - 180) < 6
    assert "upside down" in rec["warnings"][0] and "not rotated" in rec["warnings"][0]
    # the upright photo's landmarks turned 180 degrees: the mouth below the eyes on screen is above them now
    expected = np.stack([512 - ASTRO_LANDMARKS[:, 0], 400 - ASTRO_LANDMARKS[:, 1]], 1)
    assert np.abs(np.array(rec["landmarks"]) - expected).max() < 2.5, rec["landmarks"]
    assert box_mean(mask, rec["face_box"], shrink=0.15) < 0.05, "the face is cut out of the style region"
    assert any(n == "down.jpg" and "upside down" in m for n, m in s.warnings)


def test_confirmed_face_beats_larger_cartoon(tmp_path):
    from PIL import ImageDraw

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    canvas = Image.new("RGB", (780, 440), (128, 128, 128))
    d = ImageDraw.Draw(canvas)  # a 320 px yellow cartoon face on the left
    d.ellipse((60, 50, 380, 410), fill=(250, 220, 60))
    d.ellipse((140, 160, 190, 210), fill=(20, 20, 20))
    d.ellipse((250, 160, 300, 210), fill=(20, 20, 20))
    d.chord((150, 270, 290, 350), 0, 180, fill=(120, 20, 20))
    canvas.paste(astronaut().resize((320, 320), Image.Resampling.LANCZOS), (440, 20))
    canvas.save(src / "collage.png")
    s = prepare_folder("source", src, out)
    assert s.used == ["collage.png"]
    rec, _, mask = _check_item(out, "collage", "source", "mcv1")
    assert np.allclose(rec["face_box"], (552, 67, 612, 128), atol=6), rec["face_box"]
    assert rec["num_faces"] == 2 and rec["rotation"] == 0
    assert any("larger face-like box" in w and "not confirmed" in w for w in rec["warnings"]), rec["warnings"]
    assert any("using the largest confirmed one" in w for w in rec["warnings"]), rec["warnings"]
    assert mask[:, :420].max() == 0 and box_mean(mask, rec["face_box"], shrink=0.2) > 0.9
    eye_l, eye_r, nose, mouth_l, mouth_r = np.array(rec["landmarks"])
    assert eye_l[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])


def test_group_photo_warns_for_source(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    group_photo().save(src / "friends.jpg", quality=92)
    s = prepare_folder("source", src, out)
    assert s.used == ["friends.jpg"]
    rec = _record(out, "friends")
    assert rec["num_faces"] >= 2 and rec["detector"] == "full_range"
    assert any("faces found" in w and "largest" in w for w in rec["warnings"])
    lines = [ln for ln in s.lines() if "friends.jpg" in ln and "faces found" in ln]
    assert len(lines) == 1


def _cmyk_jpeg(path: Path) -> None:
    astronaut().convert("CMYK").save(path, quality=95)


def test_image_modes(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    astro = astronaut()
    gray = np.asarray(astro.convert("L"))
    _cmyk_jpeg(src / "cmyk.jpg")
    astro.convert("L").save(src / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(src / "gray16.png")  # 16-bit PNG
    astro.quantize(64).save(src / "palette.png")
    rgba = astro.convert("RGBA")
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[:, 420:] = 0  # transparent right strip
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(src / "rgba.png")
    rgba.save(src / "rgba.webp", lossless=True)
    Image.fromarray(np.asarray(astro)).save(src / "plain.bmp")
    with Image.open(src / "gray16.png") as im:
        assert im.mode in ("I;16", "I"), im.mode
    with Image.open(src / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    s = prepare_folder("source", src, out)
    assert sorted(s.used) == sorted(["cmyk.jpg", "gray.png", "gray16.png", "palette.png", "rgba.png", "rgba.webp",
                                     "plain.bmp"]), s.format()
    for stem in ("cmyk", "gray", "gray16", "palette", "rgba", "plain"):
        _check_item(out, stem, "source", "mcv1")
    _check_item(out, "rgba_webp", "source", "mcv1")  # same stem as rgba.png: renamed, with a warning
    assert any(n == "rgba.webp" and "rgba_webp" in m for n, m in s.warnings)
    g16 = np.asarray(Image.open(out / "gray16.png"))
    assert np.abs(g16[..., 0].astype(int) - gray).max() <= 1 and np.array_equal(g16[..., 0], g16[..., 2])
    rgb = np.asarray(Image.open(out / "rgba.png"))
    assert rgb[:, 430:].min() >= 254, "transparency becomes white"
    cmyk = np.asarray(Image.open(out / "cmyk.png")).astype(int)
    assert np.abs(cmyk - np.asarray(astro).astype(int)).mean() < 25


def test_resizing(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    astronaut().resize((1500, 1300), Image.Resampling.BICUBIC).save(src / "big.jpg", quality=90)
    astronaut().resize((300, 300)).save(src / "small.png")
    s = prepare_folder("source", src, out, resolution=256)
    assert s.used == ["big.jpg", "small.png"]
    big = _record(out, "big")
    assert (big["width"], big["height"]) == (591, 512), "short side = 2 x resolution"
    assert (_record(out, "small")["width"], _record(out, "small")["height"]) == (300, 300)


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    astronaut().save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h (a decompression bomb's calling card); the data is tiny."""

    def chunk(tag, payload):
        return len(payload).to_bytes(4, "big") + tag + payload + zlib.crc32(tag + payload).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _bad_folder(src: Path) -> dict[str, str]:
    """Every kind of bad input, plus one good photo; returns file -> expected words of its reason."""
    src.mkdir()
    astronaut().save(src / "good.jpg", quality=95)
    (src / "empty.jpg").write_bytes(b"")
    _truncated_jpeg(src / "truncated.jpg")
    (src / "notes.jpg").write_text("this is not a photo\n")
    astronaut().resize((60, 90)).save(src / "tiny.png")
    _png_header_only(src / "bomb.png", 30000, 30000)
    astronaut().save(src / "anim.gif")
    (src / "readme.txt").write_text("hello")
    return {"empty.jpg": "empty", "truncated.jpg": "truncated", "notes.jpg": "not an image", "tiny.png": "too small",
            "bomb.png": "too large"}


def test_bad_inputs_cli(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    expected = _bad_folder(src)
    before = hashes(src)
    r = run_cli("source", src, out)
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    assert "Traceback" not in text
    for name, words in expected.items():
        lines = [ln for ln in text.splitlines() if name in ln]
        assert len(lines) == 1, (name, lines)
        assert words in lines[0].lower(), (name, lines[0])
    for name in ("anim.gif", "readme.txt"):
        lines = [ln for ln in text.splitlines() if name in ln]
        assert len(lines) == 1 and "unsupported" in lines[0], lines
    assert (out / "good.png").exists() and (out / "good.json").exists()
    assert sorted(p.name for p in out.glob("*.json")) == ["good.json"]
    assert hashes(src) == before
    assert leftovers(out) == []


def test_decompression_bomb_warning_is_per_file(tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    big = astronaut().resize((1100, 1100))
    big.save(src / "large.jpg", quality=90)
    big.save(src / "large.png", compress_level=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 1.21 MP is now "a bomb" (warning level)
    s = prepare_folder("source", src, out)
    assert s.used == ["large.jpg"], s.format()
    assert any("very large" in m for n, m in s.warnings if n == "large.jpg")
    assert [n for n, _ in s.skipped] == ["large.png"] and "too large" in s.skipped[0][1]


def test_huge_photo_is_fast(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    canvas = Image.new("RGB", (8000, 8000), (110, 120, 130))
    canvas.paste(astronaut().resize((4000, 4000), Image.Resampling.NEAREST), (2000, 2000))
    canvas.save(src / "huge.jpg", quality=80)
    del canvas
    t0 = time.perf_counter()
    s = prepare_folder("source", src, out)
    assert s.used == ["huge.jpg"], s.format()
    assert time.perf_counter() - t0 < 20
    rec = _record(out, "huge")
    assert (rec["width"], rec["height"]) == (1024, 1024)
    assert rec["num_faces"] == 1


def test_all_bad_exit_2_and_argument_errors(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "empty.jpg").write_bytes(b"")
    coffee().save(src / "coffee.jpg")
    assert main(["source", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: no usable image" in err and "Traceback" not in err
    for argv in (
        ["source", str(tmp_path / "missing"), str(tmp_path / "o1")],
        ["source", str(src), str(src)],
        ["reference", str(src), str(src / "sub" / "out")],
        ["source", str(src), str(tmp_path / "o2"), "--token", "two words"],
        ["source", str(src), str(tmp_path / "o3"), "--resolution", "16"],
        ["source", str(src), str(tmp_path / "o4"), "--parser-weights", str(tmp_path / "nope.pth")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (src / "sub").exists()
    with pytest.raises(SystemExit) as e:
        main(["portrait", str(src), str(tmp_path / "o5")])
    assert e.value.code == 2
    with pytest.raises(PrepareError):
        prepare_folder("source", tmp_path / "missing", tmp_path / "o6")


def test_parser_weights_cli(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from library.faces.bisenet import BiSeNet
    from library.faces.masks import parse_region

    torch.manual_seed(0)
    net = BiSeNet(19)
    with torch.no_grad():  # random weights, but the class scores favour "skin" wherever features fire
        w = net.conv_out.conv_out.weight
        w.abs_()
        w[0].neg_()
        w[2:].neg_()
    weights = tmp_path / "79999_iter.pth"
    torch.save(net.state_dict(), weights)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    astronaut().save(src / "astro.jpg", quality=95)
    r = run_cli("source", src, out, "--parser-weights", weights)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rec = _record(out, "astro")
    assert rec["mask_method"] == "bisenet"
    mask = read_mask(out / "astro.mask.png")
    x0, y0, x1, y1 = parse_region(rec["face_box"], rec["width"], rec["height"])
    outside = mask.copy()
    outside[y0:y1, x0:x1] = 0
    assert outside.max() == 0, "the parsed face lies within the face's region"
    assert box_mean(mask, rec["face_box"], shrink=0.15) > 0.5
    # weights that are not a BiSeNet: one line, exit 2
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    capsys.readouterr()
    assert main(["source", str(src), str(tmp_path / "out2"), "--parser-weights", str(tmp_path / "other.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "other.pth" in err[0], err


def test_demo_photos(tmp_path):
    from dataset_tools.demo_photos import write_demo_photos

    src_raw, ref_raw = write_demo_photos(tmp_path / "raw")
    s = prepare_folder("source", src_raw, tmp_path / "source")
    assert len(s.used) == len(s.read) >= 4 and s.skipped == []
    for m in s.items:
        assert m["num_faces"] == 1 and m["mask_method"] == "face_mesh_oval" and m["warnings"] == [], m
    r = prepare_folder("reference", ref_raw, tmp_path / "reference")
    assert len(r.used) == len(r.read) == 4
    for m in r.items:
        assert m["num_faces"] == 1 and m["warnings"] == [], m


def test_failed_write_leaves_no_half_item(tmp_path, monkeypatch):
    import os

    import dataset_tools.prepare as prep

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    astronaut().save(src / "a.jpg", quality=95)
    astronaut().transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / "b.jpg", quality=95)
    real_replace = os.replace

    def flaky_replace(tmp, dst):
        if str(dst).endswith("b.json"):
            raise OSError(28, "No space left on device")
        return real_replace(tmp, dst)

    monkeypatch.setattr(prep.os, "replace", flaky_replace)
    s = prepare_folder("source", src, out)
    assert s.used == ["a.jpg"]
    assert s.skipped == [("b.jpg", "cannot write outputs: No space left on device")]
    assert sorted(p.name for p in out.glob("b*")) == [] and not (out / "preview" / "b.jpg").exists()
    assert leftovers(out) == []
    # a later run into the same folder without a.jpg says a's item is still there
    (src / "a.jpg").unlink()
    monkeypatch.setattr(prep.os, "replace", real_replace)
    s = prepare_folder("source", src, out)
    assert s.used == ["b.jpg"]
    assert any("earlier run" in m and "a" in m for _, m in s.warnings)
