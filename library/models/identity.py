"""Frozen ArcFace networks and differentiable ArcFace face alignment (docs/method.md, eq. 7).

Channel order and range: every network returned here takes **RGB** images in **[-1, 1]**, [B, 3, 112, 112]
(the VAE's output range). That is what arcface_torch's ``.pth`` backbones were trained on
((x / 255 - 0.5) / 0.5 of RGB) and what insightface feeds its ONNX packs (``ArcFaceONNX`` swaps BGR to
RGB and normalises with mean 127.5, std 127.5). Old mxnet-converted packs that carry the
normalisation inside the graph (Sub and Mul among the first nodes, the same test insightface uses) take
[0, 255] RGB; the wrapper converts for them.

Alignment reproduces insightface's ``face_align.norm_crop`` (a similarity transform from 5 landmarks
to ``ARCFACE_TEMPLATE_112``, then ``cv2.warpAffine``) with ``F.affine_grid`` + ``F.grid_sample``, so
gradients reach the image.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.files.messages import one_line
from library.files.weights import load_pickled_weights
from library.models.dlib_resnet import DlibFaceResNet, load_dlib_resnet
from library.models.iresnet import IBasicBlock, IResNet

__all__ = ["ARCFACE_TEMPLATE_112", "ArcFace", "DLIB_5_TEMPLATE", "DlibEncoder", "IdentityEncoder", "align_faces",
           "dlib_chip_transform", "dlib_chips", "dlib_parts_from_arcface", "estimate_similarity", "load_identity_encoder",
           "iresnet_config", "load_arcface"]

ARCFACE_TEMPLATE_112 = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=torch.float32)


class ArcFace(nn.Module):
    """A frozen embedding network: RGB [B, 3, 112, 112] in [-1, 1] -> [B, 512] (not normalised).

    ``scale``/``offset`` map [-1, 1] to the network's own input range. The module stays in eval mode
    (``train()`` is a no-op) so that a trainer calling ``.train()`` on its parent cannot switch its
    BatchNorm layers to batch statistics.
    """

    def __init__(self, net: nn.Module, scale: float = 1.0, offset: float = 0.0, source: str = ""):
        super().__init__()
        self.net = net
        self.scale = float(scale)
        self.offset = float(offset)
        self.source = source
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "ArcFace":
        return super().train(False)

    def _dtype(self) -> torch.dtype:
        for t in self.net.parameters():
            return t.dtype
        for t in self.net.buffers():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self._dtype())
        if self.scale != 1.0 or self.offset != 0.0:
            x = x * self.scale + self.offset
        return self.net(x).float()


# ----------------------------------------------------------------------------------------------- loaders
def _state_dict_from_file(path: Path) -> dict[str, Tensor]:
    sd = load_pickled_weights(path)  # WeightsFileError (a ValueError, one line) for a refused or broken file
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected an arcface_torch iresnet state_dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def iresnet_config(sd: dict[str, Tensor]) -> dict:
    """IResNet constructor arguments of a state_dict: blocks per layer (r18/34/50/100/200 or any other
    count), width (channels of conv1) and embedding size. KeyError when the keys are not an iresnet's."""
    layers = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
        if not idx:
            raise KeyError(f"no layer{i} blocks")
        layers.append(max(idx) + 1)
    width = int(sd["conv1.weight"].shape[0])
    if sd["fc.weight"].shape[1] != width * 8 * IResNet.fc_scale:
        raise KeyError("fc.weight does not take a 7x7 map (input other than 112x112)")
    return {"layers": layers, "width": width, "num_features": int(sd["fc.weight"].shape[0])}


def _iresnet_from_state_dict(sd: dict[str, Tensor], path: Path) -> IResNet:
    try:
        net = IResNet(IBasicBlock, **iresnet_config(sd))
        net.load_state_dict(sd, strict=True)
    except (KeyError, RuntimeError, IndexError) as e:
        raise ValueError(f"{path}: not an arcface_torch iresnet state_dict ({one_line(e, 200, first_line=True)})") from e
    return net.eval()


