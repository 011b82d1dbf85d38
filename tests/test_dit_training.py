"""Z-Image and FLUX.2 Klein train end to end on their tiny models (testkit/tiny_zimage.py, tiny_klein.py).

Pinned against diffusers' own pipelines, not against our code: the family's prompt encoding, transformer
call and velocity sign reproduce ``ZImagePipeline`` / ``Flux2KleinPipeline`` denoising steps exactly (an
Euler step x + (sigma_next - sigma) v with our v gives the pipeline's latents); Klein's packed latents equal
``Flux2KleinPipeline._encode_vae_image``; a run of ``train_magicapture.py`` writes a LoRA whose every key
follows the rule written here (ComfyUI's ``diffusion_model.<native module>`` names, fused q/k/v) and
which the pipeline's own ``load_lora_weights`` loads, reproducing the trained transformer's output;
the embeddings hold the family's key and the trained rows. Meant to fail when the velocity's sign is
flipped, the timestep convention swapped, the hidden layer changed, the 2 x 2 patch order changed or a
LoRA module left out of the export.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import load_config
from library.models.dit_keys import FLUX2, ZIMAGE, native_module
from library.models.dit_model_family import DIT_MODEL_FAMILIES
from library.training.trainer import MagiCaptureTrainer
from testkit.tiny import write_prepared
from testkit.tiny_klein import build_klein_components, save_klein_model
from testkit.tiny_zimage import build_zimage_components, save_zimage_model

PROMPT = "a photo of a person in the style of a painting"


def _pipeline(family, components):
    import diffusers

    return getattr(diffusers, family.spec.pipeline_class)(**components)


def _our_euler(family, components, latents, sigmas, prompt):
    """The pipeline's Euler loop written with the family's calls: ids -> encode_prompt -> predict."""
    tokenizer, encoder = components["tokenizer"], components["text_encoder"]
    ids = family.prompt_ids(tokenizer, prompt)[None]
    cond = family.encode_prompt((encoder,), [ids], (tokenizer,))
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = family.predict(components["transformer"], latents, torch.full((1,), float(s) * 1000), cond)
        latents = latents + (s_next - s) * v
    return latents


@torch.no_grad()
def test_zimage_calls_reproduce_the_pipelines_denoising():
    family = DIT_MODEL_FAMILIES["zimage"]
    components = build_zimage_components(seed=3)
    pipe = _pipeline(family, components)
    start = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=0.0, latents=start.clone(),
               output_type="latent").images
    ours = _our_euler(family, components, start.clone(), pipe.scheduler.sigmas.tolist(), PROMPT)
    torch.testing.assert_close(ours, out.float(), rtol=1e-5, atol=1e-5)
    assert (ours - start).abs().max() > 1e-3  # the steps moved the latents: the comparison is not vacuous


@torch.no_grad()
def test_klein_calls_and_packed_latents_reproduce_the_pipelines_denoising():
    family = DIT_MODEL_FAMILIES["klein4b"]
    components = build_klein_components("4b", seed=3)
    pipe = _pipeline(family, components)
    packed = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))  # 4 latent channels x 2 x 2
    out = pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=1.0, latents=packed.clone(),
               output_type="latent").images  # unpacked, BatchNorm undone, unpatchified: the VAE's input
    ours = _our_euler(family, components, packed.clone(), pipe.scheduler.sigmas.tolist(), PROMPT)
    torch.testing.assert_close(family.latents_to_vae(components["vae"], ours), out.float(), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_klein_latents_are_the_pipelines_encoded_image():
    family = DIT_MODEL_FAMILIES["klein4b"]
    components = build_klein_components("4b", seed=4)
    pipe = _pipeline(family, components)
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected = pipe._encode_vae_image(image, generator=None)  # patchify, then the BatchNorm statistics
    vae = components["vae"]
    ours = family.latents_from_vae(vae, vae.encode(image).latent_dist.mean)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(family.latents_to_vae(vae, ours), vae.encode(image).latent_dist.mean, rtol=0, atol=1e-5)


def test_noise_levels_follow_each_pipelines_schedule():
    """Z-Image: the static shift 3, sigma = 3u / (1 + 2u); Klein: FLUX.2's empirical mu at (64 / 16)^2 = 16
    image tokens and 50 steps, sigma = e^mu / (e^mu + 1/u - 1); both at u = 0.5 worked by hand."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    from testkit.tiny_klein import SCHEDULER as KLEIN
    from testkit.tiny_zimage import SCHEDULER as ZIMAGE_SCHEDULER

    z = DIT_MODEL_FAMILIES["zimage"].make_objective(FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER), 64)
    assert float(z.levels_at(1, 500)[0]) == pytest.approx(1.5 / 2.0)
    k = DIT_MODEL_FAMILIES["klein4b"].make_objective(FlowMatchEulerDiscreteScheduler(**KLEIN), 64)
    m_10, m_200 = 8.73809524e-05 * 16 + 1.89833333, 0.00016927 * 16 + 0.45666666
    mu = m_200 + (m_200 - m_10) / 190.0 * (50 - 200)
    assert float(k.levels_at(1, 500)[0]) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1.0), rel=1e-5)


