"""dlib's face-recognition ResNet v1 in PyTorch, read from dlib's own file by our code.

The network is ``anet_type`` of dlib's ``examples/dnn_face_recognition_ex.cpp`` (the net that
``dlib_face_recognition_resnet_model_v1.dat`` holds, shipped in ``face_recognition_models``)::

    input_rgb_image_sized<150> -> con<32,7,7,2,2> affine relu max_pool<3,3,2,2>
    -> 3 x ares<32> -> ares_down<64>, 3 x ares<64> -> ares_down<128>, 2 x ares<128>
    -> ares_down<256>, 2 x ares<256> -> ares_down<256> -> avg_pool_everything -> fc_no_bias<128>

    ares<N>      = relu(x + affine(con3x3(relu(affine(con3x3(x))))))
    ares_down<N> = relu(avg_pool<2,2,2,2>(x) + the same block with a stride-2 first convolution)

dlib's semantics kept here (dlib/dnn/layers.h, dlib/dnn/input.h, dlib/dnn/cpu_dlib.cpp): a
convolution or pooling with stride 2 has no padding (con_ and pool defaults ``stride != 1 ? 0 : size/2``,
and the file says so for each layer); ``add_prev`` adds tensors of different shapes by zero-padding
the smaller one at its bottom/right and its last channels (``tt::add``), which is how 64 channels meet 32
and a 3x3 map meets a 4x4 one; ``affine`` is a per-channel ``gamma * x + beta`` (batch norm frozen);
the input layer takes RGB pixels in 0..255 and feeds ``(p - mean) / 256`` per channel. The output is
the raw 128-d descriptor, as ``compute_face_descriptor`` returns it (not normalised).

The file (dlib/serialize.h, dlib/dnn/core.h, dlib/dnn/tensor.h): integers are a control byte (low
nibble: byte count, 0x80: negative) and that many little-endian bytes; floats are such an int64
mantissa and int16 exponent (value = mantissa * 2**exponent); strings a length and bytes; bools the
characters '0'/'1'; tensors (version 2) four dimensions and then raw little-endian float32. Layers
are written from the input outwards, each followed by its ``add_layer`` bookkeeping; tags and skips
appear only as version numbers in the nested header. :func:`read_dlib_resnet` accepts exactly this
network: every name, size, stride and padding is checked against the definition above, every tensor's
size is checked against the bytes left before it is read, and a file that is anything else is refused
with one line (:class:`DlibModelError`). Nothing in the file is executed or unpickled.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.files.messages import UserError

__all__ = ["DLIB_CHIP_SIZE", "DLIB_RESNET_FILE", "DlibFaceResNet", "DlibModelError", "dlib_model_dir",
           "load_dlib_resnet", "read_dlib_resnet"]

DLIB_RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"

DLIB_CHIP_SIZE = 150
_MAX_TENSOR = 1 << 24  # floats in one tensor: the largest of this net has 590 k (256 x 256 x 3 x 3)
_MAX_STRING = 64

# (filters, first stride) of each residual block, input to output (dnn_face_recognition_ex.cpp's alevel4..alevel0)
_BLOCKS = ([(32, 1)] * 3 + [(64, 2)] + [(64, 1)] * 3 + [(128, 2)] + [(128, 1)] * 2
           + [(256, 2)] + [(256, 1)] * 2 + [(256, 2)])


def _layers() -> list[tuple]:
    """The layers of anet_type from the input out: (kind, *hyper-parameters)."""
    out: list[tuple] = [("con", 32, 7, 2, 0), ("affine",), ("relu",), ("max_pool", 3, 2, 0)]
    for n, stride in _BLOCKS:
        out += [("con", n, 3, stride, 0 if stride == 2 else 1), ("affine",), ("relu",), ("con", n, 3, 1, 1), ("affine",)]
        out += [("avg_pool", 2, 2, 0), ("add_prev",)] if stride == 2 else [("add_prev",)]
        out.append(("relu",))
    return out + [("avg_pool", 0, 1, 0), ("fc", 128)]


def _header() -> list[int]:
    """The nested add_layer (2), tag and skip (1) versions from the output in, as dlib writes them; the
    layer on the input writes 3."""
    versions: list[int] = [2, 2]  # fc_no_bias, avg_pool_everything
    for n, stride in reversed(_BLOCKS):
        if stride == 2:  # relu, add_prev2, avg_pool, skip1, tag2, affine, con, relu, affine, con, tag1
            versions += [2, 2, 2, 1, 1, 2, 2, 2, 2, 2, 1]
        else:  # relu, add_prev1, affine, con, relu, affine, con, tag1
            versions += [2, 2, 2, 2, 2, 2, 2, 1]
    return versions + [2, 2, 2, 3]  # max_pool, relu, affine, con (on the input)


class DlibModelError(UserError, ValueError):
    """The file is not dlib's face-recognition ResNet v1 (damaged, truncated or another network); one line."""


