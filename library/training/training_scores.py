"""Likeness during training: the preview samples scored against the source faces, and the best step.

Users cannot tell from the losses when identity peaks (a LoRA trained past it drifts away from the
person); the previews already draw the composed prompt at every ``sample.every``, so their faces are
embedded with the evaluation's identity network and compared with the source set's faces, embedded once.
The figures go into the history entry of that step as ``eval/*`` keys (``loss_history.jsonl``,
TensorBoard, the log line): the paper's CSIM, and library.evaluation.likeness's identity against the
source faces' centroid, copy score and copy share (evaluate.py's figures, the same code), with the
preview faces' pose bins as ``pose/*`` counts.

The BEST STEP (:func:`best_step`, the one rule: the run's last line, ``progress.png`` and the web page's
run list all call it): the scored step with the highest ``eval/identity`` among those whose
``eval/copy_share`` is under COPY_SHARE_LIMIT = 0.5, i.e. where fewer than half of the previews with a
face are nearer to one training photo than any two training photos are to each other (a step whose
samples mostly paste a selfie is passed over however alike they look). A step without a copy share (one
source face: nothing to compare with) is not passed over. When every scored step is over the limit, the
step with the lowest copy share (then the highest identity) is named instead, and the line says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from library.evaluation.head_pose import POSE_BINS
from library.evaluation.likeness import copy_ceiling, score_face, summarise_faces
from library.files.images import read_image
from library.files.text import read_text_file

# the keys one scoring adds to a history entry
CSIM, FACE_FOUND, SAME_PERSON, STYLE = "eval/csim", "eval/face_found", "eval/same_person", "eval/style"
IDENTITY, COPY, COPY_SHARE = "eval/identity", "eval/copy", "eval/copy_share"
POSE_KEYS = {name: f"pose/{name}" for name in POSE_BINS}  # how many preview faces in each pose bin
COPY_SHARE_LIMIT = 0.5  # a step is the best step only with a copy share under this (see the module's text)


class ScoringUnavailable(RuntimeError):
    """The scores cannot be computed in this run (no network, no source face); the message says why."""


def _load_network(identity_weights: str):
    """The shared identity network (ArcFace when a file is given, else dlib's); imported late so that a
    trainer without the evaluation extras still trains."""
    from library.evaluation.face_identity import load_identity_network

    return load_identity_network(identity_weights)


class PreviewScorer:
    """Scores preview samples against the source set's faces.

    `network` follows ``library/evaluation/face_identity.py``'s IdentityNetwork: ``faces(rgb)`` (largest
    first, each with an L2-normalised ``embedding``), ``similarity(a, b)`` (cosine) and
    ``same_person(a, b)``. `source_images`: the source set's RGB images, [H, W, 3] uint8. `landmarks`
    (optional, one per image, [5, 2] pixels or None): where dataset_tools.prepare found the person (in a
    group photo, the face most like the rest of the set); a network with ``embed(rgb, landmarks)`` embeds
    that face, otherwise the image's largest face is its identity. Raises ScoringUnavailable when none of
    them gives an embedding.
    """

    def __init__(self, network, source_images: Iterable[np.ndarray],
                 landmarks: Sequence[np.ndarray | None] | None = None):
        self.network = network
        self.name = getattr(network, "name", type(network).__name__)
        self.source_embeddings: list[np.ndarray] = []
        for i, rgb in enumerate(source_images):
            points = landmarks[i] if landmarks is not None else None
            if points is not None and hasattr(network, "embed"):
                face = network.embed(rgb, points)
            else:
                faces = network.faces(rgb)
                face = faces[0] if faces else None
            if face is not None:
                self.source_embeddings.append(np.asarray(face.embedding, np.float32))
        if not self.source_embeddings:
            raise ScoringUnavailable(f"{self.name} finds no face in the source images")
        self.ceiling = copy_ceiling(np.stack(self.source_embeddings))  # None with one source face

    @classmethod
    def from_folder(cls, identity_weights: str, folder: str | Path, names: Sequence[str],
                    load: Callable[[str], object] | None = None) -> "PreviewScorer":
        """The network of `identity_weights` ('' = dlib's) and the prepared `folder`'s ``NAME.png`` files
        (full size: the cached training copies are too small to detect faces in at low resolutions).
        Raises ScoringUnavailable with a one-line reason when the network cannot load or sees no face."""
        try:
            network = (load or _load_network)(identity_weights)
        except (ImportError, ValueError, OSError, RuntimeError) as err:
            raise ScoringUnavailable(f"the identity network did not load ({err})") from err
        images, landmarks = [], []
        for name in names:
            try:
                images.append(np.array(read_image(Path(folder) / f"{name}.png").image))
            except (OSError, ValueError):  # the trainer has already read it once; a file gone since is skipped
                continue
            landmarks.append(_stored_landmarks(Path(folder) / f"{name}.json"))
        try:
            return cls(network, images, landmarks)
        except ValueError as err:  # the network refused an image or landmarks
            raise ScoringUnavailable(f"the source faces could not be embedded ({err})") from err

    def score(self, images: Sequence[Image.Image]) -> dict[str, float]:
        """`images` (the preview samples) -> {eval/face_found, eval/same_person[, eval/csim]}; see
        :meth:`score_faces`."""
        # writable arrays: torch warns on a read-only one
        return self.score_faces([self.network.faces(np.array(im.convert("RGB"))) for im in images])

    def score_faces(self, faces_per_image: Sequence[list]) -> dict[str, float]:
        """The scores of images whose faces (largest first, as ``network.faces`` gives them) are known.

        face_found: the share of images where the network finds a face. csim: over the images with a
        face, the mean of each one's largest face's cosine similarity to every source face, averaged
        (absent when no image has a face). same_person: the share of all images whose face the network
        calls the same person as the majority of the source faces. identity, copy, copy_share and the
        pose counts: library.evaluation.likeness.summarise_faces of the largest faces (identity and copy
        absent without a face, copy_share also with one source face; pose counts need dlib's ``parts``).
        """
        csims, same = [], 0
        found = 0
        scored = []
        source = np.stack(self.source_embeddings)
        for faces in faces_per_image:
            if not faces:
                continue
            found += 1
            emb = np.asarray(faces[0].embedding, np.float32)
            csims.append(float(np.mean([self.network.similarity(emb, s) for s in self.source_embeddings])))
            votes = sum(bool(self.network.same_person(emb, s)) for s in self.source_embeddings)
            same += votes * 2 > len(self.source_embeddings)
            scored.append(score_face(emb, getattr(faces[0], "parts", None), source, self.ceiling))
        n = max(len(faces_per_image), 1)
        scores = {FACE_FOUND: found / n, SAME_PERSON: same / n}
        if csims:
            scores[CSIM] = float(np.mean(csims))
        summary = summarise_faces(scored)
        for key, value in ((IDENTITY, summary["identity"]), (COPY, summary["copy"]), (COPY_SHARE, summary["copy_share"])):
            if value is not None:
                scores[key] = value
        if any(f.pose is not None for f in scored):
            scores |= {POSE_KEYS[name]: float(b["n"]) for name, b in summary["poses"].items()}
        return scores


def face_ellipse(shape: tuple[int, int], boxes: Sequence[tuple[float, float, float, float]]) -> np.ndarray | None:
    """[H, W] bool: the ellipses inscribed in the face boxes (x0, y0, x1, y1 pixels); None without a box."""
    if not boxes:
        return None
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32) + 0.5
    mask = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1.0), max((y1 - y0) / 2, 1.0)
        mask |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    return mask


class StyleScorer:
    """``eval/style`` of the preview samples: the mean cosine of their CLIP image embeddings with the
    reference photos', faces masked out (the paper's masked-CLIP style score; evaluate.py's metric).

    The references are masked by their prepared masks (``NAME.mask.png``: black = face). A preview sample
    has no prepared mask, so its faces are masked by the ellipse inscribed in each box the identity network
    found: the face-mesh oval the dataset tools would draw, to within its edge. `embedder`: a
    ``library.evaluation.clip_scores.ClipImageEmbedder``.
    """

    def __init__(self, embedder, reference_dir: str | Path, warn: Callable[[str], None] = print):
        from library.evaluation.folders import FolderError, read_folder

        try:  # the reader evaluate.py uses: the same images, the same masks
            references = read_folder(reference_dir, reference_masks=True, warn=warn)
        except FolderError as err:
            raise ScoringUnavailable(f"no reference image for the style score ({err})") from err
        self.embedder = embedder
        self.references = embedder.embed([r.rgb for r in references], [r.face_mask for r in references])  # [R, D]

    def score(self, rgbs: Sequence[np.ndarray], faces_per_image: Sequence[list]) -> float:
        masks = [face_ellipse(rgb.shape[:2], [f.box for f in faces]) for rgb, faces in zip(rgbs, faces_per_image)]
        samples = self.embedder.embed(list(rgbs), masks)  # [N, D]
        return float((samples @ self.references.T).mean())


def _stored_landmarks(path: Path) -> np.ndarray | None:
    """The [5, 2] landmarks dataset_tools.prepare stored in NAME.json, or None (absent or unreadable)."""
    try:
        points = np.asarray(json.loads(read_text_file(path)).get("landmarks"), np.float32)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return points if points.shape == (5, 2) and np.isfinite(points).all() else None


class PreviewScoring:
    """The trainer's scorer: built at the first scoring (the networks load only if previews are drawn),
    and off for the rest of the run, said once through `say`, when it cannot be built. With a CLIP folder
    (``evaluation.clip``) and the reference set, it adds ``eval/style`` (:class:`StyleScorer`); a style
    scorer that cannot be built is said once and leaves the likeness scores on.
    """

    def __init__(self, identity_weights: str, source_dir: str | Path, source_names: Sequence[str],
                 say: Callable[[str], None], clip_folder: str = "", reference_dir: str | Path = ""):
        self.identity_weights, self.source_dir, self.source_names = identity_weights, source_dir, list(source_names)
        self.clip_folder, self.reference_dir = clip_folder, reference_dir
        self.say = say
        self.scorer: PreviewScorer | None = None
        self.style: StyleScorer | None = None
        self.off = False

    def _build(self) -> bool:
        try:
            self.scorer = PreviewScorer.from_folder(self.identity_weights, self.source_dir, self.source_names,
                                                    _load_network)
        except ScoringUnavailable as err:
            self.off = True
            self.say(f"warning: preview samples are not scored for likeness: {err}")
            return False
        self.say(f"preview samples are scored with {self.scorer.name} against "
                 f"{len(self.scorer.source_embeddings)} source faces")
        if self.clip_folder:
            from library.evaluation.clip_scores import ClipImageEmbedder

            try:
                self.style = StyleScorer(ClipImageEmbedder(self.clip_folder), self.reference_dir, self.say)
            except (ScoringUnavailable, ValueError, OSError) as err:
                self.say(f"warning: preview samples are not scored for style: {err}")
        return True

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, float]:
        """The ``eval/*`` scores of `images` ({} when scoring is off)."""
        if self.off or (self.scorer is None and not self._build()):
            return {}
        rgbs = [np.array(im.convert("RGB")) for im in images]  # writable: torch warns on a read-only array
        faces = [self.scorer.network.faces(rgb) for rgb in rgbs]
        scores = self.scorer.score_faces(faces)
        if self.style is not None:
            scores[STYLE] = self.style.score(rgbs, faces)
        return scores

    @staticmethod
    def describe(scores: dict[str, float]) -> str:
        """The log line's part: ``csim 0.512 | identity 0.530 | copy 0.012 | copy share 0.25 | face found 1.00 |
        same person 0.50 | poses frontal 3, left 1``."""
        parts = [f"csim {scores[CSIM]:.3f}"] if CSIM in scores else ["csim - (no face)"]
        parts += [f"{label} {scores[key]:{form}}" for key, label, form in
                  ((IDENTITY, "identity", ".3f"), (COPY, "copy", ".3f"), (COPY_SHARE, "copy share", ".2f")) if key in scores]
        parts += [f"face found {scores[FACE_FOUND]:.2f}", f"same person {scores[SAME_PERSON]:.2f}"]
        if STYLE in scores:
            parts.append(f"style {scores[STYLE]:.3f}")
        poses = [f"{name} {int(scores[key])}" for name, key in POSE_KEYS.items() if scores.get(key)]
        if poses:
            parts.append("poses " + ", ".join(poses))
        return " | ".join(parts)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class BestStep:
    """The step :func:`best_step` picks: its history entry, and whether it passed the copy rule (False:
    no scored step did, and this is the least-copying one)."""

    entry: dict
    passed: bool

    @property
    def phase(self) -> int:
        return int(self.entry.get("phase", 1))

    @property
    def step(self) -> int:
        return int(self.entry["step"])

    @property
    def identity(self) -> float:
        return float(self.entry[IDENTITY])

    @property
    def copy_share(self) -> float | None:
        value = self.entry.get(COPY_SHARE)
        return float(value) if _finite(value) else None


def best_step(history: Iterable[dict], limit: float = COPY_SHARE_LIMIT) -> BestStep | None:
    """The best step of a run's history entries (the module's text gives the rule), or None when no
    entry has a finite ``eval/identity``. Ties go to the earliest entry."""
    scored = [e for e in history if _finite(e.get(IDENTITY))]
    passing = [e for e in scored if not (_finite(e.get(COPY_SHARE)) and e[COPY_SHARE] >= limit)]
    if passing:  # max() keeps the first of equals
        return BestStep(max(passing, key=lambda e: e[IDENTITY]), True)
    if scored:
        return BestStep(min(scored, key=lambda e: (e[COPY_SHARE], -e[IDENTITY])), False)
    return None


def best_step_message(history: Iterable[dict], files_of: Callable[[int, int], list[Path]]) -> str | None:
    """One line naming the best step (:func:`best_step`) and the files saved at it, or None.

    `files_of(phase, step)`: the LoRA and embedding files written at that step (empty when none were).
    """
    best = best_step(history)
    if best is None:
        return None
    files = [p for p in files_of(best.phase, best.step) if p.is_file()]
    if files:
        kept = f": {', '.join(str(p) for p in files)}"
        if any("-step" in p.stem for p in files):  # frontends name an embedding after its file
            kept += " (rename the embeddings without -stepNNNNNNNN to prompt with the usual words)"
    elif best.phase == 1:
        kept = " (phase 1: the embeddings alone, no LoRA yet)"
    else:
        kept = " (no LoRA was saved at that step: set output.save_lora_every to keep one)"
    share = "copy share not measured" if best.copy_share is None else f"copy share {best.copy_share:.2f}"
    where = f"phase {best.phase} step {best.step}"
    if best.passed:
        return f"best step: {where} (identity {best.identity:.3f}, {share} < {COPY_SHARE_LIMIT:g}){kept}"
    return (f"best step: none kept its copy share under {COPY_SHARE_LIMIT:g} (the samples copy training photos; "
            f"give more varied photos or train fewer steps); the least copying is {where} "
            f"(identity {best.identity:.3f}, {share}){kept}")


def report_progress(cfg, say: Callable[[str], None]) -> None:
    """The end of a run: ``progress.png`` (losses and scores over the steps, from the whole
    ``loss_history.jsonl``, a resumed run's too, the best step marked) and a line naming the best step."""
    from library.training.outputs import PROGRESS_PLOT, output_paths
    from library.training.progress_plot import plot_progress, read_history

    out = Path(cfg.output.dir)
    history = read_history(out / "loss_history.jsonl")

    def files_of(phase: int, step: int) -> list[Path]:
        if phase != 2:
            return []
        paths = output_paths(cfg, None if step == cfg.phase2.steps else step)
        return [paths["lora"], paths[cfg.tokens.source], paths[cfg.tokens.reference]]

    message = best_step_message(history, files_of)
    best = best_step(history)
    say(f"wrote {plot_progress(history, out / PROGRESS_PLOT, cfg.phase1.steps, best and best.entry, IDENTITY, message or '')}")
    if message:
        say(message)
