"""Face restoration: find faces (mediapipe), align them to FFHQ, restore, paste back with a soft mask.

The FFHQ alignment and the paste-back are what facexlib's FaceRestoreHelper does, reimplemented here
because its constructor always downloads a RetinaFace and a ParseNet model; faces are found with
mediapipe's bundled models (or landmarks the caller already has), so nothing here downloads anything.

This module sits below library.postprocess (which loads the restorer and runs the whole chain) and
never imports it; the small RGB/alpha helpers live here for that reason and postprocess reuses them.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from library.files.images import to_rgb

DEFAULT_FIDELITY = 0.5  # CodeFormer w: 0 = strongest restoration, 1 = closest to the input

# Five ArcFace-order points (image-left eye, image-right eye, nose tip, left and right mouth corner) of
# an aligned FFHQ face at 512 x 512: the template GFPGAN and CodeFormer were trained on (facexlib's).
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)
_FACE_SIZE = 512
_BORDER_RGB = (132, 133, 135)  # facexlib's grey fill outside the image, in RGB order

_FACE_EXPECTED = "a face restoration model (CodeFormer or GFPGAN v1.3/v1.4)"

# Set by the CLI (library/postprocess/__main__.py): silence mediapipe's native (C++) log lines on stderr while it
# runs. Read here, at detection time, so it must live in this module.
_QUIET_NATIVE_LOGS = False

LandmarkDetector = Callable[[np.ndarray], "list[np.ndarray]"]


def _arch_id(desc) -> str:
    """spandrel's architecture id ("CodeFormer", "GFPGAN", "ESRGAN", ...): picks the call convention."""
    return str(desc.architecture.id)


