"""The exported files load where users load them.

A LoRA with one wrong key loads silently with no effect in a frontend, so these tests load ours with the
loaders the users have: diffusers' own kohya converter (`load_lora_weights`), diffusers'
`load_textual_inversion`, A1111's name conversion (re-implemented below from
extensions-builtin/Lora/networks.py) against the module names of the original-layout SD 1.5 checkpoint,
and our own inverse (`apply_kohya_lora`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from library.export import kohya as export
from library.training import lora
from library.config import load_config
from testkit.tiny import build_components, text_encoder_to_original, unet_to_original
from library.training.trainer import MagiCaptureTrainer

RANK, ALPHA = 4, 3.0  # alpha != rank: a loader that ignores alpha fails the comparison
SUBJECT, STYLE = "ohwxsubj", "zqstyle"


# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def tiny_folder(tiny_model):
    """The tiny model's diffusers folder (tests/conftest.py builds it once per session)."""
    return tiny_model[0]


def _trained(preset: str, seed: int = 7):
    """Tiny components with UNet and text-encoder LoRA whose lora_B are random (the LoRA changes outputs)."""
    c = build_components(seed=0)
    lora.add_unet_lora(c["unet"], RANK, ALPHA, preset)
    lora.add_text_encoder_lora(c["text_encoder"], RANK, ALPHA)
    g = torch.Generator().manual_seed(seed)
    for model in (c["unet"], c["text_encoder"]):
        for _, layer in lora.lora_layers(model):
            w = layer.lora_B["default"].weight
            w.data = torch.randn(w.shape, generator=g) * 0.2
    return c


def _ids(tokenizer, prompt):
    return tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _outputs(unet, text_encoder, tokenizer, prompt="a photo of a person"):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 32, 32, generator=g)
    with torch.no_grad():
        text = text_encoder(_ids(tokenizer, prompt))[0]
        # the UNet gets a fixed conditioning so that its comparison does not depend on the text encoder
        cond = torch.randn(1, 77, text.shape[-1], generator=g)
        out = unet(x, torch.tensor([500]), encoder_hidden_states=cond).sample
    return text, out


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


class _Records(logging.Handler):
    def __init__(self, level: int = logging.WARNING):
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _lora_modules_of(model) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


# --------------------------------------------------------------------------------------------------
# names


def test_kohya_module_name():
    assert (
        export.kohya_module_name("lora_unet_", "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k")
        == "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k"
    )
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert export.kohya_module_name("lora_te_", "encoder.layers.0.self_attn.q_proj") == te  # transformers 5
    assert export.kohya_module_name("lora_te", "text_model.encoder.layers.0.self_attn.q_proj") == te  # transformers 4
    assert export.kohya_module_name("lora_te_", "encoder.layers.0.self_attn.q_proj.base_layer") == te
    assert export.kohya_module_name("lora_te_", "_orig_mod.encoder.layers.0.self_attn.q_proj") == te  # compiled
    assert export.kohya_module_name("lora_unet_", "module.mid_block.attentions.0.proj_in") == (
        "lora_unet_mid_block_attentions_0_proj_in"
    )
    with pytest.raises(ValueError):
        export.kohya_module_name("lora_te1_", "encoder.layers.0.self_attn.q_proj")


# --------------------------------------------------------------------------------------------------
# round trip through diffusers' own kohya converter