class _Reader:
    """dlib's serialisation primitives over the file's bytes (dlib/serialize.h); every read is bounds-checked."""

    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def fail(self, what: str) -> DlibModelError:
        return DlibModelError(f"{self.name}: not dlib's face-recognition ResNet v1 ({what} at byte {self.pos})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"file ends inside {what}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self, what: str, nbytes: int = 8) -> int:
        control = self.take(1, what)[0]
        size = control & 0x0F
        if control & 0x70 or not 1 <= size <= nbytes:
            raise self.fail(f"bad integer control byte {control:#04x} in {what}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if control & 0x80 else value

    def float(self, what: str) -> float:
        mantissa, exponent = self.int(what, 8), self.int(what, 2)
        if exponent >= 32000:  # float_details' is_inf / is_ninf / is_nan
            return (math.inf, -math.inf, math.nan)[min(exponent - 32000, 2)]
        if abs(exponent) > 1100:
            raise self.fail(f"float exponent {exponent} in {what}")
        return math.ldexp(mantissa, exponent)

    def string(self, what: str) -> str:
        n = self.int(what, 8)
        if not 0 <= n <= _MAX_STRING:
            raise self.fail(f"string of {n} bytes in {what}")
        try:
            return self.take(n, what).decode("ascii")
        except UnicodeDecodeError as cause:
            raise self.fail(f"non-text name in {what}") from cause

    def expect(self, name: str, what: str) -> None:
        got = self.string(what)
        if got != name:
            raise self.fail(f"{what}: '{got}' where '{name}' was expected")

    def bool(self, what: str) -> bool:
        c = self.take(1, what)
        if c not in (b"0", b"1"):
            raise self.fail(f"bad bool in {what}")
        return c == b"1"

    def dims(self, what: str) -> tuple[int, int, int, int]:
        d = tuple(self.int(what, 8) for _ in range(4))
        if any(v < 0 for v in d):
            raise self.fail(f"negative size {d} in {what}")
        return d  # type: ignore[return-value]

    def tensor(self, what: str) -> np.ndarray:
        version = self.int(what, 4)
        if version != 2:
            raise self.fail(f"tensor format {version} in {what} (this reader knows 2)")
        d = self.dims(what)
        count = d[0] * d[1] * d[2] * d[3]
        if count > _MAX_TENSOR or self.pos + 4 * count > len(self.data):  # checked before anything is allocated
            raise self.fail(f"tensor of {d} larger than the file or the net in {what}")
        values = np.frombuffer(self.take(4 * count, what), "<f4").astype(np.float32)
        return values.reshape(d)

    def alias(self, what: str) -> tuple[int, int, int, int]:
        if self.int(what, 4) != 1:
            raise self.fail(f"alias tensor format in {what}")
        return self.dims(what)


def _check(r: _Reader, got, want, what: str) -> None:
    if got != want:
        raise r.fail(f"{what} is {got}, this net has {want}")


def _layer(r: _Reader, spec: tuple, channels: int, i: int) -> tuple[dict, int]:
    """One layer's parameters from the file, checked against `spec`; (params, output channels)."""
    kind, what = spec[0], f"layer {i} ({spec[0]})"
    if kind == "con":
        _, n, k, stride, pad = spec
        r.expect("con_4", what)
        params = r.tensor(what).reshape(-1)
        got = (r.int(what), r.int(what), r.int(what), r.int(what), r.int(what), r.int(what), r.int(what))
        _check(r, got, (n, k, k, stride, stride, pad, pad), what, )
        wshape, bshape = r.alias(what), r.alias(what)
        _check(r, (wshape, bshape), ((n, channels, k, k), (1, n, 1, 1)), f"{what} shapes")
        _check(r, params.size, n * channels * k * k + n, f"{what} parameter count")
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float(what)
        w = params[: n * channels * k * k].reshape(n, channels, k, k)
        return {"weight": w, "bias": params[n * channels * k * k:]}, n
    if kind == "affine":
        r.expect("affine_", what)
        params = r.tensor(what).reshape(-1)
        gshape, bshape = r.alias(what), r.alias(what)
        _check(r, (gshape, bshape), ((1, channels, 1, 1),) * 2, f"{what} shapes")
        _check(r, r.int(what), 0, f"{what} mode (0: CONV_MODE, per channel)")
        _check(r, params.size, 2 * channels, f"{what} parameter count")
        return {"gamma": params[:channels], "beta": params[channels:]}, channels
    if kind == "relu":
        r.expect("relu_", what)
        return {}, channels
    if kind in ("max_pool", "avg_pool"):
        _, k, stride, pad = spec
        r.expect(f"{kind}_2", what)
        got = tuple(r.int(what) for _ in range(6))
        _check(r, got, (k, k, stride, stride, pad, pad), what)
        return {}, channels
    if kind == "add_prev":
        r.expect("add_prev_", what)
        return {}, channels
    if kind == "fc":
        r.expect("fc_2", what)
        n_out, n_in = r.int(what), r.int(what)
        _check(r, (n_out, n_in), (spec[1], channels), f"{what} outputs, inputs")
        params = r.tensor(what).reshape(-1)
        _check(r, r.alias(what), (n_in, n_out, 1, 1), f"{what} weight shape")
        _check(r, params.size, n_in * n_out, f"{what} parameter count")
        _check(r, r.alias(what), (0, 0, 0, 0), f"{what} bias shape")
        _check(r, r.int(what), 1, f"{what} bias mode (1: FC_NO_BIAS)")
        for _ in range(4):
            r.float(what)
        return {"weight": params.reshape(n_in, n_out)}, n_out
    raise AssertionError(kind)


def read_dlib_resnet(path: str | os.PathLike) -> dict:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat``: {"mean": [3] (R, G, B, pixel units),
    "layers": [(spec, params)] input to output, params numpy float32 arrays}.

    Raises FileNotFoundError for a missing file and DlibModelError (a ValueError, one line) for a file
    that is not exactly this network in dlib's format (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dlib's face-recognition model not found")
    size = path.stat().st_size
    if size > 64 << 20:  # the real file is 22.5 MB
        raise DlibModelError(f"{path}: not dlib's face-recognition ResNet v1 ({size} bytes, expected about 22 MB)")
    r = _Reader(path.read_bytes(), str(path))
    _check(r, r.int("loss layer version", 4), 1, "loss layer version")
    r.expect("loss_metric_2", "loss layer")
    r.float("loss margin"), r.float("loss distance threshold")
    header = _header()
    got = [r.int("layer header", 4) for _ in header]
    if got != header:
        raise r.fail("the nested layer header differs from dnn_face_recognition_ex.cpp's anet_type")
    r.expect("input_rgb_image_sized", "input layer")
    mean = [r.float("input mean") for _ in range(3)]
    _check(r, (r.int("input size"), r.int("input size")), (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE), "input size")
    layers, channels = [], 3
    specs = _layers()
    for i, spec in enumerate(specs):
        params, channels = _layer(r, spec, channels, i)
        for _ in range(3):  # add_layer's this_layer_setup_called, gradient_input_is_stale, ..._disabled
            r.bool(f"layer {i} state")
        for _ in range(3):  # x_grad, cached_output, params_grad (empty in a cleaned net)
            r.tensor(f"layer {i} state")
        if i == 0:
            _check(r, r.int("sample expansion factor"), 1, "sample expansion factor")
        layers.append((spec, params))
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} bytes after the last layer")
    if not all(math.isfinite(v) for v in mean) or not all(np.isfinite(a).all() for _, p in layers for a in p.values()):
        raise DlibModelError(f"{path}: dlib's face-recognition ResNet v1 holds non-finite weights")
    return {"mean": mean, "layers": layers}


