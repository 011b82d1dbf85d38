"""Super-resolution and face restoration through spandrel (METHOD.md, "Inference and post-processing").

The chain is: upscale the whole image (Real-ESRGAN from the user's .pth, or a LANCZOS resize), then
restore every face on the upscaled image (CodeFormer or GFPGAN from the user's .pth) and paste it back
with a soft mask. Released defaults: CodeFormer, fidelity 0.5, x2, Real-ESRGAN off.

Weights are only ever read through spandrel's loader (a restricted unpickler that admits tensors and
ordered dicts only, or safetensors). Nothing here downloads anything: faces are found with mediapipe's
bundled models (or landmarks the caller already has), and the FFHQ alignment / paste-back that
facexlib's FaceRestoreHelper does is reimplemented here because its constructor always downloads a
RetinaFace and a ParseNet model.

    python -m library.postprocess IN OUT --upscale 2 --restore codeformer --weights codeformer.pth
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_FIDELITY",
    "DEFAULT_UPSCALE",
    "FFHQ_TEMPLATE_512",
    "detect_face_landmarks",
    "load_face_restorer",
    "load_upscaler",
    "postprocess",
    "restore_faces",
    "upscale",
    "main",
]

DEFAULT_FIDELITY = 0.5  # CodeFormer w: 0 = strongest restoration, 1 = closest to the input
DEFAULT_UPSCALE = 2

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

_SR_EXPECTED = "a super-resolution model (Real-ESRGAN RRDBNet x2/x4 or SRVGGNetCompact)"
_FACE_EXPECTED = "a face restoration model (CodeFormer or GFPGAN v1.3/v1.4)"

# Set by the CLI: silence mediapipe's native (C++) log lines on stderr while it runs.
_QUIET_NATIVE_LOGS = False

LandmarkDetector = Callable[[np.ndarray], "list[np.ndarray]"]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

_extra_arches_installed = False


def _install_extra_arches() -> None:
    """Register spandrel_extra_arches (CodeFormer) in spandrel's main registry, once per process."""
    global _extra_arches_installed
    if _extra_arches_installed:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script deprecation inside an arch
        import spandrel  # noqa: F401  (its import warns too)
        import spandrel_extra_arches

        spandrel_extra_arches.install(ignore_duplicates=True)
    _extra_arches_installed = True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _describe(desc) -> str:
    arch = desc.architecture
    name = getattr(arch, "name", None) or arch.id
    return f"{name} ({desc.purpose}, x{desc.scale})"


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return device


def _load_descriptor(path: str | os.PathLike, expected: str):
    """Read a weights file through spandrel on the CPU; every failure becomes one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    _install_extra_arches()
    import spandrel

    loader = spandrel.ModelLoader(device="cpu")
    try:
        try:
            desc = loader.load_from_file(path)
        except pickle.UnpicklingError:
            # spandrel's own unpickler admits plain tensors only; torch's weights_only unpickler is as
            # safe (no code runs) and also admits nn.Parameter, numpy scalars and the like
            if path.suffix.lower() not in (".pth", ".pt", ".ckpt"):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a state dict") from None
            state = spandrel.canonicalize_state_dict(state)
            state = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
            desc = loader.load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise ValueError(
            f"{path}: spandrel does not recognise the architecture in this file; expected {expected}"
        ) from None
    except Exception as exc:  # unpickling refused, not a torch file, wrong extension, shape mismatch
        raise ValueError(f"{path}: cannot load as a model ({_one_line(exc)}); expected {expected}") from None
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise ValueError(f"{path}: spandrel detected {desc.architecture.id} ({desc.purpose}); expected {expected}")
    return desc


def load_upscaler(path: str | os.PathLike, device: str | torch.device | None = "cpu", half: bool | None = None):
    """Load a Real-ESRGAN style super-resolution .pth/.safetensors as a spandrel ImageModelDescriptor.

    Accepts any model spandrel classes as purpose "SR" (RRDBNet x2/x4, SRVGGNetCompact, ...).
    `half=None` means fp16 when the device is CUDA and the architecture supports it.
    Raises FileNotFoundError for a missing file and ValueError (one line) for anything else.
    """
    desc = _load_descriptor(path, _SR_EXPECTED)
    if desc.purpose != "SR":
        raise ValueError(f"{Path(path)}: spandrel detected {_describe(desc)}; expected {_SR_EXPECTED}")
    device = _resolve_device(device)
    if half is None:
        half = device.type == "cuda" and desc.supports_half
    desc.to(device)
    if half and desc.supports_half:
        desc.to(torch.float16)
    return desc.eval()


def load_face_restorer(path: str | os.PathLike, device: str | torch.device | None = "cpu"):
    """Load a CodeFormer or GFPGAN (v1.3/1.4, "GFPGANv1Clean") .pth as a spandrel ImageModelDescriptor.

    Must be a face restoration model (spandrel purpose "FaceSR"); kept in fp32 (neither supports fp16).
    Raises FileNotFoundError for a missing file and ValueError (one line) for anything else.
    """
    desc = _load_descriptor(path, _FACE_EXPECTED)
    if desc.purpose != "FaceSR":
        raise ValueError(f"{Path(path)}: spandrel detected {_describe(desc)}; expected {_FACE_EXPECTED}")
    return desc.to(_resolve_device(device)).eval()


def _arch_id(desc) -> str:
    return str(desc.architecture.id)


# --------------------------------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------------------------------


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """RGB part and alpha channel (or None) of any PIL image."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    if image.mode != "RGB":
        return image.convert("RGB"), None
    return image, None


