"""Super-resolution and face restoration through spandrel (docs/method.md, "Inference and post-processing").

The chain is: upscale the whole image (Real-ESRGAN from the user's .pth, or a LANCZOS resize), then
restore every face on the upscaled image (CodeFormer or GFPGAN from the user's .pth) and paste it back
with a soft mask. Released defaults: CodeFormer, fidelity 0.5, x2, Real-ESRGAN off.

Weights are only ever read through spandrel's loader (a restricted unpickler that admits tensors and
ordered dicts only, or safetensors). Nothing here downloads anything: faces are found by the project's
face finder (`library.faces.detect_face_landmarks`, mediapipe's bundled models) or given by the caller,
and the FFHQ alignment / paste-back that facexlib's FaceRestoreHelper does is reimplemented
(library.postprocess.face_restore) because its constructor always downloads a RetinaFace and a ParseNet
model.

    python -m library.postprocess IN OUT --upscale 2 --restore codeformer --weights codeformer.pth

Layout: this module loads weights and runs the chain; library.postprocess.face_restore aligns, restores and
pastes back faces (found by library.faces); library/postprocess/__main__.py is the command line (it
imports this module; nothing here imports it). The restoration names are re-exported here: import them from this module.
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from library.postprocess import face_restore as _face
from library.faces import detect_face_landmarks
from library.files.weights import WeightsFileError, load_pickled_weights
from library.files.messages import one_line
from library.postprocess.face_restore import (
    _FACE_EXPECTED,
    DEFAULT_FIDELITY,
    FFHQ_TEMPLATE_512,
    LandmarkDetector,
    _arch_id,
    _merge_alpha,
    _split_alpha,
    restore_faces,
)

__all__ = [
    "DEFAULT_FIDELITY",
    "DEFAULT_UPSCALE",
    "FFHQ_TEMPLATE_512",
    "load_face_restorer",
    "load_upscaler",
    "postprocess",
    "restore_faces",
    "upscale",
    "main",
]

DEFAULT_UPSCALE = 2

_SR_EXPECTED = "a super-resolution model (Real-ESRGAN RRDBNet x2/x4 or SRVGGNetCompact)"

# private, kept reachable as library.postprocess._paste_face: the paste-back geometry is tested through it
_paste_face = _face._paste_face


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
        importlib.import_module("spandrel")  # first import inside the filter: it warns too
        import spandrel_extra_arches

        spandrel_extra_arches.install(ignore_duplicates=True)
    _extra_arches_installed = True


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
            state = load_pickled_weights(path)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a state dict") from None
            state = spandrel.canonicalize_state_dict(state)
            state = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
            desc = loader.load_from_state_dict(state)
    except WeightsFileError as exc:
        if exc.refused:  # what the file would do is the whole story
            raise ValueError(str(exc)) from exc
        raise ValueError(f"{path}: cannot load as a model ({exc.reason}); expected {expected}") from exc
    except spandrel.UnsupportedModelError as err:
        raise ValueError(
            f"{path}: spandrel does not recognise the architecture in this file; expected {expected}"
        ) from err
    except Exception as exc:  # unpickling refused, not a torch file, wrong extension, shape mismatch
        raise ValueError(f"{path}: cannot load as a model ({one_line(exc, 200, first_line=True)}); expected {expected}") from exc
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


# --------------------------------------------------------------------------------------------------
# Super-resolution
# --------------------------------------------------------------------------------------------------


def _tile_edges(length: int, tile: int, align: int = 1) -> list[int]:
    """Split [0, length) into ceil(length / tile) near-equal parts (no thin last tile), inner edges on
    multiples of `align` (a pixel-unshuffle model, like Real-ESRGAN x2plus, must see the same 2x2 groups
    in every tile as in the whole image)."""
    n = max(1, math.ceil(length / tile))
    inner = {align * round(i * length / n / align) for i in range(1, n)}
    return [0] + sorted(e for e in inner if 0 < e < length) + [length]


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