# ------------------------------------------------------------------ a run through train_magicapture.py

@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_sets")
    return write_prepared(root / "source", "source", "mcv1", seed=1), write_prepared(root / "reference", "reference", "mcv2", seed=2)


def _run(tmp_path: Path, model: str, sets, extra=()) -> Path:
    import train_magicapture

    out = tmp_path / "out"
    rc = train_magicapture.main(["--config", "configs/test_tiny.toml", f'model.pretrained="{model}"',
                                 f'data.source_dir="{sets[0]}"', f'data.reference_dir="{sets[1]}"', f'output.dir="{out}"',
                                 "phase1.steps=2", "phase2.steps=2", "lora.text_encoder=false", "output.save_precision=\"fp32\"",
                                 *extra])
    assert rc == 0
    return out


def _native_rule(family, model) -> set[str]:
    """The modules the exported file must name: each LoRA target's native module (library/models/dit_keys.py,
    read from ComfyUI's conversion tables), q/k/v of one projection fused into one name."""
    return {native_module(family.spec.arch, m)[0] for m in family.lora_target_modules(model, "cross_attn")}


@pytest.mark.parametrize("name", ["zimage", "klein4b"])
def test_a_cli_run_exports_files_that_follow_the_rules_and_load_in_diffusers(tmp_path, sets, name):
    family = DIT_MODEL_FAMILIES[name]
    folder, _ = (save_zimage_model(tmp_path / "model") if name == "zimage" else save_klein_model(tmp_path / "model"))
    # with the previews (the family's pipeline around the trained modules) and gradient checkpointing
    out = _run(tmp_path, str(folder), sets, ["sample.every=2", "train.gradient_checkpointing=true"])
    assert (out / "samples" / "p2-000002.png").is_file() and (out / "attention" / "p2-000002.png").is_file()
    lora = load_file(out / "magicapture.safetensors")
    pipe = _pipeline(family, build_zimage_components() if name == "zimage" else build_klein_components("4b"))
    modules = _native_rule(family, pipe.transformer)
    # Z-Image: 2 layers x (qkv, out); Klein: 5 double blocks x (img qkv, txt qkv, img proj, txt proj) + 20 x 2
    assert len(modules) == (4 if name == "zimage" else 5 * 4 + 20 * 2)
    ends = ((".lora.down.weight", ".lora.up.weight", ".alpha") if family.spec.arch == ZIMAGE
            else (".lora_A.weight", ".lora_B.weight"))
    assert set(lora) == {f"diffusion_model.{m}{e}" for m in modules for e in ends}
    if family.spec.arch == ZIMAGE:
        assert all(re.fullmatch(r"diffusion_model\.layers\.\d\.attention\.(qkv|out)\..+", k) for k in lora)
    with safe_open(str(out / "magicapture.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == family.spec.base_model_version
    for word in ("mcv1", "mcv2"):
        emb = load_file(out / f"{word}.safetensors")
        assert list(emb) == [family.spec.embedding_key] and tuple(emb[family.spec.embedding_key].shape) == (1, 32)


@pytest.mark.parametrize("name", ["zimage", "klein4b"])
def test_diffusers_loads_the_exported_lora_and_reproduces_the_trained_transformer(tmp_path, sets, name):
    family = DIT_MODEL_FAMILIES[name]
    folder, _ = (save_zimage_model(tmp_path / "model") if name == "zimage" else save_klein_model(tmp_path / "model"))
    cfg = load_config("configs/test_tiny.toml", [
        f'model.pretrained="{folder}"', f'data.source_dir="{sets[0]}"', f'data.reference_dir="{sets[1]}"',
        f'output.dir="{tmp_path / "out"}"', "phase1.steps=1", "phase2.steps=3", "lora.text_encoder=false",
        'output.save_precision="fp32"', "phase2.lr_unet=0.05", "sample.every=0"])
    trainer = MagiCaptureTrainer(cfg)
    lora_path = trainer.run()
    trained = trainer.unet  # its capture processors compute the attention as diffusers' own do
    with torch.no_grad():
        components = build_zimage_components() if name == "zimage" else build_klein_components("4b")
        pipe = _pipeline(family, components)
        noisy = torch.randn(1, *trainer.source.latents.shape[1:], generator=torch.Generator().manual_seed(5))
        cond = {"hidden": torch.randn(1, 40, trainer.text_encoder.config.hidden_size * (1 if name == "zimage" else 3)),
                "mask": torch.ones(1, 40, dtype=torch.bool)}
        t = torch.tensor([400.0])
        expected = family.predict(trained, noisy, t, cond)
        base = family.predict(pipe.transformer, noisy, t, cond)
        pipe.load_lora_weights(str(lora_path))
        loaded = family.predict(pipe.transformer, noisy, t, cond)
    assert (expected - base).abs().max() > 1e-4  # the LoRA trained: without it the output differs
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)


def test_split_files_train_like_the_folder(tmp_path, sets):
    """ComfyUI's split files (transformer, Qwen3, VAE .safetensors and a tokenizer folder) load and train."""
    _, split = save_zimage_model(tmp_path / "model")
    out = _run(tmp_path, str(split.transformer), sets, [f'model.text_encoder="{split.text_encoder}"',
                                                         f'model.vae="{split.vae}"', f'model.tokenizer="{split.tokenizer}"',
                                                         f'model.config_dir="{split.config_dir}"'])
    assert (out / "magicapture.safetensors").is_file() and (out / "mcv1.safetensors").is_file()


def test_a_transformer_file_alone_is_refused_in_one_line_naming_what_is_missing(tmp_path, sets, capsys):
    import train_magicapture

    _, split = save_zimage_model(tmp_path / "model")
    rc = train_magicapture.main(["--config", "configs/test_tiny.toml", f'model.pretrained="{split.transformer}"',
                                 f'data.source_dir="{sets[0]}"', f'data.reference_dir="{sets[1]}"',
                                 f'output.dir="{tmp_path / "out"}"'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "Traceback" not in "\n".join(err)
    assert "a Z-Image transformer alone; also needs model.text_encoder" in err[-1] and "model.tokenizer" in err[-1]
    assert not (tmp_path / "out").exists()


def test_token_rows_are_held_to_clips_place_in_qwens_own_scale(tmp_path, sets):
    """tokens.norm_target (0.4) is written in CLIP-L's units (mean row norm 0.39): on Qwen3 the rows' target
    is 0.4 x (Qwen's mean row norm / 0.39), and a random [V2] starts at std 0.017 x (Qwen's std / 0.014)."""
    folder, _ = save_zimage_model(tmp_path / "model")
    cfg = load_config("configs/test_tiny.toml", [
        f'model.pretrained="{folder}"', f'data.source_dir="{sets[0]}"', f'data.reference_dir="{sets[1]}"',
        f'output.dir="{tmp_path / "out"}"', "tokens.reference_init_std=0.017"])
    trainer = MagiCaptureTrainer(cfg)
    table = trainer.text_encoder.get_input_embeddings().base.weight.detach().float()
    assert trainer.norm_targets[0] == pytest.approx(0.4 * float(table.norm(dim=-1).mean()) / 0.39, rel=1e-6)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    expected_v2 = torch.randn(32, generator=gen) * (0.017 * float(table.std()) / 0.014)
    rows = trainer.text_encoder.get_input_embeddings().new_vectors.detach()
    torch.testing.assert_close(rows[1], expected_v2, rtol=1e-5, atol=1e-7)
