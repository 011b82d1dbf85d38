"""Likeness that tells real likeness from copying: identity against the centroid of the source faces,
the copy score, the copy share, and each source photo's leave-one-out consistency.

One implementation for evaluate.py (library.evaluation.metrics) and the training-time scores
(library.training.training_scores). Pure numpy on embeddings; which network made them does not matter
here, but the figures are on that network's scale (dlib's same-person faces sit near 0.95-1.0, other
people near 0.82-0.89; ArcFace's near 0.3-0.8 and 0).

With S = the source faces' L2-normalised embeddings [n, d] and g a generated face's (unit) embedding:

- centroid c = mean(S) / |mean(S)|: the person rather than one photo (what the photos share; what
  differs between them, light, angle, expression, averages out);
- identity(g) = g . c (cosine to the centroid);
- nearest(g) = max_i g . S_i (cosine to the closest single training photo);
- copy(g) = nearest(g) - identity(g): large when g sits on one photo rather than on the person (a model
  that pastes one selfie), near 0 or negative when g is nearer the photos' common part than any one of
  them;
- ceiling = max_{i != j} S_i . S_j, the highest similarity two source photos reach between themselves;
- copied(g) = nearest(g) > ceiling, and the COPY SHARE = the share of generated faces copied.
  The pairwise MAXIMUM, not a quantile: with the 4-20 photos users give there are 6-190 pairs, too few for
  a stable upper quantile, and the maximum is the lenient choice (a generated face is called a copy only
  when it is closer to one photo than any two of the user's own photos are to each other). Two
  near-duplicate source photos raise the ceiling and hide copies: the leave-one-out scores and the
  ceiling are reported so that the user sees it.
- leave-one-out: source photo i against the centroid of the others, S_i . c_{-i} (how consistent the
  photos themselves are; a photo far below the others is another person, a heavy filter or a bad crop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from library.evaluation.head_pose import POSE_BINS, head_pose, pose_bin

__all__ = ["FaceLikeness", "ScoredFace", "centroid", "copy_ceiling", "face_likeness", "leave_one_out", "score_face",
           "summarise_faces", "unit_rows"]


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """[n, d] float64 rows scaled to unit length (a zero row stays zero). ValueError for a non-2-D array."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2:
        raise ValueError(f"likeness: expected embeddings [n, d], got shape {list(x.shape)}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def centroid(source: np.ndarray) -> np.ndarray:
    """[d]: the normalised mean of the normalised source embeddings [n, d], n >= 1. ValueError when empty."""
    s = unit_rows(source)
    if len(s) == 0:
        raise ValueError("likeness: no source face to make a centroid of")
    m = s.mean(0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def leave_one_out(source: np.ndarray) -> list[float | None]:
    """Each source face's cosine to the centroid of the other ones ([n] floats); None for all with n < 2."""
    s = unit_rows(source)
    if len(s) < 2:
        return [None] * len(s)
    return [float(s[i] @ centroid(np.delete(s, i, axis=0))) for i in range(len(s))]


def copy_ceiling(source: np.ndarray) -> float | None:
    """max_{i != j} cosine of two source faces (see the module's text for why the maximum); None for n < 2."""
    s = unit_rows(source)
    if len(s) < 2:
        return None
    sims = s @ s.T
    return float(sims[~np.eye(len(s), dtype=bool)].max())


@dataclass(frozen=True)
class FaceLikeness:
    """One generated face against the source set (cosines on the identity network's scale)."""

    identity: float  # cosine to the centroid
    nearest: float  # cosine to the closest single source face
    nearest_index: int  # which source face that is (row of the source array)
    copy: float  # nearest - identity
    copied: bool | None  # nearest > ceiling; None when the ceiling is unknown (one source face)


def face_likeness(embedding: np.ndarray, source: np.ndarray, ceiling: float | None = None) -> FaceLikeness:
    """One generated face's [d] embedding against the source embeddings [n, d] (n >= 1); `ceiling`:
    copy_ceiling(source), given by callers that score many faces against the same set."""
    s = unit_rows(source)
    g = unit_rows(np.asarray(embedding).reshape(1, -1))[0]
    sims = s @ g
    identity = float(g @ centroid(s))
    i = int(np.argmax(sims))
    nearest = float(sims[i])
    return FaceLikeness(identity, nearest, i, nearest - identity, None if ceiling is None else nearest > ceiling)


@dataclass(frozen=True)
class ScoredFace:
    """A generated image's largest face: its likeness and its head pose (degrees; None without parts)."""

    likeness: FaceLikeness
    yaw: float | None = None
    pitch: float | None = None
    pose: str | None = None  # one of library.evaluation.head_pose.POSE_BINS


def score_face(embedding: np.ndarray, parts: np.ndarray | None, source: np.ndarray,
               ceiling: float | None) -> ScoredFace:
    """face_likeness and, when dlib's 5 `parts` ([5, 2]) are known, head_pose and pose_bin of one face
    (no pose for parts head_pose refuses, e.g. eyes in one point: the likeness still counts)."""
    like = face_likeness(embedding, source, ceiling)
    try:
        yaw, pitch, _ = head_pose(parts) if parts is not None else (None, None, None)
    except ValueError:
        yaw = pitch = None
    return ScoredFace(like) if yaw is None else ScoredFace(like, yaw, pitch, pose_bin(yaw, pitch))


def summarise_faces(faces: list[ScoredFace | None]) -> dict:
    """The likeness of a set of generated images (None: an image without a face, left out of the means).

    {"identity": mean identity, "copy": mean copy score, "copy_share": share of faces with copied True
    (None when no face has a known ceiling), "faces": number of faces, "poses": {bin: {"n": count,
    "identity": mean identity of that bin's faces or None}} for every bin of POSE_BINS}; the means are
    None without a face."""
    found = [f for f in faces if f is not None]
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    judged = [f.likeness.copied for f in found if f.likeness.copied is not None]
    poses = {}
    for name in POSE_BINS:
        ids = [f.likeness.identity for f in found if f.pose == name]
        poses[name] = {"n": len(ids), "identity": mean(ids)}
    return {"identity": mean([f.likeness.identity for f in found]), "copy": mean([f.likeness.copy for f in found]),
            "copy_share": mean([float(c) for c in judged]), "faces": len(found), "poses": poses}
