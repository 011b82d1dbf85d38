"""Face detection, landmarks, orientation and face masks on mediapipe's legacy solutions (models ship in
the wheel).

One `FaceAnalyzer` per run: it builds the detectors and the face mesh once. `analyze(rgb)` finds every
face (`find`: the short-range and the full-range model on the whole image, then the full-range model on
TILE px tiles for faces of SMALL_FACE px and up), picks one, runs the face mesh on square crops around it
(so small faces in big photos get the mesh's full resolution), and returns the box, the 5 ArcFace
landmarks and a binary face mask (255 = face) in the image's pixels.

Why every stage runs: the models see a 192 px (full-range) or 128 px (short-range) copy of what they are
given, and find a face from about 1/10 of that view. On a whole 1000 x 600 photo that is ~100 px, so a
70 px face beside a larger one was never looked for once the larger one was found. Tiles of TILE px bring
a 40 px face to 1/8 of the view. Cost (measured): the short-range model ~2 ms, the full-range one ~5 ms
per view, so a 1024 px photo's 16 tiles add ~80 ms; a tile's face that the whole image already gave is
dropped before the mesh runs on it.

Which face: the largest one the face mesh *confirms*. The mesh fits a face to whatever it is given (a
cartoon, a blurred face, an upside-down face it draws upright), so one fit proves little. A face is
confirmed when two fits on differently rotated copies of its crop (0 and 90 degrees, then 270 and 180
until two agree) describe the same face the same way up. A larger detector box the mesh does not
confirm loses to a smaller confirmed face, with a warning; when no box is confirmed the largest is
used as before (detector landmarks and an ellipse when the mesh finds nothing at all).

Orientation: the confirmed fits give the face's eye-to-mouth axis. A face more than 60 degrees from
upright means the photo is on its side or upside down (a phone photo whose EXIF orientation was lost).
With `fix_rotation=True` (source photos) the image is turned upright by quarter turns, as EXIF would
have, and analysed again: `FaceAnalysis.rotation` says by how much, `.image` is the turned image and a
warning "rotated 180 degrees to upright" goes with it. With `fix_rotation=False` (reference photos,
whose composition may be deliberate: a reclining figure) the image is kept, the face is analysed in its
upright copy and mapped back, and a warning reports the turn. When the upright pass confirms no face,
the three other quarter turns are tried (short- and full-range detectors only) before giving up. The
cost is one more face-mesh run per image when the face is upright.

Landmark order: the 5 points follow insightface's template (image-left eye, image-right eye, nose,
image-left mouth corner, image-right one, along the face's own axes); every mesh fit is checked against
the mesh's midline (forehead to chin) and a fit out of order is discarded.

Face mask: the face mesh's FACE_OVAL polygon, filled; or, with BiSeNet face-parsing weights, parsing
classes 1-13 (skin, brows, eyes, glasses, ears, earrings, nose, mouth, lips) in a square region around
the detected box (`face_masks.parse_region`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import cv2
import numpy as np

from library.faces.geometry import (
    box_iou,
    face_angle,
    fits_agree,
    landmark_order_problem,
    landmarks_from_detector,
    landmarks_from_mesh,
    mesh_up_axis,
    quarter_turn,
    rotate_box,
    rotate_points,
    turn_k,
)
from library.faces.masks import ellipse_mask, oval_mask, oval_polygon, parsed_mask

MESH_CROP = 256  # side of the square crop fed to the face mesh
MESH_CROP_FACTORS = (2.0, 1.6, 3.0)  # crop side / face box side, tried in turn
DETECT_MAX_SIDE = 512  # detection runs on a copy no bigger than this (its models see 128 / 192 px)
SMALL_FACE = 40  # px: the smallest face looked for (on tiles)
TILE = 352  # tile side for small faces: a SMALL_FACE face is 1/9 of the full-range model's view there
TILE_OVERLAP = 96  # px tiles share at least: a face the whole image's view is too coarse for fits in one
MIN_SCORE = 0.5
MAX_CONFIRM = 4  # faces tried, largest first, in search of one the face mesh confirms
MESH_TURNS = (0, 1, 3, 2)  # np.rot90 turns of the crop fed to the mesh, in the order tried


@dataclass
class DetectedFace:
    """One detector box, with the face mesh's verdict once `FaceAnalyzer.check` has run on it."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels, clipped to the image
    score: float
    keypoints: np.ndarray  # [6, 2] detector keypoints in pixels (eyes, nose, mouth, ears)
    mesh: np.ndarray | None = None  # [468, 2] face-mesh points once `checked`
    confirmed: bool = False  # two face-mesh fits on differently rotated crops agree
    checked: bool = False  # the mesh has been run on this face (mesh None then means: no fit)
    detector: str = "full_range"  # the model that found it: "short_range" | "full_range"

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


