"""The paper's metrics over a folder of generated images, per image and as mean and standard deviation.

- CSIM: cosine similarity of the generated image's face embedding (largest face) with each source face
  embedding, averaged over the source faces. Which network made it is part of the result: the paper's
  figures are ArcFace's; dlib's 128-d embeddings give other values (see README, "Evaluation").
- style: cosine similarity of CLIP image embeddings of the generated image and each reference image,
  faces masked out in both, averaged over the references.
- aesthetic: the LAION improved aesthetic predictor on the generated image's CLIP embedding.
- identity: cosine with the centroid of the source faces; copy: cosine with the nearest single source
  face minus identity; copied: that nearest cosine above the highest cosine two source faces reach
  between themselves (library.evaluation.likeness says why); yaw, pitch and pose bin from dlib's 5 parts
  (library.evaluation.head_pose). `Evaluation.likeness` holds the copy share, identity per pose bin and
  each source photo's leave-one-out identity.
- face found: whether the identity network finds a face; same person: whether the face passes the
  network's own same-person threshold against at least half of the source faces.

Standard deviations are population ones (numpy's default, ddof=0) over the images that have the score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from library.evaluation.folders import EvalImage
from library.evaluation.likeness import ScoredFace, copy_ceiling, leave_one_out, score_face, summarise_faces

METRICS = ("csim", "identity", "copy", "copied", "style", "aesthetic", "face_found", "same_person")


@dataclass
class ImageScores:
    """One generated image's scores; None where the metric was skipped (or, for CSIM, no face was found)."""

    name: str
    csim: float | None = None
    identity: float | None = None  # cosine with the source faces' centroid
    copy: float | None = None  # cosine with the nearest source face minus identity
    copied: bool | None = None  # nearer to one source face than any two source faces are to each other
    nearest: str | None = None  # that source face's file name
    yaw: float | None = None  # degrees, + = nose to the image's right
    pitch: float | None = None  # degrees, + = looking up
    pose: str | None = None  # frontal, left, right, up or down
    style: float | None = None
    aesthetic: float | None = None
    face_found: bool | None = None
    same_person: bool | None = None


@dataclass
class Evaluation:
    images: list[ImageScores]
    summary: dict[str, dict]  # metric -> {"mean": float | None, "std": float | None, "n": int}
    networks: dict[str, str | None]  # "identity", "clip", "aesthetic" -> what produced it (None: skipped)
    notes: list[str] = field(default_factory=list)  # skip lines and per-file warnings, in order
    source_faces: int = 0  # source images whose face the identity network found
    # library.evaluation.likeness.summarise_faces of the generated faces, plus "ceiling" (the source
    # faces' highest pairwise cosine) and "sources" ([{"name", "leave_one_out"}]); {} without identity
    likeness: dict = field(default_factory=dict)


def summarise(images: list[ImageScores]) -> dict[str, dict]:
    """Mean, population std and count of each metric over the images that have it (booleans as shares)."""
    out: dict[str, dict] = {}
    for metric in METRICS:
        values = [float(getattr(s, metric)) for s in images if getattr(s, metric) is not None]
        if values:
            out[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
        else:
            out[metric] = {"mean": None, "std": None, "n": 0}
    return out


def _source_embeddings(identity, source: list[EvalImage], note: Callable[[str], None]) -> tuple[np.ndarray, list[str]]:
    rows, names = [], []
    for item in source:
        faces = identity.faces(item.rgb)
        if not faces:
            note(f"warning: {item.path}: no face found by {identity.name} ; left out of the source faces")
            continue
        rows.append(np.asarray(faces[0].embedding, np.float32))
        names.append(item.path.name)
    return (np.stack(rows) if rows else np.zeros((0, 0), np.float32)), names


def evaluate_images(
    generated: list[EvalImage],
    source: list[EvalImage],
    reference: list[EvalImage],
    identity=None,
    clip=None,
    aesthetic=None,
    face_mask: Callable[[np.ndarray], np.ndarray | None] | None = None,
    progress: Callable[[list], object] = lambda items: items,
    note: Callable[[str], None] = print,
) -> Evaluation:
    """Score `generated` against `source` (identity) and `reference` (style).

    identity: an `IdentityNetwork` (library.evaluation.face_identity) or None (CSIM, face found and same
    person skipped). clip: a `ClipImageEmbedder` or None (style and aesthetic skipped). aesthetic: the
    predictor MLP (needs clip). face_mask(rgb) -> [H, W] bool (True = face) or None when no face is found;
    it masks generated images and the references without a prepared mask. progress wraps the loop over
    generated images (a tqdm bar). Skips and warnings go to `note` and into `Evaluation.notes`.
    """
    notes: list[str] = []

    def say(line: str) -> None:
        notes.append(line)
        note(line)

    networks = {"identity": getattr(identity, "name", None), "clip": getattr(clip, "name", None),
                "aesthetic": "LAION improved aesthetic predictor" if (aesthetic is not None and clip is not None) else None}
    src, src_names, ceiling = np.zeros((0, 0), np.float32), [], None
    if identity is not None:
        src, src_names = _source_embeddings(identity, source, say)
        ceiling = copy_ceiling(src) if len(src) else None
        if len(src) == 1:
            say("copy share not measured: one source face, so no pair of source photos to compare with ; give more photos")
        if len(src) == 0:
            say(f"skipped CSIM: {identity.name} found no face in any source image ; give photos where the face is visible")
    ref = None
    if clip is not None:
        masks = [r.face_mask if r.face_mask is not None else (face_mask(r.rgb) if face_mask else None) for r in reference]
        for r, m in zip(reference, masks):
            if m is None:
                say(f"warning: {r.path}: no face found to mask ; its style embedding includes the whole image")
        ref = clip.embed([r.rgb for r in reference], masks)

    scores: list[ImageScores] = []
    scored: list[ScoredFace | None] = []
    for item in progress(generated):
        s = ImageScores(item.path.name)
        if identity is not None:
            faces = identity.faces(item.rgb)
            s.face_found = bool(faces)
            if faces and len(src):
                emb = np.asarray(faces[0].embedding, np.float32)
                s.csim = float(np.mean([identity.similarity(emb, e) for e in src]))
                votes = sum(bool(identity.same_person(emb, e)) for e in src)
                s.same_person = 2 * votes >= len(src)
                face = score_face(emb, getattr(faces[0], "parts", None), src, ceiling)
                s.identity, s.copy, s.copied = face.likeness.identity, face.likeness.copy, face.likeness.copied
                s.nearest, s.yaw, s.pitch, s.pose = src_names[face.likeness.nearest_index], face.yaw, face.pitch, face.pose
                scored.append(face)
            elif len(src):
                s.same_person = False  # no face is not the same person: the share is over all images
        if clip is not None:
            m = face_mask(item.rgb) if face_mask else None
            s.style = float(np.mean(ref @ clip.embed([item.rgb], [m])[0]))
            if aesthetic is not None:  # the predictor was trained on whole images: no mask
                from library.evaluation.clip_scores import aesthetic_scores

                s.aesthetic = float(aesthetic_scores(aesthetic, clip.embed([item.rgb]))[0])
        scores.append(s)
    likeness = {}
    if len(src):
        likeness = summarise_faces(scored) | {"ceiling": ceiling, "sources": [
            {"name": n, "leave_one_out": v} for n, v in zip(src_names, leave_one_out(src))]}
    return Evaluation(scores, summarise(scores), networks, notes, int(len(src)), likeness)
