"""dataset_tools.faces / bisenet / images.encode_png on real photos (no downloaded weights)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_dataset import (  # noqa: E402
    analyzer,  # noqa: F401 - fixture
    astronaut,
    box_mean,
    coffee,
    far_from_box,
    group_photo,
    tom_hanks,
)


def _check_landmark_order(lm: np.ndarray, box) -> None:
    eye_l, eye_r, nose, mouth_l, mouth_r = lm
    assert eye_l[0] < eye_r[0], "first landmark is the eye on the image's left"
    assert mouth_l[0] < mouth_r[0]
    eyes_y = (eye_l[1] + eye_r[1]) / 2
    mouth_y = (mouth_l[1] + mouth_r[1]) / 2
    assert eyes_y < nose[1] < mouth_y, "eyes above nose above mouth"
    x0, y0, x1, y1 = box
    pad = 0.15 * (x1 - x0)
    assert np.all(lm[:, 0] > x0 - pad) and np.all(lm[:, 0] < x1 + pad)
    assert np.all(lm[:, 1] > y0 - pad) and np.all(lm[:, 1] < y1 + pad)


def test_astronaut_box_landmarks_mask(analyzer):
    rgb = np.asarray(astronaut())
    res = analyzer.analyze(rgb)
    assert res.detector == "short_range" and len(res.faces) == 1
    x0, y0, x1, y1 = res.face.box
    # Eileen Collins' face sits around x 175-275, y 80-180 of the 512 px photo
    assert 150 < x0 < 200 and 250 < x1 < 300 and 55 < y0 < 110 and 150 < y1 < 205
    assert res.face.score > 0.8
    assert res.mask_method == "face_mesh_oval"
    _check_landmark_order(res.landmarks, res.face.box)
    m = res.face_mask
    assert m.shape == rgb.shape[:2] and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    assert box_mean(m, res.face.box, shrink=0.15) > 0.95
    assert box_mean(m, res.face.box) > 0.75
    assert far_from_box(m, res.face.box).max() == 0
    assert m[300:].max() == 0, "nothing below the chin (suit, helmet)"
    assert 0.015 < (m > 0).mean() < 0.06


def test_mirrored_photo_keeps_landmark_order(analyzer):
    rgb = np.ascontiguousarray(np.asarray(astronaut())[:, ::-1])
    res = analyzer.analyze(rgb)
    ref = analyzer.analyze(np.asarray(astronaut()))
    _check_landmark_order(res.landmarks, res.face.box)
    mirrored = (512 - ref.face.box[2], ref.face.box[1], 512 - ref.face.box[0], ref.face.box[3])
    assert np.allclose(res.face.box, mirrored, atol=8)


def test_small_face_112px(analyzer):
    rgb = np.asarray(tom_hanks())
    res = analyzer.analyze(rgb)
    assert len(res.faces) == 1 and res.mask_method == "face_mesh_oval"
    _check_landmark_order(res.landmarks, res.face.box)
    assert box_mean(res.face_mask, res.face.box, shrink=0.2) > 0.9
    assert 0.3 < (res.face_mask > 0).mean() < 0.75


def test_small_face_in_big_photo_uses_mesh_on_crop(analyzer):
    # the astronaut at 1/2 scale in the corner of a 1600 px frame: a ~48 px face
    canvas = Image.new("RGB", (1600, 1600), (120, 120, 120))
    canvas.paste(astronaut().resize((256, 256), Image.Resampling.LANCZOS), (1200, 900))
    res = analyzer.analyze(np.asarray(canvas))
    assert len(res.faces) == 1
    assert res.mask_method == "face_mesh_oval", res.warnings
    cx = (res.face.box[0] + res.face.box[2]) / 2
    assert 1280 < cx < 1340
    _check_landmark_order(res.landmarks, res.face.box)
    assert box_mean(res.face_mask, res.face.box, shrink=0.2) > 0.9
    assert far_from_box(res.face_mask, res.face.box).max() == 0


def test_group_photo_full_range_fallback(analyzer):
    rgb = np.asarray(group_photo())
    faces, detector = analyzer.detect(rgb)
    assert detector == "full_range", "the short-range model misses this group's small faces"
    assert len(faces) >= 2
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    res = analyzer.analyze(rgb)
    _check_landmark_order(res.landmarks, res.face.box)
    # the largest face is turned three-quarters: the oval covers its visible side of the box
    assert box_mean(res.face_mask, res.face.box, shrink=0.2) > 0.5
    assert far_from_box(res.face_mask, res.face.box).max() == 0


def test_no_face(analyzer):
    res = analyzer.analyze(np.asarray(coffee()))
    assert res.faces == [] and res.detector is None and res.face_mask is None and res.landmarks is None


def test_square_crop_maps_back():
    from dataset_tools.faces import square_crop

    yy, xx = np.mgrid[0:300, 0:400]
    img = np.stack([xx * 255 // 399, yy * 255 // 299, (xx + yy) * 255 // 698], -1).astype(np.uint8)
    crop, ox, oy, s = square_crop(img, 390.0, 20.0, 100.0, 200)  # half outside the image: padded
    assert crop.shape == (200, 200, 3)
    assert crop[:40].max() == 0 and crop[:, 120:].max() == 0
    # an image pixel lands where (p - o) * s says
    for px, py in [(350, 10), (380, 60)]:
        cx, cy = (px + 0.5 - ox) * s, (py + 0.5 - oy) * s
        assert np.abs(crop[int(cy), int(cx)].astype(int) - img[py, px].astype(int)).max() <= 3


# -- BiSeNet ---------------------------------------------------------------------------------------


def test_bisenet_keys_match_face_parsing_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from dataset_tools.bisenet import BiSeNet, ParserLoadError, load_bisenet

    net = BiSeNet(19)
    sd = net.state_dict()
    # key names of face-parsing.PyTorch's 79999_iter.pth
    for key in [
        "cp.resnet.conv1.weight", "cp.resnet.bn1.running_var", "cp.resnet.layer1.0.conv1.weight",
        "cp.resnet.layer2.0.downsample.0.weight", "cp.resnet.layer4.1.bn2.bias", "cp.arm16.conv.conv.weight",
        "cp.arm32.conv_atten.weight", "cp.arm32.bn_atten.running_mean", "cp.conv_head32.bn.weight",
        "cp.conv_avg.conv.weight", "ffm.convblk.conv.weight", "ffm.conv1.weight", "ffm.conv2.weight",
        "conv_out.conv.conv.weight", "conv_out.conv_out.weight", "conv_out16.conv_out.weight",
        "conv_out32.conv.bn.running_var",
    ]:
        assert key in sd, key
    assert not any(k.startswith("sp.") for k in sd), "the released model has no spatial path"
    assert tuple(sd["conv_out.conv_out.weight"].shape) == (19, 256, 1, 1)
    assert tuple(sd["cp.resnet.layer4.1.conv2.weight"].shape) == (512, 512, 3, 3)
    n_params = sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k)
    assert 12_000_000 < n_params < 14_000_000  # ~13.3 M, the 50 MB checkpoint
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 19, 64, 64)] * 3

    path = tmp_path / "w.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)  # DataParallel-style keys load too
    assert isinstance(load_bisenet(path), BiSeNet)
    old_style = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 torch
    torch.save(old_style, tmp_path / "old.pth")
    assert isinstance(load_bisenet(tmp_path / "old.pth"), BiSeNet)
    bad = dict(sd)
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ParserLoadError):
        load_bisenet(tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ParserLoadError):
        load_bisenet(tmp_path / "junk.pth")


# -- PNG writer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 3), (37, 53, 3), (64, 80), (5, 1)])
def test_encode_png_round_trip(shape):
    import cv2

    from dataset_tools.images import encode_png

    a = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(a)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.mode == ("RGB" if a.ndim == 3 else "L")
        assert np.array_equal(np.asarray(im), a)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(back[..., ::-1] if a.ndim == 3 else back, a)
