"""SDXL loading offline (issue 10): the tiny SDXL as a diffusers folder and as one file in the original SGM
layout give the same model; the SGM file's names follow the original layout (diffusers' own single-file
converters are the oracle for the real SDXL 1.0 shapes); the UNet module-path map the LoRA exporter uses,
pinned on kohya's SDXL names; SDXL kinds that cannot train are refused in one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.models.family import SDXL
from library.models.loading import ModelLoadError, load_stable_diffusion
from library.models.sgm_keys import diffusers_unet_module_path, sgm_unet_module_path
from testkit.tiny_sdxl import TINY_TEXT_G, TINY_TEXT_L

INCOMPLETE = "use a full checkpoint (UNet, VAE and both text encoders), e.g. sd_xl_base_1.0.safetensors"


@pytest.fixture(scope="module")
def loaded(tiny_sdxl_model):
    """(from the folder, from the single file) through load_stable_diffusion, offline."""
    folder, single = tiny_sdxl_model
    return load_stable_diffusion(str(folder)), load_stable_diffusion(str(single), config_dir=folder)


def test_folder_and_single_file_load_as_sdxl_with_the_same_outputs(tiny_sdxl_model, loaded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = loaded
    for parts in (a, b):
        assert parts.family is SDXL and (parts.kind.family, parts.kind.prediction, parts.kind.missing) == ("sdxl", "epsilon", ())
        assert parts.text_encoders == (parts.text_encoder, parts.text_encoder_2)
        assert parts.tokenizers == (parts.tokenizer, parts.tokenizer_2) and parts.tokenizer_2.pad_token == "!"
    assert b.name == tiny_sdxl_model[1].name
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, 77, TINY_TEXT_L["hidden_size"] + TINY_TEXT_G["hidden_size"])
    cond = {"text_embeds": torch.randn(2, TINY_TEXT_G["projection_dim"]),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}
    with torch.no_grad():
        ua, ub = a.unet(x, 10, ctx, added_cond_kwargs=cond).sample, b.unet(x, 10, ctx, added_cond_kwargs=cond).sample
        torch.testing.assert_close(ua, ub, rtol=0, atol=1e-5)
        # the size / crop ids reach the UNet: other ids, another output
        other = {**cond, "time_ids": torch.tensor([[512.0, 512, 0, 0, 512, 512]] * 2)}
        assert (b.unet(x, 10, ctx, added_cond_kwargs=other).sample - ub).abs().max() > 1e-4
        ids = a.tokenizer("a photo of a person", padding="max_length", return_tensors="pt").input_ids
        ids2 = a.tokenizer_2("a photo of a person", padding="max_length", return_tensors="pt").input_ids
        assert ids2[0, -1].item() == 0  # padded with "!" (id 0), as SDXL's second tokenizer pads
        la, lb = (p.text_encoder(ids, output_hidden_states=True) for p in (a, b))
        torch.testing.assert_close(la.hidden_states[-2], lb.hidden_states[-2], rtol=0, atol=1e-5)
        ga, gb = (p.text_encoder_2(ids2, output_hidden_states=True) for p in (a, b))
        torch.testing.assert_close(ga.hidden_states[-2], gb.hidden_states[-2], rtol=0, atol=1e-5)
        torch.testing.assert_close(ga.text_embeds, gb.text_embeds, rtol=0, atol=1e-5)
        assert ga.text_embeds.shape == (1, TINY_TEXT_G["projection_dim"])
        img = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(a.vae.encode(img).latent_dist.mean, b.vae.encode(img).latent_dist.mean, rtol=0, atol=1e-5)


def test_the_training_scheduler_is_sdxls_ddpm(loaded):
    """DDPM from configs/sdxl's scheduler: scaled_linear betas 0.00085..0.012 over 1000 steps, epsilon."""
    for parts in loaded:
        s = parts.noise_scheduler
        assert type(s).__name__ == "DDPMScheduler"
        assert (s.config.prediction_type, s.config.num_train_timesteps, s.config.steps_offset, s.config.timestep_spacing) == (
            "epsilon", 1000, 1, "leading")
        # scaled_linear: beta_t = (sqrt(0.00085) + t / 999 * (sqrt(0.012) - sqrt(0.00085)))^2
        prod = 1.0
        for t in range(1000):
            beta = (math.sqrt(0.00085) + t / 999 * (math.sqrt(0.012) - math.sqrt(0.00085))) ** 2
            prod *= 1 - beta
        assert s.alphas_cumprod[-1].item() == pytest.approx(prod, rel=1e-4)
        assert s.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)


