"""library.evaluation.face_identity on real photos with dlib's real network (face_recognition_models),
and the ArcFace path on a random-weight network the test saves."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from library.evaluation.face_identity import (ARCFACE_COSINE_THRESHOLD, DLIB_COSINE_THRESHOLD, IdentityNetworkError,
                                              arcface_points_from_dlib, load_identity_network)
from library.files.images import read_image

dlib = pytest.importorskip("dlib")


def _insightface_image(name: str) -> np.ndarray:
    import insightface

    return np.asarray(read_image(os.path.join(os.path.dirname(insightface.__file__), "data", "images", name)).image)


@pytest.fixture(scope="module")
def net():
    return load_identity_network()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _astronaut_variants(astronaut: np.ndarray, folder) -> dict[str, np.ndarray]:
    """The astronaut's mirror, a crop, a half-size copy and a copy stored sideways with an EXIF
    orientation tag, each read back through the project's image reader."""
    im = Image.fromarray(astronaut)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": stored turned the other way
    files = {
        "mirror": (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), None),
        "crop": (im.crop((100, 20, 380, 300)), None),
        "half": (im.resize((256, 256), Image.Resampling.LANCZOS), None),
        "exif_rotated": (im.transpose(Image.Transpose.ROTATE_90), exif.tobytes()),
    }
    out = {}
    for name, (img, tag) in files.items():
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95, **({"exif": tag} if tag else {}))
        path = folder / f"{name}.jpg"
        path.write_bytes(buf.getvalue())
        out[name] = np.asarray(read_image(path).image)
    return out


def test_same_person_scores_above_every_different_person(net, astronaut, tmp_path):
    reference = net.faces(astronaut)
    assert len(reference) == 1
    ref = reference[0].embedding
    same = {}
    for name, rgb in _astronaut_variants(astronaut, tmp_path).items():
        faces = net.faces(rgb)
        assert len(faces) == 1, name
        same[name] = net.similarity(ref, faces[0].embedding)
        assert net.same_person(ref, faces[0].embedding), (name, same[name])
    others = net.faces(_insightface_image("t1.jpg")) + net.faces(_insightface_image("Tom_Hanks_54745.png"))
    assert len(others) == 7
    different = [net.similarity(ref, f.embedding) for f in others]
    assert not any(net.same_person(ref, f.embedding) for f in others)
    # measured: same 0.990 (half size) to 0.999 (EXIF-rotated), different 0.823 to 0.891 (cosine of dlib's normalised descriptors)
    assert min(same.values()) >= 0.97, same
    assert max(different) <= 0.90, different
    assert min(same.values()) > max(different)
    assert net.similarity(ref, ref) == pytest.approx(1.0, abs=1e-5)


def test_group_photo_every_face_largest_first(net):
    t1 = _insightface_image("t1.jpg")
    faces = net.faces(t1)
    assert len(faces) == 6
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    # the largest face in t1.jpg (1280 x 886) is the one in the middle, dlib box (452, 300)-(578, 425)
    assert faces[0].box == pytest.approx((452, 300, 578, 425), abs=2)
    for f in faces:
        assert f.embedding.shape == (128,) and f.embedding.dtype == np.float32
        assert float(np.linalg.norm(f.embedding)) == pytest.approx(1.0, abs=1e-5)
        assert f.landmarks.shape == (5, 2)
        x0, y0, x1, y1 = f.box
        (lx, ly), (rx, ry), (nx, ny) = f.landmarks[0], f.landmarks[1], f.landmarks[2]
        assert x0 <= lx < nx < rx <= x1 and y0 <= ly < ny <= y1 and y0 <= ry < ny  # ArcFace order, inside
        assert f.landmarks[3, 0] < f.landmarks[4, 0] and f.landmarks[3, 1] > ny  # mouth corners below the nose
    assert net.faces(np.full((200, 200, 3), 128, np.uint8)) == []


def test_network_name_threshold_and_small_faces(net, astronaut):
    assert net.name == "dlib ResNet v1 (face_recognition_models)"
    assert net.threshold == pytest.approx(DLIB_COSINE_THRESHOLD) == pytest.approx(0.9155, abs=1e-4)
    # a 45 px face: found on the upsampled pass
    half = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.Resampling.LANCZOS))
    faces = net.faces(half)
    assert len(faces) == 1 and faces[0].box == pytest.approx((88, 41, 133, 85), abs=2)
    with pytest.raises(ValueError, match=r"RGB image \[H, W, 3\] uint8"):
        net.faces(astronaut.astype(np.float32))


