"""bench/dit_budget.py: the step budget's formulas pinned on numbers worked by hand (a toy model small enough
to add up on paper), the parameter grouping on a hand-built module, and the shipped configs read as runs."""

from __future__ import annotations

import pytest
from torch import nn

from bench import dit_budget as db

# A toy Z-Image-like model: 64 px -> (64 / 16)^2 = 16 image tokens, 8 text tokens, joint 24; 2 blocks of
# d 4, f 8, 2 heads of 2; Linear params 100 on the joint tokens and 10 per sample; LoRA (rank 1) 5 on the
# joint tokens; a text encoder of one layer with 50 Linear params; a float32 VAE of 10 params.
TOY = db.Model(
    family="zimage", dit_params=200, te_params=100, vae_params=10, vae_fp32=True,
    dit_linear={"joint": 100, "sample": 10}, lora_linear={"joint": 5}, te_linear=50,
    blocks=[db.BlockGroup("zimage", 2, "joint", d=4, f=8, heads=2, head_dim=2, attn_tokens="joint")],
    te_block=db.BlockGroup("qwen3", 1, "text", d=4, f=8, heads=2, head_dim=2, attn_tokens="text"),
    vae_decode={"flops": 1000.0, "saved_bytes": 64.0})
RUN = db.Run("toy", batch=2, grad_accum=1, checkpointing=False, rank=4, resolution=64, steps1=3, steps2=5,
             sample_every=0, sample_steps=0, sample_n=0, cfg=1.0)
KW = dict(te_tokens=8, text_tokens=8)


def test_per_token_and_per_parameter_bytes_by_hand():
    assert db.block_activation_elems("zimage", 4, 8) == 20 * 4 + 3 * 8 == 104
    assert db.block_activation_elems("single_stream", 4, 8) == 13 * 4 + 4 * 8 == 84
    assert db.block_activation_elems("double_stream", 4, 8) == 16 * 4 + 3 * 8 == 88
    # 1000 LoRA params: 4 (fp32) + 4 (grad) + 2 (two uint8 moments) bytes each, + 2 x 4 bytes per 256 (4 blocks)
    assert db.trainable_bytes(1000) == 10_000 + 32
    # the capture, one layer and sample: H 2, d_head 4, 16 image tokens, 20 in the sequence, K 2
    assert db.capture_bytes(2, 4, 16, 20, k=2) == {
        "saved": 4 * 2 * 16 + 4 * 2 * 16 * 2,  # float32 LSE + exp's output: 384
        "held": 4 * 2 * 16 * 2,  # the maps [H, N, K] float32: 256
        "transient": 2 * 2 * 36 * 4 + 2 * 1280 + 2 * 2560}  # q/k grads + 2 chunks under 16 MiB: 8256


def test_step_flops_by_hand():
    # per sample: Linear 4 x (100 x 24 + 10 x 1) = 9640; attention 4 x 2 blocks x 24^2 x 4 = 18432, x 3.5
    # (forward + flash backward) = 64512; text encoder 4 x 50 x 8 = 1600 and its attention 4 x 8^2 x 4 x 3.5
    # = 3584; phase 2 adds the LoRA 6 x 4 x 5 x 24 = 2880 and the decode 3 x 1000; x batch 2
    assert db.step_flops(TOY, RUN, 1, **KW) == 2 * (9640 + 64512 + 1600 + 3584) == 158_672
    assert db.step_flops(TOY, RUN, 2, **KW) == 2 * (9640 + 64512 + 1600 + 3584 + 2880 + 3000) == 170_432
    # checkpointed: the frozen path is 6 P N and attention 4.5x (the forward again)
    ck = db.Run(**{**RUN.__dict__, "checkpointing": True})
    assert db.step_flops(TOY, ck, 1, **KW) == 2 * (6 * 2410 + 18432 * 4.5 + 1600 + 3584)
    assert db.seconds(989.4e12 * 0.4) == pytest.approx(1.0)
    assert db.schedule_seconds(TOY, RUN, mfu=0.4, **KW) == pytest.approx(
        (3 * 158_672 + 5 * 170_432) / (989.4e12 * 0.4))