def _onnx_input_normalisation(model) -> tuple[float, float]:
    """(scale, offset) from [-1, 1] to the pack's input range, decided as insightface's ArcFaceONNX does."""
    names = [n.name for n in model.graph.node[:8]]
    find_sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    find_mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    if find_sub and find_mul:  # mxnet-converted pack: normalisation inside the graph, input RGB [0, 255]
        return 127.5, 127.5
    return 1.0, 0.0


def _load_onnx(path: Path) -> ArcFace:
    import numpy as np
    import onnx
    import onnx2torch
    import onnxruntime as ort

    try:
        model = onnx.load(str(path))
        scale, offset = _onnx_input_normalisation(model)
        inp = model.graph.input[0]
        dims = inp.type.tensor_type.shape.dim
        batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else 2
        hw = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 112 for d in dims[2:4]] or [112, 112]
        net = onnx2torch.convert(model).eval()
        net.requires_grad_(False)
    except Exception as e:  # noqa: BLE001 - conversion failures come in every type
        raise ValueError(f"{path}: ONNX model could not be converted to torch ({type(e).__name__}: "
                         f"{one_line(e, 200, first_line=True)})") from e
    # Check the conversion against onnxruntime on a fixed input before trusting it.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, *hw, generator=g) * 2 - 1
    x_net = x * scale + offset
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {sess.get_inputs()[0].name: x_net.numpy().astype(np.float32)})[0]
        with torch.no_grad():
            out = net(x_net)
        if isinstance(out, (tuple, list)):
            raise ValueError("several outputs")
        out = out.float().numpy()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: converted ONNX model could not be checked against onnxruntime "
                         f"({type(e).__name__}: {one_line(e, 200, first_line=True)})") from e
    diff = float(np.abs(out - ref).max()) if out.shape == ref.shape else float("inf")
    tol = 1e-3 * max(1.0, float(np.abs(ref).max()))
    if not diff <= tol:
        raise ValueError(f"{path}: ONNX->torch conversion differs from onnxruntime (max abs diff {diff:.3g} > {tol:.3g})")
    return ArcFace(net, scale=scale, offset=offset, source=str(path))


def load_arcface(path: str | os.PathLike, device: torch.device | str = "cpu") -> ArcFace:
    """Load a frozen ArcFace network from an insightface pack's ``.onnx`` or an arcface_torch ``.pth``.

    Returns an :class:`ArcFace` (eval, no parameter gradients) taking RGB [B, 3, 112, 112] in [-1, 1]
    and returning [B, 512] embeddings (not normalised). Gradients flow to the input.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ArcFace weights not found: {path}")
    ext = path.suffix.lower()
    if ext == ".onnx":
        model = _load_onnx(path)
    elif ext in (".pth", ".pt"):
        net = _iresnet_from_state_dict(_state_dict_from_file(path), path)
        model = ArcFace(net, source=str(path))
    else:
        raise ValueError(f"{path}: unsupported ArcFace file type {ext or '(none)'!r}; expected .onnx, .pth or .pt")
    return model.to(device)


# -------------------------------------------------------------------------------------------- alignment
def estimate_similarity(src: Tensor, dst: Tensor) -> Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src -> dst,
    as float32; see :func:`_similarity64`."""
    return _similarity64(src, dst).to(torch.float32)


