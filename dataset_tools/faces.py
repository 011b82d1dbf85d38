"""Face detection, landmarks and face masks on mediapipe's legacy solutions (models ship in the wheel).

One `FaceAnalyzer` per run: it builds the detectors and the face mesh once. `analyze(rgb)` finds the
faces (short-range model first, full-range when that finds nothing), picks the largest, runs the face
mesh on a square crop around it (so small faces in big photos get the mesh's full resolution), and
returns the box, the 5 ArcFace landmarks and a binary face mask (255 = face) in the image's pixels.

Face mask: the face mesh's FACE_OVAL polygon, filled; or, with BiSeNet face-parsing weights, parsing
classes 1-13 (skin, brows, eyes, glasses, ears, earrings, nose, mouth, lips) in a square region around
the detected box (`parse_region`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import cv2
import numpy as np

MESH_CROP = 256  # side of the square crop fed to the face mesh
MESH_CROP_FACTORS = (2.0, 1.6, 3.0)  # crop side / face box side, tried in turn
DETECT_MAX_SIDE = 512  # detection runs on a copy no bigger than this (its models see 128 / 192 px)
PARSE_FACTOR = 1.8  # BiSeNet region side / face box side (CelebAMask-HQ framing)
MIN_SCORE = 0.5

# mediapipe face-mesh indices. The mesh's "RIGHT_EYE" is the subject's right eye, which is on the
# image's left in an ordinary (unmirrored, upright) photo: insightface's order starts there.
_RIGHT_EYE = (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246)
_LEFT_EYE = (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466)
_NOSE_TIP = 1
_MOUTH_IMAGE_LEFT = 61
_MOUTH_IMAGE_RIGHT = 291


@dataclass
class DetectedFace:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels, clipped to the image
    score: float
    keypoints: np.ndarray  # [6, 2] detector keypoints in pixels (eyes, nose, mouth, ears)
    mesh: np.ndarray | None = None  # [468, 2] face-mesh points when already computed

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


@dataclass
class FaceAnalysis:
    faces: list[DetectedFace]  # largest first
    detector: str | None  # "short_range" | "full_range" | None
    landmarks: np.ndarray | None = None  # [5, 2] insightface order, pixels
    mesh: np.ndarray | None = None  # [468, 2] pixels
    face_mask: np.ndarray | None = None  # [H, W] uint8, 255 = face of the chosen face
    mask_method: str | None = None  # "face_mesh_oval" | "bisenet" | "box_ellipse"
    warnings: list[str] = field(default_factory=list)

    @property
    def face(self) -> DetectedFace | None:
        return self.faces[0] if self.faces else None


def _ordered_oval() -> list[int]:
    """FACE_OVAL is a set of edges; chain it into one closed polygon."""
    import mediapipe as mp

    edges = list(mp.solutions.face_mesh.FACEMESH_FACE_OVAL)
    nxt: dict[int, list[int]] = {}
    for a, b in edges:
        nxt.setdefault(a, []).append(b)
        nxt.setdefault(b, []).append(a)
    start = min(nxt)
    order, prev, cur = [start], None, start
    while True:
        cands = [n for n in nxt[cur] if n != prev]
        if not cands:
            break
        prev, cur = cur, cands[0]
        if cur == start:
            break
        order.append(cur)
        if len(order) > len(nxt):
            break
    return order


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence the C++ logging mediapipe/TFLite print on fd 2; yields a stream on the real stderr.

    Python code that wants to talk to the user during the block writes to the yielded stream.
    """
    try:
        sys.stderr.flush()
    except Exception:
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
        stream = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
        yield stream
    finally:
        try:
            if stream is not None:
                stream.flush()
                stream.close()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def square_crop(rgb: np.ndarray, cx: float, cy: float, side: float, out: int) -> tuple[np.ndarray, float, float, float]:
    """Square window of `side` px centred on (cx, cy), resized to out x out, zero-padded outside the image.

    Returns (crop, x0, y0, scale): image point p maps to crop point (p - (x0, y0)) * scale.
    """
    h, w = rgb.shape[:2]
    side = max(int(np.ceil(side)), 2)
    x0, y0 = int(np.floor(cx - side / 2)), int(np.floor(cy - side / 2))
    scale = out / side
    canvas = np.zeros((out, out, 3), np.uint8)
    ix0, iy0 = max(0, x0), max(0, y0)
    ix1, iy1 = min(w, x0 + side), min(h, y0 + side)
    if ix1 <= ix0 or iy1 <= iy0:
        return canvas, float(x0), float(y0), scale
    # destination rectangle of the visible part
    rx0, ry0 = int(round((ix0 - x0) * scale)), int(round((iy0 - y0) * scale))
    rx1 = min(out, max(rx0 + 1, int(round((ix1 - x0) * scale))))
    ry1 = min(out, max(ry0 + 1, int(round((iy1 - y0) * scale))))
    if rx1 <= rx0 or ry1 <= ry0:
        return canvas, float(x0), float(y0), scale
    part = rgb[iy0:iy1, ix0:ix1]
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    canvas[ry0:ry1, rx0:rx1] = cv2.resize(part, (rx1 - rx0, ry1 - ry0), interpolation=interp)
    return canvas, float(x0), float(y0), scale


