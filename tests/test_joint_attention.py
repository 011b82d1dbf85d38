"""library/training/joint_attention.py and joint_lse.py: the special tokens' maps on joint attention
(Z-Image, FLUX.2 Klein), against a materialised full attention recorded from diffusers' own processors."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import diffusers.models.transformers.transformer_flux2 as flux2_module
import diffusers.models.transformers.transformer_z_image as z_module
from library.training.joint_attention import (
    JointAttentionMapStore,
    install_joint_attention_capture,
    remove_joint_attention_capture,
)
from library.training.joint_lse import chunked_logsumexp, float32_matmul_t
from library.training.losses import attention_refocus_loss

B = 2
Z_LATENT = (8, 12)  # patch 2 -> a 4 x 6 grid: 24 image tokens, padded to 32 (the caption starts at 32)
Z_GRID = (4, 6)
Z_CAPS = (5, 40)  # padded to 32 and 64 tokens: the batch is padded to 96 and masked
Z_POSITIONS = torch.tensor([[1, 4], [38, -1]])
Z_LAYERS = ["layers.0", "layers.1"]
K_GRID = (3, 4)
K_TEXT = 6
K_POSITIONS = torch.tensor([[0, 5], [2, -1]])
K_LAYERS = ["transformer_blocks.0", "single_transformer_blocks.0"]


# --- tiny models (diffusers 0.42.1 classes, small configs, fixed seeds) ---------------------------------
def _z_image():
    torch.manual_seed(0)
    return z_module.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[128, 32, 32],
    )


def _z_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(4, 1, *Z_LATENT, generator=g) for _ in range(B)]
    caps = [torch.randn(n, 32, generator=g) for n in Z_CAPS]
    return dict(x=x, t=torch.tensor([0.3, 0.8]), cap_feats=caps)


def _klein():
    torch.manual_seed(0)
    return flux2_module.Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )


def _k_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = K_GRID
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(K_TEXT))
    return dict(hidden_states=torch.randn(B, h * w, 8, generator=g), encoder_hidden_states=torch.randn(B, K_TEXT, 24, generator=g),
                timestep=torch.tensor([0.4, 0.9]), img_ids=img_ids, txt_ids=txt_ids)


FAMILIES = {
    # model, inputs, capture layers, grid, positions, module whose dispatch_attention_fn the processors call,
    # and by hand, in each capture layer's joint sequence: (first image token, first text token, text length).
    # Z-Image: [24 image + 8 pad, caption padded to 64 (the longer one)]; Klein: [6 text, 12 image]
    "zimage": (_z_image, _z_inputs, Z_LAYERS, Z_GRID, Z_POSITIONS, z_module, [(0, 32, 64), (0, 32, 64)]),
    "klein": (_klein, _k_inputs, K_LAYERS, K_GRID, K_POSITIONS, flux2_module, [(K_TEXT, 0, K_TEXT)] * 2),
}


@contextlib.contextmanager
def _recorded_attention(module):
    """Record (query, key, mask) of every dispatch_attention_fn call of the diffusers processors."""
    calls = []
    original = module.dispatch_attention_fn

    def record(query, key, value, attn_mask=None, **kwargs):
        calls.append((query, key, attn_mask))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    module.dispatch_attention_fn = record
    try:
        yield calls
    finally:
        module.dispatch_attention_fn = original


def _reference_maps(call, starts, grid, positions, normalisation):
    """The materialised attention: softmax over all keys (or over the text segment), the image rows and the
    special tokens' columns -> [B, H, K, h, w]."""
    query, key, mask = call
    q, k = query.double().transpose(1, 2), key.double().transpose(1, 2)  # [B, H, S, d]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, S, S]
    if mask is not None:
        mask = mask if mask.dim() == 4 else mask[:, None, None, :]
        logits = logits.masked_fill(~mask, float("-inf"))
    img0, txt0, n_txt = starts
    n = grid[0] * grid[1]
    if normalisation == "text":
        logits = logits[..., txt0:txt0 + n_txt]
        col = positions.clamp(min=0)
    else:
        col = txt0 + positions.clamp(min=0)
    probs = logits.softmax(-1)[:, :, img0:img0 + n]  # [B, H, N, keys]
    out = torch.stack([probs[b][..., col[b]] for b in range(B)]) * (positions >= 0).view(B, 1, 1, -1)
    return out.permute(0, 1, 3, 2).reshape(B, q.shape[1], -1, *grid)


