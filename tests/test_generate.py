"""generate.py / library.generation.pipeline on the tiny model, with trained files made without the trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.config import load_config
from library.generation.pipeline import GenerationError, generate, load_model, parse_infotext

ROOT = Path(__file__).resolve().parent.parent
SOURCE, REFERENCE = "mcv1", "mcv2"
RUN = "tinyrun"


def _make_trained_files(model_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """What training writes to output.dir: <name>.safetensors (kohya LoRA) and <token>.safetensors."""
    from library.export.kohya import build_metadata, lora_state_dict, save_embedding, save_lora
    from library.training.lora import add_text_encoder_lora, add_unet_lora
    from library.models.loading import load_stable_diffusion

    parts = load_stable_diffusion(str(model_dir))
    add_unet_lora(parts.unet, rank=4, alpha=4.0, preset="cross_attn")
    add_text_encoder_lora(parts.text_encoder, rank=4, alpha=4.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (parts.unet, parts.text_encoder):
            for name, p in model.named_parameters():
                if "lora_B" in name.split("."):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    state = lora_state_dict(parts.unet, parts.text_encoder, dtype=torch.float16)
    tokens = {"source": SOURCE, "reference": REFERENCE}
    meta = build_metadata(
        output_name=RUN, rank=4, alpha=4.0, unet_targets_preset="cross_attn", train_text_encoder=True,
        tokens=tokens, base_model_name=model_dir.name, base_model_hash=None, training={"seed": 0},
        state_dict=state,
    )
    out.mkdir(parents=True, exist_ok=True)
    save_lora(out / f"{RUN}.safetensors", state, meta)
    dim = parts.text_encoder.config.hidden_size  # 32 for the tiny model
    vectors = {SOURCE: torch.randn(1, dim, generator=gen), REFERENCE: torch.randn(2, dim, generator=gen)}
    for word, vec in vectors.items():
        save_embedding(out / f"{word}.safetensors", word, vec.to(torch.float16))
    return {w: v.to(torch.float16).float() for w, v in vectors.items()}


def _write_config(path: Path, model_dir: Path, out: Path, data: Path) -> Path:
    path.write_text(
        f"""
[model]
pretrained = "{model_dir.as_posix()}"

[data]
source_dir = "{data.as_posix()}"
reference_dir = "{data.as_posix()}"
resolution = 64

[tokens]
source = "{SOURCE}"
reference = "{REFERENCE}"

[output]
dir = "{out.as_posix()}"
name = "{RUN}"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    folder, _single = tiny_model
    base = tmp_path_factory.mktemp("gen")
    out = base / "out"
    vectors = _make_trained_files(folder, out)
    (base / "data").mkdir()
    config = _write_config(base / "run.toml", folder, out, base / "data")
    cfg = load_config(config, check_paths=True)
    return cfg, config, vectors


@pytest.fixture(scope="module")
def model(run):
    """The pipeline with the default scales, loaded once for the tests that do not change them."""
    return load_model(run[0], device="cpu")


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


FAST = dict(steps=2, width=64, height=64, progress=False, device="cpu")


def test_files_and_parameters(run, model, tmp_path):
    cfg, _, _ = run
    paths = generate(cfg, n=3, seed=123, out_dir=tmp_path, model=model, **FAST)
    assert [p.name for p in paths] == ["00000-123.png", "00001-124.png", "00002-125.png"]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["00000-123.png", "00001-124.png", "00002-125.png", "grid-00000.png"]
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    seeds = []
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (64, 64)
            text = im.text["parameters"]
        info = parse_infotext(text)
        assert info["Prompt"].startswith(f"a photo of a {SOURCE} person in the style of {REFERENCE}")
        assert f"<lora:{RUN}:te=0.9:unet=0.6>" in info["Prompt"]
        assert info["Steps"] == "2" and info["Sampler"] == "Euler a" and info["CFG scale"] == "7"
        assert info["Size"] == "64x64" and info["Model"] == "tiny_sd"
        assert info["Lora hashes"].startswith(f"{RUN}: ") and len(info["Lora hashes"]) == len(RUN) + 2 + 12
        assert SOURCE in info["TI hashes"] and REFERENCE in info["TI hashes"]
        assert "Negative prompt" not in text
        seeds.append(int(info["Seed"]))
    assert seeds == [123, 124, 125]
    with Image.open(tmp_path / "grid-00000.png") as grid:
        assert grid.size == (128, 128)  # 2 x 2 cells for 3 images
    # a second run continues the numbering instead of overwriting
    more = generate(cfg, n=1, seed=7, negative="blurry, text", scheduler="ddim", out_dir=tmp_path, model=model, **FAST)
    assert [p.name for p in more] == ["00003-7.png"]
    with Image.open(more[0]) as im:
        info = parse_infotext(im.text["parameters"])
    assert info["Negative prompt"] == "blurry, text" and info["Sampler"] == "DDIM" and info["Seed"] == "7"


def test_same_seed_same_pixels_and_per_image_seeds(run, model, tmp_path):
    cfg, _, _ = run
    a = generate(cfg, n=2, seed=5, out_dir=tmp_path / "a", **FAST)  # loads its own model
    b = generate(cfg, n=1, seed=6, out_dir=tmp_path / "b", model=model, **FAST)  # image 1 of the first run, alone
    c = generate(cfg, n=1, seed=5, out_dir=tmp_path / "c", model=model, **FAST)
    assert np.array_equal(_pixels(a[1]), _pixels(b[0]))
    assert np.array_equal(_pixels(a[0]), _pixels(c[0]))
    assert not np.array_equal(_pixels(a[0]), _pixels(a[1]))