@pytest.mark.parametrize("preset,dtype", [("cross_attn", torch.float32), ("kohya_all", torch.float16)])
def test_diffusers_loads_every_key(tiny_folder, tmp_path, preset, dtype):
    c = _trained(preset)
    tok = c["tokenizer"]
    trained_text, trained_unet = _outputs(c["unet"], c["text_encoder"], tok)
    base = build_components(seed=0)
    base_text, base_unet = _outputs(base["unet"], base["text_encoder"], tok)
    lora_effect_text = (trained_text - base_text).abs().max()
    lora_effect_unet = (trained_unet - base_unet).abs().max()
    assert lora_effect_text > 1e-2 and lora_effect_unet > 1e-2

    sd = export.lora_state_dict(c["unet"], c["text_encoder"], dtype=dtype)
    assert all(v.dtype == dtype for v in sd.values())
    names = export.lora_module_names(sd)
    unet_names = [n for n in names if n.startswith("lora_unet_")]
    te_names = [n for n in names if n.startswith("lora_te_")]
    assert len(unet_names) == len(lora.unet_lora_target_modules(base["unet"], preset))
    assert len(te_names) == 4 * base["text_encoder"].config.num_hidden_layers
    assert len(sd) == 3 * len(names)
    assert all(sd[n + ".alpha"].ndim == 0 and float(sd[n + ".alpha"]) == ALPHA for n in names)
    if preset == "kohya_all":
        proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
        assert sd[proj + ".lora_down.weight"].shape == (RANK, 32, 1, 1)
        assert sd[proj + ".lora_up.weight"].shape == (32, RANK, 1, 1)

    path = tmp_path / "my_run.safetensors"
    export.save_lora(path, sd, {"ss_network_module": "networks.lora"})

    pipe = _pipe(tiny_folder)
    records = _Records()
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers"), logging.getLogger("peft")]
    for lg in loggers:
        lg.addHandler(records)
    try:
        pipe.load_lora_weights(str(path))
    finally:
        for lg in loggers:
            lg.removeHandler(records)
    suspicious = [m for m in records.messages if re.search(r"unexpected|missing|not .*renamed|No LoRA keys", m, re.I)]
    assert not suspicious, suspicious

    # every module of the file became a peft layer in the fresh pipeline, under the same name, holding our tensors
    loaded_unet = _lora_modules_of(pipe.unet)
    loaded_te = _lora_modules_of(pipe.text_encoder)
    assert sorted(export.kohya_module_name("lora_unet", n) for n in loaded_unet) == unet_names
    assert sorted(export.kohya_module_name("lora_te", n) for n in loaded_te) == te_names
    for prefix, loaded in (("lora_unet", loaded_unet), ("lora_te", loaded_te)):
        for path_, layer in loaded.items():
            name = export.kohya_module_name(prefix, path_)
            (adapter,) = layer.lora_A.keys()
            torch.testing.assert_close(layer.lora_A[adapter].weight, sd[name + ".lora_down.weight"].float())
            torch.testing.assert_close(layer.lora_B[adapter].weight, sd[name + ".lora_up.weight"].float())
            assert layer.scaling[adapter] == pytest.approx(ALPHA / RANK)

    text, out = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    if dtype == torch.float32:
        torch.testing.assert_close(text, trained_text, rtol=0, atol=1e-5)
        torch.testing.assert_close(out, trained_unet, rtol=0, atol=1e-5)
    else:  # fp16 rounding of the LoRA weights: a small fraction of the LoRA's own effect
        assert (text - trained_text).abs().max() < 0.02 * lora_effect_text
        assert (out - trained_unet).abs().max() < 0.02 * lora_effect_unet

    # our own inverse merges the same file into plain modules and gives the same model
    fresh = build_components(seed=0)
    tensors, _ = export.load_lora(path)
    assert export.apply_kohya_lora(fresh["unet"], fresh["text_encoder"], tensors) == len(names)
    text2, out2 = _outputs(fresh["unet"], fresh["text_encoder"], tok)
    tol = 1e-5 if dtype == torch.float32 else None
    if tol:
        torch.testing.assert_close(text2, trained_text, rtol=0, atol=tol)
        torch.testing.assert_close(out2, trained_unet, rtol=0, atol=tol)
    else:
        assert (text2 - trained_text).abs().max() < 0.02 * lora_effect_text
        assert (out2 - trained_unet).abs().max() < 0.02 * lora_effect_unet