# --- the chunked log-sum-exp ---------------------------------------------------------------------------
def test_chunked_logsumexp_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(2, 1, 1, 9, dtype=torch.float64)
    bias[1, ..., 6:] = float("-inf")  # sample 1's last three keys masked
    # 200 bytes: one head at a time (a head's float32 keys and gradient: 2 x 4 x 2 x 9 x 4 = 576 bytes), and
    # 200 // (4 x 2 x 1 x 9) = 2 query rows per chunk (7 rows: 4 chunks, the last of one row)
    got = chunked_logsumexp(q, k, 0.5, bias, chunk_bytes=200)
    expect = torch.logsumexp(q @ k.transpose(-1, -2) * 0.5 + bias, dim=-1)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    # by hand: one query, two keys: log(e^1 + e^2) with q.k = 2 and 4, scale 0.5
    one = chunked_logsumexp(torch.tensor([[[[2.0, 0.0]]]]), torch.tensor([[[[1.0, 5.0], [2.0, -1.0]]]]), 0.5)
    assert one.item() == pytest.approx(math.log(math.exp(1) + math.exp(2)), abs=1e-6)
    assert torch.autograd.gradcheck(lambda a, b: chunked_logsumexp(a, b, 0.5, bias, chunk_bytes=200), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: chunked_logsumexp(a, b, 0.5, bias), (q, k))  # one chunk
    # bf16 inputs: float32 LSE of the upcast inputs, the bf16 tensors saved (no float32 copies kept)
    q16, k16 = q.detach().bfloat16().requires_grad_(True), k.detach().bfloat16().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        lse16 = chunked_logsumexp(q16, k16, 0.5, bias, chunk_bytes=200)
    assert lse16.dtype == torch.float32 and saved[:2] == [torch.bfloat16, torch.bfloat16]
    expect16 = torch.logsumexp(q16.float() @ k16.float().transpose(-1, -2) * 0.5 + bias.float(), dim=-1)
    torch.testing.assert_close(lse16, expect16, rtol=0, atol=1e-5)
    lse16.sum().backward()
    assert q16.grad.dtype == torch.bfloat16 and k16.grad.dtype == torch.bfloat16