@dataclass
class FaceAnalysis:
    """What `FaceAnalyzer.analyze` found in one image; every coordinate is in `image` when `rotation` is set."""

    faces: list[DetectedFace]  # the chosen face first, then the others largest first
    detector: str | None  # the chosen face's model: "short_range" | "full_range" | None
    landmarks: np.ndarray | None = None  # [5, 2] insightface order, pixels
    mesh: np.ndarray | None = None  # [468, 2] pixels
    face_mask: np.ndarray | None = None  # [H, W] uint8, 255 = face of the chosen face
    mask_method: str | None = None  # "face_mesh_oval" | "bisenet" | "box_ellipse"
    warnings: list[str] = field(default_factory=list)
    rotation: int = 0  # degrees clockwise the input was turned (0, 90, 180, 270): all above is in `image`
    image: np.ndarray | None = None  # the turned RGB image when rotation != 0
    angle: float | None = None  # the chosen face's up axis, degrees clockwise from upright (mesh fits only)

    @property
    def face(self) -> DetectedFace | None:
        return self.faces[0] if self.faces else None

    @property
    def turn(self) -> int:
        """Clockwise quarter turn that would bring the chosen, confirmed face upright (0 when it is
        upright or when no face is confirmed)."""
        if self.face is None or not self.face.confirmed or self.angle is None:
            return 0
        return quarter_turn(self.angle)


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