def _merge_alpha(rgb: Image.Image, alpha: Image.Image | None) -> Image.Image:
    if alpha is None:
        return rgb
    if alpha.size != rgb.size:
        alpha = alpha.resize(rgb.size, Image.LANCZOS)
    out = rgb.copy()
    out.putalpha(alpha)
    return out


def _tile_edges(length: int, tile: int, align: int = 1) -> list[int]:
    """Split [0, length) into ceil(length / tile) near-equal parts (no thin last tile), inner edges on
    multiples of `align` (a pixel-unshuffle model, like Real-ESRGAN x2plus, must see the same 2x2 groups
    in every tile as in the whole image)."""
    n = max(1, math.ceil(length / tile))
    inner = {align * round(i * length / n / align) for i in range(1, n)}
    return [0] + sorted(e for e in inner if 0 < e < length) + [length]


# --------------------------------------------------------------------------------------------------
# Super-resolution
# --------------------------------------------------------------------------------------------------


def _run_sr(model, patch: np.ndarray) -> np.ndarray:
    """One uint8 HWC patch through the SR descriptor; returns the uint8 HWC result on the CPU."""
    with torch.inference_mode():
        x = torch.from_numpy(np.array(patch, dtype=np.uint8, copy=True)).permute(2, 0, 1).unsqueeze(0)
        x = x.to(device=model.device, dtype=model.dtype).div_(255.0)
        y = model(x)  # descriptor: pads to the size requirements, clamps to [0, 1]
        if model.dtype == torch.float16 and not torch.isfinite(y).all():
            # some ESRGAN weights overflow in fp16: fall back to fp32 for the rest of this model's life
            warnings.warn("super-resolution overflowed in fp16; switching the model to fp32", RuntimeWarning)
            model.to(torch.float32)
            y = model(x.float())
        y = y[0].float().mul_(255.0).round_().clamp_(0, 255).byte()
        return y.permute(1, 2, 0).cpu().numpy()


def upscale(image: Image.Image, model, tile: int = 512, overlap: int = 32) -> Image.Image:
    """Upscale `image` by the SR model's scale, tile by tile, on the model's device and dtype.

    `tile` is the size (input pixels) of the region each tile contributes; each tile is run with
    `overlap` extra pixels of context on every side and the context is cropped away after the model,
    so seams vanish once `overlap` covers the network's receptive field. `tile <= 0` runs the whole
    image at once. Output size = input size x model.scale; an alpha channel is resized with LANCZOS.
    """
    if getattr(model, "purpose", None) != "SR":
        raise ValueError(f"upscale() needs {_SR_EXPECTED}, got {type(model).__name__}")
    from spandrel import ModelTiling

    rgb, alpha = _split_alpha(image)
    arr = np.asarray(rgb, dtype=np.uint8)
    h, w = arr.shape[:2]
    s = int(model.scale)
    align = max(1, int(getattr(model.size_requirements, "multiple_of", 1) or 1))
    overlap = align * math.ceil(max(0, int(overlap)) / align)
    if tile is None or tile <= 0 or model.tiling == ModelTiling.INTERNAL:
        tile = max(h, w)
    out = np.empty((h * s, w * s, 3), dtype=np.uint8)
    ys, xs = _tile_edges(h, tile, align), _tile_edges(w, tile, align)
    for y0, y1 in zip(ys[:-1], ys[1:]):
        for x0, x1 in zip(xs[:-1], xs[1:]):
            py0, py1 = max(0, y0 - overlap), min(h, y1 + overlap)
            px0, px1 = max(0, x0 - overlap), min(w, x1 + overlap)
            y = _run_sr(model, arr[py0:py1, px0:px1])
            oy, ox = (y0 - py0) * s, (x0 - px0) * s
            out[y0 * s : y1 * s, x0 * s : x1 * s] = y[oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s]
    return _merge_alpha(Image.fromarray(out, "RGB"), alpha)


