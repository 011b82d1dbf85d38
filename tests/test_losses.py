"""library.losses against values computed by hand (the arithmetic is written next to each number)."""
import math

import pytest
import torch

from library.losses import (attention_refocus_loss, combine_losses, identity_loss, masked_reconstruction_loss,
                            normalize_attention_maps, resize_mask, soften_mask, tweedie_x0)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


# ------------------------------------------------------------------------------------------------ masks
def test_soften_mask_values():
    m = t([0.0, 0.5, 1.0])
    # (0 + 0.01) / 1.01, (0.5 + 0.01) / 1.01, (1 + 0.01) / 1.01
    assert torch.allclose(soften_mask(m), t([0.01 / 1.01, 0.51 / 1.01, 1.0]))
    assert torch.allclose(soften_mask(m, eps=0.1), t([0.1 / 1.1, 0.6 / 1.1, 1.0]))


def test_resize_mask_nearest():
    m = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    # nearest, scale 2: source index floor(2 * i) -> rows/cols 0 and 2
    assert torch.equal(resize_mask(m, 2), t([[[[0.0, 2.0], [8.0, 10.0]]]]))
    up = resize_mask(t([[[1.0, 0.0], [0.0, 1.0]]]), 4)  # [B,H,W] accepted
    assert up.shape == (1, 1, 4, 4)
    assert torch.equal(up[0, 0], t([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]))
    assert set(resize_mask(torch.rand(2, 1, 512, 512).round(), 64).unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------- reconstruction
def test_masked_reconstruction_by_hand():
    pred = t([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros(1, 1, 2, 2)
    mask = t([[[[1.0, 0.0], [0.5, 0.0]]]])
    # (pred - target) * mask = [1, 0, 1.5, 0] -> squares [1, 0, 2.25, 0] -> mean 3.25 / 4 = 0.8125
    raw = masked_reconstruction_loss(pred, target, mask, area_normalize=False)
    assert raw.shape == (1,)
    assert raw.item() == pytest.approx(0.8125)
    # area normalisation: x H*W / sum(mask) = x 4 / 1.5 -> 3.25 / 1.5
    assert masked_reconstruction_loss(pred, target, mask).item() == pytest.approx(3.25 / 1.5)


def test_masked_reconstruction_per_sample_and_channels():
    pred = torch.zeros(2, 2, 2, 2)
    target = torch.ones(2, 2, 2, 2)
    target[1] *= 3.0
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 1.0          # one pixel of four
    mask[1] = 1.0                   # everything
    out = masked_reconstruction_loss(pred, target, mask, area_normalize=False)
    # sample 0: 2 channels x one pixel of error 1 -> 2 / 8 = 0.25; sample 1: all 8 entries 9 -> 9
    assert torch.allclose(out, t([0.25, 9.0]))
    out_n = masked_reconstruction_loss(pred, target, mask)
    # sample 0: 0.25 * 4 / 1 = 1 (= the mean over the masked area); sample 1: 9 * 4 / 4 = 9
    assert torch.allclose(out_n, t([1.0, 9.0]))


def test_masked_reconstruction_float32_and_gradient():
    pred = torch.randn(2, 4, 8, 8, dtype=torch.float16, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, dtype=torch.float16)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1.0
    out = masked_reconstruction_loss(pred, target, mask)
    assert out.dtype == torch.float32
    out.sum().backward()
    g = pred.grad.float()
    assert g[:, :, :4].abs().sum() > 0
    assert g[:, :, 4:].abs().sum() == 0  # no gradient outside the mask


# ----------------------------------------------------------------------------------- attention maps
def test_normalize_attention_maps_range_and_detached_extremes():
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 5, 5, requires_grad=True)
    s = normalize_attention_maps(maps)
    assert s.min() >= 0 and s.max() <= 1
    assert torch.allclose(s.amin(dim=(-2, -1)), torch.zeros(2, 3))
    assert torch.allclose(s.amax(dim=(-2, -1)), torch.ones(2, 3), atol=1e-5)
    w = torch.randn_like(maps)
    (s * w).sum().backward()
    # with min and max treated as constants, d/dA [(A - mn) / (mx - mn + 1e-6 mx)] = 1 / (mx - mn + 1e-6 mx)
    mx = maps.amax(dim=(-2, -1), keepdim=True).detach()
    rng = mx - maps.amin(dim=(-2, -1), keepdim=True).detach()
    assert torch.allclose(maps.grad, w / (rng + 1e-6 * mx), atol=1e-5)


def test_attention_refocus_is_scale_invariant():
    """Shrinking a token's whole probability column must not lower the loss (no reward for ignoring the token)."""
    torch.manual_seed(1)
    maps = torch.rand(2, 4, 4, 4)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    base = attention_refocus_loss(maps, mask)
    assert base.min() > 0
    for scale in (1e-3, 1e-10):
        torch.testing.assert_close(attention_refocus_loss(maps * scale, mask), base, rtol=1e-4, atol=0)


def test_attention_refocus_by_hand_no_upsampling():
    # map and mask both 2x2: bilinear resize to the same size is the identity
    a1 = t([[0.1, 0.3], [0.5, 0.2]])    # S: (a - 0.1) / 0.4 = [[0, 0.5], [1, 0.25]]
    a2 = t([[0.2, 0.2], [0.2, 0.6]])    # S: (a - 0.2) / 0.4 = [[0, 0], [0, 1]]
    mask = t([[[[1.0, 0.0], [0.0, 0.0]]]])
    one = attention_refocus_loss(a1.reshape(1, 1, 2, 2), mask)
    # outside the mask: 0.5^2 + 1^2 + 0.25^2 = 1.3125, mean over 4 pixels
    assert one.shape == (1,)
    assert one.item() == pytest.approx(1.3125 / 4, rel=1e-5)
    two = attention_refocus_loss(torch.stack([a1, a2]).unsqueeze(0), mask)
    # average of the two S maps: [[0, 0.25], [0.5, 0.625]] -> 0.0625 + 0.25 + 0.390625 = 0.703125
    assert two.item() == pytest.approx(0.703125 / 4, rel=1e-5)


def _left_half_mask(b=1, s=64):
    m = torch.zeros(b, 1, s, s)
    m[..., : s // 2] = 1.0
    return m


def test_attention_refocus_zero_inside_and_positive_outside():
    mask = _left_half_mask()
    inside = torch.zeros(1, 8, 16, 16)
    inside[..., 2:14, 0:6] = torch.rand(1, 8, 12, 6) + 0.1  # upsampled support ends at column 27 < 32
    assert attention_refocus_loss(inside, mask).item() == pytest.approx(0.0, abs=1e-12)
    outside = torch.zeros(1, 8, 16, 16)
    outside[..., 10:16] = 1.0
    loss = attention_refocus_loss(outside, mask)
    # every map normalises to 1 on columns >= 10 of 16 upsampled (output columns >= 42, exact 1), and
    # only the right half counts: at least 22 of 64 columns at value 1 -> > 22 / 64
    assert loss.item() > 22 / 64 and loss.item() < 0.5


def test_attention_refocus_inside_not_penalised():
    torch.manual_seed(1)
    mask = _left_half_mask(2)
    base = torch.rand(2, 4, 16, 16)
    base[..., 0, 0] = 0.0   # fix the extremes of S outside the changed region
    base[..., 0, 15] = 2.0
    changed = base.clone()
    changed[..., 1:15, 0:6] = torch.rand(2, 4, 14, 6)  # only far-inside source pixels change
    assert torch.allclose(attention_refocus_loss(base, mask), attention_refocus_loss(changed, mask))
    maps = base.clone().requires_grad_(True)
    attention_refocus_loss(maps, mask).sum().backward()
    assert maps.grad[..., 0:6].abs().max() == 0          # attention well inside the mask: free
    assert maps.grad[..., 9:].abs().sum() > 0             # outside: pushed


def test_attention_refocus_soft_mask_dtype():
    mask = soften_mask(_left_half_mask())
    maps = torch.rand(1, 40, 16, 16, dtype=torch.bfloat16)
    out = attention_refocus_loss(maps, mask)
    assert out.dtype == torch.float32 and out.shape == (1,) and out.item() > 0


# -------------------------------------------------------------------------------------- tweedie, id
def test_tweedie_recovers_z0():
    torch.manual_seed(0)
    z0 = torch.randn(3, 4, 8, 8)
    eps = torch.randn(3, 4, 8, 8)
    a = t([0.99, 0.5, 0.047])
    z_t = a.sqrt().view(-1, 1, 1, 1) * z0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(tweedie_x0(z_t, eps, a), z0, atol=1e-5)
    # scalar a_t, float64 keeps float64
    z_t64 = math.sqrt(0.3) * z0.double() + math.sqrt(0.7) * eps.double()
    x0 = tweedie_x0(z_t64, eps.double(), torch.tensor(0.3, dtype=torch.float64))
    assert x0.dtype == torch.float64 and torch.allclose(x0, z0.double(), atol=1e-12)
    # gradient reaches the noise prediction: d x0 / d eps_hat = -sqrt(1 - a) / sqrt(a)
    e = eps.clone().requires_grad_(True)
    tweedie_x0(z_t, e, a).sum().backward()
    assert torch.allclose(e.grad[:, 0, 0, 0], -((1 - a) / a).sqrt())


def test_identity_loss_values():
    emb = t([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    ref = t([[2.0, 0.0], [0.0, 5.0], [-3.0, -4.0]])
    assert torch.allclose(identity_loss(emb, ref), t([0.0, 1.0, 2.0]), atol=1e-6)
    x = torch.randn(2, 512, requires_grad=True)
    identity_loss(x, torch.randn(2, 512)).sum().backward()
    assert x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- combine
def test_combine_losses_by_hand():
    recon = t([1.0, 2.0, 3.0], requires_grad=True)
    attn = t([0.1, 0.2, 0.3], requires_grad=True)
    ident = t([float("nan"), float("nan"), 0.4], requires_grad=True)  # only the composed sample has one
    w = t([1.0, 2.0, 2.0])
    out = combine_losses(recon, attn, ident, w, id_mask=torch.tensor([False, False, True]))
    # per sample: 1 + 2.5*0.1 = 1.25; 2 + 2.5*0.2 = 2.5; 3 + 2.5*0.3 + 0.25*0.4 = 3.85
    # weighted: 1.25, 5.0, 7.7 -> mean 13.95 / 3 = 4.65
    assert out["loss"].item() == pytest.approx(4.65)
    assert out["mask"].item() == pytest.approx(2.0)
    assert out["attn"].item() == pytest.approx(0.2)
    assert out["id"].item() == pytest.approx(0.4)  # mean over the sample it applies to
    out["loss"].backward()
    assert torch.allclose(recon.grad, w / 3)
    assert torch.allclose(attn.grad, 2.5 * w / 3)
    assert torch.allclose(ident.grad, t([0.0, 0.0, 0.25 * 2 / 3]))  # no NaN from the skipped samples


def test_combine_losses_missing_terms_and_weights():
    recon = t([1.0, 3.0])
    out = combine_losses(recon, None, None, t([1.0, 1.0]))
    assert set(out) == {"loss", "mask"}
    assert out["loss"].item() == pytest.approx(2.0)
    out = combine_losses(recon, t([1.0, 1.0]), None, None, attn_weight=1.0)
    # (1 + 1 + 3 + 1) / 2 = 3
    assert set(out) == {"loss", "mask", "attn"} and out["loss"].item() == pytest.approx(3.0)
    # weight 2 on the second sample doubles its share: (1 + 2 * 3) / 2 = 3.5
    assert combine_losses(recon, None, None, t([1.0, 2.0]))["loss"].item() == pytest.approx(3.5)


def test_gradient_chain_reaches_prediction():
    """L_mask + L_id through Tweedie: the noise prediction gets gradient from both terms."""
    torch.manual_seed(0)
    eps_hat = torch.randn(2, 4, 8, 8, requires_grad=True)
    eps = torch.randn(2, 4, 8, 8)
    z_t = torch.randn(2, 4, 8, 8)
    a = t([0.5, 0.2])
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    recon = masked_reconstruction_loss(eps_hat, eps, mask)
    x0 = tweedie_x0(z_t, eps_hat, a)
    ident = identity_loss(x0.flatten(1), torch.randn(2, 256))
    out = combine_losses(recon, None, ident, t([1.0, 2.0]), id_mask=torch.tensor([False, True]))
    out["loss"].backward()
    g = eps_hat.grad
    assert g[1].abs().sum() > 0
    assert g[0][:, 2:6, 2:6].abs().sum() > 0
    assert g[0][:, :2].abs().sum() == 0  # sample 0: no ID term, nothing outside its mask
