"""library/training/attention.py: capture of the special tokens' cross-attention maps (docs/method.md eq. 8, traps)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from library.training.attention import (
    DEFAULT_CAPTURE_LAYERS,
    AttentionMapStore,
    CaptureCrossAttnProcessor,
    capture_module_name,
    install_attention_capture,
    remove_attention_capture,
)

try:
    from library.training.losses import attention_refocus_loss
except ImportError:  # losses.py not there yet: the same quantity, simply written
    def attention_refocus_loss(maps, mask):
        up = F.interpolate(maps.float(), size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)
        mn = up.amin(dim=(-2, -1), keepdim=True).detach()
        mx = up.amax(dim=(-2, -1), keepdim=True).detach()
        avg = ((up - mn) / (mx - mn + 1e-8)).mean(dim=1, keepdim=True)
        return ((avg - mask) * (1 - mask)).pow(2).mean(dim=(1, 2, 3))


LAYER = DEFAULT_CAPTURE_LAYERS[0]
B = 2
TEXT_LEN = 77
LATENT = 16  # smaller than the model's sample_size (32), to keep the tests fast; capture layers at 4x4


@pytest.fixture(scope="module")
def base_unet():
    from testkit.tiny import build_components

    return build_components()["unet"]


@pytest.fixture
def unet(base_unet):
    return copy.deepcopy(base_unet)


def _inputs(unet, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(B, cfg.in_channels, LATENT, LATENT, generator=g).to(dtype)
    ctx = torch.randn(B, TEXT_LEN, cfg.cross_attention_dim, generator=g).to(dtype)
    t = torch.tensor([10, 600])
    return x, t, ctx


def _add_lora(unet, seed=1):
    import peft

    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # non-zero, so that gradients reach lora_A too
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    unet.requires_grad_(False)
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)


def _hand_probs(attn, hidden, context):
    """Reference: q = to_q(hidden), k = to_k(context), softmax(q k^T * scale) per head -> [B, H, N, L]."""
    q, k = attn.to_q(hidden), attn.to_k(context)
    b, n, inner = q.shape
    h = attn.heads
    d = inner // h
    q = q.view(b, n, h, d).permute(0, 2, 1, 3)
    k = k.view(b, context.shape[1], h, d).permute(0, 2, 1, 3)
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) * attn.scale, dim=-1)


def test_probabilities_match_hand_reference_and_output_unchanged(unet):
    x, t, ctx = _inputs(unet)
    unet.eval()
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample

    store = AttentionMapStore()
    names = install_attention_capture(unet, store)
    assert names == [capture_module_name(layer) for layer in DEFAULT_CAPTURE_LAYERS]
    attn = unet.get_submodule(capture_module_name(LAYER))
    assert isinstance(attn.processor, CaptureCrossAttnProcessor)
    seen = {}
    hook = attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(hidden=args[0], context=kwargs["encoder_hidden_states"]),
        with_kwargs=True,
    )
    chosen = torch.tensor([[5, 9, 0], [2, 76, 30]])
    # the chosen tokens, then all 77 columns (to check that the softmax ran over all the keys)
    positions = torch.cat([chosen, torch.arange(TEXT_LEN).repeat(B, 1)], dim=1)
    store.set_token_positions(positions)
    with torch.no_grad():
        captured = unet(x, t, encoder_hidden_states=ctx).sample
        ref = _hand_probs(attn, seen["hidden"], seen["context"])  # [B, H, N, 77]
    hook.remove()
    # the capture changes nothing in the output
    torch.testing.assert_close(captured, plain, rtol=0, atol=1e-6)

    got = store.layer_maps()[LAYER]  # [B, H, K, h, w]
    n = ref.shape[2]
    side = int(n ** 0.5)
    k = positions.shape[1]
    assert got.shape == (B, attn.heads, k, side, side) and got.dtype == torch.float32
    expect = torch.stack([ref[b][:, :, positions[b]] for b in range(B)])  # [B, H, N, K]
    expect = expect.permute(0, 1, 3, 2).reshape(got.shape)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)

    # all 77 columns: each query's probabilities over the keys sum to 1 (full softmax, then gather)
    full = got[:, :, chosen.shape[1]:]
    assert full.shape[2] == TEXT_LEN
    torch.testing.assert_close(full.sum(dim=2), torch.ones(B, attn.heads, side, side), rtol=0, atol=1e-5)
    assert store.maps().shape == (B, k, len(DEFAULT_CAPTURE_LAYERS) * attn.heads, side, side)

    remove_attention_capture(unet)
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_maps_shape_order_absent_tokens_and_errors(unet):
    x, t, ctx = _inputs(unet)
    store = AttentionMapStore()
    install_attention_capture(unet, store)
    heads = unet.get_submodule(capture_module_name(LAYER)).heads
    with pytest.raises(RuntimeError, match="install|recorded"):
        store.maps()  # nothing recorded yet
    store.set_token_positions(torch.tensor([[4, 7], [-1, 3]]))
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)
    maps = store.maps()
    side = maps.shape[-1]
    assert maps.shape == (B, 2, len(DEFAULT_CAPTURE_LAYERS) * heads, side, side)
    assert torch.count_nonzero(maps[1, 0]) == 0  # absent token -> zeros
    assert maps[0, 0].abs().sum() > 0 and maps[1, 1].abs().sum() > 0
    # fixed order: layer i, head j -> slot i * heads + j
    per_layer = store.layer_maps()
    for i, layer in enumerate(DEFAULT_CAPTURE_LAYERS):
        torch.testing.assert_close(maps[:, :, i * heads:(i + 1) * heads], per_layer[layer].transpose(1, 2))

    store.clear()
    with pytest.raises(RuntimeError, match="down_blocks.2.attentions.0"):
        store.maps()
    with torch.no_grad():  # no positions -> no capture, no error
        unet(x, t, encoder_hidden_states=ctx)
    assert store.layer_maps() == {}
    store.set_token_positions(torch.tensor([[4, 7]]))  # positions for 1 sample, batch of 2
    with pytest.raises(ValueError, match="samples"):
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)


def test_bad_layer_and_backend(unet):
    store = AttentionMapStore()
    with pytest.raises(ValueError, match="down_blocks.7.attentions.0"):
        install_attention_capture(unet, store, layers=["down_blocks.2.attentions.0", "down_blocks.7.attentions.0"])
    with pytest.raises(ValueError, match="backend"):
        install_attention_capture(unet, store, backend="flash")
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="xformers isn't usable.*sdpa"):
            install_attention_capture(unet, store, backend="xformers")


def _ar_step(unet, store, gradient_checkpointing, clear_before_backward):
    """One forward, the AR loss alone from store.maps(), backward; returns the LoRA grads."""
    x, t, ctx = _inputs(unet, seed=3)
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.zero_grad(set_to_none=True)
    positions = torch.tensor([[5, 9], [6, 2]])
    store.set_token_positions(positions)
    unet(x, t, encoder_hidden_states=ctx)
    maps = store.maps()  # read before backward
    assert maps.requires_grad
    s = 16
    face = torch.zeros(B, 1, s, s)
    face[:, :, 4:11, 5:12] = 1.0
    loss = (attention_refocus_loss(maps[:, 0], face) + attention_refocus_loss(maps[:, 1], 1 - face)).mean()
    if clear_before_backward:
        store.clear()  # the checkpoint recomputation must still replay the forward's capture
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in unet.named_parameters() if "lora_" in n and p.grad is not None}


def test_refocus_loss_reaches_lora_with_and_without_checkpointing(unet):
    _add_lora(unet)
    store = AttentionMapStore()
    install_attention_capture(unet, store)
    plain = _ar_step(unet, store, gradient_checkpointing=False, clear_before_backward=False)
    ckpt = _ar_step(unet, store, gradient_checkpointing=True, clear_before_backward=True)

    for layer in DEFAULT_CAPTURE_LAYERS:
        for proj in ("to_q", "to_k"):
            for part in ("lora_A", "lora_B"):
                name = f"{capture_module_name(layer)}.{proj}.{part}.default.weight"
                assert name in plain and name in ckpt, name
                assert plain[name].abs().sum() > 0, f"no AR gradient on {name}"
                torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-8)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-8)
    # layers after the last capture layer do not influence the maps: no gradient there
    late = [n for n in plain if n.startswith("up_blocks.3.")]
    assert all(plain[n].abs().sum() == 0 for n in late)


def test_checkpointed_backward_overwrites_not_appends(unet):
    """The recomputation inside a checkpointed backward records nothing: after backward the store holds
    the very tensors of the forward, one per layer, and no layer recorded twice."""
    _add_lora(unet)
    store = AttentionMapStore()
    install_attention_capture(unet, store)
    heads = unet.get_submodule(capture_module_name(LAYER)).heads
    records = []
    real_record = store._record
    store._record = lambda layer, probs: (records.append(layer), real_record(layer, probs))
    x, t, ctx = _inputs(unet)
    unet.train()
    unet.enable_gradient_checkpointing()
    store.set_token_positions(torch.tensor([[5, 9], [6, 2]]))
    unet(x, t, encoder_hidden_states=ctx)
    forward = store.layer_maps()
    assert records == list(DEFAULT_CAPTURE_LAYERS)
    s = 16
    face = torch.zeros(B, 1, s, s)
    face[:, :, 4:11, 5:12] = 1.0
    maps = store.maps()
    (attention_refocus_loss(maps[:, 0], face) + attention_refocus_loss(maps[:, 1], 1 - face)).sum().backward()
    assert records == list(DEFAULT_CAPTURE_LAYERS), "the checkpoint recomputation recorded maps"
    after = store.layer_maps()
    assert list(after) == list(DEFAULT_CAPTURE_LAYERS)
    assert all(after[layer] is forward[layer] for layer in DEFAULT_CAPTURE_LAYERS)
    assert store.maps().shape[:3] == (B, 2, len(DEFAULT_CAPTURE_LAYERS) * heads)


def test_bf16_probabilities_in_float32(unet):
    unet.to(torch.bfloat16).eval()
    x, t, ctx = _inputs(unet, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample
    store = AttentionMapStore()
    install_attention_capture(unet, store)
    store.set_token_positions(torch.arange(TEXT_LEN).repeat(B, 1))
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=ctx).sample
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    maps = store.maps()
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps.sum(dim=1), torch.ones_like(maps.sum(dim=1)), rtol=0, atol=1e-5)
