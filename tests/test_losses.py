"""library.training.losses against values computed by hand (the arithmetic is written next to each number)."""
import math

import pytest
import torch

from library.training.losses import (attention_refocus_loss, combine_losses, identity_loss, masked_reconstruction_loss,
                            multi_token_refocus_loss, normalize_attention_maps, resize_mask, soften_mask)
from library.models.objectives import tweedie_x0


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
C = 1e-6  # RELATIVE_EPS: S = (A - min + C max) / (max - min + C max)


def test_normalize_attention_maps_by_hand():
    a = t([[0.1, 0.3], [0.5, 0.2]]).reshape(1, 1, 2, 2)
    # min 0.1, max 0.5, c = 0.5e-6: S = (a - 0.1 + c) / (0.4 + c)
    c = 0.5 * C
    want = t([[c / (0.4 + c), (0.2 + c) / (0.4 + c)], [1.0, (0.1 + c) / (0.4 + c)]]).reshape(1, 1, 2, 2)
    torch.testing.assert_close(normalize_attention_maps(a), want, rtol=1e-6, atol=0)
    # exactly scale-invariant, down to probabilities near float32's smallest normals
    for k in (1e-3, 1e-20, 1e-29):
        torch.testing.assert_close(normalize_attention_maps(a * k), want, rtol=1e-5, atol=0)
    # a flat map, and one whose probabilities all underflowed to 0, read as attention everywhere (1), never 0
    assert torch.equal(normalize_attention_maps(torch.full((1, 1, 3, 3), 0.2)), torch.ones(1, 1, 3, 3))
    assert torch.equal(normalize_attention_maps(torch.zeros(1, 1, 3, 3)), torch.ones(1, 1, 3, 3))
    # float64 stays float64, bf16 is computed in float32
    assert normalize_attention_maps(a.double()).dtype == torch.float64
    assert normalize_attention_maps(a.bfloat16()).dtype == torch.float32


def test_normalize_detached_extremes_gradient_by_hand():
    """The released literal S: min and max are constants, d S_i / d A_j = [i = j] / (max - min + c)."""
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn_like(maps)
    (normalize_attention_maps(maps, detach_extremes=True) * w).sum().backward()
    mx = maps.amax(dim=(-2, -1), keepdim=True).detach()
    rng = mx - maps.amin(dim=(-2, -1), keepdim=True).detach()
    torch.testing.assert_close(maps.grad, w / (rng + C * mx), rtol=1e-12, atol=0)


def test_underflowed_map_does_not_score_zero():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0
    # every probability below float32's range: the map reads flat, i.e. attention on every pixel;
    # outside the mask (8 of 16 pixels) ((1 - 0) * 1)^2 = 1 -> 8 / 16
    assert attention_refocus_loss(torch.zeros(1, 1, 4, 4), mask).item() == pytest.approx(0.5)
    assert attention_refocus_loss(torch.full((1, 1, 4, 4), 1e-40), mask).item() == pytest.approx(0.5)


def _random_probability_maps(n_samples=10, n_maps=12, side=16, seed=0):
    """Softmax-like maps: positive, peaked, 120 in all; masks: a random rectangle per sample at 64x64."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_samples, n_maps, side, side, generator=g, dtype=torch.float64) * 2.0
    maps = torch.softmax(logits.flatten(2), -1).view_as(logits) * 0.3  # a token's share of each pixel
    masks = torch.zeros(n_samples, 1, 64, 64, dtype=torch.float64)
    for b in range(n_samples):
        y, x = torch.randint(0, 32, (2,), generator=g).tolist()
        h, w = torch.randint(12, 32, (2,), generator=g).tolist()
        masks[b, :, y : y + h, x : x + w] = 1.0
    return maps, masks


def test_refocus_gradient_has_no_collapse_direction_with_attached_extremes():
    """Default (eq. 8 differentiated as written): per map, the gradient is orthogonal to the map (scaling
    it) and to the all-ones map (shifting it), so descent cannot drain the token's attention."""
    maps, masks = _random_probability_maps()
    maps.requires_grad_(True)
    attention_refocus_loss(maps, masks, detach_extremes=False).sum().backward()
    g, a = maps.grad.flatten(2), maps.detach().flatten(2)  # [10, 12, 256]
    n = a.shape[-1]
    assert (g.norm(dim=-1) > 0).all()
    along_a = (g * a).sum(-1).abs() / (g.norm(dim=-1) * a.norm(dim=-1))
    along_1 = g.sum(-1).abs() / (g.norm(dim=-1) * math.sqrt(n))
    assert along_a.max() <= 1e-6, along_a.max()
    assert along_1.max() <= 1e-6, along_1.max()


def test_refocus_gradient_shrinks_every_map_with_detached_extremes():
    """The released literal S: <dL/dA, A> > 0 for every map, i.e. descent scales the whole map down."""
    maps, masks = _random_probability_maps()
    maps.requires_grad_(True)
    attention_refocus_loss(maps, masks, detach_extremes=True).sum().backward()
    along_a = (maps.grad * maps.detach()).flatten(2).sum(-1)
    assert (along_a > 0).all(), along_a.min()


