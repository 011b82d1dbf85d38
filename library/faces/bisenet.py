"""BiSeNet face parsing (ResNet-18 context path), the 19-class CelebAMask-HQ model of
face-parsing.PyTorch that MagiCapture's released code uses for its face masks.

Written to the published architecture so that its checkpoint (e.g. ``79999_iter.pth``) loads with
``strict=True``: the module names below are the checkpoint's key names. No weights ship here; the user
passes the file (``--parser-weights``).

Classes: 0 background, 1 skin, 2 l_brow, 3 r_brow, 4 l_eye, 5 r_eye, 6 eye_g (glasses), 7 l_ear,
8 r_ear, 9 ear_r (earring), 10 nose, 11 mouth, 12 u_lip, 13 l_lip, 14 neck, 15 neck_l, 16 cloth,
17 hair, 18 hat. MagiCapture's face region is classes 1-13.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from library.files.weights import WeightsFileError, load_pickled_weights
from library.files.messages import UserError

N_CLASSES = 19
FACE_CLASSES = tuple(range(1, 14))
INPUT_SIZE = 512
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chan, out_chan, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chan),
            )

    def forward(self, x):
        residual = F.relu(self.bn1(self.conv1(x)))
        residual = self.bn2(self.conv2(residual))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _layer(in_chan: int, out_chan: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_chan, out_chan, stride)]
    layers += [BasicBlock(out_chan, out_chan, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Resnet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _layer(64, 64, 2, 1)
        self.layer2 = _layer(64, 128, 2, 2)
        self.layer3 = _layer(128, 256, 2, 2)
        self.layer4 = _layer(256, 512, 2, 2)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan, ks=3, stride=1, padding=1)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x):
        feat = self.conv(x)
        atten = F.adaptive_avg_pool2d(feat, 1)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(atten)))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_head16 = ConvBNReLU(128, 128, ks=3, stride=1, padding=1)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, stride=1, padding=0)

    def forward(self, x):
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))
        avg_up = F.interpolate(avg, feat32.shape[2:], mode="nearest")
        feat32_sum = self.arm32(feat32) + avg_up
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, stride=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = F.adaptive_avg_pool2d(feat, 1)
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(atten))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan, ks=3, stride=1, padding=1)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """forward(x) -> (logits, logits16, logits32), each [N, n_classes, H, W]; inference uses the first."""

    def __init__(self, n_classes: int = N_CLASSES):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x, aux: bool = True):
        h, w = x.shape[2:]
        feat_res8, feat_cp8, feat_cp16 = self.cp(x)
        out = F.interpolate(self.conv_out(self.ffm(feat_res8, feat_cp8)), (h, w), mode="bilinear", align_corners=True)
        if not aux:
            return out
        out16 = F.interpolate(self.conv_out16(feat_cp8), (h, w), mode="bilinear", align_corners=True)
        out32 = F.interpolate(self.conv_out32(feat_cp16), (h, w), mode="bilinear", align_corners=True)
        return out, out16, out32


class ParserLoadError(UserError):
    pass


def load_bisenet(path: str | os.PathLike, device: str = "cpu") -> BiSeNet:
    """Load a face-parsing.PyTorch BiSeNet checkpoint (a state_dict) with strict key matching."""
    try:
        state = load_pickled_weights(path)
    except (WeightsFileError, OSError) as exc:
        raise ParserLoadError(f"cannot read face-parsing weights: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ParserLoadError(f"face-parsing weights {path} hold no state_dict")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    n_classes = N_CLASSES
    w = state.get("conv_out.conv_out.weight")
    if isinstance(w, torch.Tensor) and w.ndim == 4:
        n_classes = int(w.shape[0])
    if n_classes < 14:
        raise ParserLoadError(f"face-parsing weights {path} have {n_classes} classes; need the 19-class CelebAMask-HQ model")
    net = BiSeNet(n_classes)
    # checkpoints from before PyTorch 0.4.1 carry no BatchNorm step counters; they are unused in eval
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:240]
        raise ParserLoadError(f"face-parsing weights {path} do not fit BiSeNet (ResNet-18): {first}") from exc
    return net.eval().to(device)


class FaceParser:
    """Runs BiSeNet on RGB crops and returns the face-region mask (classes 1-13)."""

    def __init__(self, weights: str | os.PathLike, device: str = "cpu"):
        self.device = device
        self.net = load_bisenet(weights, device)
        self._mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(_STD).view(1, 3, 1, 1)

    @torch.inference_mode()
    def labels(self, crop_rgb: np.ndarray) -> np.ndarray:
        """crop_rgb: [512, 512, 3] uint8 -> [512, 512] int64 class map."""
        x = torch.from_numpy(np.ascontiguousarray(crop_rgb)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        x = ((x - self._mean) / self._std).to(self.device)
        logits = self.net(x, aux=False)
        return logits[0].argmax(0).cpu().numpy()

    def face_mask(self, crop_rgb: np.ndarray) -> np.ndarray:
        """[512, 512] uint8, 255 where the class is one of FACE_CLASSES."""
        lab = self.labels(crop_rgb)
        return np.where((lab >= FACE_CLASSES[0]) & (lab <= FACE_CLASSES[-1]), 255, 0).astype(np.uint8)
