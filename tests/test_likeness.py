"""library/evaluation/likeness.py and head_pose.py: centroid identity, copy score and share, leave-one-out,
head pose and its bins; by hand on constructed sets, then on real photos with dlib's network."""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from library.evaluation.head_pose import head_pose, pose_bin
from library.evaluation.likeness import (centroid, copy_ceiling, face_likeness, leave_one_out, score_face,
                                         summarise_faces)

# three source "photos": unit vectors, given unscaled (the code normalises them)
SOURCE = np.array([[2.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.3, 0.0, 0.4]])
NORM = math.sqrt(2.2 ** 2 + 0.8 ** 2 + 0.8 ** 2)  # |S0 + S1 + S2| of the unit rows (1, 0, 0) + (.6, .8, 0) + (.6, 0, .8)


def test_centroid_leave_one_out_and_ceiling_by_hand():
    np.testing.assert_allclose(centroid(SOURCE), np.array([2.2, 0.8, 0.8]) / NORM, atol=1e-12)
    # S0 against (S1 + S2) / |S1 + S2| = (1.2, .8, .8) / sqrt(2.72); S1 against (1.6, 0, .8) / sqrt(3.2)
    assert leave_one_out(SOURCE) == pytest.approx([1.2 / math.sqrt(2.72), 0.6 * 1.6 / math.sqrt(3.2),
                                                   0.6 * 1.6 / math.sqrt(3.2)], abs=1e-12)
    assert copy_ceiling(SOURCE) == pytest.approx(0.6, abs=1e-12)  # S0.S1 = S0.S2 = .6, S1.S2 = .36
    assert copy_ceiling(SOURCE[:1]) is None and leave_one_out(SOURCE[:1]) == [None]
    with pytest.raises(ValueError, match="no source face"):
        centroid(np.zeros((0, 3)))


def test_copy_score_and_share_by_hand():
    ceiling = copy_ceiling(SOURCE)
    # a copy of photo 1: nearest 1, identity S1.c = (.6 * 2.2 + .8 * .8) / NORM
    copy = face_likeness(np.array([0.6, 0.8, 0.0]), SOURCE, ceiling)
    assert copy.identity == pytest.approx(1.96 / NORM, abs=1e-12) and copy.nearest == pytest.approx(1.0)
    assert copy.nearest_index == 1 and copy.copy == pytest.approx(1.0 - 1.96 / NORM, abs=1e-12) and copy.copied is True
    # the centroid itself: identity 1, nearest S0.c = 2.2 / NORM, copy negative, nearer than .6: copied
    middle = face_likeness(np.array([2.2, 0.8, 0.8]), SOURCE, ceiling)
    assert (middle.identity, middle.nearest, middle.nearest_index) == pytest.approx((1.0, 2.2 / NORM, 0), abs=1e-12)
    assert middle.copy == pytest.approx(2.2 / NORM - 1.0, abs=1e-12) and middle.copied is True
    # someone else: (0, -1, 0): identity -.8 / NORM, nearest 0 (S0 and S2), copy .8 / NORM, not copied
    other = face_likeness(np.array([0.0, -1.0, 0.0]), SOURCE, ceiling)
    assert (other.identity, other.nearest, other.copy) == pytest.approx((-0.8 / NORM, 0.0, 0.8 / NORM), abs=1e-12)
    assert other.copied is False
    assert face_likeness(np.array([1.0, 0, 0]), SOURCE[:1]).copied is None  # one source face: no ceiling

    summary = summarise_faces([score_face(np.array(v), None, SOURCE, ceiling) for v in
                               ([0.6, 0.8, 0.0], [2.2, 0.8, 0.8], [0.0, -1.0, 0.0])] + [None])
    assert summary["identity"] == pytest.approx((1.96 / NORM + 1.0 - 0.8 / NORM) / 3, abs=1e-12)
    assert summary["copy"] == pytest.approx((1.0 - 1.96 / NORM + 2.2 / NORM - 1.0 + 0.8 / NORM) / 3, abs=1e-12)
    assert summary["copy_share"] == pytest.approx(2 / 3) and summary["faces"] == 3
    assert summary["poses"]["frontal"] == {"n": 0, "identity": None}  # no parts: no pose
    assert summarise_faces([None])["identity"] is None
    degenerate = score_face(np.array([1.0, 0, 0]), np.zeros((5, 2)), SOURCE, ceiling)  # eyes in one point: no pose
    assert degenerate.pose is None and degenerate.likeness.copied is True
    assert score_face(np.array([1.0, 0, 0]), np.array([[210, 200], [190, 200], [90, 200], [110, 200], [150, 275]]),
                      SOURCE, ceiling).pose == "frontal"