def test_float32_matmul_matches_upcast_autograd_in_bf16():
    """bf16 inputs: the product and the gradients autograd gives through a.float() @ b.float().mT, but the
    float32 copies are not what is saved (a and b are)."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 5, 4, generator=g).bfloat16().requires_grad_(True)
    b = torch.randn(2, 3, 4, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(2, 5, 3, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = float32_matmul_t(a, b)
    assert out.dtype == torch.float32 and saved == [torch.bfloat16, torch.bfloat16]
    (out * w).sum().backward()
    got = (a.grad.clone(), b.grad.clone())
    a.grad = b.grad = None
    expect = a.float() @ b.float().transpose(-1, -2)
    (expect * w).sum().backward()
    assert torch.equal(out, expect) and torch.equal(got[0], a.grad) and torch.equal(got[1], b.grad)
    a64 = torch.randn(1, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    b64 = torch.randn(1, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(float32_matmul_t, (a64, b64))


# --- the maps against a materialised attention ---------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("normalisation", ["joint", "text"])
def test_maps_match_materialised_attention_and_output_unchanged(family, normalisation):
    build, inputs, layers, grid, positions, module, starts = FAMILIES[family]
    model = build().eval()
    with torch.no_grad(), _recorded_attention(module) as calls:
        plain = model(**inputs(), return_dict=False)[0]
    store = JointAttentionMapStore()
    install_joint_attention_capture(model, store, layers, normalisation=normalisation)
    store.set_token_positions(positions, grid=grid)
    with torch.no_grad():
        captured = model(**inputs(), return_dict=False)[0]
    for a, b in zip(plain if isinstance(plain, list) else [plain], captured if isinstance(captured, list) else [captured]):
        assert torch.equal(a, b)  # the capture leaves the attention's output bit for bit
    assert len(calls) == {"zimage": 4, "klein": 2}[family]  # Z-Image: its two refiners first, then the layers
    joint_calls = calls[-len(layers):]
    maps = store.layer_maps()
    for layer, call, start in zip(layers, joint_calls, starts):
        expect = _reference_maps(call, start, grid, positions, normalisation)
        assert maps[layer].shape == expect.shape and maps[layer].dtype == torch.float32
        torch.testing.assert_close(maps[layer].double(), expect, rtol=0, atol=1e-5)
        assert expect[0, :, 0].abs().sum() > 0 and (maps[layer][1, :, 1] == 0).all()  # absent token: zero map
    assert store.maps().shape == (B, positions.shape[1], len(layers) * 2, *grid)
    remove_joint_attention_capture(model)
    with torch.no_grad():
        assert torch.equal(torch.stack(list(model(**inputs(), return_dict=False)[0])), torch.stack(list(plain)))


def test_text_normalisation_sums_to_one_over_the_text():
    """Every text position captured at once: the "text" maps of each image query sum to 1 over the text
    keys (Klein's 6), the "joint" ones to less (the image keys take the rest)."""
    model = _klein().eval()
    everything = torch.arange(K_TEXT).repeat(B, 1)
    sums = {}
    for normalisation in ("text", "joint"):
        store = JointAttentionMapStore()
        install_joint_attention_capture(model, store, K_LAYERS, normalisation=normalisation)
        store.set_token_positions(everything, grid=K_GRID)
        with torch.no_grad():
            model(**_k_inputs())
        sums[normalisation] = store.maps().sum(dim=1)  # [B, M, h, w]
    torch.testing.assert_close(sums["text"], torch.ones_like(sums["text"]), rtol=0, atol=1e-5)
    assert (sums["joint"] < 1 - 1e-3).all()


# --- gradients -----------------------------------------------------------------------------------------
LORA_TARGETS = {"zimage": ["to_q", "to_k", "to_v"], "klein": ["to_q", "to_k", "add_k_proj", "to_qkv_mlp_proj"]}


def _with_lora(family):
    import peft

    model = FAMILIES[family][0]()
    model.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=LORA_TARGETS[family]))
    g = torch.Generator().manual_seed(1)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            if "lora_B" in name:  # non-zero, so that gradients reach lora_A too
                p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
            p.requires_grad_(True)
    return model.train()


def _refocus(maps, grid):
    mask = torch.zeros(B, 1, 2 * grid[0], 2 * grid[1])
    mask[:, :, 1:4, 2:6] = 1.0
    return (attention_refocus_loss(maps[:, 0], mask) + attention_refocus_loss(maps[:, 1], 1 - mask)).mean()


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("normalisation", ["joint", "text"])
def test_refocus_gradient_reaches_lora_under_checkpointing(family, normalisation):
    """The refocusing loss alone: its LoRA gradients from the capture (with and without gradient
    checkpointing, the store cleared before backward) equal those of the materialised attention."""
    _, inputs, layers, grid, positions, module, starts = FAMILIES[family]
    model = _with_lora(family)
    with _recorded_attention(module) as calls:
        model(**inputs())
    assert len(calls) >= len(layers)
    expect = torch.cat([_reference_maps(c, s, grid, positions, normalisation).transpose(1, 2)
                        for c, s in zip(calls[-len(layers):], starts)], dim=2).float()
    _refocus(expect, grid).backward()
    reference = _lora_grads(model)
    assert reference and all(g.abs().sum() > 0 for n, g in reference.items() if f"{layers[0]}." in n)

    store = JointAttentionMapStore()
    install_joint_attention_capture(model, store, layers, normalisation=normalisation)
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.enable_gradient_checkpointing() if checkpointing else model.disable_gradient_checkpointing()
        store.set_token_positions(positions, grid=grid)
        model(**inputs())
        maps = store.maps()
        assert maps.requires_grad
        loss = _refocus(maps, grid)
        store.clear()  # the checkpoint recomputation must replay the forward's capture on its own
        loss.backward()
        got = _lora_grads(model)
        assert got.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)