def test_lora_has_effect(run, tmp_path):
    cfg, _, _ = run
    images = {}
    for unet, te in ((0.0, 0.0), (0.6, 0.0), (0.0, 0.9)):
        (path,) = generate(cfg, n=1, seed=1, lora_scale=unet, te_scale=te, out_dir=tmp_path / f"{unet}-{te}", **FAST)
        images[unet, te] = _pixels(path)
    off = images[0.0, 0.0]
    assert np.abs(images[0.6, 0.0] - off).max() > 0  # UNet LoRA changes the picture
    assert np.abs(images[0.0, 0.9] - off).max() > 0  # text-encoder LoRA too


def test_embeddings_and_lora_loaded(run, model):
    cfg, _, vectors = run
    pipe = model.pipe
    table = pipe.text_encoder.get_input_embeddings().weight
    assert len(model.token_ids[SOURCE]) == 1 and len(model.token_ids[REFERENCE]) == 2
    for word, vec in vectors.items():
        assert torch.equal(table[model.token_ids[word]].float(), vec)
    # the prompt's token reaches the text encoder as the saved row (multi-vector words expanded)
    prompt = pipe.maybe_convert_prompt(f"a photo of a {SOURCE} person in the style of {REFERENCE}", pipe.tokenizer)
    ids = pipe.tokenizer(prompt).input_ids
    assert all(i in ids for i in model.token_ids[SOURCE] + model.token_ids[REFERENCE])
    with torch.no_grad():
        looked_up = pipe.text_encoder.get_input_embeddings()(torch.tensor([ids]))[0]
    pos = ids.index(model.token_ids[SOURCE][0])
    assert torch.equal(looked_up[pos], vectors[SOURCE][0])
    assert model.lora_modules > 0 and model.lora_name == RUN


def test_missing_lora_is_one_line_error(run, tmp_path):
    cfg, _, _ = run
    import copy

    other = copy.deepcopy(cfg)
    other.output.name = "never_trained"
    with pytest.raises(GenerationError) as err:
        generate(other, n=1, out_dir=tmp_path, **FAST)
    msg = str(err.value)
    assert "\n" not in msg and "never_trained.safetensors" in msg and "run training first" in msg
    other = copy.deepcopy(cfg)
    other.tokens.reference = "mcv9"
    with pytest.raises(GenerationError, match=r"mcv9\.safetensors"):
        generate(other, n=1, out_dir=tmp_path, **FAST)


def test_unknown_scheduler(run, tmp_path):
    cfg, _, _ = run
    with pytest.raises(GenerationError) as err:
        generate(cfg, n=1, scheduler="euler_x", out_dir=tmp_path, **FAST)
    assert "euler_a" in str(err.value) and "dpmpp_2m" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_missing_restorer_weights_fails_before_sampling(run, tmp_path):
    cfg, _, _ = run
    with pytest.raises(GenerationError, match="nothing.pth"):
        generate(cfg, n=1, restore="codeformer", restore_weights=tmp_path / "nothing.pth", out_dir=tmp_path / "o", **FAST)
    with pytest.raises(GenerationError, match="--restore-weights"):
        generate(cfg, n=1, restore="gfpgan", out_dir=tmp_path / "o", **FAST)
    assert not (tmp_path / "o").exists()


def test_upscale_lanczos(run, model, tmp_path):
    cfg, _, _ = run
    (path,) = generate(cfg, n=1, seed=3, upscale=2, restore="none", out_dir=tmp_path, model=model, **FAST)
    with Image.open(path) as im:
        assert im.size == (128, 128)
        info = parse_infotext(im.text["parameters"])
    assert info["Postprocess upscale by"] == "2" and info["Postprocess upscaler"] == "Lanczos"
    with Image.open(tmp_path / "raw" / path.name) as raw:
        assert raw.size == (64, 64)


def _compact_x2(path: Path) -> Path:
    """A Real-ESRGAN "realesr-general" layout x2 network with random weights (spandrel's Compact)."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)
    torch.save({"params": net.state_dict()}, path)
    return path


def test_upscale_with_sr_weights_and_wrong_restorer(run, model, tmp_path):
    cfg, _, _ = run
    sr = _compact_x2(tmp_path / "realesr-tiny-x2.pth")
    (path,) = generate(cfg, n=1, seed=3, sr_weights=sr, out_dir=tmp_path / "o", model=model, **FAST)  # x2 from the model
    with Image.open(path) as im:
        assert im.size == (128, 128)
        info = parse_infotext(im.text["parameters"])
    assert info["Postprocess upscaler"] == "realesr-tiny-x2" and info["Postprocess upscale by"] == "2"
    with pytest.raises(GenerationError) as err:  # an upscaler given as the face restorer: refused before sampling
        generate(cfg, n=1, restore="codeformer", restore_weights=sr, out_dir=tmp_path / "p", model=model, **FAST)
    assert "\n" not in str(err.value) and "face restoration" in str(err.value)
    assert not (tmp_path / "p").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli(run, tmp_path):
    _, config, _ = run
    out = tmp_path / "cli"
    res = _cli("--config", str(config), "--n", "2", "--seed", "42", "--steps", "2", "--device", "cpu",
               "--scheduler", "dpmpp_2m", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-42.png", "00001-43.png", "grid-00000.png"]
    with Image.open(out / "00000-42.png") as im:
        assert parse_infotext(im.text["parameters"])["Sampler"] == "DPM++ 2M"


def test_cli_missing_file(run, tmp_path):
    _, config, _ = run
    res = _cli("--config", str(config), "--n", "1", "output.name=missing_run", "--out", str(tmp_path / "x"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "missing_run.safetensors" in res.stderr and "run training first" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = _cli("--config", str(tmp_path / "nope.toml"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "nope.toml" in res.stderr
    res = _cli("--config", str(config), "--scheduler", "bogus")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "euler_a" in res.stderr