def _parts(eye_left, eye_right, nose, half_width: float = 10.0) -> np.ndarray:
    """dlib's 5 parts from eye centres (image-left, image-right) and the nose base: corners +-half_width along x."""
    (lx, ly), (rx, ry) = eye_left, eye_right
    return np.array([[rx + half_width, ry], [rx - half_width, ry], [lx - half_width, ly], [lx + half_width, ly], nose],
                    np.float64)


def test_head_pose_of_hand_made_parts():
    """Eyes 100 px apart. Nose 35 px right of their midpoint: x_n / e = 0.35 = D, so yaw = atan(1) = 45 degrees;
    106.07 px below (0.75 / cos(45 deg) eye distances: the frontal drop H once the eyes' shortening is undone):
    pitch 0. Mirrored: -45."""
    drop = 75.0 / math.cos(math.radians(45))
    yaw, pitch, roll = head_pose(_parts((100, 200), (200, 200), (185, drop + 200)))
    assert (yaw, pitch, roll) == pytest.approx((45.0, 0.0, 0.0), abs=1e-9)
    yaw, pitch, roll = head_pose(_parts((100, 200), (200, 200), (115, drop + 200)))
    assert (yaw, pitch, roll) == pytest.approx((-45.0, 0.0, 0.0), abs=1e-9)
    # frontal nose at H = .75 below: 0, 0; at .75 cos(20) - .35 sin(20) (the face raised 20 degrees): pitch 20
    assert head_pose(_parts((100, 200), (200, 200), (150, 275)))[:2] == pytest.approx((0.0, 0.0), abs=1e-9)
    up = 100 * (0.75 * math.cos(math.radians(20)) - 0.35 * math.sin(math.radians(20)))
    assert head_pose(_parts((100, 200), (200, 200), (150, 200 + up)))[:2] == pytest.approx((0.0, 20.0), abs=1e-9)
    # the same face turned 30 degrees in the image plane (clockwise on screen): roll 30, yaw and pitch unchanged
    turn = np.array([[math.cos(math.radians(30)), -math.sin(math.radians(30))],
                     [math.sin(math.radians(30)), math.cos(math.radians(30))]])
    turned = (_parts((100, 200), (200, 200), (185, drop + 200)) - 150) @ turn.T + 150
    assert head_pose(turned) == pytest.approx((45.0, 0.0, 30.0), abs=1e-9)
    with pytest.raises(ValueError, match="5 parts"):
        head_pose(np.zeros((4, 2)))


def test_pose_bins_and_their_edges():
    assert [pose_bin(*a) for a in ((0, 0), (14.9, 19.9), (15, 0), (-15, 0), (0, 20), (0, -20), (30, 30), (-20, -40))] == [
        "frontal", "frontal", "right", "left", "up", "down", "right", "down"]  # (30, 30): 2.0 yaw edges > 1.5 pitch edges


# ------------------------------------------------------------------------------ real photos, dlib's network
def _insightface_image(name: str) -> np.ndarray:
    from library.files.images import read_image

    folder = Path(list(importlib.util.find_spec("insightface").submodule_search_locations)[0]) / "data" / "images"
    return np.asarray(read_image(folder / name).image)


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.fixture(scope="module")
def dlib_net():
    from library.evaluation.face_identity import load_identity_network

    return load_identity_network()


