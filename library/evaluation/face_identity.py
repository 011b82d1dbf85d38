"""The identity network: find every face in a photo and embed it, with dlib's network or an ArcFace file.

    net = load_identity_network()                       # dlib ResNet v1 from face_recognition_models
    net = load_identity_network("w600k_r50.onnx")       # ArcFace through library.models.identity's loaders
    faces = net.faces(rgb)                              # [FoundFace], largest first
    net.similarity(faces[0].embedding, other)           # cosine similarity (the paper's CSIM)
    net.same_person(faces[0].embedding, other)          # the network's own same-person rule

Faces are found by dlib's HOG frontal-face detector (`get_frontal_face_detector`) for both networks: on
the image as given (its 80 px window: faces from ~80 px) and always once more on the image upsampled 2x
(faces from ~40 px), whose boxes count only where the first pass found none (`_SAME_FACE_IOU`): a large
face keeps the box the same-person threshold was measured on (the upsampled pyramid's scales differ, and
so do its boxes by a few pixels), and a 40-80 px face beside a larger one is found too. The upsampled
pass costs ~4x the first (1280 x 886: 80 -> 440 ms on one core). HOG alone fires on textures (the patch on the astronaut's suit, in a mirrored JPEG copy, is a larger
"face" than hers), and its score does not separate them (0.05 there, 0.21 for a real face in t1.jpg): each
box is confirmed by dlib's CNN detector (`mmod_human_face_detector.dat`) on a 120 px crop around it
(~0.14 s per face on one CPU core; on the whole 512 px photo the CNN costs 1.6 s, against 20 ms for HOG).

Why dlib's detector here and not the project's face finder (`library.faces`): this detector is part of
the identity *network*, not a second face finder. dlib's 5-point shape predictor was trained on boxes of
dlib's own detector, and its ResNet descriptor aligns itself with that shape, so the embeddings and the
same-person threshold (0.6, measured above) hold only for faces boxed by dlib's detector; a mediapipe
box has another size and centre and shifts every descriptor. The ArcFace network uses the same boxes so
that "face found" and "same person" shares mean the same thing whichever network is chosen, and takes its
alignment landmarks from the project's face finder (`library.faces.detect_face_landmarks`).

**dlib** (`face_recognition_models`' `dlib_face_recognition_resnet_model_v1.dat`, 128-d), run in PyTorch
by `library.models.dlib_resnet` (the identity loss's network; dlib's C++ network only in the tests that
compare with it): dlib's 5-point shape predictor gives the eye corners and the base of the nose, and the
chip is dlib's 150 px chip at those parts (`library.models.identity.dlib_chips`). dlib's own rule is "same person when the euclidean distance of the raw descriptors is under 0.6";
the raw descriptors' norms are 1.35 to 1.59 (1.46 typical), so on the L2-normalised embeddings this
interface hands out the rule becomes cosine > 1 - (0.6 / 1.46)^2 / 2 = 0.915 (`DLIB_COSINE_THRESHOLD`).
Measured on real photos: the astronaut against its mirror, crop, half-size and brightened copies cosine
0.984 to 1.0; against six other people 0.82 to 0.89. dlib's figures are not comparable to ArcFace ones
(the paper's CSIM is ArcFace): different people sit near 0.85 with dlib and near 0 with ArcFace.

**ArcFace** (insightface's `w600k_r50.onnx` / `glintr100.onnx` or an arcface_torch `.pth`, through
`library.models.identity.IdentityEncoder.from_file`): the face is aligned to ArcFace's 112 px template with 5
landmarks that must include the mouth corners, which dlib's 5-point model does not give; they come from
mediapipe's face mesh (`library.faces.detect_face_landmarks`), matched to each dlib box by its
nose; a box the mesh does not match gets its mouth corners from the template (eyes and nose fitted to
it, `FoundFace.landmarks_source` says which). Same person: cosine > 0.3 (`ARCFACE_COSINE_THRESHOLD`, a
common choice for w600k_r50; pass `threshold=` to change it).

`FoundFace.landmarks` are always in ArcFace order (image-left eye, image-right eye, nose, image-left and
image-right mouth corner), in pixels. Errors (missing package, model file or weights) are one line,
`IdentityNetworkError`, a ValueError.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from library.faces.geometry import box_iou
from library.models.dlib_resnet import dlib_model_dir as _models_dir
from library.files.messages import UserError, one_line

__all__ = ["ARCFACE_COSINE_THRESHOLD", "DLIB_COSINE_THRESHOLD", "FoundFace", "IdentityNetwork",
           "IdentityNetworkError", "arcface_points_from_dlib", "dlib_model_dir", "load_identity_network"]

DLIB_DISTANCE_THRESHOLD = 0.6  # dlib's rule, euclidean distance of raw descriptors
DLIB_DESCRIPTOR_NORM = 1.46  # typical norm of a raw dlib descriptor (measured: 1.35 to 1.59 on 12 faces)
DLIB_COSINE_THRESHOLD = 1.0 - (DLIB_DISTANCE_THRESHOLD / DLIB_DESCRIPTOR_NORM) ** 2 / 2  # = 0.9155
ARCFACE_COSINE_THRESHOLD = 0.3

# ArcFace's 112 px template (library.models.identity.ARCFACE_TEMPLATE_112, kept here as numpy so that importing
# this module for dlib does not import torch)
_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                      [70.7299, 92.2041]], np.float64)
_SMALL_FACE_UPSAMPLE = 1  # HOG pyramid upsamplings of the second pass: faces from ~40 px
_SAME_FACE_IOU = 0.3  # an upsampled-pass box overlapping a first-pass box this much is that face
_DETECT_MAX_SIDE = 1600  # detection runs on a copy no bigger than this (HOG cost grows with pixels)
_CONFIRM_CROP = 120  # side of the crop the CNN detector confirms a HOG box on (faces of ~75 px there)
_CONFIRM_SPAN = 1.6  # that crop's side over the HOG box's side


class IdentityNetworkError(UserError, ValueError):
    """The identity network cannot be loaded or run; str() is one line saying what to do."""


@dataclass
class FoundFace:
    """One face found in an image (pixel coordinates of that image)."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    landmarks: np.ndarray  # [5, 2] float32, ArcFace order
    embedding: np.ndarray  # [d] float32, L2-normalised (d = 128 for dlib, 512 for w600k_r50)
    score: float = 0.0  # the HOG detector's score (higher: surer); 0 for faces given by landmarks
    landmarks_source: str = "dlib"  # "dlib" (mouth from the template), "mediapipe" (mesh), "given"
    # dlib's 5 parts [5, 2] (image-right eye outer, inner corner, image-left eye outer, inner, nose base):
    # measured for every network's faces (the head pose, library.evaluation.head_pose, is read from them)
    parts: np.ndarray | None = None

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform src [N, 2] -> dst [N, 2] as a 2x3 matrix (Umeyama, 2-D)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var = max(float((s ** 2).sum()), 1e-12)
    a = float((s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum()) / var
    b = float((s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum()) / var
    rs = np.array([[a, -b], [b, a]])
    return np.concatenate([rs, (mu_d - rs @ mu_s)[:, None]], axis=1)


def arcface_points_from_dlib(parts: np.ndarray) -> np.ndarray:
    """[5, 2] ArcFace-order points from dlib's 5-point shape ([5, 2]: image-right eye's outer and inner
    corner, image-left eye's outer and inner corner, base of the nose).

    Eyes are the corner midpoints; the nose is dlib's nose base (a few pixels below ArcFace's nose tip);
    the mouth corners are the template's, placed by the similarity that fits the template's eyes and nose
    to these three points. Good for boxes and display; ArcFace alignment uses mesh landmarks when it can.
    """
    parts = np.asarray(parts, np.float64)
    three = np.stack([(parts[2] + parts[3]) / 2, (parts[0] + parts[1]) / 2, parts[4]])
    m = _similarity(_TEMPLATE[:3], three)
    mouth = _TEMPLATE[3:] @ m[:, :2].T + m[:, 2]
    return np.concatenate([three, mouth]).astype(np.float32)


def _box_from_points(points: np.ndarray) -> "tuple[float, float, float, float]":
    """A dlib-detector-like square box around ArcFace-order landmarks (what the shape predictor expects).

    Calibrated on dlib's own boxes of 7 faces (astronaut, t1.jpg): side 2.1 to 2.7 eye distances (3.6 for
    a turned head), centre 0.25 to 0.8 eye distances below the eye midpoint; the eye-to-mouth distance
    stands in for the eye distance when a turned head shortens it."""
    p = np.asarray(points, np.float64)
    eyes, mouth = (p[0] + p[1]) / 2, (p[3] + p[4]) / 2
    across = p[1] - p[0]
    unit = max(np.linalg.norm(across), 0.75 * np.linalg.norm(mouth - eyes), 1.0)
    down = np.array([-across[1], across[0]]) / max(np.linalg.norm(across), 1e-6)
    cx, cy = eyes + 0.5 * unit * down
    half = 1.1 * unit
    return (cx - half, cy - half, cx + half, cy + half)


def dlib_model_dir() -> Path:
    """The folder of face_recognition_models' model files (library.models.dlib_resnet's), or IdentityNetworkError."""
    try:
        return _models_dir()
    except FileNotFoundError as err:
        raise IdentityNetworkError(str(err)) from err


def _import_dlib():
    try:
        import dlib
    except ImportError as cause:
        raise IdentityNetworkError("dlib is not installed ; pip install dlib-bin==20.0.1.post1") from cause
    return dlib


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"identity network: expected an RGB image [H, W, 3] uint8, got {rgb.dtype} {list(rgb.shape)}")
    return np.ascontiguousarray(rgb)


class IdentityNetwork:
    """Face detector + embedding network. Subclasses give `_embed_found`.

    `name` says which network (reports must: dlib's and ArcFace's figures are not comparable),
    `threshold` the cosine similarity above which `same_person` holds.
    """

    name: str = ""
    threshold: float = 0.0

    def __init__(self) -> None:
        dlib = _import_dlib()
        models = dlib_model_dir()
        predictor = models / "shape_predictor_5_face_landmarks.dat"
        cnn = models / "mmod_human_face_detector.dat"
        for needed in (predictor, cnn):
            if not needed.is_file():
                raise IdentityNetworkError(f"{needed}: missing ; reinstall face_recognition_models==0.3.0")
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._confirmer = dlib.cnn_face_detection_model_v1(str(cnn))
        self._predictor = dlib.shape_predictor(str(predictor))

    # ---------------------------------------------------------------------------------------- detection
    def _detect(self, rgb: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """(box, score) of every face dlib's HOG detector finds, in `rgb`'s pixels."""
        h, w = rgb.shape[:2]
        scale = min(1.0, _DETECT_MAX_SIDE / max(h, w))
        img = rgb
        if scale < 1.0:
            import cv2

            img = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        found: list = []
        for upsample in (0, _SMALL_FACE_UPSAMPLE):
            rects, scores, _ = self._detector.run(img, upsample, 0.0)
            boxes = [((r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale), float(s))
                     for r, s in zip(rects, scores)]
            found += [f for f in boxes if all(box_iou(f[0], g[0]) < _SAME_FACE_IOU for g in found)
                      and self._confirmed(rgb, f[0])]
        return found

    def _confirmed(self, rgb: np.ndarray, box) -> bool:
        """dlib's CNN detector finds a face near the centre of a small crop around a HOG box."""
        import cv2

        side = max(2, int(round(_CONFIRM_SPAN * max(box[2] - box[0], box[3] - box[1]))))
        x0, y0 = int(round((box[0] + box[2] - side) / 2)), int(round((box[1] + box[3] - side) / 2))
        crop = rgb[max(0, y0):max(0, y0 + side), max(0, x0):max(0, x0 + side)]
        # outside the image is black, as at the CNN's own image borders
        crop = cv2.copyMakeBorder(crop, max(0, -y0), side - crop.shape[0] - max(0, -y0), max(0, -x0),
                                  side - crop.shape[1] - max(0, -x0), cv2.BORDER_CONSTANT, value=0)
        crop = cv2.resize(crop, (_CONFIRM_CROP, _CONFIRM_CROP),
                          interpolation=cv2.INTER_AREA if side > _CONFIRM_CROP else cv2.INTER_LINEAR)
        lo, hi = _CONFIRM_CROP * 0.25, _CONFIRM_CROP * 0.75
        return any(lo <= d.rect.center().x <= hi and lo <= d.rect.center().y <= hi for d in self._confirmer(crop, 0))

    def _shape(self, rgb: np.ndarray, box) -> tuple[object, np.ndarray]:
        rect = self._dlib.rectangle(int(round(box[0])), int(round(box[1])), int(round(box[2])) - 1, int(round(box[3])) - 1)
        shape = self._predictor(rgb, rect)
        parts = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
        return shape, parts

    # ------------------------------------------------------------------------------------------- public
    def faces(self, rgb: np.ndarray) -> list[FoundFace]:
        """Every face in `rgb` ([H, W, 3] uint8 RGB), largest box first, each embedded.

        ValueError for an array that is not an 8-bit RGB image; [] when no face is found."""
        rgb = _check_rgb(rgb)
        found = []
        for box, score in self._detect(rgb):
            shape, parts = self._shape(rgb, box)
            found.append((box, score, shape, arcface_points_from_dlib(parts), parts))
        found.sort(key=lambda f: -(f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
        if not found:
            return []
        embeddings, landmarks, sources = self._embed_found(rgb, found)
        return [FoundFace(box=tuple(float(v) for v in f[0]), landmarks=lm, embedding=e, score=f[1], landmarks_source=src,
                          parts=f[4].astype(np.float32)) for f, e, lm, src in zip(found, embeddings, landmarks, sources)]

    def embed(self, rgb: np.ndarray, landmarks: np.ndarray) -> FoundFace:
        """Embed the face at known ArcFace-order `landmarks` ([5, 2] pixels), without running the detector
        (dataset_tools.prepare has found its faces already). ArcFace aligns with these landmarks; dlib
        fits its own 5 points in a box made from them (its descriptor aligns itself). ValueError for a
        bad image."""
        rgb = _check_rgb(rgb)
        landmarks = np.asarray(landmarks, np.float32).reshape(5, 2)
        box = _box_from_points(landmarks)
        shape, parts = self._shape(rgb, box)
        embeddings, points, _ = self._embed_found(rgb, [(box, 0.0, shape, landmarks, parts)], given=True)
        return FoundFace(box=tuple(float(v) for v in box), landmarks=points[0], embedding=embeddings[0],
                         score=0.0, landmarks_source="given", parts=parts.astype(np.float32))

    def _embed_found(self, rgb, found, given: bool = False) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
        raise NotImplementedError

    @staticmethod
    def _unit(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, np.float32).reshape(-1)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Cosine similarity of two embeddings ([d] each; normalised here, so raw vectors work too)."""
        return float(np.dot(self._unit(a), self._unit(b)))

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        """The network's same-person rule on two embeddings: cosine similarity above `threshold`."""
        return self.similarity(a, b) > self.threshold


class DlibIdentity(IdentityNetwork):
    """dlib's ResNet face-recognition network v1 (128-d) from face_recognition_models, run in PyTorch
    (library.models.identity.DlibEncoder, the identity loss's network) on dlib's chip at dlib's 5 parts."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        from library.models.identity import load_identity_encoder

        try:
            self._encoder = load_identity_encoder("", device)
        except (FileNotFoundError, ValueError) as exc:
            raise IdentityNetworkError(f"{one_line(exc)} ; reinstall face_recognition_models==0.3.0") from exc
        self._device = device
        self.name = "dlib ResNet v1 (face_recognition_models)"
        self.threshold = DLIB_COSINE_THRESHOLD

    def _embed_found(self, rgb, found, given: bool = False):
        import torch

        parts = torch.tensor(np.array([[[p.x, p.y] for p in f[2].parts()] for f in found], np.float64))
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0).unsqueeze(0).to(self._device)
        with torch.no_grad():
            raw = self._encoder.from_parts(image.expand(len(found), -1, -1, -1), parts.to(self._device)).cpu().numpy()
        return [self._unit(d) for d in raw], [f[3] for f in found], ["given" if given else "dlib"] * len(found)


class ArcFaceIdentity(IdentityNetwork):
    """An ArcFace file through library.models.identity's loaders, on faces found by dlib's detector."""

    def __init__(self, weights: str | os.PathLike, device: str = "cpu", threshold: float = ARCFACE_COSINE_THRESHOLD):
        super().__init__()
        from library.models.identity import IdentityEncoder

        try:
            self._encoder = IdentityEncoder.from_file(weights, device)
        except FileNotFoundError as cause:
            raise IdentityNetworkError(f"{weights}: ArcFace weights not found ; give an insightface .onnx or an "
                                       "arcface_torch .pth, or none for dlib's network") from cause
        except (ValueError, OSError, RuntimeError) as exc:
            raise IdentityNetworkError(one_line(exc)) from exc
        self._device = device
        self.name = f"ArcFace {Path(weights).name}"
        self.threshold = float(threshold)

    def _mesh_points(self, rgb: np.ndarray, found) -> tuple[list[np.ndarray], list[str]]:
        from library.faces import detect_face_landmarks

        meshes = detect_face_landmarks(rgb)
        points, sources, used = [], [], set()
        for box, _, _, derived, _ in found:
            x0, y0, x1, y1 = box
            match = next((i for i, m in enumerate(meshes) if i not in used
                          and x0 <= m[2][0] <= x1 and y0 <= m[2][1] <= y1), None)
            if match is None:
                points.append(derived)
                sources.append("dlib")
            else:
                used.add(match)
                points.append(np.asarray(meshes[match], np.float32))
                sources.append("mediapipe")
        return points, sources

    def _embed_found(self, rgb, found, given: bool = False):
        import torch

        if given:
            points, sources = [f[3] for f in found], ["given"] * len(found)
        else:
            points, sources = self._mesh_points(rgb, found)
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0).unsqueeze(0).to(self._device)
        lms = torch.from_numpy(np.stack(points)).float().to(self._device)
        with torch.no_grad():
            emb = self._encoder(image.expand(len(points), -1, -1, -1), lms).cpu().numpy()
        return [self._unit(e) for e in emb], points, sources


def load_identity_network(arcface_weights: str | os.PathLike = "", device: str = "cpu",
                          threshold: float | None = None) -> IdentityNetwork:
    """ArcFace from `arcface_weights` (`.onnx`/`.pth`, library.models.identity's loaders) when given, else dlib's
    network from face_recognition_models. `threshold` overrides the same-person cosine threshold.

    Raises IdentityNetworkError (a ValueError; str() one line) for a missing package, model file or a
    weights file that cannot be loaded."""
    try:
        if arcface_weights:
            return ArcFaceIdentity(arcface_weights, device,
                                   ARCFACE_COSINE_THRESHOLD if threshold is None else threshold)
        net = DlibIdentity(device)
    except IdentityNetworkError:
        raise
    except (RuntimeError, OSError) as exc:  # dlib's own errors (a corrupt .dat file) are RuntimeErrors
        raise IdentityNetworkError(f"identity network could not be loaded: {one_line(exc)}") from exc
    if threshold is not None:
        net.threshold = float(threshold)
    return net