# --------------------------------------------------------------------------------------------------
# Image helpers (also used by library.postprocess's upscale: alpha is carried around the RGB models)
# --------------------------------------------------------------------------------------------------


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """RGB part and alpha channel (or None) of any PIL image in memory (files are read without alpha)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    if image.mode != "RGB":
        return to_rgb(image), None  # 16-bit, CMYK, palette: the shared reader's conversion
    return image, None


def _merge_alpha(rgb: Image.Image, alpha: Image.Image | None) -> Image.Image:
    if alpha is None:
        return rgb
    if alpha.size != rgb.size:
        alpha = alpha.resize(rgb.size, Image.LANCZOS)
    out = rgb.copy()
    out.putalpha(alpha)
    return out



# --------------------------------------------------------------------------------------------------
# Face detection (mediapipe 0.10.21 legacy solutions; models ship in the wheel)
# --------------------------------------------------------------------------------------------------

# face_mesh indices (image-left = the subject's right for a frontal, unmirrored face)
_MESH_EYE_LEFT = (33, 160, 158, 133, 153, 144)
_MESH_EYE_RIGHT = (362, 385, 387, 263, 373, 380)
_MESH_NOSE_TIP = 1
_MESH_MOUTH_LEFT = 61
_MESH_MOUTH_RIGHT = 291
# half the mouth-corner distance over the eye distance in the FFHQ template
_MOUTH_HALF_OVER_EYES = float(
    np.linalg.norm(FFHQ_TEMPLATE_512[4] - FFHQ_TEMPLATE_512[3]) / np.linalg.norm(FFHQ_TEMPLATE_512[1] - FFHQ_TEMPLATE_512[0]) / 2
)


@contextlib.contextmanager
def _native_stderr_quiet():
    """Redirect file descriptor 2 to /dev/null (mediapipe's C++ logging) when the CLI asked for it."""
    if not _QUIET_NATIVE_LOGS:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _mp_detect(rgb: np.ndarray, model_selection: int, min_score: float) -> list[tuple[float, np.ndarray, np.ndarray]]:
    import mediapipe as mp

    h, w = rgb.shape[:2]
    with mp.solutions.face_detection.FaceDetection(model_selection=model_selection, min_detection_confidence=min_score) as det:
        result = det.process(rgb)
    faces = []
    for d in result.detections or []:
        bb = d.location_data.relative_bounding_box
        box = np.array([bb.xmin * w, bb.ymin * h, (bb.xmin + bb.width) * w, (bb.ymin + bb.height) * h], np.float32)
        kps = np.array([[k.x * w, k.y * h] for k in d.location_data.relative_keypoints], np.float32)
        if kps.shape[0] >= 4:
            faces.append((float(d.score[0]), box, kps))
    return faces


def _points_from_detection(kps: np.ndarray) -> np.ndarray:
    """5 ArcFace points from mediapipe's 6 detection keypoints (eyes, nose tip, mouth centre, ears)."""
    eye_l, eye_r, nose, mouth = kps[0], kps[1], kps[2], kps[3]
    half = (eye_r - eye_l) * _MOUTH_HALF_OVER_EYES
    return np.stack([eye_l, eye_r, nose, mouth - half, mouth + half]).astype(np.float32)


def _points_from_mesh(rgb: np.ndarray, box: np.ndarray, face_mesh) -> np.ndarray | None:
    """Refine one detection with face_mesh on a square crop around it; None when the mesh finds nothing."""
    import cv2

    h, w = rgb.shape[:2]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = int(round(max(box[2] - box[0], box[3] - box[1]) * 2.0))
    if side < 16:
        return None
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    pad = (max(0, -y0), max(0, y0 + side - h), max(0, -x0), max(0, x0 + side - w))
    crop = rgb[max(0, y0) : min(h, y0 + side), max(0, x0) : min(w, x0 + side)]
    if any(pad):
        crop = cv2.copyMakeBorder(crop, *pad, cv2.BORDER_CONSTANT, value=0)
    result = face_mesh.process(np.ascontiguousarray(crop))
    if not result.multi_face_landmarks:
        return None
    lm = result.multi_face_landmarks[0].landmark
    pts = np.array([[p.x, p.y] for p in lm], np.float32) * side + np.array([x0, y0], np.float32)
    five = np.stack(
        [
            pts[list(_MESH_EYE_LEFT)].mean(0),
            pts[list(_MESH_EYE_RIGHT)].mean(0),
            pts[_MESH_NOSE_TIP],
            pts[_MESH_MOUTH_LEFT],
            pts[_MESH_MOUTH_RIGHT],
        ]
    )
    # the mesh must describe the detected face, not a neighbour that also fits in the crop
    bw, bh = box[2] - box[0], box[3] - box[1]
    nx, ny = five[2]
    if not (box[0] - 0.25 * bw <= nx <= box[2] + 0.25 * bw and box[1] - 0.25 * bh <= ny <= box[3] + 0.25 * bh):
        return None
    return five.astype(np.float32)


def detect_face_landmarks(
    rgb: np.ndarray | Image.Image, min_score: float = 0.5, sure_score: float = 0.75, refine: bool = True
) -> list[np.ndarray]:
    """Faces in an RGB image as 5x2 float32 arrays in ArcFace order (pixel coordinates), best first.

    mediapipe face_detection short range, falling back to full range when it finds nothing; each face's
    points are refined with face_mesh on a crop around it (eye-contour centres, nose tip 1, mouth corners
    61/291) or, when the mesh fails, derived from the detection's 6 keypoints. A detection scoring
    below `sure_score` is kept only when face_mesh confirms it (the detector alone fires on textures).
    """
    import mediapipe as mp

    if isinstance(rgb, Image.Image):
        rgb = np.asarray(_split_alpha(rgb)[0])
    rgb = np.asarray(rgb, dtype=np.uint8)
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    rgb = np.ascontiguousarray(rgb[..., :3])
    with _native_stderr_quiet():
        faces = _mp_detect(rgb, 0, min_score) or _mp_detect(rgb, 1, min_score)
        if not faces:
            return []
        faces.sort(key=lambda f: -f[0])
        out = []
        mesh_ctx = (
            mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False, min_detection_confidence=0.3)
            if refine
            else contextlib.nullcontext()
        )
        with mesh_ctx as face_mesh:
            for score, box, kps in faces:
                five = _points_from_mesh(rgb, box, face_mesh) if refine else None
                if five is None and score < sure_score:
                    continue
                out.append(five if five is not None else _points_from_detection(kps))
    return out


# --------------------------------------------------------------------------------------------------
# Face restoration: align to FFHQ, restore, paste back with a soft mask
# --------------------------------------------------------------------------------------------------


def _restore_crop(restorer, crop: np.ndarray, fidelity: float) -> np.ndarray:
    """One 512x512 uint8 RGB aligned face through the restorer (which works in [-1, 1])."""
    model = restorer.model
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).unsqueeze(0).float()
    x = (x / 127.5 - 1.0).to(device=restorer.device, dtype=restorer.dtype)
    arch = _arch_id(restorer)
    with torch.inference_mode():
        if arch == "CodeFormer":
            y = model(x, weight=float(fidelity))
        elif arch == "GFPGAN":
            y = model(x, return_rgb=False)
        else:
            y = model(x)
    if isinstance(y, (tuple, list)):
        y = y[0]
    y = (y[0].float().clamp(-1, 1) + 1.0) * 127.5
    return y.round().byte().permute(1, 2, 0).cpu().numpy()


