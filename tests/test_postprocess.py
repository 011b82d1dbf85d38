"""library/postprocess/ on networks with random weights saved in each architecture's real key layout.

Real-ESRGAN files are basicsr state dicts under "params_ema" (RRDBNet: conv_first / body.N.rdbM.convK /
conv_body / conv_up1 / conv_up2 / conv_hr / conv_last; x2plus = the x4 network behind a pixel-unshuffle,
so conv_first takes 12 channels) or under "params" (SRVGGNetCompact: body.N); GFPGAN v1.3/1.4 and
CodeFormer are under "params_ema". GFPGAN has no size knobs in spandrel's loader, so it is full size
(86 M parameters, ~350 MB on disk, ~4 s per face on CPU); CodeFormer's transformer is shrunk (its VQGAN
is fixed: ~3-4 s per face). Each of them runs once in the suite.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from library import postprocess as pp
from library.faces import detect_face_landmarks
from library.postprocess import __main__ as postprocess_cli

ROOT = Path(__file__).resolve().parent.parent


def _real_esrgan_keys(state: dict) -> dict:
    """spandrel's old-arch RRDBNet keys (model.N...) -> basicsr RRDBNet keys (Real-ESRGAN files)."""
    fixed = {"model.0": "conv_first", "model.3": "conv_up1", "model.6": "conv_up2", "model.8": "conv_hr", "model.10": "conv_last"}
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key)
        if m:
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
            continue
        m = re.fullmatch(r"model\.1\.sub\.\d+\.(weight|bias)", key)
        if m:
            out[f"conv_body.{m[1]}"] = value
            continue
        layer, kind = key.rsplit(".", 1)
        out[f"{fixed[layer]}.{kind}"] = value
    return out


def _build(name: str):
    """The object torch.save writes for weight file `name` (random weights, real key layout)."""
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.GFPGAN import GFPGAN

    pp._install_extra_arches()
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    torch.manual_seed(sum(map(ord, name)))
    if name in ("esrgan_x4", "esrgan_x2plus"):
        # RealESRGAN_x4plus layout: RRDBNet x4, basicsr keys, {'params_ema': ...}; x2plus: the same x4
        # network behind a pixel-unshuffle 2 (conv_first takes 12 channels)
        x2 = name == "esrgan_x2plus"
        net = ESRGAN(in_nc=12 if x2 else 3, out_nc=3, num_filters=8, num_blocks=1, scale=4, shuffle_factor=2 if x2 else None)
        state = net.state_dict()
        last = f"model.{max(int(k.split('.')[1]) for k in state)}.bias"  # centre the output: no clamping
        state[last] = torch.full_like(state[last], 0.5)
        return {"params_ema": _real_esrgan_keys(state)}
    if name in ("compact_x4", "compact_x2", "compact_x2_parameters"):  # realesr-general layout, {'params': ...}
        net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4 if name == "compact_x4" else 2)
        if name == "compact_x2_parameters":
            # nn.Parameter objects, not tensors: spandrel's unpickler refuses them, torch's weights_only admits them
            return {"params": dict(net.named_parameters())}
        return {"params": net.state_dict()}
    if name == "codeformer":  # the released file's keys; smaller transformer and codebook
        return {"params_ema": CodeFormer(dim_embd=64, n_head=8, n_layers=1, codebook_size=64, latent_size=256).state_dict()}
    if name == "gfpgan":  # spandrel reads no sizes from GFPGAN files: full size
        net = GFPGAN(
            out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
            num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True,
        )
        return {"params_ema": net.state_dict()}
    if name == "random":
        return {"encoder.weight": torch.randn(4, 4), "head.bias": torch.zeros(4)}
    raise KeyError(name)


