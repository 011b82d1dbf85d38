"""prepare's identity pass over a source set: embed each photo's faces as it is prepared, then check the
set (`identity_check.check_set`) and rewrite what changed: a group photo's mask, landmarks and preview when
another face is the person's, and every NAME.json with its identity distance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from library.files.atomic import write_bytes
from library.files.messages import UserError, one_line

from dataset_tools.identity_check import MIN_PHOTOS, check_set, embed_faces
from dataset_tools.images import load_image
from dataset_tools.previews import THUMB, encode_jpg as _encode_jpg, fit as _fit, make_preview
from dataset_tools.images import encode_png as _encode_png
from dataset_tools.records import json_bytes as _json_bytes, round_list as _round, small_face_warning


class IdentityWeightsError(UserError, ValueError):
    """The ArcFace file given for the identity check does not load; str() is one line."""


def identity_network(summary, weights):
    """The identity network, or None with a summary warning when dlib's is not installed; an ArcFace
    file the user named that does not load is an error."""
    from library.evaluation.face_identity import IdentityNetworkError, load_identity_network

    try:
        return load_identity_network(weights or "")
    except IdentityNetworkError as exc:
        if weights:
            raise IdentityWeightsError(f"--identity-weights: {exc}") from None
        summary.warnings.append(("", f"identity check skipped: {exc}"))
        return None


def embed_one(network, name: str, stem: str, meta: dict, rgb, fa, records: list, summary) -> None:
    try:
        embeddings = embed_faces(network, rgb, fa.faces, fa.landmarks)
    except Exception as exc:  # noqa: BLE001 - the photo is prepared; only its identity check is lost
        summary.warnings.append((name, f"identity check: cannot embed its faces ({one_line(exc)})"))
        return
    records.append({"name": name, "stem": stem, "meta": meta, "faces": fa.faces, "embeddings": embeddings})


def identity_pass(network, records: list[dict], analyzer, out_dir: Path, preview_dir: Path, summary,
                   thumbs: list) -> None:
    """The set-level identity check: pick each group photo's face by identity (re-doing its mask, landmarks
    and preview when that is not the face prepare took), then record every photo's identity distance in
    its NAME.json and warn about photos of a different person."""
    verdicts = check_set(network, [r["embeddings"] for r in records])
    if verdicts is None:
        summary.warnings.append(("", f"identity check skipped: it needs {MIN_PHOTOS} or more photos with a face"))
        return
    for rec, verdict in zip(records, verdicts):
        name, stem, meta, faces = rec["name"], rec["stem"], rec["meta"], rec["faces"]
        old = list(meta["warnings"])
        try:
            if len(faces) > 1:
                use_identity_face(analyzer, rec, verdict.index, out_dir, preview_dir, thumbs)
            meta.update(identity_distance=round(verdict.distance, 4), different_person=verdict.different,
                        identity_network=network.name)
            meta["warnings"] = meta["warnings"] + verdict.messages
            write_bytes(out_dir / f"{stem}.json", _json_bytes(meta))
        except (OSError, ValueError) as exc:
            summary.warnings.append((name, f"identity check: cannot rewrite its outputs ({one_line(exc)})"))
            continue
        summary.warnings = [(n, w) for n, w in summary.warnings if n != name or w not in old]
        summary.warnings += [(name, w) for w in meta["warnings"]]
        if verdict.different:
            summary.different_person.append(name)
    summary.identity = f"{network.name}, largest distance {max(v.distance for v in verdicts):.3f}"


def use_identity_face(analyzer, rec: dict, index: int, out_dir: Path, preview_dir: Path, thumbs: list) -> None:
    """Redo a group photo's mask, landmarks and preview for `faces[index]`, the face most like the set."""
    stem, meta, faces = rec["stem"], rec["meta"], rec["faces"]
    n = len(faces)
    group = (f"{n} faces found; using", "a larger face-like box", "the face mesh does not confirm", "small face")
    warns = [w for w in meta["warnings"] if not w.startswith(group)]
    if index != 0:
        rgb = np.asarray(load_image(out_dir / f"{stem}.png", None).image)  # the image as written (upright)
        fa = analyzer.use_face(rgb, faces, index)
        face = fa.face
        coverage = float(np.count_nonzero(fa.face_mask)) / fa.face_mask.size
        meta.update(face_box=_round(face.box), score=round(float(face.score), 4),
                    landmarks=[_round(p) for p in fa.landmarks], mask_coverage=round(coverage, 5),
                    face_angle=None if fa.angle is None else round(float(fa.angle), 1), mask_method=fa.mask_method)
        preview = make_preview(rgb, fa.face_mask, face.box, fa.landmarks, [f.box for f in fa.faces[1:]])
        write_bytes(out_dir / f"{stem}.mask.png", _encode_png(fa.face_mask))
        write_bytes(preview_dir / f"{stem}.jpg", _encode_jpg(preview))
        thumbs[:] = [(t, _fit(preview, THUMB)[0] if t == stem else im) for t, im in thumbs]
        warns += fa.warnings
    box = meta["face_box"]
    largest = max(f.area for f in faces) <= (box[2] - box[0]) * (box[3] - box[1]) + 1.0
    warns.append(f"{n} faces found; using the one most like the other photos ({box[2] - box[0]:.0f}x"
                 f"{box[3] - box[1]:.0f} px at {box[0]:.0f},{box[1]:.0f}){'' if largest else ', not the largest'}. "
                 "A group photo can teach the wrong person: crop it to one face")
    small = small_face_warning(box, meta["width"], meta["height"])  # of the face used, dropped above with the rest
    if small:
        warns.append(small)
    meta["warnings"] = warns
    meta["face_choice"] = "identity"