def _similarity64(src: Tensor, dst: Tensor) -> Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src -> dst.

    src [B, N, 2] (or [N, 2]), dst [N, 2] (or [B, N, 2]) -> [B, 2, 3] float64, row-major affine
    ``[[a, -b, tx], [b, a, ty]]``. This is Umeyama's estimate (what skimage's ``SimilarityTransform``
    and insightface's ``estimate_norm`` compute) in its 2-D closed form: with points as complex numbers
    z (src) and w (dst), centred, ``a + ib = sum(conj(z) w) / sum(|z|^2)``. Computed in float64.
    """
    src = src.to(torch.float64)
    dst = dst.to(device=src.device, dtype=torch.float64)
    if src.dim() == 2:
        src = src.unsqueeze(0)
    if dst.dim() == 2:
        dst = dst.unsqueeze(0)
    batch = max(src.shape[0], dst.shape[0])
    src, dst = src.expand(batch, -1, -1), dst.expand(batch, -1, -1)
    mu_s, mu_d = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    var = (s ** 2).sum(dim=(1, 2)).clamp_min(1e-12)
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(dim=1) / var
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(dim=1) / var
    rs = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], dim=1)  # [B, 2, 2]
    t = mu_d.squeeze(1) - (rs @ mu_s.squeeze(1).unsqueeze(-1)).squeeze(-1)
    return torch.cat([rs, t.unsqueeze(-1)], dim=-1)


def align_faces(images: Tensor, landmarks: Tensor, size: int = 112) -> Tensor:
    """Differentiable ``norm_crop``: [B, 3, H, W] + landmarks [B, 5, 2] (pixel x, y) -> [B, 3, size, size].

    Landmarks are in the pixel coordinates of ``images`` (pixel centres at integers, as in OpenCV), in
    insightface order (image-left eye, image-right eye, nose, mouth left, mouth right). Bilinear sampling
    with zero padding, like ``cv2.warpAffine(img, M, (size, size), borderValue=0)``. Sampled and returned
    in float32 (float64 for float64 images), whatever the images' dtype; gradients reach ``images``.
    """
    if images.dim() != 4 or landmarks.shape[-2:] != (5, 2) or landmarks.shape[0] != images.shape[0]:
        raise ValueError(f"align_faces: images [B,C,H,W] and landmarks [B,5,2] expected, got "
                         f"{tuple(images.shape)} and {tuple(landmarks.shape)}")
    dev = images.device
    m = _similarity64(landmarks.detach().to(dev), ARCFACE_TEMPLATE_112.to(dev) * (size / 112.0))
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=dev).expand(m.shape[0], 1, 3)
    return warp_affine(images, torch.linalg.inv(torch.cat([m, bottom], dim=1))[:, :2], size)


def warp_affine(images: Tensor, chip_to_image: Tensor, size: int) -> Tensor:
    """[B, C, H, W] -> [B, C, size, size]: output pixel (x, y) takes the bilinear sample of ``images`` at
    ``chip_to_image`` [B, 2, 3] @ (x, y, 1) (pixel centres at integers, OpenCV's and dlib's convention),
    zero outside. Sampled in float32 (float64 for float64 images); gradients reach ``images``."""
    B, C, H, W = images.shape
    dev = images.device
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=dev).expand(B, 1, 3)
    m_inv = torch.cat([chip_to_image.to(device=dev, dtype=torch.float64), bottom], dim=1)

    # grid_sample (align_corners=False): normalised n = (2 p + 1) / W - 1 for pixel-centre coordinate p.
    def to_norm(w: int, h: int) -> Tensor:
        return torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]],
                            dtype=torch.float64, device=dev)
    from_norm_out = torch.linalg.inv(to_norm(size, size))
    theta = (to_norm(W, H) @ m_inv @ from_norm_out)[:, :2, :]
    # float32 at least: a half-precision grid is off by ~0.25 px on a 512 px image
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    grid = F.affine_grid(theta.to(dtype), [B, C, size, size], align_corners=False)
    return F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# dlib's 5-point chip template (dlib/image_transforms/interpolation.h, get_face_chip_details): where the
# shape_predictor_5 parts (image-right eye outer and inner corner, image-left eye outer and inner corner,
# base of the nose) sit in an unpadded chip, in chip-side units
DLIB_5_TEMPLATE = torch.tensor([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387908],
                                [0.1205750620789, 0.2137274526813], [0.3340850613712, 0.2290642403242],
                                [0.4901123135679, 0.6277975316475]], dtype=torch.float64)
DLIB_PADDING = 0.25  # compute_face_descriptor's chip padding (dlib/tools/python/src/face_recognition.cpp)


def dlib_chip_transform(parts: Tensor, size: int = 150, padding: float = DLIB_PADDING) -> Tensor:
    """dlib's chip geometry: parts [B, 5, 2] (dlib's 5-point order, image pixels) -> [B, 2, 3] float64,
    chip pixel (x, y, 1) -> image pixel.

    As dlib does it (interpolation.h: get_face_chip_details, chip_details' constructor, extract_image_chips):
    the least-squares similarity from the padded template ``(padding + t) / (1 + 2 padding) * size`` to the
    parts gives an angle, a scale s and the image point c of chip point (size/2, size/2); the chip's
    rectangle is centred on c with side ``size * s - 1`` (centered_drect), and chip pixels 0 and size-1 map
    to its two edges, so one chip pixel is ``(size * s - 1) / (size - 1)`` image pixels."""
    if parts.dim() != 3 or parts.shape[-2:] != (5, 2):
        raise ValueError(f"dlib chip: parts [B, 5, 2] expected, got {tuple(parts.shape)}")
    parts = parts.detach().to(torch.float64)
    template = (padding + DLIB_5_TEMPLATE.to(parts.device)) / (1 + 2 * padding) * size
    m = _similarity64(template, parts)
    rs = m[:, :, :2]
    scale = rs[:, :, 0].norm(dim=-1)  # [B]
    half = torch.full((2, 1), size / 2, dtype=torch.float64, device=parts.device)
    centre = (rs @ half).squeeze(-1) + m[:, :, 2]
    a = rs * (((size * scale - 1) / (size - 1)) / scale)[:, None, None]
    origin = centre - (a @ (half - 0.5)).squeeze(-1)
    return torch.cat([a, origin.unsqueeze(-1)], dim=-1)


def dlib_chips(images: Tensor, parts: Tensor, size: int = 150, padding: float = DLIB_PADDING) -> Tensor:
    """Differentiable ``dlib.get_face_chip``: images [B, C, H, W] + dlib parts [B, 5, 2] -> [B, C, size, size]
    (bilinear; dlib truncates its uint8 chip, so it reads up to one grey level under this one). Gradients
    reach ``images``, not ``parts``."""
    m = dlib_chip_transform(parts, size, padding)
    # dlib samples a face more than twice the chip's size from its image pyramid (pyramid_down<2>), one
    # level per halving: the same number of 2x2 box halvings here, so bilinear sampling does not alias
    levels = torch.log2(m[:, :, 0].norm(dim=-1).clamp_min(1.0)).floor().long().tolist()
    out = [None] * len(levels)
    for n in sorted(set(levels)):
        idx = [i for i, v in enumerate(levels) if v == n]
        k = 2 ** n
        mk = m[idx].clone()
        mk[:, :, :2] /= k
        mk[:, :, 2] = (mk[:, :, 2] - (k - 1) / 2) / k  # pooled pixel j is centred on image pixel k j + (k - 1) / 2
        src = images[idx]
        if k > 1:
            src = F.avg_pool2d(src.float() if src.dtype != torch.float64 else src, k, k, ceil_mode=True)
        for i, chip in zip(idx, warp_affine(src, mk, size)):
            out[i] = chip
    return torch.stack(out)


class IdentityEncoder(nn.Module):
    """Frozen ArcFace + alignment: forward(images in [-1, 1] RGB [B, 3, H, W], landmarks [B, 5, 2]) -> [B, 512].

    ``arcface`` is a module from :func:`load_arcface` (or any RGB [-1, 1] 112x112 -> embedding network).
    The image is not clamped: values a VAE decodes slightly outside [-1, 1] keep their gradient.
    """

    def __init__(self, arcface: nn.Module, size: int = 112):
        super().__init__()
        self.arcface = arcface
        self.size = size
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "IdentityEncoder":
        return cls(load_arcface(path, device))

    def train(self, mode: bool = True) -> "IdentityEncoder":
        return super().train(False)

    def align(self, images: Tensor, landmarks: Tensor) -> Tensor:
        return align_faces(images, landmarks, self.size)

    def forward(self, images: Tensor, landmarks: Tensor) -> Tensor:
        return self.arcface(self.align(images, landmarks))


# dlib's 5 parts in ArcFace's 112 px frame (the frame ARCFACE_TEMPLATE_112's points define): the mean over 13
# faces (the astronaut, insightface's t1.jpg, both mirrored) of dlib's shape_predictor_5 parts, each face
# moved into the frame by the similarity that fits its face-mesh ArcFace landmarks
# (library.faces.detect_face_landmarks, what dataset_tools.prepare stores) to the template. Eye centres are
# not eye corners, and the nose tip is not the base of the nose: the parts are estimated, not matched.
DLIB_PARTS_IN_ARCFACE_112 = torch.tensor([[78.437, 52.401], [65.628, 52.86], [31.984, 52.613], [45.226, 52.858],
                                          [56.382, 80.948]], dtype=torch.float64)


def dlib_parts_from_arcface(landmarks: Tensor) -> Tensor:
    """ArcFace-order landmarks [B, 5, 2] (image pixels) -> estimated dlib 5-point parts [B, 5, 2] float64:
    :data:`DLIB_PARTS_IN_ARCFACE_112` moved by the similarity from ARCFACE_TEMPLATE_112 to the landmarks."""
    m = _similarity64(ARCFACE_TEMPLATE_112.to(landmarks.device), landmarks.detach())
    return DLIB_PARTS_IN_ARCFACE_112.to(landmarks.device) @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]


class DlibEncoder(nn.Module):
    """dlib's ResNet v1 as an identity encoder: forward(images RGB [B, 3, H, W] in [-1, 1], ArcFace-order
    landmarks [B, 5, 2] pixels) -> raw descriptors [B, 128] (compute_face_descriptor's scale, not normalised).

    The chip is dlib's (:func:`dlib_chips`, 150 px, padding 0.25) at parts estimated from the landmarks
    (:func:`dlib_parts_from_arcface`); :meth:`from_parts` takes dlib's own parts. Gradients reach the
    images; the image is not clamped, so values a VAE decodes slightly outside [-1, 1] keep theirs."""

    def __init__(self, net: DlibFaceResNet):
        super().__init__()
        self.net = net
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "DlibEncoder":
        return super().train(False)

    def from_parts(self, images: Tensor, parts: Tensor) -> Tensor:
        """Descriptors [B, 128] of the faces at dlib's own 5 parts [B, 5, 2] (image pixels)."""
        return self.net(dlib_chips((images.float() + 1.0) * 127.5, parts))

    def forward(self, images: Tensor, landmarks: Tensor) -> Tensor:
        return self.from_parts(images, dlib_parts_from_arcface(landmarks))


_DLIB_ENCODERS: dict[str, DlibFaceResNet] = {}  # one parse per process and device: the file is 22 MB


def load_identity_encoder(arcface_weights: str | os.PathLike = "", device: torch.device | str = "cpu") -> nn.Module:
    """The identity encoder of eq. 7 and of every score: ArcFace from `arcface_weights` (:meth:`IdentityEncoder.from_file`)
    when given, else dlib's ResNet v1 from face_recognition_models (:class:`DlibEncoder`). Both take
    (images [-1, 1] [B, 3, H, W], ArcFace-order landmarks [B, 5, 2]). FileNotFoundError or ValueError, one line."""
    if arcface_weights:
        return IdentityEncoder.from_file(arcface_weights, device)
    key = str(torch.device(device))
    if key not in _DLIB_ENCODERS:
        _DLIB_ENCODERS[key] = load_dlib_resnet("", device)
    return DlibEncoder(_DLIB_ENCODERS[key])