def tile_origins(length: int, tile: int = TILE, overlap: int = TILE_OVERLAP) -> list[int]:
    """Start positions (px) of tiles of side `tile` covering 0..`length`, evenly spread, neighbours sharing
    at least `overlap` px; [0] when one tile (or the whole length, when shorter) covers it."""
    if length <= tile:
        return [0]
    n = max(2, int(np.ceil((length - overlap) / (tile - overlap))))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _same_face(a: DetectedFace, b: DetectedFace) -> bool:
    """Two boxes of one face: overlapping, or one's centre inside the other (a tile that shows part of
    a large face finds a smaller box inside it)."""
    if box_iou(a.box, b.box) >= 0.3:
        return True
    small, big = (a, b) if a.area <= b.area else (b, a)
    cx, cy = (small.box[0] + small.box[2]) / 2, (small.box[1] + small.box[3]) / 2
    return big.box[0] <= cx <= big.box[2] and big.box[1] <= cy <= big.box[3]


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
        self._oval = oval_polygon()
        self.parser = None
        if parser_weights is not None:
            from library.faces.bisenet import FaceParser

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
            faces.append(DetectedFace(box, float(d.score[0]), kps.reshape(-1, 2),
                                      detector="short_range" if det is self._short else "full_range"))
        return faces

    def detect(self, rgb: np.ndarray, tiles: bool = True) -> tuple[list[DetectedFace], str | None]:
        """Every face of an RGB image [H, W, 3] uint8, largest first, and the model that found the largest
        ("short_range" / "full_range"; None with no face). See `find`."""
        faces = self.find(rgb, tiles=tiles)
        return faces, (faces[0].detector if faces else None)

    def find(self, rgb: np.ndarray, tiles: bool = True, thorough: bool = True) -> list[DetectedFace]:
        """Every face of an RGB image [H, W, 3] uint8, each once, largest first: the short-range and the
        full-range model on a copy no bigger than DETECT_MAX_SIDE, then, with `tiles` and an image larger
        than one tile, the full-range model on overlapping TILE px tiles (faces from SMALL_FACE px). A
        tile's face counts only when it is new (`_same_face`) and the face mesh confirms it (`check` with
        `thorough`): on tiles the model also fires on textures (star fields, foliage)."""
        h, w = rgb.shape[:2]
        s = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = rgb if s >= 1.0 else cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        pool: list[DetectedFace] = []
        for det in (self._short, self._full):
            for f in sorted(self._run(det, small, 0.0, 0.0, w, h, w, h), key=lambda f: f.area, reverse=True):
                if not any(_same_face(f, p) for p in pool):
                    pool.append(f)
        if tiles and max(h, w) > TILE:
            for f in self._detect_tiled(rgb):
                if not any(_same_face(f, p) for p in pool) and self.check(rgb, f, thorough).confirmed:
                    pool.append(f)
        return sorted(pool, key=lambda f: f.area, reverse=True)

    def _detect_tiled(self, rgb: np.ndarray) -> list[DetectedFace]:
        """The full-range model on TILE px tiles (`tile_origins`), each overlap group's best-scoring box."""
        h, w = rgb.shape[:2]
        tw, th = min(TILE, w), min(TILE, h)
        found: list[DetectedFace] = []
        for y in tile_origins(h):
            for x in tile_origins(w):
                found += self._run(self._full, rgb[y:y + th, x:x + tw], x, y, tw, th, w, h)
        found.sort(key=lambda f: f.score, reverse=True)
        kept: list[DetectedFace] = []
        for f in found:
            if not any(_same_face(f, k) for k in kept):
                kept.append(f)
        return kept

    # -- face mesh on a crop ---------------------------------------------------------------------
    def _fit(self, crop: np.ndarray, k: int) -> np.ndarray | None:
        """Face-mesh points [468, 2] in `crop`'s pixels, fitted on the crop turned k times (np.rot90);
        the fit nearest the crop's centre when the mesh sees several faces."""
        res = self._mesh.process(np.ascontiguousarray(np.rot90(crop, k)) if k else crop)
        if not res.multi_face_landmarks:
            return None
        best, best_d = None, None
        for lms in res.multi_face_landmarks:
            pts = np.array([(p.x, p.y) for p in lms.landmark], np.float64) * MESH_CROP
            d = float(np.sum((pts.mean(0) - MESH_CROP / 2) ** 2))
            if best_d is None or d < best_d:
                best, best_d = pts, d
        return rotate_points(best, -k, MESH_CROP, MESH_CROP) if k else best

    def check(self, rgb: np.ndarray, face: DetectedFace, thorough: bool = True) -> DetectedFace:
        """Run the face mesh on `face` (once; cached on it) and set `face.mesh` and `face.confirmed`.

        For each crop size in MESH_CROP_FACTORS the crop is fitted turned 0, 90, 270 and 180 degrees
        (MESH_TURNS) until two fits agree (`fits_agree`): the face is confirmed and its mesh is the
        agreeing fit that saw the face nearest upright. A crop size where neither of the first two
        turns fits is given up. A fit must lie on the detected face (not a neighbour) with its landmarks
        in order along its own midline. Without two agreeing fits the face is unconfirmed and keeps the
        first fit on the unturned crop, if any (mesh None: no fit at all). `thorough=False` tries only
        the first crop size and turns 0 and 90 (for a face expected upright). Costs two mesh runs for an
        ordinary face; a box that is not a face costs up to six (two when not thorough).
        """
        if face.checked:
            return face
        face.checked = True
        x0, y0, x1, y1 = face.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        size = max(x1 - x0, y1 - y0)
        single = None
        for factor in MESH_CROP_FACTORS if thorough else MESH_CROP_FACTORS[:1]:
            crop, ox, oy, scale = square_crop(rgb, cx, cy, size * factor, MESH_CROP)
            fits: list[tuple[int, np.ndarray, np.ndarray]] = []
            for i, k in enumerate(MESH_TURNS if thorough else MESH_TURNS[:2]):
                if i == 2 and not fits:
                    break
                pts = self._fit(crop, k)
                if pts is None:
                    continue
                pts = pts / scale + np.array([ox, oy])
                c = pts.mean(0)
                if not (abs(c[0] - cx) < size and abs(c[1] - cy) < size):
                    continue  # the mesh found a neighbour, not the detected face
                lm = landmarks_from_mesh(pts)
                if landmark_order_problem(lm, mesh_up_axis(pts)) is not None:
                    continue
                if single is None and k == 0:
                    single = pts  # a lone fit on a turned crop may be drawn the wrong way up: never kept
                for k2, pts2, lm2 in fits:
                    if fits_agree(lm, lm2):
                        # the mesh is most accurate on a face it sees upright: the crop turned by k
                        # shows the face at (angle - 90 k) degrees
                        a = face_angle(lm)
                        face.mesh = min((k, pts), (k2, pts2),
                                        key=lambda t: abs((a - 90 * t[0] + 180) % 360 - 180))[1]
                        face.confirmed = True
                        return face
                fits.append((k, pts, lm))
        face.mesh = single
        return face

    def mesh(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray | None:
        """Face-mesh points [468, 2] of `face` in image pixels, or None (see `check`)."""
        return self.check(rgb, face).mesh

    # -- all together ----------------------------------------------------------------------------
    def analyze(self, rgb: np.ndarray, fix_rotation: bool = True) -> FaceAnalysis:
        """Faces, landmarks and face mask of an RGB image [H, W, 3] uint8 (see the module docstring).

        fix_rotation: turn a photo whose face is on its side or upside down upright (True), or keep it
        and report the turn (False). An image without faces gives an empty `faces`, never an error.
        """
        rgb = np.ascontiguousarray(rgb)
        out = self._analyze_frame(rgb)
        if out.face is not None and out.face.confirmed and out.turn == 0:
            return out
        if out.face is not None and out.face.confirmed:
            turns = [out.turn]
        else:  # nothing confirmed here: perhaps the detectors missed a turned face
            turns = [90, 180, 270]
        for turn in turns:
            k = turn_k(turn)
            turned = np.ascontiguousarray(np.rot90(rgb, k))
            # a blind search (no confirmed face to go by) is cheap: no tiles, and a face must confirm at once
            res = self._analyze_frame(turned, thorough=len(turns) == 1)
            if res.face is None or not res.face.confirmed or res.turn != 0:
                continue
            how = {90: "90 degrees clockwise", 180: "180 degrees", 270: "90 degrees counter-clockwise"}[turn]
            if fix_rotation:
                res.rotation, res.image = turn, turned
                res.warnings.insert(0, f"rotated {how} to upright (the face was {_how_turned(turn)}: the photo's "
                                       "orientation was lost or wrong)")
                return res
            back = _map_back(res, (4 - k) % 4, turned.shape[1], turned.shape[0])
            back.warnings.insert(0, f"the face is {_how_turned(turn)} ({back.angle:.0f} degrees from upright): not "
                                    f"rotated, a reference photo keeps its composition; turn the file {how} if the "
                                    "photo itself is sideways")
            return back
        if out.face is not None and out.face.confirmed:
            out.warnings.append(f"the face is {_how_turned(out.turn)} ({out.angle:.0f} degrees from upright) but "
                                "the turned image shows no upright face: used as it is")
        return out

    def _analyze_frame(self, rgb: np.ndarray, thorough: bool = True) -> FaceAnalysis:
        """One orientation: find every face (`find`), choose the largest confirmed one, its landmarks and mask.

        Faces are checked largest first (up to MAX_CONFIRM not yet checked), so a big face-like box does
        not hide a smaller real face. No confirmed face: the largest face. `thorough=False`: no tiles, and
        a face must confirm at once (see `check`).
        """
        pool = self.find(rgb, tiles=thorough, thorough=thorough)
        face, left = None, MAX_CONFIRM
        for f in pool:
            if not f.checked:
                if left == 0:
                    continue
                left -= 1
            if self.check(rgb, f, thorough).confirmed:
                face = f
                break
        detector = (face or pool[0]).detector if pool else None
        out = FaceAnalysis(faces=sorted(pool, key=lambda f: f.area, reverse=True), detector=detector)
        if not pool:
            return out
        if face is None:
            face = self.check(rgb, pool[0], thorough)
            out.faces.remove(face)
            out.faces.insert(0, face)
            if face.mesh is not None:
                out.warnings.append("the face mesh does not confirm this face (a drawing, or a blurred, covered or "
                                    "turned face?): check its landmarks in the preview")
        elif face is not out.faces[0]:
            big = out.faces[0]
            out.warnings.append(
                f"a larger face-like box ({big.box[2] - big.box[0]:.0f}x{big.box[3] - big.box[1]:.0f} px at "
                f"{big.box[0]:.0f},{big.box[1]:.0f}) is not confirmed by the face mesh: using the largest "
                "confirmed face")
            out.faces.remove(face)
            out.faces.insert(0, face)
        return self._finish(rgb, out, face)

    def use_face(self, rgb: np.ndarray, faces: list[DetectedFace], index: int) -> FaceAnalysis:
        """The analysis of `rgb` with `faces[index]` as the chosen face (landmarks, mesh, mask), for a
        caller that knows better which face is meant (dataset_tools.identity_check: the person of the set).
        `faces` are an earlier `analyze`'s, in `rgb`'s pixels (its `image` when it turned the photo)."""
        rgb = np.ascontiguousarray(rgb)
        face = self.check(rgb, faces[index])
        others = sorted((f for i, f in enumerate(faces) if i != index), key=lambda f: f.area, reverse=True)
        out = FaceAnalysis(faces=[face] + others, detector=None)
        if face.mesh is not None and not face.confirmed:
            out.warnings.append("the face mesh does not confirm this face (a drawing, or a blurred, covered or "
                                "turned face?): check its landmarks in the preview")
        return self._finish(rgb, out, face)

    def _finish(self, rgb: np.ndarray, out: FaceAnalysis, face: DetectedFace) -> FaceAnalysis:
        """Landmarks, mesh, angle and face mask of the chosen `face` into `out`."""
        shape = rgb.shape[:2]
        pts = face.mesh
        if pts is not None:
            out.mesh = pts
            out.landmarks = landmarks_from_mesh(pts)
            out.angle = face_angle(out.landmarks)
        else:
            out.landmarks = landmarks_from_detector(face.keypoints)
            out.warnings.append("face mesh found no face in the detected box: landmarks from the detector, mask is an ellipse")
        if self.parser is not None:
            mask = parsed_mask(self.parser, rgb, face.box)
            x0, y0, x1, y1 = (int(v) for v in face.box)
            inside = mask[y0:y1, x0:x1]
            if inside.size and float(inside.mean()) / 255.0 >= 0.05:
                out.face_mask, out.mask_method = mask, "bisenet"
                return out
            out.warnings.append("face parsing found almost no face inside the box: using the face-mesh mask")
        if pts is not None:
            out.face_mask, out.mask_method = oval_mask(shape, pts, self._oval), "face_mesh_oval"
        else:
            out.face_mask, out.mask_method = ellipse_mask(shape, face.box), "box_ellipse"
        return out


def _how_turned(turn: int) -> str:
    """How a face looks that needs `turn` degrees clockwise to be upright."""
    return "upside down" if turn == 180 else "on its side"


def _map_back(res: FaceAnalysis, k: int, width: int, height: int) -> FaceAnalysis:
    """A FaceAnalysis of a width x height image -> the same analysis of ``np.rot90(image, k)``."""
    def pts(p):
        return None if p is None else rotate_points(p, k, width, height)

    faces = [DetectedFace(rotate_box(f.box, k, width, height), f.score, pts(f.keypoints), pts(f.mesh),
                          f.confirmed, f.checked, f.detector) for f in res.faces]
    lm = pts(res.landmarks)
    return FaceAnalysis(
        faces=faces, detector=res.detector, landmarks=lm, mesh=pts(res.mesh),
        face_mask=None if res.face_mask is None else np.ascontiguousarray(np.rot90(res.face_mask, k)),
        mask_method=res.mask_method, warnings=list(res.warnings),
        angle=None if lm is None else face_angle(lm),
    )
