"""Geometry of one face: the 5 ArcFace landmarks, the face's up axis, their order, quarter turns.

Pure numpy, no models. Points are image pixels, x right and y down, continuous (an image of width w spans
[0, w]). Angles are the face's up direction (mouth -> eyes) in degrees clockwise from the image's up:
0 = upright, 90 = the top of the head points right, -90 = left, +-180 = upside down.

The 5 landmarks are in insightface's order (``ARCFACE_TEMPLATE_112``): the eye on the image's left, the
eye on the image's right, the nose tip, the mouth corner on the image's left, the one on its right. For
a tilted face "left" means along the face's own left-right axis, which is what a similarity alignment
to the template needs.
"""

from __future__ import annotations

import numpy as np

# mediapipe face-mesh indices. The mesh's "RIGHT_EYE" is the subject's right eye, which is on the
# image's left in an ordinary (unmirrored, upright) photo: insightface's order starts there.
MESH_RIGHT_EYE = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246)
MESH_LEFT_EYE = (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)
MESH_NOSE_TIP = 1
MESH_MOUTH_IMAGE_LEFT = 61
MESH_MOUTH_IMAGE_RIGHT = 291
MESH_FOREHEAD = 10  # top of the face's midline
MESH_CHIN = 152  # bottom of the face's midline

UPRIGHT_LIMIT = 60.0  # degrees: a face further than this from upright is "on its side" or upside down
AGREE_DISTANCE = 0.3  # two fits of one face agree within this x the eye-to-mouth distance (RMS over the 5)


def landmarks_from_mesh(pts: np.ndarray) -> np.ndarray:
    """[468, 2] face-mesh points -> [5, 2] ArcFace landmarks in the mesh's own (subject-based) order."""
    return np.stack(
        [
            pts[list(MESH_RIGHT_EYE)].mean(0),
            pts[list(MESH_LEFT_EYE)].mean(0),
            pts[MESH_NOSE_TIP],
            pts[MESH_MOUTH_IMAGE_LEFT],
            pts[MESH_MOUTH_IMAGE_RIGHT],
        ]
    )


def landmarks_from_detector(keypoints: np.ndarray) -> np.ndarray:
    """mediapipe detector keypoints [6, 2] (right eye, left eye, nose tip, mouth centre, ears) -> [5, 2].

    The detector gives one mouth point; the corners are put 0.42 interocular distances either side of
    it, along the eye line, then ordered image-left first along the face's own axes.
    """
    eye_a, eye_b, nose, mouth = keypoints[0], keypoints[1], keypoints[2], keypoints[3]
    half = (eye_b - eye_a) * 0.42
    lm = np.stack([eye_a, eye_b, nose, mouth - half, mouth + half])
    return order_landmarks(lm, up_axis(lm))


def up_axis(landmarks: np.ndarray) -> np.ndarray:
    """Unit vector from the mouth's centre to the eyes' centre (the face's up), [2]."""
    v = (landmarks[0] + landmarks[1]) / 2 - (landmarks[3] + landmarks[4]) / 2
    n = float(np.hypot(*v))
    return v / n if n > 0 else np.array([0.0, -1.0])


def mesh_up_axis(pts: np.ndarray) -> np.ndarray:
    """Unit vector from the chin to the top of the forehead along the mesh's midline, [2]."""
    v = pts[MESH_FOREHEAD] - pts[MESH_CHIN]
    n = float(np.hypot(*v))
    return v / n if n > 0 else np.array([0.0, -1.0])


def right_axis(up: np.ndarray) -> np.ndarray:
    """The face's left-to-right axis as the image shows it: `up` turned 90 degrees clockwise on screen."""
    return np.array([-up[1], up[0]])


def angle_of(up: np.ndarray) -> float:
    """Degrees clockwise from the image's up to the unit vector `up` (y down), in (-180, 180]."""
    a = float(np.degrees(np.arctan2(up[0], -up[1])))
    return 180.0 if a <= -180.0 else a


def face_angle(landmarks: np.ndarray) -> float:
    """The face's eye-to-mouth axis in degrees clockwise from upright (0 upright, 180 upside down)."""
    return angle_of(up_axis(landmarks))