def test_the_single_file_uses_the_sgm_names(tiny_sdxl_model, loaded):
    folder, single = tiny_sdxl_model
    with safe_open(str(single), framework="pt") as f:
        keys = set(f.keys())
        shape = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    unet = "model.diffusion_model."
    g = "conditioner.embedders.1.model."
    assert {k.split(".")[0] for k in keys} == {"model", "conditioner", "first_stage_model"}
    # block numbering of SDXL's 3 levels: level 0 has no attention; levels 1 and 2 have 1 and 2 transformer blocks
    assert shape[unet + "input_blocks.0.0.weight"] == (32, 4, 3, 3)
    assert not any(k.startswith((unet + "input_blocks.1.1.", unet + "input_blocks.2.1.", unet + "input_blocks.9.")) for k in keys)
    assert shape[unet + "input_blocks.3.0.op.weight"] == (32, 32, 3, 3)
    assert shape[unet + "input_blocks.4.0.skip_connection.weight"] == (64, 32, 1, 1)
    assert shape[unet + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == (64, 96)
    assert unet + "input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in keys
    assert unet + "input_blocks.7.1.transformer_blocks.2.attn2.to_k.weight" not in keys
    assert unet + "middle_block.1.transformer_blocks.1.attn1.to_q.weight" in keys
    assert shape[unet + "output_blocks.2.2.conv.weight"] == (64, 64, 3, 3)  # upsampler after an attention
    assert shape[unet + "output_blocks.8.0.out_layers.3.weight"] == (32, 32, 3, 3)
    assert shape[unet + "label_emb.0.0.weight"] == (128, 48 + 6 * 8)  # pooled OpenCLIP-G + 6 Fourier size ids
    assert shape[unet + "time_embed.2.weight"] == (128, 128)
    # the two text encoders
    assert shape["conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"] == (32, 32)
    assert shape["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"] == (77, 32)
    assert {k.split(".")[6] for k in keys if k.startswith(g + "transformer.resblocks.")} == {"0", "1"}
    assert shape[g + "transformer.resblocks.1.attn.in_proj_weight"] == (192, 64)
    assert shape[g + "transformer.resblocks.1.attn.in_proj_bias"] == (192,)
    assert shape[g + "transformer.resblocks.0.mlp.c_fc.weight"] == (37, 64)
    assert shape[g + "text_projection"] == (64, 48)  # [hidden, projection]
    assert shape[g + "positional_embedding"] == (77, 64) and shape[g + "token_embedding.weight"] == (49408, 64)
    assert shape["first_stage_model.decoder.mid.attn_1.q.weight"] == (32, 32, 1, 1)
    # the values: q, k, v stacked in that order, the projection transposed
    state = load_file(str(single))
    te2 = loaded[0].text_encoder_2.state_dict()
    qkv = state[g + "transformer.resblocks.1.attn.in_proj_weight"]
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(qkv[64 * i:64 * (i + 1)], te2[f"text_model.encoder.layers.1.self_attn.{name}.weight"])
    assert torch.equal(state[g + "text_projection"], te2["text_projection.weight"].T)


def test_real_sdxl_shapes_go_through_diffusers_converters_with_configs_sdxl():
    """What from_single_file does with configs/sdxl, on full-size SDXL 1.0 with its weights on the meta device: every SGM key this project writes converts back to exactly the diffusers model's keys and shapes."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from testkit.tiny_sdxl import build_sdxl_components, sdxl_to_sgm

    from accelerate import init_empty_weights

    with init_empty_weights():  # what `python -m testkit.tiny DEST --sdxl --full-size` builds, no memory
        parts = build_sdxl_components(full_size=True)
    assert (list(parts["unet"].config.block_out_channels), parts["text_encoder_2"].config.num_hidden_layers) == ([320, 640, 1280], 32)
    sgm = sdxl_to_sgm(parts)
    counts = {}
    for k in sgm:
        top = ".".join(k.split(".")[:3]) if k.startswith("conditioner") else k.split(".")[0]
        counts[top] = counts.get(top, 0) + 1
    # what sd_xl_base_1.0.safetensors holds (less CLIP-L's position_ids buffer and OpenCLIP's logit_scale)
    assert counts == {"model": 1680, "conditioner.embedders.0": 12 * 16 + 4, "conditioner.embedders.1": 32 * 12 + 5,
                      "first_stage_model": 248}
    shape = {k: tuple(v.shape) for k, v in sgm.items()}
    assert shape["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shape["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shape["model.diffusion_model.output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shape["model.diffusion_model.output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert shape["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shape["conditioner.embedders.1.model.text_projection"] == (1280, 1280)

    def same(converted, model):
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == want

    same(convert_ldm_unet_checkpoint(sgm, dict(parts["unet"].config)), parts["unet"])
    same(convert_ldm_vae_checkpoint(sgm, dict(parts["vae"].config)), parts["vae"])
    clip_l = {k.removeprefix("text_model."): v for k, v in
              convert_ldm_clip_checkpoint(sgm, "conditioner.embedders.0.transformer.").items()
              if not k.startswith("conditioner.embedders.1.")}
    same(clip_l, parts["text_encoder"])
    same(convert_open_clip_checkpoint(parts["text_encoder_2"], sgm, prefix="conditioner.embedders.1.model."), parts["text_encoder_2"])


# kohya's SDXL LoRA names (sd-scripts' sdxl_model_util / networks/lora.py), written down module by module:
# lora_unet_<SGM path with "_" for ".">  <-  diffusers path
KOHYA_SDXL = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("lora_unet_input_blocks_5_1_proj_in", "down_blocks.1.attentions.1.proj_in"),
    ("lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2", "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2"),
    ("lora_unet_input_blocks_8_1_transformer_blocks_0_attn1_to_out_0", "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0"),
    ("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v", "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"),
    ("lora_unet_output_blocks_1_1_proj_out", "up_blocks.0.attentions.1.proj_out"),
    ("lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_k", "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_k"),
    # conv LoRA (LoCon) names of resnets and samplers
    ("lora_unet_input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
    ("lora_unet_input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("lora_unet_input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
    ("lora_unet_middle_block_2_emb_layers_1", "mid_block.resnets.1.time_emb_proj"),
    ("lora_unet_output_blocks_8_0_out_layers_3", "up_blocks.2.resnets.2.conv2"),
    ("lora_unet_output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
    ("lora_unet_output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
    ("lora_unet_label_emb_0_0", "add_embedding.linear_1"),
    ("lora_unet_time_embed_2", "time_embedding.linear_2"),
    ("lora_unet_out_2", "conv_out"),
]


def test_sgm_unet_module_path_on_sdxl_gives_kohyas_names():
    config = SDXL.component_config("unet")  # configs/sdxl/unet: SDXL 1.0's numbers
    for kohya, path in KOHYA_SDXL:
        sgm = sgm_unet_module_path(path, config)
        assert "lora_unet_" + sgm.replace(".", "_") == kohya, path
        assert diffusers_unet_module_path(sgm, config) == path
    assert sgm_unet_module_path("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", config) == (
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight")
    assert sgm_unet_module_path("down_blocks.0.resnets.1.norm1.bias", config) == "input_blocks.2.0.in_layers.0.bias"
    with pytest.raises(ValueError, match=r"'down_blocks.0.attentions.0' is not a module path of this UNet"):
        sgm_unet_module_path("down_blocks.0.attentions.0", config)  # SDXL's first level has no attention


def test_sgm_unet_module_path_on_sd15_numbers_four_levels():
    from library.models.family import SD1

    config = SD1.component_config("unet")
    pairs = {"down_blocks.2.attentions.0": "input_blocks.7.1", "down_blocks.0.attentions.1": "input_blocks.2.1",
             "up_blocks.1.attentions.0": "output_blocks.3.1", "up_blocks.3.attentions.2": "output_blocks.11.1",
             "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv", "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
             "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3"}
    for path, sgm in pairs.items():
        assert sgm_unet_module_path(path, config) == sgm


# ----------------------------------------------------------------------------------------- refusals
def _write(path: Path, state: dict) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_sdxl_kinds_that_cannot_train_are_refused_in_one_line(tiny_sdxl_model, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("a pipeline was built before the model was refused")

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", forbidden)
    folder, single = tiny_sdxl_model
    state = load_file(str(single))
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    g, l = "conditioner.embedders.1.model.", "conditioner.embedders.0.transformer."
    vpred = _write(tmp_path / "noob_vpred.safetensors", {**state, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)})
    yaml_v = _write(tmp_path / "yaml_v.safetensors", state)
    yaml_v.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    refiner = {(k.replace(g, "conditioner.embedders.0.model.")): v for k, v in state.items() if not k.startswith(l)}
    cases = [
        (vpred, "an SDXL v-prediction model (conditioner.embedders.* keys; a v_pred key); this trainer trains "
                "epsilon-prediction models only: use an SDXL text-to-image model such as sd_xl_base_1.0.safetensors "
                "(not a v-prediction fine-tune)"),
        (yaml_v, 'an SDXL v-prediction model (conditioner.embedders.* keys; parameterization: "v" in its .yaml); this trainer '
                 "trains epsilon-prediction models only: use an SDXL text-to-image model such as sd_xl_base_1.0.safetensors "
                 "(not a v-prediction fine-tune)"),
        (_write(tmp_path / "inpaint.safetensors", {**state, conv: torch.zeros(32, 9, 3, 3)}),
         "an SDXL inpainting model (conditioner.embedders.* keys; 9-channel conv_in); training needs a text-to-image "
         "model (4-channel conv_in): use the model it was made from, e.g. sd_xl_base_1.0.safetensors"),
        (_write(tmp_path / "no_g.safetensors", {k: v for k, v in state.items() if not k.startswith(g)}),
         f"an incomplete SDXL model (conditioner.embedders.* keys): no second text encoder; {INCOMPLETE}"),
        (_write(tmp_path / "refiner.safetensors", refiner),
         "an incomplete SDXL model (a refiner: one text encoder, conditioner.embedders.0.model.*): no CLIP-L text "
         f"encoder; {INCOMPLETE}"),
        (_write(tmp_path / "novae.safetensors", {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}),
         "an SDXL model without a VAE; set model.vae to a VAE file or folder, e.g. sdxl_vae.safetensors"),
    ]
    for path, message in cases:
        with pytest.raises(ModelLoadError) as info:
            load_stable_diffusion(str(path), config_dir=folder)
        assert str(info.value) == f"{path}: {message}", path.name


def test_a_pickled_sdxl_checkpoint_loads_its_tensors_only(tiny_sdxl_model, loaded, tmp_path):
    folder, single = tiny_sdxl_model
    ckpt = tmp_path / "sdxl.ckpt"
    torch.save({"state_dict": load_file(str(single))}, ckpt)
    parts = load_stable_diffusion(str(ckpt), config_dir=folder)
    assert parts.family is SDXL and parts.tokenizer_2 is not None
    want = loaded[0].text_encoder_2.state_dict()
    got = parts.text_encoder_2.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_tiny_file_against_sdxl_1_0_configs_is_one_line(tiny_sdxl_model):
    """Without model.config_dir a single SDXL file is built with configs/sdxl (SDXL 1.0's shapes): the tiny
    file does not fit them, and that is said in one line naming the file and the fix."""
    single = tiny_sdxl_model[1]
    with pytest.raises(ModelLoadError) as info:
        load_stable_diffusion(str(single))
    text = str(info.value)
    assert text.startswith(f"{single}: cannot load it with the configs in {SDXL.config_dir}: ")
    assert text.endswith("; set model.config_dir to a diffusers folder whose configs fit this model")
    assert "\n" not in text


def test_model_vae_for_sdxl_is_shaped_by_the_sdxl_config(tiny_sdxl_model, loaded, tmp_path):
    """model.vae on an SDXL base: the VAE file (original layout) replaces the checkpoint's; a VAE of another
    shape is refused naming SDXL."""
    from diffusers import AutoencoderKL

    from library.models.sgm_keys import vae_to_original
    from testkit.tiny_sdxl import TINY_VAE

    folder, single = tiny_sdxl_model
    torch.manual_seed(7)
    vae = AutoencoderKL(**(SDXL.component_config("vae") | TINY_VAE))
    path = _write(tmp_path / "my_sdxl_vae.safetensors", vae_to_original(vae.state_dict()))
    parts = load_stable_diffusion(str(single), config_dir=folder, vae=str(path))
    got = parts.vae.state_dict()
    assert all(torch.equal(got[k], v) for k, v in vae.state_dict().items()) and parts.vae_name == path.name
    assert parts.vae.config.scaling_factor == 0.13025  # SDXL's latent scale, from its VAE config
    bad = _write(tmp_path / "bad.safetensors", {"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match=r"not an SDXL VAE for this model \(\d+ weights missing, 1 of another shape.*"
                                             r"give the VAE file of an SDXL model, e.g. sdxl_vae.safetensors$"):
        load_stable_diffusion(str(single), config_dir=folder, vae=str(bad))


def test_the_extra_keys_real_sdxl_files_carry_are_ignored(tiny_sdxl_model, loaded, tmp_path):
    """sd_xl_base_1.0.safetensors and its fine-tunes also hold CLIP-L's position_ids buffer, OpenCLIP's
    logit_scale and (SGM) the denoiser's sigmas; none of them is a weight of the diffusers model."""
    folder, single = tiny_sdxl_model
    extra = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
             "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6052),
             "denoiser.sigmas": torch.linspace(0.03, 14.6, 1000)}
    path = _write(tmp_path / "with_extras.safetensors", {**load_file(str(single)), **extra})
    parts = load_stable_diffusion(str(path), config_dir=folder)
    assert parts.kind.missing == ()
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        want, got = getattr(loaded[0], name).state_dict(), getattr(parts, name).state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
