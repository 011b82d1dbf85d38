"""library.faces.detect_face_landmarks (the landmarks-only face finder post-processing, the identity term
and the ArcFace identity network use) and quiet_native_stderr, on real photos (no downloaded weights)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from library.faces import FaceAnalyzer, detect_face_landmarks, quiet_native_stderr

ROOT = Path(__file__).resolve().parent.parent

# The astronaut (skimage, 512 x 512), measured with mediapipe 0.10.21's face mesh: the image-left eye,
# the image-right eye, the nose tip, the image-left and image-right mouth corners (ArcFace order).
ASTRONAUT_MESH = np.array([[203.9, 101.9], [247.3, 104.3], [223.2, 131.7], [201.3, 139.2], [245.8, 141.7]])
# The same face from the detector's keypoints alone: mouth corners placed 0.42 eye distances either
# side of the detector's mouth point (geometry.landmarks_from_detector), so lower and narrower.
ASTRONAUT_DETECTOR = np.array([[201.5, 104.9], [245.8, 109.1], [220.4, 127.3], [201.2, 146.8], [238.4, 150.4]])


def test_astronaut_landmarks_come_from_the_face_mesh():
    (points,) = detect_face_landmarks(data.astronaut())
    assert points.dtype == np.float32
    np.testing.assert_allclose(points, ASTRONAUT_MESH, atol=1.5)


def test_without_refinement_the_detector_keypoints_give_the_landmarks():
    (points,) = detect_face_landmarks(data.astronaut(), refine=False)
    np.testing.assert_allclose(points, ASTRONAUT_DETECTOR, atol=1.5)


def test_one_detection_path_with_the_analyzer():
    """The finder is FaceAnalyzer's detection and mesh: on a photo with one upright face both give the
    same landmarks, to the bit."""
    rgb = data.astronaut()
    with quiet_native_stderr(), FaceAnalyzer() as analyzer:
        analysis = analyzer.analyze(rgb)
    (points,) = detect_face_landmarks(rgb)
    assert analysis.face.confirmed
    np.testing.assert_array_equal(points, analysis.landmarks.astype(np.float32))


def test_no_face_and_tiny_images_give_an_empty_list():
    assert detect_face_landmarks(data.coffee()) == []
    assert detect_face_landmarks(np.zeros((1, 1, 3), np.uint8)) == []


def test_pil_images_of_any_mode_and_grey_arrays():
    rgb = data.astronaut()
    (ref,) = detect_face_landmarks(rgb)
    (rgba,) = detect_face_landmarks(Image.fromarray(rgb).convert("RGBA"))  # opaque alpha: same pixels
    np.testing.assert_array_equal(rgba, ref)
    (grey,) = detect_face_landmarks(np.asarray(Image.fromarray(rgb).convert("L")))
    np.testing.assert_allclose(grey, ref, atol=2.0)  # measured: 1.1 px at most


def test_mediapipe_says_nothing_on_stderr():
    """mediapipe's C++ start-up lines ("Created TensorFlow Lite XNNPACK delegate", "Feedback manager
    requires ...") go to file descriptor 2; the finder silences them, in a fresh process where they
    would all appear."""
    code = ("import numpy as np; from skimage import data; from library.faces import detect_face_landmarks; "
            "print(len(detect_face_landmarks(data.astronaut())), len(detect_face_landmarks(data.coffee())))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "0"]
    assert r.stderr == ""


def test_quiet_native_stderr_hands_python_messages_to_the_callers_stderr(capsys):
    """Native writes to fd 2 vanish; Python messages written to the yielded stream reach sys.stderr,
    also when sys.stderr is not fd 2 (here pytest's capture)."""
    with quiet_native_stderr() as stream:
        os.write(2, b"native noise\n")
        print("for the user", file=stream)
    assert capsys.readouterr().err == "for the user\n"


def test_quiet_native_stderr_on_the_real_stderr():
    """With sys.stderr on fd 2 (a command line), the yielded stream is a copy of the real stderr."""
    code = ("import os, sys; from library.faces import quiet_native_stderr\n"
            "with quiet_native_stderr() as s:\n"
            "    os.write(2, b'native noise\\n'); print('for the user', file=s)\n"
            "print('after', file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stderr == "for the user\nafter\n", r.stderr


@pytest.mark.parametrize("score", [0.5, 0.9])
def test_sure_score_keeps_unconfirmed_faces_out(score):
    """A detection under `sure_score` needs the mesh's confirmation; without the mesh (refine=False)
    nothing confirms, so only detections at or over `sure_score` remain (the astronaut scores 0.92)."""
    found = detect_face_landmarks(data.astronaut(), refine=False, sure_score=score + 0.05)
    assert len(found) == (1 if score + 0.05 <= 0.92 else 0)