# --- errors --------------------------------------------------------------------------------------------
def test_bad_layers_grid_and_positions():
    z = _z_image()
    store = JointAttentionMapStore()
    with pytest.raises(ValueError, match="noise_refiner.0.*not a joint attention"):
        install_joint_attention_capture(z, store, ["noise_refiner.0"])
    with pytest.raises(ValueError, match="layers.9.*not a joint"):
        install_joint_attention_capture(z, store, ["layers.9"])
    with pytest.raises(ValueError, match="unknown normalisation"):
        install_joint_attention_capture(z, store, ["layers.0"], normalisation="image")
    with pytest.raises(ValueError, match="grid must be"):
        store.set_token_positions(Z_POSITIONS)
    install_joint_attention_capture(z, store, ["layers.0"])
    store.set_token_positions(torch.tensor([[64], [0]]), grid=Z_GRID)  # the padded caption has 64 positions
    with pytest.raises(ValueError, match="token position 64 >= 64 text positions"), torch.no_grad():
        z(**_z_inputs())
    store.set_token_positions(Z_POSITIONS, grid=(10, 10))
    with pytest.raises(ValueError, match="10x10 token grid does not fit"), torch.no_grad():
        z(**_z_inputs())


def test_bf16_model_maps_in_float32_from_the_kernels_q_and_k():
    """A bf16 Klein: the maps are float32 and equal the materialised attention of the very bf16 q and k the
    kernel got (upcast), under autocast too."""
    model = _klein().to(torch.bfloat16).eval()
    inputs = {n: (v.bfloat16() if v.is_floating_point() and n != "timestep" else v) for n, v in _k_inputs().items()}
    with torch.no_grad(), _recorded_attention(flux2_module) as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs)  # diffusers' processors: the reference's q and k
    store = JointAttentionMapStore()
    install_joint_attention_capture(model, store, K_LAYERS, normalisation="joint")
    store.set_token_positions(K_POSITIONS, grid=K_GRID)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs)
    assert len(calls) == len(K_LAYERS)
    for layer, call in zip(K_LAYERS, calls):
        assert call[0].dtype == torch.bfloat16 and store.layer_maps()[layer].dtype == torch.float32
        expect = _reference_maps(call, (K_TEXT, 0, K_TEXT), K_GRID, K_POSITIONS, "joint")
        torch.testing.assert_close(store.layer_maps()[layer].double(), expect, rtol=0, atol=1e-6)


def test_capture_saves_no_float32_copies_of_q_and_k():
    """bf16 Klein, one capture layer: the bytes autograd saves grow by the float32 LSE [H, N] and exp's output
    [H, N, K] only (4 x 2 x 12 x (1 + 2) = 288 bytes, batch 2: 576), plus index-sized bookkeeping; float32
    copies of the image queries and all keys would add 4 x 2 x 2 x (12 + 18) x 16 = 7680 bytes."""
    from bench.measure_joint_attention import saved_bytes

    model = _klein().to(torch.bfloat16).train()
    inputs = {n: (v.bfloat16() if v.is_floating_point() and n != "timestep" else v) for n, v in _k_inputs().items()}
    params = list(model.parameters())
    base = saved_bytes(lambda: model(**inputs), params)
    store = JointAttentionMapStore()
    install_joint_attention_capture(model, store, K_LAYERS[:1], normalisation="joint")
    store.set_token_positions(K_POSITIONS, grid=K_GRID)
    extra = saved_bytes(lambda: model(**inputs), params) - base
    assert 576 <= extra <= 576 + 512, extra


def test_capture_memory_formula_by_hand():
    """bench's formula at 1024 px for Z-Image (30 heads x 128, 4096 image tokens, 4608 keys, K = 2): saved
    4 x 30 x 4096 x (1 + 2) = 1 474 560 bytes, held maps 983 040, transient 2 x 30 x 8704 x 128 = 66 846 720
    plus twice 16 MiB twice (the chunks are full) = 133 955 584 bytes (127.75 MiB)."""
    from bench.measure_joint_attention import capture_bytes_formula

    assert capture_bytes_formula(30, 128, 4096, 4608) == {"saved": 1474560, "held": 983040, "transient_backward": 133955584}