def test_step_memory_by_hand():
    mem = db.step_memory(TOY, RUN, **KW)
    assert mem["weights"] == 2 * (200 + 100) + 4 * 10  # bf16 frozen + the float32 VAE
    assert mem["lora_and_adam8bit"] == db.trainable_bytes(4 * 5) == 208
    assert mem["transformer_activations"] == 2 * 2 * 24 * 104 * 2  # micro-batch x blocks x tokens x elems x 2 B
    assert mem["text_encoder_activations"] == 2 * 1 * 8 * 104 * 2
    # capture: H 2, d_head 2, N 16, S 24: saved 384 + held 256 per layer, 2 layers, + transient 8000
    assert mem["capture"] == 2 * (2 * (384 + 256) + (2 * 2 * 40 * 2 + 2 * 768 + 2 * 3072))
    assert mem["identity_decode"] == 2 * 64
    assert mem["peak"] == 640 + 208 + 19_968 + 3_328 + 18_560 + 128
    # checkpointing keeps the block inputs (2 x 24 x 4 x 2 B) and one block; the capture keeps its maps only
    ck = db.step_memory(TOY, db.Run(**{**RUN.__dict__, "checkpointing": True}), **KW)
    assert ck["transformer_activations"] == 2 * (2 * 24 * 4 * 2 + 24 * 104 * 2)
    assert ck["capture"] == 2 * (2 * 256 + 8000)


def test_parameters_are_grouped_by_the_tokens_they_see():
    toy = nn.Module()
    toy.layers = nn.ModuleList([nn.Module()])
    toy.layers[0].attention = nn.Module()
    toy.layers[0].attention.to_q = nn.Linear(4, 4, bias=False)  # 16 params, joint tokens, a LoRA target
    toy.layers[0].adaLN_modulation = nn.Sequential(nn.Linear(2, 8))  # 16 + 8: one token per sample
    toy.noise_refiner = nn.Sequential(nn.Linear(4, 3))  # 12 + 3: image tokens
    rules = db.TOKEN_GROUPS["zimage"]
    assert db.group_linears(toy, rules) == {"joint": 16, "sample": 24, "image": 15}
    assert db.group_linears(toy, rules, db.LORA_TARGETS["zimage"]) == {"joint": 4 + 4}


def test_shipped_configs_are_read_as_runs():
    default = db.Run.from_toml(db.ROOT / "configs" / "magicapture_zimage.toml")
    small = db.Run.from_toml(db.ROOT / "configs" / "magicapture_klein_24gb.toml")
    assert (default.micro, default.checkpointing, default.steps1, default.steps2) == (4, True, 1200, 1500)
    assert (small.micro, small.grad_accum, small.checkpointing, small.rank) == (1, 4, True, 16)


@pytest.mark.slow  # builds the real-size Klein 4B and Qwen3-4B on the meta device (a few seconds, no memory)
def test_counts_on_meta_match_the_shipped_configs_and_a_hand_count_of_the_lora():
    m = db.count_family("klein4b", id_window=64)
    assert (m.dit_params, m.te_params) == (3_875_544_576, 4_022_468_096)
    # LoRA rank 1: 5 double blocks x 8 projections 3072 -> 3072 (in + out = 6144) on their stream's tokens,
    # 20 single blocks x (to_qkv_mlp_proj 3072 -> 27648, to_out 12288 -> 3072) on the joint tokens
    assert m.lora_linear == {"image": 5 * 4 * 6144, "text": 5 * 4 * 6144, "joint": 20 * (30720 + 15360)}
    assert [(b.kind, b.count, b.tokens, b.d, b.f) for b in m.blocks] == [
        ("double_stream", 5, "image", 3072, 9216), ("double_stream", 5, "text", 3072, 9216),
        ("single_stream", 20, "joint", 3072, 9216)]
    assert m.vae_decode["flops"] > 0 and not m.vae_fp32  # FLUX.2's VAE has no force_upcast
