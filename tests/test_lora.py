"""LoRA targets and peft layers on the tiny SD 1.x-shaped model (testkit.tiny)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from library.training import lora
from testkit.tiny import build_components

N_TRANSFORMERS = 16  # SD 1.x: down 3 x 2, mid 1, up 3 x 3 Transformer2DModel, one transformer block each


@pytest.fixture(scope="module")
def base():
    return build_components(seed=0)


def _fresh():
    return build_components(seed=0)


def _unet_out(unet, text_hidden):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 32, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=text_hidden.expand(2, -1, -1)).sample


def _te_out(c, prompt="a photo of a person"):
    ids = c["tokenizer"]([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return c["text_encoder"](ids)[0]


def _suffix_counts(names):
    out = {}
    for n in names:
        key = n.split(".transformer_blocks.0.")[-1] if ".transformer_blocks." in n else n.rsplit(".", 1)[-1]
        out[key] = out.get(key, 0) + 1
    return out


def test_cross_attn_preset(base):
    names = lora.unet_lora_target_modules(base["unet"], "cross_attn")
    assert len(names) == 4 * N_TRANSFORMERS
    assert _suffix_counts(names) == {f"attn2.{p}": N_TRANSFORMERS for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k" in names
    modules = dict(base["unet"].named_modules())
    assert all(isinstance(modules[n], nn.Linear) for n in names)


def test_attn_geglu_preset(base):
    names = lora.unet_lora_target_modules(base["unet"], "attn_geglu")
    assert len(names) == 9 * N_TRANSFORMERS
    expected = {f"{a}.{p}": N_TRANSFORMERS for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
    expected["ff.net.0.proj"] = N_TRANSFORMERS
    assert _suffix_counts(names) == expected
    assert set(lora.unet_lora_target_modules(base["unet"], "cross_attn")) < set(names)


def test_kohya_all_preset(base):
    names = lora.unet_lora_target_modules(base["unet"], "kohya_all")
    assert len(names) == 12 * N_TRANSFORMERS
    counts = _suffix_counts(names)
    for part in ("proj_in", "proj_out", "ff.net.2", "ff.net.0.proj", "attn1.to_q", "attn2.to_out.0"):
        assert counts[part] == N_TRANSFORMERS, part
    assert set(lora.unet_lora_target_modules(base["unet"], "attn_geglu")) < set(names)
    modules = dict(base["unet"].named_modules())
    # SD 1.x (use_linear_projection=False): proj_in / proj_out are 1x1 convolutions
    assert isinstance(modules["down_blocks.0.attentions.0.proj_in"], nn.Conv2d)
    # nothing outside the transformer models (resnets, time embedding, up/down samplers)
    assert not any(".resnets." in n or "sampler" in n or n.startswith("time_") for n in names)


def test_unknown_preset(base):
    with pytest.raises(ValueError) as err:
        lora.unet_lora_target_modules(base["unet"], "everything")
    msg = str(err.value)
    assert "everything" in msg and all(p in msg for p in lora.LORA_TARGET_PRESETS)


def test_text_encoder_targets(base):
    names = lora.text_encoder_lora_target_modules(base["text_encoder"])
    n_layers = base["text_encoder"].config.num_hidden_layers
    assert len(names) == 4 * n_layers
    assert "encoder.layers.0.self_attn.q_proj" in names  # transformers 5: no text_model level
    assert {n.rsplit(".", 1)[-1] for n in names} == set(lora.TEXT_ENCODER_TARGETS)


@pytest.mark.parametrize("preset", ["cross_attn", "kohya_all"])
def test_add_lora_trainable_and_identity_at_init(base, preset):
    ref_text = _te_out(base)
    ref_unet = _unet_out(base["unet"], ref_text)

    c = _fresh()
    lora.add_unet_lora(c["unet"], rank=4, alpha=2.0, preset=preset)
    lora.add_text_encoder_lora(c["text_encoder"], rank=4, alpha=2.0)

    n_unet = len(lora.unet_lora_target_modules(base["unet"], preset))
    assert len(lora.lora_layers(c["unet"])) == n_unet
    assert len(lora.lora_layers(c["text_encoder"])) == 4 * c["text_encoder"].config.num_hidden_layers

    for model in (c["unet"], c["text_encoder"]):
        params = lora.lora_parameters(model)
        assert len(params) == 2 * len(lora.lora_layers(model))
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in params}  # only LoRA parameters train
        for _, layer in lora.lora_layers(model):
            assert layer.r["default"] == 4 and layer.scaling["default"] == pytest.approx(0.5)
            assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # gaussian init: B = 0
            assert torch.count_nonzero(layer.lora_A["default"].weight) > 0

    conv = [layer for _, layer in lora.lora_layers(c["unet"]) if isinstance(layer.get_base_layer(), nn.Conv2d)]
    assert len(conv) == (2 * N_TRANSFORMERS if preset == "kohya_all" else 0)

    text = _te_out(c)
    torch.testing.assert_close(text, ref_text, rtol=0, atol=0)
    torch.testing.assert_close(_unet_out(c["unet"], text), ref_unet, rtol=0, atol=0)

    # a gradient reaches the LoRA (A and B) through the UNet
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 32, 32, generator=g)
    c["unet"](x, torch.tensor([10]), encoder_hidden_states=text[:1]).sample.square().mean().backward()
    grads = [p.grad for p in lora.lora_parameters(c["unet"])]
    assert all(gr is not None for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)


def test_set_lora_scale(base):
    ref_text = _te_out(base)
    c = _fresh()
    lora.add_text_encoder_lora(c["text_encoder"], rank=2, alpha=2.0)
    g = torch.Generator().manual_seed(5)
    for _, layer in lora.lora_layers(c["text_encoder"]):
        w = layer.lora_B["default"].weight
        w.data = torch.randn(w.shape, generator=g)
    assert not torch.allclose(_te_out(c), ref_text, atol=1e-3)
    assert lora.set_lora_scale(c["text_encoder"], 0.0) == 8
    torch.testing.assert_close(_te_out(c), ref_text)
    lora.set_lora_scale(c["text_encoder"], 1.0)
    assert not torch.allclose(_te_out(c), ref_text, atol=1e-3)