def test_attention_refocus_is_scale_invariant():
    """Shrinking a token's whole probability column must not lower the loss (no reward for ignoring the token)."""
    torch.manual_seed(1)
    maps = torch.rand(2, 4, 4, 4)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    for detach in (False, True):
        base = attention_refocus_loss(maps, mask, detach)
        for scale in (1e-3, 1e-10, 1e-25):
            torch.testing.assert_close(attention_refocus_loss(maps * scale, mask, detach), base, rtol=1e-4, atol=0)


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


def test_multi_token_refocus_is_the_mean_over_present_tokens():
    a1 = t([[0.1, 0.3], [0.5, 0.2]])    # against mask1: 1.3125 / 4 = 0.328125 (above)
    a2 = t([[0.2, 0.2], [0.2, 0.6]])    # against mask1: S = [[0, 0], [0, 1]] -> 1 / 4 = 0.25
    mask1 = t([[1.0, 0.0], [0.0, 0.0]])
    maps = torch.stack([torch.stack([a1, a2])] * 3)[:, :, None]  # [3 samples, 2 tokens, 1 map, 2, 2]
    masks = mask1.expand(3, 2, 1, 2, 2)
    present = torch.tensor([[True, False], [True, True], [False, False]])
    out = multi_token_refocus_loss(maps, masks, present)
    # sample 0: [V1] alone; sample 1: (0.328125 + 0.25) / 2, not the sum; sample 2: no token -> 0
    torch.testing.assert_close(out, t([0.328125, 0.2890625, 0.0]), rtol=1e-5, atol=1e-7)


def _left_half_mask(b=1, s=64):
    m = torch.zeros(b, 1, s, s)
    m[..., : s // 2] = 1.0
    return m


def test_attention_refocus_zero_inside_and_positive_outside():
    mask = _left_half_mask()
    inside = torch.zeros(1, 8, 16, 16)
    inside[..., 2:14, 0:6] = torch.rand(1, 8, 12, 6) + 0.1  # upsampled support ends at column 27 < 32
    # outside the support the maps are at their minimum: S = c / (range + c) ~ 1e-6, squared ~ 1e-12
    assert attention_refocus_loss(inside, mask).item() == pytest.approx(0.0, abs=1e-10)
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
    inner = maps.grad[..., 1:15, 0:6]
    assert inner.abs().max() == 0                      # attention well inside the mask: free
    assert maps.grad[..., 9:].abs().sum() > 0           # outside: pushed


def test_attention_refocus_soft_mask_bf16_by_hand():
    # 2x2 map and mask (no resampling): S = [[0, 1], [0, 1]] (up to c); soft mask m = soften([[1, 0], [1, 0]])
    maps = t([[0.25, 0.5], [0.25, 0.5]]).to(torch.bfloat16).reshape(1, 1, 2, 2)
    mask = soften_mask(t([[1.0, 0.0], [1.0, 0.0]]).reshape(1, 1, 2, 2))
    e = 0.01 / 1.01
    out = attention_refocus_loss(maps, mask)
    # left column: (S - 1) * (1 - 1) = 0; right column: ((1 - e) * (1 - e))^2 twice, mean over 4 -> (1 - e)^4 / 2
    assert out.dtype == torch.float32 and out.shape == (1,)
    assert out.item() == pytest.approx((1 - e) ** 4 / 2, rel=1e-6)


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
    w = t([1.0, 2.0, 2.0])  # first half: x2 on the reconstruction term of the reference and composed samples
    out = combine_losses(recon, attn, ident, w, id_mask=torch.tensor([False, False, True]))
    # per sample: 1*1 + 2.5*0.1 = 1.25; 2*2 + 2.5*0.2 = 4.5; 2*3 + 2.5*0.3 + 0.25*0.4 = 6.85
    # mean (1.25 + 4.5 + 6.85) / 3 = 4.2: the weight touches reconstruction only (released code)
    assert out["loss"].item() == pytest.approx(4.2)
    assert out["mask"].item() == pytest.approx(2.0)
    assert out["attn"].item() == pytest.approx(0.2)
    assert out["id"].item() == pytest.approx(0.4)  # mean over the sample it applies to
    out["loss"].backward()
    assert torch.allclose(recon.grad, w / 3)
    assert torch.allclose(attn.grad, torch.full((3,), 2.5 / 3))
    assert torch.allclose(ident.grad, t([0.0, 0.0, 0.25 / 3]))  # no NaN from the skipped samples


def test_combine_losses_missing_terms_and_weights():
    recon = t([1.0, 3.0])
    out = combine_losses(recon, None, None, t([1.0, 1.0]))
    assert set(out) == {"loss", "mask"}
    assert out["loss"].item() == pytest.approx(2.0)
    out = combine_losses(recon, t([1.0, 1.0]), None, None, attn_weight=1.0)
    # (1 + 1 + 3 + 1) / 2 = 3
    assert set(out) == {"loss", "mask", "attn"} and out["loss"].item() == pytest.approx(3.0)
    # weight 2 on the second sample doubles its reconstruction: (1 + 2 * 3) / 2 = 3.5
    assert combine_losses(recon, None, None, t([1.0, 2.0]))["loss"].item() == pytest.approx(3.5)
    # ... and not its refocusing term: (1 + 1 + 2 * 3 + 1) / 2 = 4.5
    assert combine_losses(recon, t([1.0, 1.0]), None, t([1.0, 2.0]), attn_weight=1.0)["loss"].item() == pytest.approx(4.5)


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