_upscale_with_model = upscale  # postprocess() has a parameter named `upscale`


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


# --------------------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------------------


def _restorer_name(restorer) -> str:
    return {"CodeFormer": "CodeFormer", "GFPGAN": "GFPGAN"}.get(_arch_id(restorer), _arch_id(restorer))


def postprocess(
    image: Image.Image,
    upscaler=None,
    restorer=None,
    upscale: float = DEFAULT_UPSCALE,
    fidelity: float = DEFAULT_FIDELITY,
    landmarks: Sequence[np.ndarray] | None = None,
    tile: int = 512,
    detector: LandmarkDetector | None = None,
) -> tuple[Image.Image, list[str]]:
    """Upscale the background, then restore faces on the upscaled image. Returns (image, notes).

    `upscaler`: a descriptor from `load_upscaler` (Real-ESRGAN) or None for a LANCZOS resize; when its
    scale differs from `upscale` its output is LANCZOS-resized to the requested factor.
    `restorer`: a descriptor from `load_face_restorer` or None (no restoration).
    `landmarks`: 5x2 points per face in the INPUT image's coordinates (scaled here); None = detect.
    `notes`: one-line remarks for the caller to print (what ran, faces restored, no face found).
    """
    if not upscale or upscale <= 0:
        raise ValueError(f"upscale factor must be positive, got {upscale}")
    notes: list[str] = []
    w, h = image.size
    size = (max(1, round(w * upscale)), max(1, round(h * upscale)))
    if upscaler is not None:
        out = _upscale_with_model(image, upscaler, tile=tile)
        notes.append(f"background upscaled x{upscaler.scale} with {_describe(upscaler)}")
        if out.size != size:
            out = out.resize(size, Image.LANCZOS)
            notes.append(f"resized x{upscaler.scale} output to x{upscale:g} with LANCZOS")
    elif size != image.size:
        out = image.resize(size, Image.LANCZOS)
        notes.append(f"background resized x{upscale:g} with LANCZOS")
    else:
        out = image.copy()

    if restorer is not None:
        sx, sy = out.size[0] / w, out.size[1] / h
        if landmarks is None:
            # detect on the (smaller) input: same faces, cheaper
            landmarks = (detector or detect_face_landmarks)(np.asarray(_split_alpha(image)[0], dtype=np.uint8))
        # pixel centres: x_out + 0.5 = (x_in + 0.5) * s
        scaled = [(np.asarray(p, np.float32).reshape(5, 2) + 0.5) * np.array([sx, sy], np.float32) - 0.5 for p in landmarks]
        out, count = restore_faces(out, restorer, landmarks=scaled, fidelity=fidelity)
        name = _restorer_name(restorer)
        if count == 0:
            notes.append(f"no face found: {name} restoration skipped")
        else:
            extra = f" (fidelity {fidelity:g})" if _arch_id(restorer) == "CodeFormer" else ""
            notes.append(f"restored {count} face{'s' if count != 1 else ''} with {name}{extra}")
    return out, notes


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog="python -m library.postprocess",
        description="Upscale (Real-ESRGAN or LANCZOS) and restore faces (CodeFormer / GFPGAN) with your own weights.",
    )
    p.add_argument("input", metavar="IN", help="an image file or a folder of images")
    p.add_argument("output", metavar="OUT", help="an image file (for one IN file) or a folder")
    p.add_argument("--upscale", type=float, default=DEFAULT_UPSCALE, help="output size factor (default 2)")
    p.add_argument("--restore", choices=("codeformer", "gfpgan", "none"), default="codeformer", help="face restorer (default codeformer)")
    p.add_argument("--weights", help="the face restorer's .pth (CodeFormer or GFPGAN v1.3/1.4)")
    p.add_argument("--sr-weights", help="a Real-ESRGAN .pth for the background (default: LANCZOS resize)")
    p.add_argument("--fidelity", type=float, default=DEFAULT_FIDELITY, help="CodeFormer w in [0, 1] (default 0.5)")
    p.add_argument("--tile", type=int, default=512, help="super-resolution tile size in input pixels, 0 = no tiling")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    return p.parse_args(argv)