def test_embed_at_given_landmarks_matches_detected_face(net, astronaut):
    found = net.faces(astronaut)[0]
    # dlib's 5 points of the astronaut: eye corners and nose base
    assert found.landmarks[:3] == pytest.approx(np.array([[203.5, 102.0], [246.0, 104.5], [224.0, 135.0]]), abs=1.5)
    given = net.embed(astronaut, found.landmarks)
    assert given.landmarks_source == "given"
    assert net.similarity(found.embedding, given.embedding) >= 0.995


def test_arcface_points_from_dlib_template_fit():
    # dlib's parts: image-right eye outer/inner corner, image-left eye outer/inner corner, nose base.
    # Built from ArcFace's template eyes (width 10 each) and nose: the result gives back the template.
    t = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])
    parts = np.array([t[1] + [5, 0], t[1] - [5, 0], t[0] - [5, 0], t[0] + [5, 0], t[2]])
    assert arcface_points_from_dlib(parts) == pytest.approx(t, abs=1e-3)
    moved = arcface_points_from_dlib(parts * 2 + [10, 20])
    assert moved == pytest.approx(t * 2 + [10, 20], abs=1e-3)


def test_random_arcface_loads_and_embeds(tmp_path, astronaut):
    from testkit.tiny import save_random_arcface

    path = save_random_arcface(tmp_path / "arcface.pth")
    arc = load_identity_network(str(path))
    assert arc.name == "ArcFace arcface.pth"
    assert arc.threshold == ARCFACE_COSINE_THRESHOLD == 0.3
    faces = arc.faces(astronaut)
    assert len(faces) == 1
    f = faces[0]
    assert f.embedding.shape == (64,) and f.embedding.dtype == np.float32  # the random net's 64-d features
    assert float(np.linalg.norm(f.embedding)) == pytest.approx(1.0, abs=1e-5)
    # mouth corners from mediapipe's mesh, not the template
    assert f.landmarks_source == "mediapipe"
    assert f.landmarks[3:] == pytest.approx(np.array([[201.1, 139.1], [245.8, 141.6]]), abs=3)
    assert load_identity_network(str(path), threshold=0.5).threshold == 0.5


@pytest.mark.parametrize("content, expected", [
    (b"", r"arcface\.pth: .*"),
    (b"not a pickle at all", r"arcface\.pth: .*"),
])
def test_bad_arcface_file_is_one_line(tmp_path, content, expected):
    path = tmp_path / "arcface.pth"
    path.write_bytes(content)
    with pytest.raises(IdentityNetworkError, match=expected) as err:
        load_identity_network(str(path))
    assert "\n" not in str(err.value)


def test_missing_and_unknown_arcface_files(tmp_path):
    with pytest.raises(IdentityNetworkError) as err:
        load_identity_network(str(tmp_path / "nope.onnx"))
    assert str(err.value) == (f"{tmp_path / 'nope.onnx'}: ArcFace weights not found ; give an insightface .onnx "
                              "or an arcface_torch .pth, or none for dlib's network")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(IdentityNetworkError, match=r"unsupported ArcFace file type '\.bin'"):
        load_identity_network(str(tmp_path / "w.bin"))


def test_small_face_beside_a_larger_one_is_found(net, astronaut):
    """Issue 16, kind 7: a 40-80 px face beside a larger one. The upsampled pass ran only when the first
    found nothing, so a second, smaller face was never looked for (and never scored)."""
    t1 = Image.fromarray(_insightface_image("t1.jpg"))
    canvas = Image.new("RGB", (1000, 600), (120, 120, 120))
    canvas.paste(t1.crop((633, 255, 963, 585)).resize((520, 520), Image.Resampling.LANCZOS), (20, 40))
    # the astronaut at 1/2: her 88 px dlib box (179, 83)-(267, 171) becomes 44 px at (760, 242)
    canvas.paste(Image.fromarray(astronaut).crop((60, 0, 400, 340)).resize((170, 170), Image.Resampling.LANCZOS),
                 (700, 200))
    faces = net.faces(np.asarray(canvas))
    assert len(faces) == 2
    big, small = faces
    assert big.box == pytest.approx((174, 214, 354, 394), abs=3)  # the first pass's box, as before
    assert small.box == pytest.approx((760, 242, 805, 287), abs=4)  # measured on the upsampled pass
    own = net.faces(astronaut)[0].embedding
    assert net.same_person(small.embedding, own) and not net.same_person(big.embedding, own)
    assert net.similarity(small.embedding, own) == pytest.approx(0.99, abs=0.01)  # measured 0.990; stranger 0.86
    assert net.similarity(big.embedding, own) == pytest.approx(0.86, abs=0.02)