def quarter_turn(angle: float, limit: float = UPRIGHT_LIMIT) -> int:
    """Clockwise rotation of the image (0, 90, 180 or 270) that brings a face at `angle` upright.

    0 when the face is within `limit` degrees of upright: a tilted head is not a turned photo.
    """
    a = (angle + 180.0) % 360.0 - 180.0
    if abs(a) <= limit:
        return 0
    return int(round(-a / 90.0)) % 4 * 90


def order_landmarks(lm: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Eyes and mouth corners swapped where needed so that each pair runs image-left first along the
    face's left-right axis (perpendicular to `up`); nose unchanged. Returns a new [5, 2] array."""
    r = right_axis(up)
    out = np.array(lm, dtype=np.float64, copy=True)
    for a, b in ((0, 1), (3, 4)):
        if float(out[a] @ r) > float(out[b] @ r):
            out[[a, b]] = out[[b, a]]
    return out


def landmark_order_problem(lm: np.ndarray, up: np.ndarray) -> str | None:
    """None when the 5 landmarks are in insightface's order for a face whose up axis is `up`; else what
    is wrong, one line.

    Checks, along `up`: both eyes above the nose, the nose above both mouth corners; across it (the
    face's left-right axis): the first eye and the first mouth corner on the image's left of the
    second, by more than 10% of the eye-to-mouth height.
    """
    lm = np.asarray(lm, np.float64)
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        return f"landmarks must be 5 finite (x, y) points, got shape {lm.shape}"
    r = right_axis(up)
    h = lm @ up  # height along the face's up axis
    x = lm @ r  # position along its left-right axis
    if min(h[0], h[1]) <= h[2]:
        return "the nose is not below both eyes"
    if h[2] <= max(h[3], h[4]):
        return "the nose is not above both mouth corners"
    span = (h[0] + h[1]) / 2 - (h[3] + h[4]) / 2  # > 0 after the checks above
    if x[1] - x[0] < 0.1 * span:
        return "the first eye is not on the image's left of the second"
    if x[4] - x[3] < 0.1 * span:
        return "the first mouth corner is not on the image's left of the second"
    return None


def fits_agree(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two [5, 2] landmark sets describe the same face the same way up: their RMS distance is
    under AGREE_DISTANCE x their mean eye-to-mouth distance. (A fit drawn the wrong way up puts the
    mouth where the eyes are: about 2 eye-to-mouth distances away.)"""
    scale = (eye_mouth_distance(a) + eye_mouth_distance(b)) / 2
    rms = float(np.sqrt(((a - b) ** 2).sum(1).mean()))
    return scale > 0 and rms < AGREE_DISTANCE * scale


def eye_mouth_distance(lm: np.ndarray) -> float:
    """Distance from the eyes' centre to the mouth's centre, pixels."""
    return float(np.hypot(*((lm[0] + lm[1]) / 2 - (lm[3] + lm[4]) / 2)))


def rotate_points(pts: np.ndarray, k: int, width: int, height: int) -> np.ndarray:
    """Points of a width x height image -> the same points in ``np.rot90(image, k)`` (k quarter turns
    counter-clockwise). [N, 2] -> [N, 2]."""
    p = np.asarray(pts, np.float64).reshape(-1, 2).copy()
    w, h = width, height
    for _ in range(k % 4):
        p = np.stack([p[:, 1], w - p[:, 0]], 1)  # one turn: x' = y, y' = w - x; the size becomes (h, w)
        w, h = h, w
    return p


def rotate_box(box, k: int, width: int, height: int) -> tuple[float, float, float, float]:
    """An (x0, y0, x1, y1) box of a width x height image -> the box in ``np.rot90(image, k)``."""
    x0, y0, x1, y1 = box
    c = rotate_points(np.array([[x0, y0], [x1, y1]]), k, width, height)
    return (float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max()))


def turn_k(clockwise: int) -> int:
    """The ``np.rot90`` k that rotates an image `clockwise` degrees (a multiple of 90) clockwise."""
    return (-(clockwise // 90)) % 4


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (pixels); 0 when they do not meet."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
