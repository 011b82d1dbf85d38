"""dlib's face-recognition ResNet in PyTorch (library/models/dlib_resnet.py, library/models/identity.py's dlib
chip) against dlib's own C++ on real photos: the astronaut and insightface's t1.jpg (six faces)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from library.files.images import read_image
from library.models.dlib_resnet import DLIB_RESNET_FILE, DlibModelError, dlib_model_dir, read_dlib_resnet
from library.models.identity import dlib_chips, dlib_parts_from_arcface, load_identity_encoder

dlib = pytest.importorskip("dlib")


def _t1() -> np.ndarray:
    import insightface

    return np.asarray(read_image(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")).image)


@pytest.fixture(scope="module")
def ref():
    """dlib's detector, 5-point predictor and recogniser, our encoder, and every face of the two photos."""
    from skimage import data

    models = dlib_model_dir()
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    recogniser = dlib.face_recognition_model_v1(str(models / DLIB_RESNET_FILE))
    faces = []
    for img in (data.astronaut(), _t1()):
        for rect in detector(img, 0):  # faces of 80 px and more: the first pass finds no texture "face"
            faces.append((img, predictor(img, rect)))
    assert len(faces) == 7
    return {"recogniser": recogniser, "faces": faces, "encoder": load_identity_encoder(),
            "detector": detector, "predictor": predictor}


def _parts(shape) -> torch.Tensor:
    return torch.tensor([[[p.x, p.y] for p in shape.parts()]], dtype=torch.float64)


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].double()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_descriptor_equals_dlibs_on_the_same_chip(ref):
    """The network alone: dlib's own 150 px chip into both; measured max |diff| 1.7e-7 (descriptor norm ~1.46)."""
    net = ref["encoder"].net
    for img, shape in ref["faces"]:
        chip = dlib.get_face_chip(img, shape, 150, 0.25)
        want = np.array(ref["recogniser"].compute_face_descriptor(chip))
        with torch.no_grad():
            got = net(torch.from_numpy(chip).permute(2, 0, 1)[None].float())[0].numpy()
        assert np.abs(got - want).max() < 1e-4
        assert _cos(got, want) > 0.99999


def test_chip_equals_get_face_chip_within_one_grey_level(ref):
    """Our differentiable chip is the exact bilinear value; dlib truncates it to uint8 (measured 0 to 0.99999)."""
    for img, shape in ref["faces"]:
        want = dlib.get_face_chip(img, shape, 150, 0.25).astype(np.float64)
        got = dlib_chips(_tensor(img), _parts(shape))[0].permute(1, 2, 0).numpy()
        diff = got - want
        assert diff.min() > -1e-6 and diff.max() < 1.0 + 1e-6, (diff.min(), diff.max())
        assert 0.4 < diff.mean() < 0.6  # truncation: half a grey level on average


def test_image_to_descriptor_equals_compute_face_descriptor(ref):
    """Chip and network together from dlib's parts, against compute_face_descriptor(img, shape): measured
    cosine 0.999984 to 0.999997 (dlib's chip is truncated to integers, ours is not)."""
    enc = ref["encoder"]
    for img, shape in ref["faces"]:
        want = np.array(ref["recogniser"].compute_face_descriptor(img, shape))
        with torch.no_grad():
            got = enc.from_parts(_tensor(img).float() / 127.5 - 1, _parts(shape))[0].numpy()
        assert _cos(got, want) > 0.9999


def test_large_face_from_a_pyramid_level(ref):
    """A face over twice the chip's size: dlib samples its image pyramid, we box-filter as many halvings;
    not bit-equal (dlib's pyramid_down<2> filter differs), measured cosine 0.99945 (3x astronaut)."""
    import cv2
    from skimage import data

    img = cv2.resize(data.astronaut(), None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    shape = ref["predictor"](img, ref["detector"](img, 0)[0])
    want = np.array(ref["recogniser"].compute_face_descriptor(img, shape))
    with torch.no_grad():
        got = ref["encoder"].from_parts(_tensor(img).float() / 127.5 - 1, _parts(shape))[0].numpy()
    assert _cos(got, want) > 0.999


def test_chip_from_stored_arcface_landmarks(ref):
    """What training uses: dlib's parts estimated from the face mesh's ArcFace landmarks (what prepare stores).
    Against dlib's own descriptor of the same face, measured cosine 0.964 (a turned head in t1.jpg) to
    0.995, euclidean 0.16 to 0.40: the same person by dlib's rule (under 0.6). The parts sit within 0.32
    eye-corner distances of dlib's (0.09 for frontal faces). The constants were fitted on these faces."""
    from library.faces import detect_face_landmarks

    enc = ref["encoder"]
    meshes = {}
    for img, shape in ref["faces"]:
        parts = _parts(shape)[0].numpy()
        found = meshes.setdefault(id(img), detect_face_landmarks(img))
        match = [np.asarray(m, np.float32) for m in found if np.linalg.norm(m[2] - parts.mean(0)) < 40]
        if not match:
            continue
        lm = torch.from_numpy(match[0])[None]
        est = dlib_parts_from_arcface(lm)[0].numpy()
        assert np.abs(est - parts).max() < 0.35 * np.linalg.norm(parts[0] - parts[2])
        want = np.array(ref["recogniser"].compute_face_descriptor(img, shape))
        with torch.no_grad():
            got = enc(_tensor(img).float() / 127.5 - 1, lm)[0].numpy()
        assert _cos(got, want) > 0.95 and np.linalg.norm(got - want) < 0.45


def test_gradient_reaches_the_image_inside_the_chip(ref):
    img, shape = ref["faces"][0]
    x = (_tensor(img).float() / 127.5 - 1).requires_grad_(True)
    ref["encoder"].from_parts(x, _parts(shape)).pow(2).sum().backward()
    assert x.grad[0, :, 100:160, 190:260].abs().sum() > 0  # the astronaut's face
    assert x.grad[0, :, 400:, :100].abs().sum() == 0  # far from the chip


def _damaged(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DlibModelError) as err:
        read_dlib_resnet(path)
    assert "\n" not in str(err.value) and name in str(err.value)
    return str(err.value)


def test_damaged_and_foreign_files_are_refused_in_one_line(tmp_path):
    real = (dlib_model_dir() / DLIB_RESNET_FILE).read_bytes()
    assert "larger than the file" in _damaged(tmp_path, "truncated.dat", real[: len(real) // 2])
    assert "file ends" in _damaged(tmp_path, "cut.dat", real[:300])
    assert "bytes after the last layer" in _damaged(tmp_path, "longer.dat", real + b"\x00")
    _damaged(tmp_path, "text.dat", b"not a model\n")
    _damaged(tmp_path, "empty.dat", b"")
    # another dlib network (the CNN face detector) is refused at its loss layer's name
    assert "loss_mmod" in _damaged(tmp_path, "mmod.dat", (dlib_model_dir() / "mmod_human_face_detector.dat").read_bytes())
    # a tensor claiming 2**31 floats is refused before anything is allocated
    at = real.index(b"con_4") + len(b"con_4") + 2  # after the params tensor's version
    bomb = real[:at] + b"\x04\xff\xff\xff\x7f" + real[at + 3:]
    assert "larger than the file" in _damaged(tmp_path, "bomb.dat", bomb)
    # one filter count changed (the first convolution's 32 -> 33)
    at = real.index(b"\x01\x20\x01\x07\x01\x07\x01\x02\x01\x02")
    assert "layer 0 (con)" in _damaged(tmp_path, "other.dat", real[:at] + b"\x01\x21" + real[at + 2:])