def test_apply_kohya_lora_scales_and_rejects_unknown_keys():
    c = _trained("cross_attn")
    sd = export.lora_state_dict(c["unet"], c["text_encoder"], dtype=torch.float32)
    lora.set_lora_scale(c["unet"], 0.6)
    lora.set_lora_scale(c["text_encoder"], 0.9)
    expected = _outputs(c["unet"], c["text_encoder"], c["tokenizer"])

    fresh = build_components(seed=0)
    export.apply_kohya_lora(fresh["unet"], fresh["text_encoder"], sd, unet_scale=0.6, te_scale=0.9)
    got = _outputs(fresh["unet"], fresh["text_encoder"], fresh["tokenizer"])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    # a key with no module raises (and changes nothing) instead of loading silently with no effect
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    naive = {k.replace(name, "lora_te_encoder_layers_0_self_attn_q_proj"): v for k, v in sd.items()}
    before = fresh["unet"].state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"].clone()
    with pytest.raises(ValueError, match="lora_te_encoder_layers_0_self_attn_q_proj"):
        export.apply_kohya_lora(fresh["unet"], fresh["text_encoder"], naive)
    after = fresh["unet"].state_dict()["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"]
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="match no module"):
        export.apply_kohya_lora(fresh["unet"], None, sd)


# --------------------------------------------------------------------------------------------------
# key names on SD 1.5 shapes, and A1111's conversion to the original (compvis) module names

UNET_KEY = re.compile(
    r"^lora_unet_(down_blocks_[0-2]_attentions_[01]|mid_block_attentions_0|up_blocks_[1-3]_attentions_[0-2])_"
    r"(proj_in|proj_out|transformer_blocks_0_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))$"
)
TE_KEY = re.compile(r"^lora_te_text_model_encoder_layers_([0-9]|1[01])_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")