def _paste_face(canvas: np.ndarray, face: np.ndarray, affine: np.ndarray) -> None:
    """Blend the restored aligned `face` back into `canvas` (uint8 HWC, in place).

    Same mask as facexlib's FaceRestoreHelper without parsing: the warped square, eroded by 2 px, then
    eroded and Gaussian-blurred by ~1/10 of the face size. Pixels outside the mask stay bit-identical.
    """
    import cv2

    h, w = canvas.shape[:2]
    inv = cv2.invertAffineTransform(affine).astype(np.float64)
    n = face.shape[0]
    scale = math.sqrt(abs(np.linalg.det(inv[:, :2])))
    if scale < 0.75:
        # shrink with area averaging first: a bilinear warp straight from 512 px would alias
        m = max(8, int(round(n * scale)))
        r = m / n
        face = cv2.resize(face, (m, m), interpolation=cv2.INTER_AREA)
        # crop pixel x = (x' + 0.5) / r - 0.5 in the resized face's pixel x'
        inv = np.concatenate([inv[:, :2] / r, (inv[:, 2] + inv[:, :2].sum(1) * (0.5 / r - 0.5))[:, None]], 1)
        n = m
    corners = np.array([[0, 0, 1], [n, 0, 1], [0, n, 1], [n, n, 1]], np.float64) @ inv.T
    x0 = max(0, int(math.floor(corners[:, 0].min())) - 2)
    y0 = max(0, int(math.floor(corners[:, 1].min())) - 2)
    x1 = min(w, int(math.ceil(corners[:, 0].max())) + 2)
    y1 = min(h, int(math.ceil(corners[:, 1].max())) + 2)
    if x1 <= x0 or y1 <= y0:
        return
    inv_roi = inv.copy()
    inv_roi[:, 2] -= (x0, y0)
    size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(face, inv_roi, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(np.ones((n, n), np.float32), inv_roi, size, flags=cv2.INTER_LINEAR)
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))
    edge = int(math.sqrt(float(mask.sum()))) // 20
    if edge > 0:
        mask = cv2.erode(mask, np.ones((2 * edge, 2 * edge), np.uint8))
        mask = cv2.GaussianBlur(mask, (2 * edge + 1, 2 * edge + 1), 0)
    mask = np.clip(mask, 0.0, 1.0)[:, :, None]
    roi = canvas[y0:y1, x0:x1].astype(np.float32)
    canvas[y0:y1, x0:x1] = np.rint(mask * warped.astype(np.float32) + (1.0 - mask) * roi).clip(0, 255).astype(np.uint8)


def restore_faces(
    image: Image.Image,
    restorer,
    landmarks: Sequence[np.ndarray] | None = None,
    fidelity: float = DEFAULT_FIDELITY,
    detector: LandmarkDetector | None = None,
) -> tuple[Image.Image, int]:
    """Restore every face in `image`; returns (image, number of faces restored).

    `landmarks`: 5x2 ArcFace-order points per face in `image`'s pixel coordinates; when None, faces are
    found with `detector(rgb_uint8_array) -> list of 5x2` (default: mediapipe, `detect_face_landmarks`).
    `fidelity` is CodeFormer's w (0 = strongest restoration, 1 = closest to the input); GFPGAN ignores
    it. No face: the same image object comes back, unchanged, with 0.
    """
    import cv2

    if getattr(restorer, "purpose", None) != "FaceSR":
        raise ValueError(f"restore_faces() needs {_FACE_EXPECTED}, got {type(restorer).__name__}")
    rgb, alpha = _split_alpha(image)
    arr = np.asarray(rgb, dtype=np.uint8)
    if landmarks is None:
        landmarks = (detector or detect_face_landmarks)(arr)
    canvas = None
    count = 0
    for pts in landmarks:
        pts = np.asarray(pts, dtype=np.float32).reshape(5, 2)
        if not np.isfinite(pts).all():
            continue
        affine, _ = cv2.estimateAffinePartial2D(pts, FFHQ_TEMPLATE_512, method=cv2.LMEDS)
        if affine is None:
            continue
        crop = cv2.warpAffine(
            arr, affine, (_FACE_SIZE, _FACE_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=_BORDER_RGB
        )
        restored = _restore_crop(restorer, crop, fidelity)
        if canvas is None:
            canvas = arr.copy()
        _paste_face(canvas, restored, affine)
        count += 1
    if canvas is None:
        return image, 0
    return _merge_alpha(Image.fromarray(canvas, "RGB"), alpha), count
