"""Head pose (yaw, pitch, roll) of a face from dlib's 5 parts, and pose bins, so that a LoRA that draws
one angle only shows it.

The parts are those dlib's 5-point shape predictor gives for every face the identity network finds
(`FoundFace.parts`: image-right eye's outer and inner corner, image-left eye's outer and inner corner,
base of the nose). dlib's 68-point model would give more, but as far as known its training data's
licence (iBUG 300-W) excludes commercial use (see the README's licences), so it is not used.

Formula (weak-perspective projection of a rigid three-point face; the textbook orthographic model, e.g.
Hartley & Zisserman, "Multiple View Geometry", 6.3): in units of the eye-centre distance, the eye
centres sit at (-1/2, 0, 0) and (1/2, 0, 0) and the base of the nose at (0, H, D) (H below the eye line,
D in front of it). Roll is the angle of the line between the eye centres (the corner midpoints); the
parts are turned by -roll about the eye midpoint, then with x_n, y_n the nose's offset from that
midpoint and e the eye distance in the image:

- a yaw psi (turn about the vertical axis) moves the nose sideways by D sin(psi) and shortens the eyes to
  cos(psi): x_n / e = D tan(psi), so  yaw = atan((x_n / e) / D);
- a pitch theta (nod about the eye line) moves the nose up by: y_n / e' = H cos(theta) - D sin(theta),
  with e' = e / cos(yaw) the eye distance the face would show frontally; so with R = sqrt(H^2 + D^2)
  and phi = atan2(D, H):  pitch = acos(y_n / (e' R)) - phi  (clipped to acos's range: a nose drop of
  R or more reads as pitch = -phi, the model's lowest).

Signs: yaw > 0 when the nose points to the image's right, pitch > 0 when the face looks up (the nose
rises towards the eyes), roll > 0 when the image-right eye is lower (clockwise on screen).

Constants: H = 0.75, the median nose drop of dlib's parts on 7 near-frontal faces (|x_n / e| < 0.13:
skimage's astronaut and its mirror, Tom_Hanks_54745.png, five faces of insightface's t1.jpg; 0.68 to
0.96, so the pitch of one face is uncertain by about +-15 degrees: people's proportions differ);
D = 0.35 (the base of the nose about 2 cm in front of the eye corners for a 6 cm eye distance: a typical
adult's proportion, not measured here; checked by eye on t1.jpg, whose two faces turned about 40-45
degrees to the image's left read -39 and -48). Yaw is reliable in its sign and ordering, its degrees to within
the uncertainty of D; the bins' edges (YAW_EDGE, PITCH_EDGE) are wide for that reason.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NOSE_DEPTH", "NOSE_DROP", "PITCH_EDGE", "POSE_BINS", "YAW_EDGE", "head_pose", "pose_bin"]

NOSE_DROP = 0.75  # H: the base of the nose below the eye line, in eye distances (measured, see above)
NOSE_DEPTH = 0.35  # D: the base of the nose in front of the eye line, in eye distances (assumed, see above)
YAW_EDGE = 15.0  # degrees: |yaw| at least this is turned left or right
PITCH_EDGE = 20.0  # degrees: |pitch| at least this is up or down (wider: pitch is the less certain angle)
POSE_BINS = ("frontal", "left", "right", "up", "down")


def head_pose(parts: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from dlib's 5 parts ([5, 2] pixels, dlib's order; see the module's
    text for the formula and the signs). ValueError for another shape or coinciding eyes."""
    p = np.asarray(parts, np.float64)
    if p.shape != (5, 2) or not np.isfinite(p).all():
        raise ValueError(f"head pose: expected dlib's 5 parts [5, 2], got shape {list(p.shape)}")
    right, left = (p[0] + p[1]) / 2, (p[2] + p[3]) / 2  # image-right and image-left eye centres
    across = right - left
    e = float(np.hypot(*across))
    if e < 1e-6:
        raise ValueError("head pose: the two eye centres coincide")
    c, s = across / e
    nose = p[4] - (right + left) / 2
    x_n, y_n = c * nose[0] + s * nose[1], -s * nose[0] + c * nose[1]  # turned by -roll
    yaw = math.atan((x_n / e) / NOSE_DEPTH)
    r, phi = math.hypot(NOSE_DROP, NOSE_DEPTH), math.atan2(NOSE_DEPTH, NOSE_DROP)
    drop = (y_n / e) * math.cos(yaw)  # over the frontal eye distance e / cos(yaw)
    pitch = math.acos(min(1.0, max(-1.0, drop / r))) - phi
    return math.degrees(yaw), math.degrees(pitch), math.degrees(math.atan2(s, c))


def pose_bin(yaw: float, pitch: float) -> str:
    """One of POSE_BINS: "left"/"right" (the nose to the image's left/right) when |yaw| >= YAW_EDGE,
    "up"/"down" when |pitch| >= PITCH_EDGE, the axis further past its edge when both, else "frontal"."""
    over_yaw, over_pitch = abs(yaw) / YAW_EDGE, abs(pitch) / PITCH_EDGE
    if max(over_yaw, over_pitch) < 1.0:
        return "frontal"
    if over_yaw >= over_pitch:
        return "right" if yaw > 0 else "left"
    return "up" if pitch > 0 else "down"
