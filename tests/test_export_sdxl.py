"""SDXL files load where users load them: kohya names, diffusers' own loaders, our generate path.

The tiny SDXL (testkit/tiny_sdxl.py) gets LoRA on its UNet and both text encoders (weights set
from a seeded generator) and one special token with fixed vectors in both encoders; the export must

(a) follow kohya's SDXL naming (sd-scripts networks/lora.py with its original-layout SDXL UNet and the
    transformers text encoders): ``lora_unet_`` + the original UNet path (``input_blocks_<i>_<j>``,
    ``middle_block_<i>``, ``output_blocks_<i>_<j>``), ``lora_te1_text_model_encoder_layers_<n>_`` for
    CLIP-L, ``lora_te2_text_model_encoder_layers_<n>_`` for OpenCLIP-G; each module with
    ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``;
(b) load into a fresh pipeline with diffusers' ``load_lora_weights`` (its kohya converter maps the SGM
    names back by the UNet config) and ``load_textual_inversion`` (``clip_l`` into text_encoder,
    ``clip_g`` into text_encoder_2), every module of the file becoming a LoRA layer, and reproduce the
    trained UNet and both text encoders;
(c) carry kohya's SDXL metadata;
(d) give, through our own generate path, the same image as the diffusers-loaded pipeline.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from library.export import kohya as export
from library.models.family import SDXL
from testkit.tiny_sdxl import build_sdxl_components
from library.training import lora

RANK, ALPHA = 4, 3.0  # alpha != rank: a loader that ignores alpha fails the comparison
TOKENS = {"mcv1": 2, "mcv2": 1}  # token word -> vectors
PROMPT = "a photo of a mcv1 person in the style of mcv2"

# kohya's SDXL naming rule, one pattern per prefix (sd-scripts networks/lora.py: LORA_PREFIX_UNET,
# LORA_PREFIX_TEXT_ENCODER1/2, module path with "." -> "_", on the original UNet and transformers' CLIP)
_SUFFIX = r"\.(lora_down\.weight|lora_up\.weight|alpha)"
KOHYA_SDXL = {
    "unet": re.compile(r"lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_"
                       r"(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))" + _SUFFIX),
    "te1": re.compile(r"lora_te1_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj" + _SUFFIX),
    "te2": re.compile(r"lora_te2_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj" + _SUFFIX),
}


def _token_vectors() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return {w: {"clip_l": torch.randn(n, 32, generator=g) * 0.3, "clip_g": torch.randn(n, 64, generator=g) * 0.3}
            for w, n in TOKENS.items()}


def _add_tokens(tokenizer, text_encoder, vectors: dict[str, torch.Tensor]) -> None:
    """word, word_1, ... into the tokenizer and the vectors into new rows (written here, not by the code under test)."""
    for word, vec in vectors.items():
        words = [word] + [f"{word}_{i}" for i in range(1, vec.shape[0])]
        tokenizer.add_tokens(words)
        text_encoder.resize_token_embeddings(len(tokenizer))
        ids = tokenizer.convert_tokens_to_ids(words)
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[ids] = vec


@pytest.fixture(scope="module")
def trained():
    """Tiny SDXL with LoRA (UNet: kohya_all; both text encoders) at seeded values and the two tokens."""
    c = build_sdxl_components(seed=0)
    lora.add_unet_lora(c["unet"], RANK, ALPHA, "kohya_all")
    lora.add_text_encoder_lora(c["text_encoder"], RANK, ALPHA)
    lora.add_text_encoder_lora(c["text_encoder_2"], RANK, ALPHA)
    g = torch.Generator().manual_seed(7)
    for model in (c["unet"], c["text_encoder"], c["text_encoder_2"]):
        for _, layer in lora.lora_layers(model):
            for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                w.data = torch.randn(w.shape, generator=g) * 0.2
    vectors = _token_vectors()
    _add_tokens(c["tokenizer"], c["text_encoder"], {w: v["clip_l"] for w, v in vectors.items()})
    _add_tokens(c["tokenizer_2"], c["text_encoder_2"], {w: v["clip_g"] for w, v in vectors.items()})
    return c, vectors


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """out/magicapture.safetensors (fp32) and out/<token>.safetensors, as export_outputs writes them."""
    c, vectors = trained
    out = tmp_path_factory.mktemp("sdxl_out")
    state = export.lora_state_dict(c["unet"], (c["text_encoder"], c["text_encoder_2"]), SDXL, dtype=torch.float32)
    metadata = export.build_metadata(
        output_name="magicapture", rank=RANK, alpha=ALPHA, unet_targets_preset="kohya_all", train_text_encoder=True,
        tokens={"source": "mcv1", "reference": "mcv2"}, base_model_name="sd_xl_base_1.0.safetensors",
        base_model_hash=None, base_model_version=SDXL.base_model_version, training={"seed": 0}, state_dict=state,
        date="2026-01-01T00:00:00+00:00",
    )
    export.save_lora(out / "magicapture.safetensors", state, metadata)
    for word, vecs in vectors.items():
        export.save_embedding(out / f"{word}.safetensors", word, vecs)
    return out


def _ids(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _outputs(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, prompt: str):
    """(CLIP-L last hidden state, OpenCLIP-G last hidden state, its projected pooled output, UNet output)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        text_l = text_encoder(_ids(tokenizer, prompt)).last_hidden_state
        out_g = text_encoder_2(_ids(tokenizer_2, prompt))
        # the UNet gets fixed conditioning, so its comparison does not depend on the text encoders
        cond = torch.randn(1, 77, 96, generator=g)
        added = {"text_embeds": torch.randn(1, 48, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        out = unet(x, torch.tensor([500]), encoder_hidden_states=cond, added_cond_kwargs=added).sample
    return text_l, out_g.last_hidden_state, out_g.text_embeds, out


def _expanded(prompt: str) -> str:
    for word, n in TOKENS.items():
        prompt = prompt.replace(word, " ".join([word] + [f"{word}_{i}" for i in range(1, n)]))
    return prompt


# --------------------------------------------------------------------------------------------------
# (a) names


def test_every_key_follows_kohyas_sdxl_naming(exported):
    tensors, _ = export.load_lora(exported / "magicapture.safetensors")
    by_prefix = {p: [k for k in tensors if pattern.fullmatch(k)] for p, pattern in KOHYA_SDXL.items()}
    assert sorted(sum(by_prefix.values(), [])) == sorted(tensors), [k for k in tensors if not any(p.fullmatch(k) for p in KOHYA_SDXL.values())][:5]
    # kohya_all: proj_in + proj_out per attention, 10 Linear per transformer block (attn1 and attn2 q/k/v/out,
    # ff.net.0.proj, ff.net.2). Tiny SDXL (transformer_layers_per_block [1, 1, 2]): attentions 2 + 2 down,
    # 1 mid, 3 + 3 up = 11; transformer blocks 2 x 1 + 2 x 2 down, 2 mid, 3 x 2 + 3 x 1 up = 17. Text
    # encoders: 2 layers x q/k/v/out, twice.
    assert len(export.lora_module_names(tensors)) == 17 * 10 + 11 * 2 + 2 * 2 * 4
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",  # down_blocks.1.attentions.0
        "lora_unet_input_blocks_8_1_transformer_blocks_1_ff_net_0_proj",  # down_blocks.2.attentions.1
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_2_1_transformer_blocks_1_attn1_to_out_0",  # up_blocks.0.attentions.2
        "lora_unet_output_blocks_5_1_proj_out",  # up_blocks.1.attentions.2
        "lora_te1_text_model_encoder_layers_1_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
    ):
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            assert name + suffix in tensors
    assert tensors["lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight"].shape == (RANK, 64)
    assert tensors["lora_te1_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight"].shape == (32, RANK)
    assert float(tensors["lora_unet_middle_block_1_proj_in.alpha"]) == ALPHA


def test_embedding_file_holds_clip_l_and_clip_g(exported):
    from safetensors import safe_open

    with safe_open(str(exported / "mcv1.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        assert f.get_tensor("clip_l").shape == (2, 32) and f.get_tensor("clip_g").shape == (2, 64)
        assert f.metadata()["name"] == "mcv1"
    name, vecs = export.load_embedding_vectors(exported / "mcv1.safetensors", SDXL)
    expected = _token_vectors()["mcv1"]
    assert name == "mcv1" and list(vecs) == ["clip_l", "clip_g"]
    assert torch.equal(vecs["clip_l"], expected["clip_l"]) and torch.equal(vecs["clip_g"], expected["clip_g"])


def test_embeddings_of_the_other_family_are_one_line_errors(exported, tmp_path):
    from library.models.family import SD1

    with pytest.raises(ValueError, match=r"^mcv1\.safetensors: an SDXL embedding \(clip_l, clip_g\) but the model is SD 1\.x"):
        export.load_embedding(exported / "mcv1.safetensors")
    sd1 = export.save_embedding(tmp_path / "mcv1.safetensors", "mcv1", torch.zeros(1, 32))
    with pytest.raises(ValueError, match=r"^mcv1\.safetensors: an SD 1\.x embedding \(one tensor\) but the model is SDXL"):
        export.load_embedding_vectors(sd1, SDXL)
    assert list(export.load_embedding_vectors(sd1, SD1)[1]) == ["emb_params"]
    with pytest.raises(ValueError, match="SDXL embeddings are .safetensors only"):
        export.save_embedding(tmp_path, "mcv1", _token_vectors()["mcv1"], legacy_pt=True)


def test_bundled_sdxl_embeddings_use_clip_l_and_clip_g(trained, tmp_path):
    from library.generation.trained_files import read_embedding

    c, vectors = trained
    state = export.lora_state_dict(c["unet"], (c["text_encoder"], c["text_encoder_2"]), SDXL, dtype=torch.float32)
    path = tmp_path / "bundled.safetensors"
    export.save_lora(path, state, {}, bundle_embeddings=vectors, family=SDXL)
    tensors, _ = export.load_lora(path)
    assert sorted(k for k in tensors if k.startswith("bundle_emb.")) == [
        "bundle_emb.mcv1.clip_g", "bundle_emb.mcv1.clip_l", "bundle_emb.mcv2.clip_g", "bundle_emb.mcv2.clip_l"]
    got = read_embedding("mcv1", None, path, SDXL)
    assert torch.equal(got["clip_l"], vectors["mcv1"]["clip_l"]) and torch.equal(got["clip_g"], vectors["mcv1"]["clip_g"])


# --------------------------------------------------------------------------------------------------
# (b) diffusers' own loaders reproduce the trained model


def _peft_layer_names(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def test_diffusers_loads_every_module_and_reproduces_the_model(trained, exported):
    from diffusers import StableDiffusionXLPipeline

    c, _ = trained
    expected = _outputs(c["unet"], c["text_encoder"], c["text_encoder_2"], c["tokenizer"], c["tokenizer_2"], _expanded(PROMPT))

    pipe = StableDiffusionXLPipeline(**build_sdxl_components(seed=0))
    base = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, "a photo of a person")
    pipe.load_lora_weights(str(exported / "magicapture.safetensors"))
    from safetensors.torch import load_file

    for word in TOKENS:
        vecs = load_file(str(exported / f"{word}.safetensors"))
        pipe.load_textual_inversion(vecs["clip_l"], token=word, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(vecs["clip_g"], token=word, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)

    tensors, _ = export.load_lora(exported / "magicapture.safetensors")
    names = export.lora_module_names(tensors)
    for prefix, model in (("lora_unet_", pipe.unet), ("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        assert len(_peft_layer_names(model)) == len([n for n in names if n.startswith(prefix)]) > 0, prefix

    prompt = pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)
    assert prompt == pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer_2) == _expanded(PROMPT)
    got = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, prompt)
    for what, a, b, before in zip(("CLIP-L", "OpenCLIP-G", "pooled", "UNet"), got, expected, base):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=what)
    # and the LoRA is not a no-op: the UNet without it answers differently to the same conditioning
    assert (base[3] - expected[3]).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# (c) metadata


def test_sdxl_metadata(exported):
    _, meta = export.load_lora(exported / "magicapture.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_resolution"] == "(1024, 1024)"  # kohya writes the tuple; the family's side by default
    assert meta["modelspec.resolution"] == "1024x1024"
    assert meta["ss_v2"] == "False" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["sshs_model_hash"] == export.safetensors_file_hash(exported / "magicapture.safetensors")


# --------------------------------------------------------------------------------------------------
# (d) our generate path


def test_generate_matches_the_diffusers_loaded_pipeline(exported, tmp_path, tiny_sdxl_model):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from library.config import load_config
    from library.generation.pipeline import generate

    folder = tiny_sdxl_model[0]  # the same seed-0 components as build_sdxl_components()
    cfg = load_config("configs/test_tiny.toml", [f'model.pretrained="{folder}"', f'output.dir="{exported}"'], check_paths=False)
    seed = 1234
    paths = generate(cfg, prompt=PROMPT, n=1, seed=seed, steps=2, lora_scale=1.0, te_scale=1.0, width=64, height=64,
                     upscale=2, out_dir=tmp_path / "images", device="cpu", precision="fp32", grid=False, progress=False)
    # post-processing (here a plain 2x resize) runs on the SDXL sample; the sample itself is in raw/
    assert Image.open(paths[0]).size == (128, 128)
    ours = np.asarray(Image.open(paths[0].parent / "raw" / paths[0].name).convert("RGB"), dtype=np.int16)
    assert ours.shape == (64, 64, 3)
    # A1111 writes the same "parameters" fields for SDXL as for SD 1.x
    from library.export.infotext import parse_infotext

    info = parse_infotext(Image.open(paths[0].parent / "raw" / paths[0].name).text["parameters"])
    assert info["Prompt"] == f"{PROMPT} <lora:magicapture:1>"
    assert (info["Steps"], info["Sampler"], info["CFG scale"], info["Seed"], info["Size"]) == ("2", "Euler a", "7", "1234", "64x64")
    lora_hash = export.safetensors_file_hash(exported / "magicapture.safetensors")[:12]
    assert info["Lora hashes"] == f"magicapture: {lora_hash}" and info["Model"] == "tiny_sdxl"

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(exported / "magicapture.safetensors"))
    from safetensors.torch import load_file

    for word in TOKENS:
        vecs = load_file(str(exported / f"{word}.safetensors"))
        pipe.load_textual_inversion(vecs["clip_l"], token=word, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(vecs["clip_g"], token=word, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        image = pipe(PROMPT, num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    theirs = np.asarray(image.convert("RGB"), dtype=np.int16)
    # merged weights (ours) against peft layers (diffusers): the same sums in another order, <= 1 level
    assert np.abs(ours - theirs).max() <= 1
    assert ours.std() > 1  # a picture, not a flat fill that any two pipelines would agree on


def test_default_size_comes_from_the_family():
    from types import SimpleNamespace

    from library.generation.options import default_side
    from library.models.family import SD1

    # data.resolution = 0 (the default) means the family's side; a set one is what training used
    assert default_side(SimpleNamespace(data=SimpleNamespace(resolution=0)), SDXL) == 1024
    assert default_side(SimpleNamespace(data=SimpleNamespace(resolution=0)), SD1) == 512
    assert default_side(SimpleNamespace(data=SimpleNamespace(resolution=768)), SDXL) == 768
    assert default_side(SimpleNamespace(data=SimpleNamespace(resolution=512)), SDXL) == 512


def test_an_sdxl_lora_does_not_fit_an_sd1_model(exported):
    from testkit.tiny import build_components

    tensors, _ = export.load_lora(exported / "magicapture.safetensors")
    sd1 = build_components(seed=0)
    with pytest.raises(ValueError, match=r"^200 LoRA modules match no module of this SD 1\.x model \(a LoRA for SDXL\?\): "):
        export.apply_kohya_lora(sd1["unet"], sd1["text_encoder"], tensors)


def test_presets_select_the_same_layers_on_the_sdxl_unet():
    """The presets keep their meaning on SDXL: tiny SDXL has 17 transformer blocks in 11 attentions."""
    unet = build_sdxl_components(seed=0)["unet"]
    counts = {preset: len(lora.unet_lora_target_modules(unet, preset)) for preset in lora.LORA_TARGET_PRESETS}
    assert counts == {"cross_attn": 17 * 4, "attn_geglu": 17 * 9, "kohya_all": 17 * 10 + 11 * 2}
    te2 = build_sdxl_components(seed=0)["text_encoder_2"]
    assert lora.text_encoder_lora_target_modules(te2)[:2] == [
        "text_model.encoder.layers.0.self_attn.k_proj", "text_model.encoder.layers.0.self_attn.v_proj"]
    assert len(lora.text_encoder_lora_target_modules(te2)) == 2 * 4


def test_export_outputs_writes_the_sdxl_files(trained, tmp_path, monkeypatch):
    """The end of an SDXL run: te1 / te2 LoRA, clip_l / clip_g embeddings, SDXL metadata, no .pt."""
    from types import SimpleNamespace

    import library.training.outputs as outputs
    from library.config import Config

    c, vectors = trained
    cfg = Config()
    cfg.output.dir, cfg.output.save_precision, cfg.lora.targets = str(tmp_path), "fp32", "kohya_all"
    cfg.output.embeddings_pt = True  # SDXL has no .pt embeddings: ignored, with a note
    cfg.data.resolution = 1024
    ids = {w: c["tokenizer"].convert_tokens_to_ids([w] + [f"{w}_{i}" for i in range(1, n)]) for w, n in TOKENS.items()}
    assert ids == {w: c["tokenizer_2"].convert_tokens_to_ids([w] + [f"{w}_{i}" for i in range(1, n)]) for w, n in TOKENS.items()}
    # the trainer's token-embedding wrapper (training/tokens.py) is not on these plain encoders: read the rows
    monkeypatch.setattr(outputs, "token_vectors", lambda enc, rows: enc.get_input_embeddings().weight[rows].detach().clone())
    said = []
    trainer = SimpleNamespace(
        cfg=cfg, family=SDXL, unet=c["unet"], text_encoder=c["text_encoder"], text_encoders=(c["text_encoder"], c["text_encoder_2"]),
        resolution=cfg.data.resolution,
        token_ids=ids, lora_added=True, model_name="sd_xl_base_1.0.safetensors", vae_name=None, print=said.append,
        v_parameterization=False, num_processes=1,
    )
    lora_path = outputs.export_outputs(trainer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["magicapture.safetensors", "mcv1.safetensors", "mcv2.safetensors"]
    assert said[0] == "note: output.embeddings_pt is ignored: SDXL embeddings exist as .safetensors only"
    tensors, meta = export.load_lora(lora_path)
    assert {k.split("_text_model")[0] for k in tensors if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert len(export.lora_module_names(tensors)) == 17 * 10 + 11 * 2 + 2 * 2 * 4
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["modelspec.resolution"]) == (
        "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "1024x1024")
    for word, vecs in vectors.items():
        name, got = export.load_embedding_vectors(tmp_path / f"{word}.safetensors", SDXL)
        assert name == word and torch.equal(got["clip_l"], vecs["clip_l"]) and torch.equal(got["clip_g"], vecs["clip_g"])


def test_single_file_scheduler_config_comes_from_the_family(tmp_path):
    """A single-file SDXL checkpoint samples with configs/sdxl's scheduler settings (interpolation_type is
    only in SDXL's), a folder with its own."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from library.generation.samplers import scheduler_base_config

    parts = SimpleNamespace(noise_scheduler=DDPMScheduler(), family=SDXL)
    single = SimpleNamespace(model=SimpleNamespace(pretrained=str(tmp_path / "sd_xl_base_1.0.safetensors"), config_dir=""))
    config = scheduler_base_config(single, parts)
    assert (config["interpolation_type"], config["steps_offset"], config["timestep_spacing"]) == ("linear", 1, "leading")
