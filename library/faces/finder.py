"""Faces as 5 ArcFace landmarks, for callers that want only the points: post-processing (face
restoration), the identity term's `loss.id_face = "detector"` and the ArcFace identity network.

    faces = detect_face_landmarks(rgb)   # [[5, 2] float32, ...], surest face first

It runs on `FaceAnalyzer`'s detectors and face mesh (one detection code path for the whole project):
every face `FaceAnalyzer.find` gives (both detectors on the whole image, the full-range one on tiles for
faces from 40 px), then the face mesh on a square crop around each face (`FaceAnalyzer.check`, the quick
form: the crop as it is and turned 90 degrees).
Landmarks come from the mesh (`geometry.landmarks_from_mesh`) or, without a mesh fit, from the
detector's keypoints (`geometry.landmarks_from_detector`).

One analyzer per `min_score` is built on first use and kept for the process (building mediapipe's
graphs costs ~0.3 s; the identity term calls this every step). mediapipe's native (C++) start-up and
warning lines on stderr are silenced while it runs (`quiet_native_stderr`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import numpy as np
from PIL import Image

from library.faces.analyzer import FaceAnalyzer
from library.faces.geometry import landmarks_from_detector, landmarks_from_mesh

__all__ = ["detect_face_landmarks", "quiet_native_stderr"]

_ANALYZERS: dict[float, FaceAnalyzer] = {}
_LOCK = threading.Lock()  # mediapipe's graphs are not safe to run from two threads at once


def _writes_to_fd2(stream) -> bool:
    """Whether `stream` (sys.stderr) writes to file descriptor 2 (False when a test harness or a caller
    has replaced it with an in-memory stream)."""
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence the C++ logging mediapipe/TFLite print on file descriptor 2; yields the stream Python
    messages meant for the user should be written to during the block.

    That stream is a copy of the real stderr when `sys.stderr` writes to fd 2, else `sys.stderr` itself
    (pytest's capture, a caller's StringIO), so messages always reach whoever reads stderr. Nests.
    """
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed or odd stderr must not stop the work
        pass
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield sys.stderr
        return
    stream = None
    try:
        os.dup2(devnull, 2)
        if _writes_to_fd2(sys.stderr):
            stream = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
            yield stream
        else:
            yield sys.stderr
    finally:
        try:
            if stream is not None:
                stream.flush()
                stream.close()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def _shared_analyzer(min_score: float) -> FaceAnalyzer:
    """The process's analyzer for `min_score` (built on first use; call with _LOCK held)."""
    analyzer = _ANALYZERS.get(min_score)
    if analyzer is None:
        analyzer = _ANALYZERS[min_score] = FaceAnalyzer(min_score=min_score)
    return analyzer


def _as_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """[H, W, 3] uint8 contiguous RGB from a PIL image (any mode, through the shared converter), an
    [H, W] grey array or an [H, W, 3/4] array (alpha dropped)."""
    if isinstance(image, Image.Image):
        from library.files.images import to_rgb

        image = to_rgb(image)
    rgb = np.asarray(image, dtype=np.uint8)
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    return np.ascontiguousarray(rgb[..., :3])


def detect_face_landmarks(
    rgb: np.ndarray | Image.Image, min_score: float = 0.5, sure_score: float = 0.75, refine: bool = True
) -> list[np.ndarray]:
    """Faces in an RGB image as [5, 2] float32 arrays in ArcFace order (pixels), surest first.

    rgb: [H, W, 3] uint8 (an alpha channel is dropped, grey is repeated) or a PIL image of any mode.
    min_score: the detectors' confidence threshold. A detection scoring below `sure_score` is kept only
    when the face mesh confirms it (two fits on differently turned crops agree): the detector alone
    fires on textures. refine=False skips the face mesh: detector landmarks, sure detections only, and
    no tiles (a tile's face needs the mesh's confirmation), so faces under ~1/10 of the image's long side
    may be missed. No face: []. Never raises for an image without faces.
    """
    rgb = _as_rgb(rgb)
    if min(rgb.shape[:2]) < 2:
        return []
    with _LOCK, quiet_native_stderr():
        analyzer = _shared_analyzer(float(min_score))
        faces = analyzer.find(rgb, tiles=refine, thorough=False)
        out = []
        for face in sorted(faces, key=lambda f: -f.score):
            if refine:
                analyzer.check(rgb, face, thorough=False)
            if face.score < sure_score and not face.confirmed:
                continue
            points = landmarks_from_mesh(face.mesh) if face.mesh is not None else landmarks_from_detector(face.keypoints)
            out.append(np.asarray(points, np.float32))
    return out