def a1111_convert_diffusers_name_to_compvis(key: str) -> str:
    """A1111 extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis, SD 1.x branches."""
    suffix_conversion = {
        "attentions": {},
        "resnets": {
            "conv1": "in_layers_2",
            "conv2": "out_layers_3",
            "norm1": "in_layers_0",
            "norm2": "out_layers_0",
            "time_emb_proj": "emb_layers_1",
            "conv_shortcut": "skip_connection",
        },
    }

    def match(regex):
        r = re.match(regex, key)
        return None if r is None else [int(x) if re.match(r"\d+", x) else x for x in r.groups()]

    if (m := match(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := match(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if (m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = suffix_conversion.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if (m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if (m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if (m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    return key


@pytest.fixture(scope="module")
def sd15_meta():
    """SD 1.5-shaped UNet and text encoder on the meta device, every preset as its own adapter."""
    with torch.device("meta"):
        c = build_components(sd15_size=True)
    unet, te = c["unet"], c["text_encoder"]
    # A1111's module names: sd_model.model.named_modules() (-> diffusion_model_...) and
    # cond_stage_model.wrapped.named_modules() (-> transformer_text_model_...), "." -> "_"
    compvis = {}
    for key, value in unet_to_original(unet.state_dict()).items():
        if key.endswith(".weight"):
            compvis[key.removeprefix("model.").removesuffix(".weight").replace(".", "_")] = tuple(value.shape)
    for key, value in text_encoder_to_original(te.state_dict()).items():
        if key.endswith(".weight"):
            compvis[key.removeprefix("cond_stage_model.").removesuffix(".weight").replace(".", "_")] = tuple(value.shape)
    sds = {}
    for preset in lora.LORA_TARGET_PRESETS:
        with warnings.catch_warnings():  # peft warns about several adapters in one model: intended here
            warnings.simplefilter("ignore")
            lora.add_unet_lora(unet, RANK, ALPHA, preset, adapter_name=preset)
        sds[preset] = export.lora_state_dict(unet, None, adapter_name=preset)
    lora.add_text_encoder_lora(te, RANK, ALPHA)
    sds["te"] = export.lora_state_dict(None, te)
    return sds, compvis


@pytest.mark.parametrize("which,count", [("cross_attn", 64), ("attn_geglu", 144), ("kohya_all", 192), ("te", 48)])
def test_sd15_key_names_match_kohya_and_a1111(sd15_meta, which, count):
    sds, compvis = sd15_meta
    sd = sds[which]
    names = export.lora_module_names(sd)
    assert len(names) == count
    rule = TE_KEY if which == "te" else UNET_KEY
    assert [n for n in names if not rule.match(n)] == []
    assert set(sd) == {f"{n}.{p}" for n in names for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    for n in names:
        target = a1111_convert_diffusers_name_to_compvis(n)
        assert target in compvis, (n, target)
        shape = compvis[target]
        down, up = sd[n + ".lora_down.weight"], sd[n + ".lora_up.weight"]
        assert down.shape[0] == RANK and up.shape[1] == RANK
        assert (up.shape[0], down.shape[1]) == shape[:2], n
        assert down.shape[2:] == shape[2:] and up.shape[2:] == (1,) * (len(shape) - 2), n
        assert sd[n + ".alpha"].shape == ()
    if which == "te":
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
        # what a naive exporter writes on transformers 5 maps to nothing in A1111
        assert a1111_convert_diffusers_name_to_compvis("lora_te_encoder_layers_0_self_attn_q_proj") not in compvis
    if which == "cross_attn":
        assert "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in sd
    if which == "kohya_all":  # proj_in / proj_out are 1x1 convs in SD 1.5 and stay 4-D, as kohya stores them
        assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (RANK, 1280, 1, 1)


# --------------------------------------------------------------------------------------------------
# embeddings


def _embedding_rows(pipe, token, n):
    words = [token] + [f"{token}_{i}" for i in range(1, n)]
    ids = pipe.tokenizer.convert_tokens_to_ids(words)
    assert pipe.tokenizer.unk_token_id not in ids
    return pipe.text_encoder.get_input_embeddings().weight[ids]


def test_embedding_loads_in_diffusers(tiny_folder, tmp_path):
    g = torch.Generator().manual_seed(2)
    vec = torch.randn(2, 32, generator=g) * 0.4
    path = export.save_embedding(tmp_path / f"{SUBJECT}.safetensors", SUBJECT, vec, step=1200)
    assert path == tmp_path / f"{SUBJECT}.safetensors" and os.listdir(tmp_path) == [path.name]

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"]  # A1111 reads a single-tensor file
        assert f.get_tensor("emb_params").shape == (2, 32)
        assert f.metadata()["name"] == SUBJECT
    name, loaded = export.load_embedding(path)
    assert name == SUBJECT and torch.equal(loaded, vec)

    pipe = _pipe(tiny_folder)
    pipe.load_textual_inversion(str(path), token=SUBJECT)
    torch.testing.assert_close(_embedding_rows(pipe, SUBJECT, 2), vec, rtol=0, atol=0)

    # the prompt with the token: the base text encoder with the token's positions fed our vectors
    prompt = f"a photo of a {SUBJECT} person"
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids = _ids(pipe.tokenizer, converted)
    with torch.no_grad():
        got = pipe.text_encoder(ids)[0]
    new_ids = pipe.tokenizer.convert_tokens_to_ids([SUBJECT, f"{SUBJECT}_1"])
    positions = [(ids[0] == i).nonzero().item() for i in new_ids]
    assert positions[1] == positions[0] + 1

    base = build_components(seed=0)
    placeholder = _ids(base["tokenizer"], "a photo of a cat dog person")
    assert placeholder[0, : positions[0]].tolist() == ids[0, : positions[0]].tolist()

    def swap(module, inputs, output):
        output = output.clone()
        output[0, positions] = vec
        return output

    handle = base["text_encoder"].get_input_embeddings().register_forward_hook(swap)
    with torch.no_grad():
        expected = base["text_encoder"](placeholder)[0]
    handle.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_legacy_pt_embedding(tiny_folder, tmp_path):
    vec = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    path = export.save_embedding(tmp_path, STYLE, vec, legacy_pt=True, step=1500)
    assert path == tmp_path / f"{STYLE}.pt" and os.listdir(tmp_path) == [path.name]
    data = torch.load(str(path), weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265} and data["name"] == STYLE and data["step"] == 1500
    assert data["sd_checkpoint"] is None and data["sd_checkpoint_name"] is None
    assert torch.equal(data["string_to_param"]["*"], vec)
    assert export.load_embedding(path)[0] == STYLE and torch.equal(export.load_embedding(path)[1], vec)

    pipe = _pipe(tiny_folder)
    pipe.load_textual_inversion(str(path))  # token taken from the file's "name"
    torch.testing.assert_close(_embedding_rows(pipe, STYLE, 1), vec, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# metadata, hashes, atomic writes


def _metadata(sd, tmp_path, **over):
    kwargs = dict(
        output_name="my_run",
        rank=RANK,
        alpha=ALPHA,
        unet_targets_preset="cross_attn",
        train_text_encoder=True,
        tokens={"source": SUBJECT, "reference": STYLE},
        base_model_name=str(tmp_path / "models" / "v1-5-pruned-emaonly.safetensors"),
        base_model_hash="ab" * 32,
        training={
            "learning_rate": 1e-4,
            "unet_lr": 1e-4,
            "text_encoder_lr": 1e-5,
            "max_train_steps": 1500,
            "seed": 42,
            "resolution": 512,
            "mixed_precision": "fp16",
            "network_args": {"dataset": str(tmp_path / "data" / "me")},
            "output_dir": str(tmp_path / "out"),
            "datasets": [str(Path.home() / "photos"), "relative/dir"],
        },
        state_dict=sd,
        date="2024-01-02T03:04:05+00:00",
    )
    kwargs.update(over)
    return export.build_metadata(**kwargs)


REQUIRED = [
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
    "ss_output_name", "ss_tag_frequency", "ss_training_comment", "ss_sd_model_name", "ss_new_sd_model_hash",
    "sshs_model_hash", "sshs_legacy_hash", "modelspec.sai_model_spec", "modelspec.architecture",
    "modelspec.implementation", "modelspec.title", "modelspec.resolution", "modelspec.date",
    "modelspec.trigger_phrase", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_max_train_steps",
    "ss_seed", "ss_resolution", "ss_network_args", "ss_mixed_precision",
]


def test_metadata(tmp_path):
    c = _trained("cross_attn")
    sd = export.lora_state_dict(c["unet"], c["text_encoder"])
    meta = _metadata(sd, tmp_path)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert [k for k in REQUIRED if k not in meta] == []
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.resolution"] == "512x512"
    assert meta["ss_sd_model_name"] == "v1-5-pruned-emaonly.safetensors"
    assert json.loads(meta["ss_tag_frequency"]) == {"magicapture": {SUBJECT: 1, STYLE: 1}}
    assert SUBJECT in meta["ss_training_comment"] and STYLE in meta["ss_training_comment"]
    assert meta["modelspec.trigger_phrase"] == meta["ss_training_comment"]
    assert meta["ss_resolution"] == "(512, 512)" and meta["ss_max_train_steps"] == "1500"
    assert json.loads(meta["ss_network_args"])["unet_targets"] == "cross_attn"
    # the trainer's way of passing settings: two phases' steps, the prompt inside `training`
    two_phase = {"phase1_steps": 1200, "phase2_steps": 1500, "composed_prompt": "a [V1] in [V2]"}
    meta2 = _metadata(sd, tmp_path, training=two_phase)
    assert meta2["ss_max_train_steps"] == "2700" and meta2["ss_phase1_steps"] == "1200"
    assert meta2["ss_training_comment"] == meta2["modelspec.trigger_phrase"] == "a [V1] in [V2]"
    assert meta2["ss_learning_rate"] == "None" and [k for k in REQUIRED if k not in meta2] == []
    machine = [str(tmp_path), str(Path.home())] + ([os.getcwd()] if os.getcwd() != "/" else [])
    leaks = {k: v for k, v in meta.items() if any(p in v for p in machine)}
    assert leaks == {}

    # hashes: stable, kohya's definitions, and the file's own (A1111 recomputes it from the file)
    assert _metadata(sd, tmp_path) == meta
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sshs_model_hash"])
    assert meta["sshs_legacy_hash"] == "e3b0c442"  # sha256(b"")[:8]: the file is under 1 MiB
    sd32 = export.lora_state_dict(c["unet"], c["text_encoder"], dtype=torch.float32)
    assert _metadata(sd32, tmp_path)["sshs_model_hash"] != meta["sshs_model_hash"]

    path = tmp_path / "my_run.safetensors"
    export.save_lora(path, sd, meta)
    assert sorted(os.listdir(tmp_path)) == ["my_run.safetensors"]  # no .tmp left
    tensors, meta_back = export.load_lora(path)
    assert meta_back == meta and set(tensors) == set(sd)
    assert export.safetensors_file_hash(path) == meta["sshs_model_hash"]

    # bundled embeddings (A1111, ComfyUI): kohya's name "bundle_emb.<token>.string_to_param.*" (ComfyUI's
    # sd1_clip.py looks for exactly this; A1111 takes a bundle's one tensor); the hash is recomputed
    bundled = tmp_path / "bundled.safetensors"
    export.save_lora(bundled, sd, meta, bundle_embeddings={SUBJECT: torch.randn(2, 32), STYLE: torch.randn(32)})
    tensors, meta_b = export.load_lora(bundled)
    assert sorted(k for k in tensors if k.startswith("bundle_emb.")) == [
        f"bundle_emb.{SUBJECT}.string_to_param.*", f"bundle_emb.{STYLE}.string_to_param.*"]
    assert tensors[f"bundle_emb.{SUBJECT}.string_to_param.*"].shape == (2, 32)
    assert tensors[f"bundle_emb.{STYLE}.string_to_param.*"].shape == (1, 32)
    assert meta_b["sshs_model_hash"] == export.safetensors_file_hash(bundled) != meta["sshs_model_hash"]
    fresh = build_components(seed=0)
    assert export.apply_kohya_lora(fresh["unet"], fresh["text_encoder"], tensors) == len(export.lora_module_names(sd))


def test_save_is_atomic(tmp_path, monkeypatch):
    import errno

    from library.files.atomic import OutputWriteError

    path = tmp_path / "run.safetensors"
    sd = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(3, 2),
          "lora_unet_x.alpha": torch.tensor(2.0)}
    export.save_lora(path, sd, {"ss_network_module": "networks.lora"})
    before = path.read_bytes()

    real_write_bytes = Path.write_bytes

    def disk_full(self, data):  # half the file reaches the disk, then the disk is full
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OutputWriteError, match=f"^cannot write run.safetensors in {tmp_path}: No space left on device; "):
        export.save_lora(path, {k: v * 2 for k, v in sd.items()}, {"ss_network_module": "networks.lora"})
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]
    with pytest.raises(TypeError):
        export.save_lora(tmp_path / "bad.safetensors", sd, {"ss_network_dim": 4})


def test_bundled_embeddings_are_a1111_only(tiny_folder, tmp_path):
    """Why bundling is opt-in: diffusers 0.42.1's kohya loader refuses a LoRA with bundle_emb.* tensors."""
    c = _trained("cross_attn")
    sd = export.lora_state_dict(c["unet"], c["text_encoder"])
    path = tmp_path / "bundled.safetensors"
    export.save_lora(path, sd, {}, bundle_embeddings={SUBJECT: torch.randn(2, 32)})
    with pytest.raises(ValueError, match="lora"):
        _pipe(tiny_folder).load_lora_weights(str(path))

# --------------------------------------------------------------------------------------------------
# after a real training run


def test_trained_files_reproduce_the_trained_model(tiny_model, prepared_data, tmp_path):
    """After a real training run, the exported files reproduce the trained model in a fresh diffusers pipeline.

    diffusers' own kohya and A1111 converters load them; the UNet and text-encoder outputs on the composed
    prompt must equal the trained model's, and every module of the file must have become a LoRA layer.
    """
    folder, _ = tiny_model
    source, reference = prepared_data
    out = tmp_path / "out"
    cfg = load_config("configs/test_tiny.toml", [
        f'model.pretrained="{folder}"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
        f'output.dir="{out}"', 'output.save_precision="fp32"', "sample.every=0",
        "phase2.lr_unet=1e-2", "phase2.lr_text_encoder=1e-2",  # a few steps must move the LoRA visibly
        "output.bundle_embeddings=true",  # the LoRA stays loadable everywhere; A1111's bundle is its own file
    ])
    trainer = MagiCaptureTrainer(cfg)
    trainer.run()
    prompt = "a photo of a mcv1 person in the style of mcv2"
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    with torch.no_grad():
        ids = trainer.prompts.ids(prompt)[None]
        trained_text = trainer.text_encoder(ids)[0]
        trained_unet = trainer.unet(latents, t, trained_text).sample

    pipe = _pipe(folder)
    with torch.no_grad():
        base_unet = pipe.unet(latents, t, trained_text).sample
    records = _Records(logging.DEBUG)
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).addHandler(records)
    try:
        pipe.load_lora_weights(str(out / "magicapture.safetensors"))
        pipe.load_textual_inversion(str(out / "mcv1.safetensors"), token="mcv1")
        pipe.load_textual_inversion(str(out / "mcv2.safetensors"), token="mcv2")
    finally:
        for name in ("diffusers", "transformers", "peft"):
            logging.getLogger(name).removeHandler(records)
    assert not [m for m in records.messages if "unexpected" in m.lower() or "missing" in m.lower()], records.messages

    tensors, _ = export.load_lora(out / "magicapture.safetensors")
    names = export.lora_module_names(tensors)
    assert sorted(export.kohya_module_name("lora_unet", n) for n in _lora_modules_of(pipe.unet)) == [n for n in names if n.startswith("lora_unet_")]
    assert sorted(export.kohya_module_name("lora_te", n) for n in _lora_modules_of(pipe.text_encoder)) == [n for n in names if n.startswith("lora_te_")]

    with torch.no_grad():
        pipe_ids = pipe.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
        assert torch.equal(pipe_ids, ids)  # the tokens got the same ids: mcv1 -> 49408, mcv2 -> 49409
        text = pipe.text_encoder(pipe_ids)[0]
        out_unet = pipe.unet(latents, t, text).sample
    torch.testing.assert_close(text, trained_text, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_unet, trained_unet, rtol=0, atol=1e-5)
    # and the LoRA is not a no-op: the UNet without it answers differently to the same conditioning
    assert (base_unet - trained_unet).abs().max() > 1e-4

    # A1111's one file: the same LoRA plus kohya's bundle names; diffusers takes it with the README's one line
    from safetensors.torch import load_file

    bundle = load_file(str(out / "magicapture_a1111.safetensors"))
    assert sorted(k for k in bundle if k.startswith("bundle_emb.")) == [
        "bundle_emb.mcv1.string_to_param.*", "bundle_emb.mcv2.string_to_param.*"]
    assert torch.equal(bundle["bundle_emb.mcv1.string_to_param.*"], load_file(str(out / "mcv1.safetensors"))["emb_params"])
    plain = load_file(str(out / "magicapture.safetensors"))
    assert {k: v for k, v in bundle.items() if not k.startswith("bundle_emb.")}.keys() == plain.keys()
    with pytest.raises(ValueError, match="lora"):  # why the bundle cannot be the LoRA itself
        _pipe(folder).load_lora_weights(str(out / "magicapture_a1111.safetensors"))
    again = _pipe(folder)
    again.load_lora_weights({k: v for k, v in load_file(str(out / "magicapture_a1111.safetensors")).items()
                             if not k.startswith("bundle_emb.")})
    assert len(_lora_modules_of(again.unet)) == len(_lora_modules_of(pipe.unet))


def test_sd1_bundles_old_and_new_names_are_read(tmp_path):
    """generate.py reads kohya's bundle name ("string_to_param.*", written now) and this project's old one."""
    from safetensors.torch import save_file

    from library.generation.trained_files import _bundled_tokens, read_embedding

    new, old = torch.randn(2, 32), torch.randn(1, 32)
    path = tmp_path / "run.safetensors"
    save_file({"bundle_emb.mcv1.string_to_param.*": new, "bundle_emb.mcv2.emb_params": old,
               "bundle_emb.mcv3.clip_l": old.clone()}, str(path))  # mcv3: half an SDXL bundle, not an embedding
    assert _bundled_tokens(path) == {"mcv1", "mcv2"}
    assert torch.equal(read_embedding("mcv1", None, path)["emb_params"], new)
    assert torch.equal(read_embedding("mcv2", None, path)["emb_params"], old)