def parse_region(box, width: int, height: int) -> tuple[int, int, int, int]:
    """The image region (x0, y0, x1, y1), clipped, that face parsing looks at for a face box."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = PARSE_FACTOR * max(x1 - x0, y1 - y0)
    return (
        max(0, int(np.floor(cx - side / 2))),
        max(0, int(np.floor(cy - side / 2))),
        min(width, int(np.ceil(cx + side / 2))),
        min(height, int(np.ceil(cy + side / 2))),
    )


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FaceAnalyzer:
    """Create once per run; `analyze` many images; `close` (or use as a context manager)."""

    def __init__(self, parser_weights: str | os.PathLike | None = None, min_score: float = MIN_SCORE):
        import mediapipe as mp

        fd = mp.solutions.face_detection
        self._short = fd.FaceDetection(model_selection=0, min_detection_confidence=min_score)
        self._full = fd.FaceDetection(model_selection=1, min_detection_confidence=min_score)
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=2, refine_landmarks=False, min_detection_confidence=min_score
        )
        self._oval = np.array(_ordered_oval(), dtype=np.int64)
        self.parser = None
        if parser_weights is not None:
            from .bisenet import FaceParser

            self.parser = FaceParser(parser_weights)

    def close(self) -> None:
        for g in (self._short, self._full, self._mesh):
            try:
                g.close()
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- detection -----------------------------------------------------------------------------
    def _run(self, det, img: np.ndarray, ox: float, oy: float, sx: float, sy: float, w: int, h: int) -> list[DetectedFace]:
        """Detections of one model on `img`, mapped to image pixels: p = (ox, oy) + rel * (sx, sy)."""
        res = det.process(np.ascontiguousarray(img))
        faces = []
        for d in res.detections or []:
            rb = d.location_data.relative_bounding_box
            x0, y0 = ox + rb.xmin * sx, oy + rb.ymin * sy
            x1, y1 = x0 + rb.width * sx, y0 + rb.height * sy
            box = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue
            kps = np.array([(ox + k.x * sx, oy + k.y * sy) for k in d.location_data.relative_keypoints], np.float64)
            faces.append(DetectedFace(box, float(d.score[0]), kps.reshape(-1, 2)))
        return faces

    def detect(self, rgb: np.ndarray) -> tuple[list[DetectedFace], str | None]:
        """Short-range model; full-range when it finds nothing; then full-range on overlapping tiles
        (faces under ~5% of the frame, e.g. a full-body portrait). Largest face first."""
        h, w = rgb.shape[:2]
        s = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = rgb if s >= 1.0 else cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        for name, det in (("short_range", self._short), ("full_range", self._full)):
            faces = self._run(det, small, 0.0, 0.0, w, h, w, h)
            if faces:
                faces.sort(key=lambda f: f.area, reverse=True)
                return faces, name
        # tiles: the same full-range model on overlapping half-size windows. Textures fool it there
        # (star fields, foliage), so a tile's face counts only when the face mesh confirms it.
        faces = []
        for f in self._detect_tiled(rgb):
            f.mesh = self.mesh(rgb, f)
            if f.mesh is not None:
                faces.append(f)
        return (faces, "full_range") if faces else ([], None)

    def _detect_tiled(self, rgb: np.ndarray) -> list[DetectedFace]:
        h, w = rgb.shape[:2]
        tile = min(h, w) // 2
        if tile < 128:
            return []
        step = tile // 2
        xs = list(range(0, w - tile + 1, step))
        ys = list(range(0, h - tile + 1, step))
        if xs[-1] != w - tile:
            xs.append(w - tile)
        if ys[-1] != h - tile:
            ys.append(h - tile)
        found: list[DetectedFace] = []
        for y in ys:
            for x in xs:
                crop = rgb[y:y + tile, x:x + tile]
                if tile > DETECT_MAX_SIDE:
                    crop = cv2.resize(crop, (DETECT_MAX_SIDE, DETECT_MAX_SIDE), interpolation=cv2.INTER_AREA)
                found += self._run(self._full, crop, x, y, tile, tile, w, h)
        # overlapping tiles see the same face: keep the best-scoring box of each overlap group
        found.sort(key=lambda f: f.score, reverse=True)
        kept: list[DetectedFace] = []
        for f in found:
            if all(_iou(f.box, k.box) < 0.3 for k in kept):
                kept.append(f)
        kept.sort(key=lambda f: f.area, reverse=True)
        return kept

    # -- face mesh on a crop ---------------------------------------------------------------------
    def mesh(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray | None:
        x0, y0, x1, y1 = face.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        size = max(x1 - x0, y1 - y0)
        for factor in MESH_CROP_FACTORS:
            crop, ox, oy, scale = square_crop(rgb, cx, cy, size * factor, MESH_CROP)
            res = self._mesh.process(crop)
            if not res.multi_face_landmarks:
                continue
            best, best_d = None, None
            for lms in res.multi_face_landmarks:
                pts = np.array([(p.x, p.y) for p in lms.landmark], np.float64) * MESH_CROP
                d = float(np.sum((pts.mean(0) - MESH_CROP / 2) ** 2))
                if best_d is None or d < best_d:
                    best, best_d = pts, d
            pts = best / scale + np.array([ox, oy])
            # the mesh must describe the detected face, not a neighbour
            c = pts.mean(0)
            if abs(c[0] - cx) < size and abs(c[1] - cy) < size:
                return pts
        return None

    @staticmethod
    def landmarks_from_mesh(pts: np.ndarray) -> np.ndarray:
        return np.stack(
            [
                pts[list(_RIGHT_EYE)].mean(0),
                pts[list(_LEFT_EYE)].mean(0),
                pts[_NOSE_TIP],
                pts[_MOUTH_IMAGE_LEFT],
                pts[_MOUTH_IMAGE_RIGHT],
            ]
        )

    @staticmethod
    def landmarks_from_detector(face: DetectedFace) -> np.ndarray:
        k = face.keypoints  # right eye, left eye, nose tip, mouth centre, right ear, left ear
        eye_l, eye_r, nose, mouth = k[0], k[1], k[2], k[3]
        half = (eye_r - eye_l) * 0.42
        return np.stack([eye_l, eye_r, nose, mouth - half, mouth + half])

    # -- masks -----------------------------------------------------------------------------------
    def oval_mask(self, shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
        mask = np.zeros(shape, np.uint8)
        poly = np.round(pts[self._oval] * 16).astype(np.int32)
        cv2.fillPoly(mask, [poly], 255, lineType=cv2.LINE_8, shift=4)
        return mask

    @staticmethod
    def ellipse_mask(shape: tuple[int, int], box) -> np.ndarray:
        mask = np.zeros(shape, np.uint8)
        x0, y0, x1, y1 = box
        center = (int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2 - 0.05 * (y1 - y0))))
        axes = (max(1, int(round(0.5 * (x1 - x0)))), max(1, int(round(0.62 * (y1 - y0)))))
        cv2.ellipse(mask, center, axes, 0, 0, 360, 255, -1)
        return mask

    def parsed_mask(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        h, w = rgb.shape[:2]
        rx0, ry0, rx1, ry1 = parse_region(face.box, w, h)
        region = rgb[ry0:ry1, rx0:rx1]
        from .bisenet import INPUT_SIZE

        interp = cv2.INTER_AREA if max(region.shape[:2]) > INPUT_SIZE else cv2.INTER_LINEAR
        crop = cv2.resize(region, (INPUT_SIZE, INPUT_SIZE), interpolation=interp)
        m = cv2.resize(self.parser.face_mask(crop), (rx1 - rx0, ry1 - ry0), interpolation=cv2.INTER_NEAREST)
        # keep the face blobs that touch the detected box: a neighbour's face in the region is not ours
        n, labels = cv2.connectedComponents((m > 0).astype(np.uint8), connectivity=8)
        if n > 2:
            bx0, by0, bx1, by1 = (int(round(v)) for v in face.box)
            inside = labels[max(0, by0 - ry0): max(0, by1 - ry0), max(0, bx0 - rx0): max(0, bx1 - rx0)]
            keep = np.unique(inside[inside > 0])
            m = np.where(np.isin(labels, keep), 255, 0).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[ry0:ry1, rx0:rx1] = m
        return mask

    # -- all together ----------------------------------------------------------------------------
    def analyze(self, rgb: np.ndarray) -> FaceAnalysis:
        rgb = np.ascontiguousarray(rgb)
        faces, detector = self.detect(rgb)
        out = FaceAnalysis(faces=faces, detector=detector)
        if not faces:
            return out
        face = faces[0]
        shape = rgb.shape[:2]
        pts = face.mesh if face.mesh is not None else self.mesh(rgb, face)
        if pts is not None:
            out.mesh = pts
            out.landmarks = self.landmarks_from_mesh(pts)
        else:
            out.landmarks = self.landmarks_from_detector(face)
            out.warnings.append("face mesh found no face in the detected box: landmarks from the detector, mask is an ellipse")
        if self.parser is not None:
            mask = self.parsed_mask(rgb, face)
            x0, y0, x1, y1 = (int(v) for v in face.box)
            inside = mask[y0:y1, x0:x1]
            if inside.size and float(inside.mean()) / 255.0 >= 0.05:
                out.face_mask, out.mask_method = mask, "bisenet"
                return out
            out.warnings.append("face parsing found almost no face inside the box: using the face-mesh mask")
        if pts is not None:
            out.face_mask, out.mask_method = self.oval_mask(shape, pts), "face_mesh_oval"
        else:
            out.face_mask, out.mask_method = self.ellipse_mask(shape, face.box), "box_ellipse"
        return out