def test_copies_other_photos_and_other_people_on_real_photos(dlib_net):
    """Source: the astronaut, her mirror, a half-size and a grey copy (highest pairwise cosine 0.9931, measured).
    The source photos themselves as generated images: nearest 1, all copied (share 1), copy = 1 - identity.
    Her other photos (a JPEG at quality 15, a blur, noise): identity high, none copied, copy within +-0.01.
    Other people (a face of insightface's t1.jpg, Tom Hanks): identity 0.86-0.89, none copied."""
    from skimage import data

    from dataset_tools.demo_photos import T1_CROPS
    from library.evaluation.folders import EvalImage
    from library.evaluation.metrics import evaluate_images

    rgb = data.astronaut()
    image = Image.fromarray(rgb)
    source = {"orig": rgb, "mirror": rgb[:, ::-1].copy(), "half": np.asarray(image.resize((256, 256), Image.Resampling.LANCZOS)),
              "gray": np.asarray(image.convert("L").convert("RGB"))}
    others = {"jpeg15": _jpeg(rgb, 15), "blur": np.asarray(image.filter(ImageFilter.GaussianBlur(2))),
              "noise": np.clip(rgb + np.random.default_rng(0).normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)}
    x0, y0, x1, y1 = dict(T1_CROPS)["t1_left"]
    people = {"t1_left": _insightface_image("t1.jpg")[y0:y1, x0:x1].copy(), "tom": _insightface_image("Tom_Hanks_54745.png")}
    as_items = lambda d: [EvalImage(Path(f"{k}.png"), v) for k, v in d.items()]  # noqa: E731
    ev = evaluate_images(as_items(source | others | people), as_items(source), [], identity=dlib_net, note=lambda _: None)
    scores = {s.name[:-4]: s for s in ev.images}
    assert ev.likeness["ceiling"] == pytest.approx(0.9931, abs=0.002)  # measured 0.99305 (orig and mirror)
    # each photo against the others' centroid: measured 0.989 (half) to 0.997 (orig)
    assert [s["leave_one_out"] for s in ev.likeness["sources"]] == pytest.approx([0.9965, 0.9933, 0.9894, 0.9919], abs=0.002)
    for name in source:
        s = scores[name]
        assert s.copied is True and s.nearest == f"{name}.png" and s.copy == pytest.approx(1.0 - s.identity, abs=1e-5)
        assert 0.99 < s.identity < 1.0  # measured 0.9941 to 0.9981
    for name in others:
        s = scores[name]
        assert s.copied is False and s.identity > 0.97 and abs(s.copy) < 0.012, (name, s)  # measured 0.9735-0.9921
    for name in people:
        s = scores[name]
        assert s.copied is False and 0.85 < s.identity < 0.90 and abs(s.copy) < 0.005, (name, s)  # measured 0.870, 0.889
    assert ev.summary["copied"]["mean"] == pytest.approx(4 / 9) and ev.likeness["copy_share"] == pytest.approx(4 / 9)
    # every face here is near-frontal but Tom Hanks, who tucks his chin (pitch at the model's lowest, -25)
    assert {n: s.pose for n, s in scores.items() if s.pose != "frontal"} == {"tom": "down"}


def test_pose_on_turned_and_mirrored_real_faces(dlib_net):
    """t1.jpg's two turned faces read left (yaw -39 and -48 measured; by eye: turned ~40-45 degrees to the image's
    left); mirrored, the yaw's sign swaps (to within 2 degrees) and the bin is right. The astronaut turned 20
    degrees in the image plane: roll moves by 20 (to 1 degree), yaw and pitch stay frontal."""
    t1 = _insightface_image("t1.jpg")
    faces = {tuple(round(v) for v in f.box): head_pose(f.parts) for f in dlib_net.faces(t1)}
    mirrored = {tuple(round(v) for v in f.box): head_pose(f.parts) for f in dlib_net.faces(t1[:, ::-1].copy())}
    width = t1.shape[1]
    for box in ((883, 89, 988, 193), (275, 179, 363, 267)):
        yaw, pitch, roll = faces[box]
        # HOG's boxes sit on its window grid: the mirrored face's box is within 10 px of the mirrored box
        twin = next(v for b, v in mirrored.items() if abs(width - b[2] - box[0]) <= 10 and abs(b[1] - box[1]) <= 3)
        assert yaw < -35 and pose_bin(yaw, pitch) == "left", (box, yaw, pitch)
        assert twin[0] == pytest.approx(-yaw, abs=2.0) and twin[2] == pytest.approx(-roll, abs=2.0)
        assert pose_bin(twin[0], twin[1]) == "right"
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())
    yaw0, pitch0, roll0 = head_pose(dlib_net.faces(np.asarray(astronaut))[0].parts)
    yaw, pitch, roll = head_pose(dlib_net.faces(np.asarray(astronaut.rotate(20, resample=Image.Resampling.BICUBIC)))[0].parts)
    assert roll == pytest.approx(roll0 - 20, abs=1.0)  # PIL turns counter-clockwise on screen: roll falls
    assert pose_bin(yaw0, pitch0) == pose_bin(yaw, pitch) == "frontal" and abs(yaw - yaw0) < 5
