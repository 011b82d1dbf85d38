"""Face restoration: align faces to FFHQ, restore, paste back with a soft mask.

The FFHQ alignment and the paste-back are what facexlib's FaceRestoreHelper does, reimplemented here
because its constructor always downloads a RetinaFace and a ParseNet model; faces are found by the
project's face finder (`library.faces.detect_face_landmarks`, mediapipe's bundled models) or given by
the caller, so nothing here downloads anything.

This module sits below library.postprocess (which loads the restorer and runs the whole chain) and
never imports it; the small RGB/alpha helpers live here for that reason and postprocess reuses them.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from library.faces import detect_face_landmarks
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
    found with `detector(rgb_uint8_array) -> list of 5x2` (default: `library.faces.detect_face_landmarks`).
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