def _add_prev(a: Tensor, b: Tensor) -> Tensor:
    """dlib's add_prev: shapes differing in channels or size are zero-padded to the larger at the end
    (cpu_dlib.cpp's ``add(dest, src1, src2)``), which is how ares_down meets its shortcut."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: Tensor) -> Tensor:
        if t.shape[1:] == (c, h, w):
            return t
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class DlibFaceResNet(nn.Module):
    """dlib's face-recognition ResNet v1: RGB chips [B, 3, 150, 150] in pixel units (0..255, float; values
    outside keep their gradient) -> raw descriptors [B, 128] (``compute_face_descriptor``'s, not normalised).

    Frozen: weights are buffers and ``train()`` keeps eval mode (there is no batch statistic anyway).
    Built from :func:`read_dlib_resnet`'s output; see the module docstring for the architecture.
    """

    def __init__(self, parsed: dict):
        super().__init__()
        self.register_buffer("mean", torch.tensor(parsed["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.specs = [spec for spec, _ in parsed["layers"]]
        for i, (_, params) in enumerate(parsed["layers"]):
            for key, value in params.items():
                self.register_buffer(f"l{i}_{key}", torch.from_numpy(np.ascontiguousarray(value)))
        self.eval()

    def train(self, mode: bool = True) -> "DlibFaceResNet":
        return super().train(False)

    def _p(self, i: int, key: str) -> Tensor:
        return getattr(self, f"l{i}_{key}")

    def _con(self, i: int, x: Tensor) -> Tensor:
        _, _, _, stride, pad = self.specs[i]
        return F.conv2d(x, self._p(i, "weight"), self._p(i, "bias"), stride=stride, padding=pad)

    def _affine(self, i: int, x: Tensor) -> Tensor:
        return x * self._p(i, "gamma").view(1, -1, 1, 1) + self._p(i, "beta").view(1, -1, 1, 1)

    def forward(self, chips: Tensor) -> Tensor:
        if chips.dim() != 4 or chips.shape[1:] != (3, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE):
            raise ValueError(f"dlib ResNet: chips [B, 3, 150, 150] expected, got {tuple(chips.shape)}")
        x = (chips.float() - self.mean) / 256.0  # input_rgb_image: (p - avg) / 256 per channel (dlib/dnn/input.h)
        x = F.max_pool2d(F.relu(self._affine(1, self._con(0, x))), 3, 2)
        i = 4
        for _, stride in _BLOCKS:  # layers i..: con affine relu con affine [avg_pool] add_prev relu
            y = self._affine(i + 4, self._con(i + 3, F.relu(self._affine(i + 1, self._con(i, x)))))
            shortcut = F.avg_pool2d(x, 2, 2) if stride == 2 else x
            x = F.relu(_add_prev(y, shortcut))
            i += 8 if stride == 2 else 7
        return x.mean(dim=(2, 3)) @ self._p(i + 1, "weight")  # avg_pool_everything, fc_no_bias


def load_dlib_resnet(path: str | os.PathLike = "", device: torch.device | str = "cpu") -> DlibFaceResNet:
    """:func:`read_dlib_resnet` of `path` (default: face_recognition_models' file) as a
    :class:`DlibFaceResNet` on `device`. FileNotFoundError / DlibModelError, one line each."""
    return DlibFaceResNet(read_dlib_resnet(path or dlib_model_dir() / DLIB_RESNET_FILE)).to(device)


def dlib_model_dir() -> Path:
    """The folder of face_recognition_models' model files (found without importing the package: its
    __init__ imports pkg_resources, which current setuptools no longer has). FileNotFoundError (one line)
    when the package is not installed."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face_recognition_models is not installed ; pip install face_recognition_models==0.3.0 "
                                "(dlib's face-recognition weights), or give an ArcFace file")
    return Path(list(spec.submodule_search_locations)[0]) / "models"