def _list_inputs(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTS and not p.name.startswith("."))


def _read_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    return im


def _write_image(image: Image.Image, dest: Path) -> None:
    """Write to a hidden temporary name beside `dest`, then os.replace (no half-written outputs)."""
    tmp = dest.with_name(f".{dest.stem}.tmp{os.getpid()}{dest.suffix}")
    ext = dest.suffix.lower()
    if ext in (".jpg", ".jpeg") and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    kwargs = {"quality": 95} if ext in (".jpg", ".jpeg", ".webp") else {}
    try:
        image.save(tmp, **kwargs)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _plan(src: Path, out_arg: str) -> list[tuple[Path, Path]]:
    dst = Path(out_arg)
    if not src.exists():
        raise _UsageError(f"input not found: {src}")
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise _UsageError(f"IN is a folder, so OUT must be a folder: {dst}")
        if dst.exists() and dst.resolve() == src.resolve():
            raise _UsageError(f"OUT must not be the input folder: {dst}")
        dst.mkdir(parents=True, exist_ok=True)
        return [(p, dst / p.name) for p in _list_inputs(src)]
    if dst.is_dir() or out_arg.endswith(("/", os.sep)):
        dst.mkdir(parents=True, exist_ok=True)
        return [(src, dst / src.name)]
    if dst.suffix.lower() not in _IMAGE_EXTS:
        raise _UsageError(f"OUT must be a folder or an image file ({', '.join(sorted(_IMAGE_EXTS))}): {dst}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return [(src, dst)]


def main(argv: Sequence[str] | None = None) -> int:
    global _QUIET_NATIVE_LOGS
    args = _parse_args(argv)
    prog = "postprocess"

    def fail(msg: str) -> int:
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2

    if args.upscale <= 0:
        return fail(f"--upscale must be positive, got {args.upscale:g}")
    if not 0.0 <= args.fidelity <= 1.0:
        return fail(f"--fidelity must be in [0, 1], got {args.fidelity:g}")
    if args.restore != "none" and not args.weights:
        return fail(f"--restore {args.restore} needs --weights RESTORER.pth (or --restore none)")
    if not Path(args.input).exists():
        return fail(f"input not found: {args.input}")
    try:
        device = _resolve_device(args.device)
        upscaler = load_upscaler(args.sr_weights, device=device) if args.sr_weights else None
        restorer = None
        if args.restore != "none":
            restorer = load_face_restorer(args.weights, device=device)
            want = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN"}[args.restore]
            if _arch_id(restorer) != want:
                return fail(f"{args.weights}: spandrel detected {_arch_id(restorer)}, but --restore {args.restore} expects {want}")
        jobs = _plan(Path(args.input), args.output)
    except (_UsageError, ValueError, OSError) as exc:
        return fail(_one_line(exc))
    if not jobs:
        print(f"{prog}: no images ({', '.join(sorted(_IMAGE_EXTS))}) in {args.input}", file=sys.stderr)
        return 1

    from tqdm import tqdm

    _QUIET_NATIVE_LOGS = True
    written = failed = faces = no_face = 0
    bar = tqdm(jobs, unit="img", desc=prog, disable=len(jobs) < 2, file=sys.stderr)
    for src, dst in bar:
        try:
            image = _read_image(src)
            out, notes = postprocess(image, upscaler=upscaler, restorer=restorer, upscale=args.upscale, fidelity=args.fidelity, tile=args.tile)
            _write_image(out, dst)
        except Exception as exc:  # one line per bad file, then carry on
            failed += 1
            tqdm.write(f"{src.name}: error: {_one_line(exc)}", file=sys.stderr)
            continue
        written += 1
        for note in notes:
            if note.startswith("no face"):
                no_face += 1
                tqdm.write(f"{src.name}: {note}", file=sys.stderr)
            elif note.startswith("restored "):
                faces += int(note.split()[1])
    bar.close()
    summary = f"{prog}: {written} written, {failed} failed"
    if restorer is not None:
        summary += f", {faces} face{'s' if faces != 1 else ''} restored, {no_face} without a face"
    print(f"{summary} -> {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