class _WeightFiles(dict):
    """Weight files written on first use (the GFPGAN one is ~350 MB), shared by the module."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def __missing__(self, name: str) -> Path:
        if name == "text":
            path = self.folder / "notes.pth"
            path.write_text("this is not a model\n")
        else:
            path = self.folder / f"{name}.pth"
            torch.save(_build(name), path)
        self[name] = path
        return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> _WeightFiles:
    return _WeightFiles(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def codeformer(weights):
    return pp.load_face_restorer(weights["codeformer"])


@pytest.fixture(scope="module")
def gfpgan(weights):
    return pp.load_face_restorer(weights["gfpgan"])


@pytest.fixture(scope="module")
def face256() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((256, 256), Image.LANCZOS)


@pytest.fixture(scope="module")
def landmarks256(face256) -> list[np.ndarray]:
    return detect_face_landmarks(np.asarray(face256))


# ----------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "name, arch, scale",
    [
        ("esrgan_x4", "ESRGAN", 4),
        ("esrgan_x2plus", "ESRGAN", 2),
        ("compact_x4", "Compact", 4),
        ("compact_x2", "Compact", 2),
        ("compact_x2_parameters", "Compact", 2),
    ],
)
def test_load_upscaler_detects_real_esrgan_layouts(weights, name, arch, scale):
    model = pp.load_upscaler(weights[name])
    assert model.architecture.id == arch
    assert model.purpose == "SR" and model.scale == scale
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    out = pp.upscale(Image.new("RGB", (13, 11), (90, 120, 200)), model)
    assert out.size == (13 * scale, 11 * scale) and out.mode == "RGB"


def test_load_face_restorers(codeformer, gfpgan):
    assert codeformer.architecture.id == "CodeFormer" and codeformer.purpose == "FaceSR"
    assert gfpgan.architecture.id == "GFPGAN" and gfpgan.purpose == "FaceSR"


def test_wrong_kind_and_bad_files_give_one_line_value_errors(weights):
    with pytest.raises(ValueError, match=r"esrgan_x4\.pth: spandrel detected ESRGAN.*SR, x4.*expected a face restoration"):
        pp.load_face_restorer(weights["esrgan_x4"])
    with pytest.raises(ValueError, match=r"codeformer\.pth: spandrel detected CodeFormer.*FaceSR.*expected a super-resolution"):
        pp.load_upscaler(weights["codeformer"])
    with pytest.raises(ValueError, match=r"random\.pth: spandrel does not recognise"):
        pp.load_upscaler(weights["random"])
    with pytest.raises(ValueError, match=r"random\.pth: spandrel does not recognise.*face restoration"):
        pp.load_face_restorer(weights["random"])
    with pytest.raises(ValueError, match=r"notes\.pth: cannot load as a model"):
        pp.load_upscaler(weights["text"])
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        pp.load_face_restorer(weights["text"].parent / "missing.pth")
    for call in (lambda: pp.load_face_restorer(weights["esrgan_x2plus"]), lambda: pp.load_upscaler(weights["text"])):
        with pytest.raises(ValueError) as info:
            call()
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- upscaling


@pytest.mark.parametrize(
    "name, scale, overlap",
    # 1 RRDB block: receptive field ~19 px, so 20 px of context per side reproduces the whole run;
    # x2plus runs it behind a pixel-unshuffle (half resolution): ~38 input px
    [("esrgan_x4", 4, 20), ("esrgan_x2plus", 2, 40)],
)
def test_tiled_upscale_matches_untiled(weights, name, scale, overlap):
    model = pp.load_upscaler(weights[name])
    img = Image.fromarray(data.astronaut()[160:207, 190:245])  # 55 x 47: 3 x 2 tiles, odd sizes
    whole = np.asarray(pp.upscale(img, model, tile=0)).astype(int)
    assert whole.shape == (47 * scale, 55 * scale, 3) and whole.std() > 1.0  # not a constant image
    tiled = np.asarray(pp.upscale(img, model, tile=19, overlap=overlap)).astype(int)
    assert np.abs(tiled - whole).max() <= 1
    seams = np.asarray(pp.upscale(img, model, tile=19, overlap=0)).astype(int)
    assert np.abs(seams - whole).max() > 1  # without context the tiles disagree at the borders


def test_upscale_keeps_alpha(weights):
    model = pp.load_upscaler(weights["compact_x2"])
    img = Image.new("RGBA", (10, 8), (10, 200, 30, 77))
    out = pp.upscale(img, model, tile=4, overlap=2)
    assert out.mode == "RGBA" and out.size == (20, 16)
    assert np.all(np.asarray(out)[..., 3] == 77)


# ---------------------------------------------------------------------------- faces and the chain


def test_detect_face_landmarks_on_astronaut(landmarks256):
    assert len(landmarks256) == 1
    eye_l, eye_r, nose, mouth_l, mouth_r = landmarks256[0]
    assert eye_l[0] < nose[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
    # the face is around (110, 60) in the 256 px astronaut
    assert 90 < nose[0] < 130 and 45 < nose[1] < 80


def test_restoration_only_chain_changes_face_and_keeps_background(face256, codeformer):
    out, notes = pp.postprocess(face256, restorer=codeformer, upscale=2, fidelity=0.5)
    assert out.size == (512, 512)
    plain = np.asarray(face256.resize((512, 512), Image.LANCZOS)).astype(int)
    got = np.asarray(out).astype(int)
    face = (slice(100, 150), slice(195, 250))  # around the nose, x2 coordinates
    assert np.abs(got[face] - plain[face]).mean() > 10  # random CodeFormer: clearly different
    assert np.array_equal(got[400:, 400:], plain[400:, 400:])  # far corner: only the resize
    assert np.array_equal(got[:40, :40], plain[:40, :40])
    assert any("background resized x2" in n for n in notes)
    assert any("restored 1 face with CodeFormer (fidelity 0.5)" in n for n in notes)


def test_sr_and_gfpgan_chain_x4(weights, gfpgan, face256, landmarks256):
    up = pp.load_upscaler(weights["compact_x4"])
    only_sr, notes_sr = pp.postprocess(face256, upscaler=up, upscale=4, tile=128)
    assert only_sr.size == (1024, 1024) and len(notes_sr) == 1
    out, notes = pp.postprocess(face256, upscaler=up, restorer=gfpgan, upscale=4, landmarks=landmarks256, tile=128)
    assert out.size == (1024, 1024)
    a, b = np.asarray(out).astype(int), np.asarray(only_sr).astype(int)
    assert np.abs(a[200:300, 390:500] - b[200:300, 390:500]).mean() > 10
    assert np.array_equal(a[800:, 800:], b[800:, 800:])
    assert any("restored 1 face with GFPGAN" in n for n in notes)


@pytest.mark.parametrize("zoom", [2.0, 1.0])  # face drawn at half size (area pre-shrink path) / full size
def test_paste_back_geometry(zoom):
    face = np.zeros((512, 512, 3), np.uint8)
    face[240:272, 240:272] = 255  # marker centred on crop pixel 255.5
    canvas = np.full((400, 400, 3), 7, np.uint8)
    affine = np.array([[zoom, 0.0, -100.0], [0.0, zoom, -60.0]])  # image -> crop
    pp._paste_face(canvas, face, affine)
    bright = canvas[..., 0].astype(float) - 7
    ys, xs = np.nonzero(bright > 0)
    weights = bright[ys, xs]
    cx, cy = (xs * weights).sum() / weights.sum(), (ys * weights).sum() / weights.sum()
    assert abs(cx - (255.5 + 100) / zoom) < 0.3 and abs(cy - (255.5 + 60) / zoom) < 0.3
    assert abs(weights.sum() / 248 - (32 / zoom) ** 2) < 0.05 * (32 / zoom) ** 2  # marker area kept
    # outside the pasted square nothing changes
    assert (canvas[:, : int(100 / zoom) - 1] == 7).all() and (canvas[: int(60 / zoom) - 1] == 7).all()


def test_no_face_passes_through(codeformer):
    coffee = Image.fromarray(data.coffee()).resize((150, 100), Image.LANCZOS)
    same, count = pp.restore_faces(coffee, codeformer)
    assert count == 0 and np.array_equal(np.asarray(same), np.asarray(coffee))
    flat = Image.new("RGB", (64, 48), (128, 128, 128))
    out, notes = pp.postprocess(flat, restorer=codeformer, upscale=2)
    assert out.size == (128, 96)
    assert np.array_equal(np.asarray(out), np.asarray(flat.resize((128, 96), Image.LANCZOS)))
    assert notes[-1] == "no face found: CodeFormer restoration skipped"


def test_restore_faces_rejects_an_upscaler(weights):
    with pytest.raises(ValueError, match="face restoration"):
        pp.restore_faces(Image.new("RGB", (8, 8)), pp.load_upscaler(weights["compact_x2"]), landmarks=[])


# ------------------------------------------------------------------------------------------- CLI


def test_cli_folder_with_a_bad_file(tmp_path, weights, capsys):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(data.coffee()).resize((60, 40)).save(src / "coffee.jpg")
    Image.new("RGB", (32, 24), (40, 90, 160)).save(src / "flat.png")
    (src / "broken.png").write_text("not an image")
    (src / "readme.txt").write_text("ignored")
    rc = postprocess_cli.main([str(src), str(dst), "--upscale", "2", "--restore", "codeformer", "--weights", str(weights["codeformer"]),
                  "--sr-weights", str(weights["esrgan_x2plus"]), "--tile", "16", "--device", "cpu"])
    captured = capsys.readouterr().err
    assert rc == 1
    error_lines = [line for line in captured.splitlines() if "error" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("broken.png: error:")
    assert "Traceback" not in captured
    assert sorted(p.name for p in dst.iterdir()) == ["coffee.jpg", "flat.png"]  # no temporaries left
    assert Image.open(dst / "coffee.jpg").size == (120, 80)
    assert Image.open(dst / "flat.png").size == (64, 48)
    assert "coffee.jpg: no face found: CodeFormer restoration skipped" in captured


def test_cli_summary_line(tmp_path, weights, capsys):
    src = tmp_path / "one.png"
    Image.new("RGB", (20, 10), (1, 2, 3)).save(src)
    rc = postprocess_cli.main([str(src), str(tmp_path / "big.png"), "--restore", "none", "--upscale", "3"])
    assert rc == 0
    assert capsys.readouterr().out.strip().startswith("postprocess: 1 written, 0 failed")
    assert Image.open(tmp_path / "big.png").size == (60, 30)


class _Names(dict):
    def __init__(self, weights, **fixed):
        super().__init__(fixed)
        self.weights = weights

    def __missing__(self, key):
        return str(self.weights[key])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "{missing}"], r"weights file not found: .*nothere\.pth"),
        (["--restore", "gfpgan", "--weights", "{codeformer}"], r"codeformer\.pth: spandrel detected CodeFormer, but --restore gfpgan"),
        (["--weights", "{esrgan_x4}"], r"esrgan_x4\.pth: spandrel detected ESRGAN"),
        (["--restore", "none", "--sr-weights", "{codeformer}"], r"expected a super-resolution model"),
        ([], r"--restore codeformer needs --weights"),
        (["--fidelity", "2"], r"--fidelity must be in \[0, 1\]"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, weights, capsys, extra, message):
    src = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(src)
    args = [e.format_map(_Names(weights, missing=str(tmp_path / "nothere.pth"))) for e in extra]
    rc = postprocess_cli.main([str(src), str(tmp_path / "b.png")] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "b.png").exists()


def test_cli_as_a_module_missing_weights(tmp_path):
    src = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(src)
    proc = subprocess.run(
        [sys.executable, "-m", "library.postprocess", str(src), str(tmp_path / "b.png"), "--weights", str(tmp_path / "cf.pth")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"postprocess: error: weights file not found: {tmp_path / 'cf.pth'}"]


def test_cli_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        postprocess_cli.main(["only-one-path"])
    assert info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
