"""MagiCapture's losses as pure functions of tensors (docs/method.md, "The losses"). No model code here.

Every loss returns one value per sample ([B]) so that the trainer can put the source, reference and
composed tasks into one batch and weight each sample; :func:`combine_losses` does the weighting.
Losses are computed in float32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soften_mask", "resize_mask", "masked_reconstruction_loss", "normalize_attention_maps",
           "attention_refocus_loss", "multi_token_refocus_loss", "identity_loss", "combine_losses"]


def soften_mask(mask: Tensor, eps: float = 0.01) -> Tensor:
    """(m + eps) / (1 + eps): a mask in [0, 1] mapped to [eps / (1 + eps), 1] (released code)."""
    return (mask + eps) / (1.0 + eps)


def resize_mask(mask: Tensor, size: int) -> Tensor:
    """[B, 1, H, W] (or [B, H, W]) -> [B, 1, size, size], nearest neighbour (released code)."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    dtype = mask.dtype
    out = F.interpolate(mask.float(), size=(size, size), mode="nearest")
    return out.to(dtype) if dtype.is_floating_point else out


def _as_mask4(mask: Tensor) -> Tensor:
    return mask.unsqueeze(1) if mask.dim() == 3 else mask


def masked_reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor, area_normalize: bool = True) -> Tensor:
    """Eq. 4-6: per-sample mean over (C, H, W) of ((pred - target) * mask)^2 -> [B].

    pred, target [B, C, H, W]; mask [B, 1, H, W] in [0, 1]. With ``area_normalize`` the mean is
    multiplied by H * W / sum_hw(mask) (the released code's rescaling), i.e. it becomes a mean over the
    masked area rather than over the whole latent.
    """
    mask = _as_mask4(mask).float()
    if mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} and prediction {tuple(pred.shape)} differ in size")
    per = ((pred.float() - target.float()) * mask).pow(2).mean(dim=tuple(range(1, pred.dim())))
    if area_normalize:
        h, w = pred.shape[-2:]
        area = mask.sum(dim=(-2, -1)).mean(dim=1)  # sum_hw(mask), [B]
        per = per * (h * w) / area.clamp_min(1e-8)
    return per


PROB_FLOOR = 1e-30  # attention probabilities are clamped to this before S (float32's normals end at 1.2e-38)
RELATIVE_EPS = 1e-6


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def normalize_attention_maps(maps: Tensor, detach_extremes: bool = False) -> Tensor:
    """S(A) of eq. 8: per-map min-max normalisation over the last two dims -> values in (0, 1].

    ``S = (A - min + c) / (max - min + c)`` with ``c = 1e-6 max`` and ``A`` clamped to ``PROB_FLOOR``
    first. Every term scales with ``A``, so ``S(kA) = S(A)`` exactly (the value is scale-invariant), and a
    flat map (including one whose probabilities underflowed to the floor) is 1 everywhere: the loss
    scores it as attention spread over the whole image, never as 0.

    Gradient: with ``detach_extremes=False`` (the default; eq. 8 differentiated as written) the
    gradient of any loss of S is orthogonal to ``A`` (Euler's theorem on a 0-homogeneous function) and,
    up to ``c``, to the all-ones map: descent can move attention around but has no direction that
    shrinks or shifts the token's whole column. With ``True`` (the released code's literal S: min and
    max taken through ``.item()`` in ``lora_diffusion_/magicapture_train.py``) only the numerator
    carries gradient; for the refocusing loss ``<dL/dA, A> > 0`` for every map, so descent shrinks the
    token's attention everywhere (measured on the tiny model: the inside probability fell ~400x in 60
    steps and underflowed by step 150). Computed in at least float32.
    """
    a = maps.to(_compute_dtype(maps)).clamp_min(PROB_FLOOR)
    mn = a.amin(dim=(-2, -1), keepdim=True)
    mx = a.amax(dim=(-2, -1), keepdim=True)
    if detach_extremes:
        mn, mx = mn.detach(), mx.detach()
    c = RELATIVE_EPS * mx
    return (a - mn + c) / (mx - mn + c)


def attention_refocus_loss(maps: Tensor, mask: Tensor, detach_extremes: bool = False) -> Tensor:
    """Eq. 8 for one special token: per-sample mean of ((mean_M S(up(A_m)) - M) * (1 - M))^2 -> [B].

    maps [B, M, h, w]: the token's cross-attention probabilities from M maps (layers x heads; [B, h, w]
    is taken as M = 1). mask [B, 1, S, S] in [0, 1], the token's target region; each map is upsampled
    bilinearly (align_corners=False) to the mask's size, normalised by :func:`normalize_attention_maps`,
    and averaged over M. Only attention outside the mask is penalised (pushed towards M there, i.e. ~0);
    the mean runs over all S x S pixels. For a prompt with several tokens use
    :func:`multi_token_refocus_loss` (the mean over tokens, E_k of the paper).
    """
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    ct = _compute_dtype(maps)
    mask = _as_mask4(mask).to(ct)
    up = F.interpolate(maps.to(ct), size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)
    avg = normalize_attention_maps(up, detach_extremes).mean(dim=1, keepdim=True)  # [B, 1, S, S]
    return ((avg - mask) * (1.0 - mask)).pow(2).mean(dim=(1, 2, 3))


def multi_token_refocus_loss(maps: Tensor, masks: Tensor, present: Tensor, detach_extremes: bool = False) -> Tensor:
    """Eq. 8 with E_k: per sample, the mean of :func:`attention_refocus_loss` over the tokens present -> [B].

    maps [B, K, M, h, w] (token k's maps), masks [B, K, 1, S, S] (token k's target region), present
    [B, K] bool (token k is in sample b's prompt and has a target). A sample with no token present gets
    0. The paper (eq. 8, E over k) and the released code (``.mean()`` over the composed prompt's two
    tokens) both average; summing would double the composed task's refocusing weight.
    """
    present = present.to(maps.device).bool()
    total = torch.zeros(maps.shape[0], device=maps.device, dtype=_compute_dtype(maps))
    for k in range(maps.shape[1]):
        term = attention_refocus_loss(maps[:, k], masks[:, k], detach_extremes)
        total = total + torch.where(present[:, k], term, torch.zeros_like(term))
    return total / present.sum(1).clamp_min(1).to(total.dtype)


def identity_loss(emb: Tensor, emb_ref: Tensor) -> Tensor:
    """Eq. 7: 1 - cos(emb, emb_ref) along the last dim -> [B] (0 equal, 1 orthogonal, 2 opposite).

    ``emb_ref`` is not detached here; pass a constant (the source image's embedding)."""
    return 1.0 - F.cosine_similarity(emb.float(), emb_ref.float(), dim=-1, eps=1e-8)


def _masked_term(term: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(term with invalid samples set to 0, float validity [B]); ``where`` (not a product) keeps a NaN
    placeholder of a skipped sample out of the total."""
    term = term.float()
    if valid is None:
        return term, torch.ones_like(term)
    valid = valid.to(device=term.device).bool().expand_as(term)
    return torch.where(valid, term, torch.zeros_like(term)), valid.float()


def combine_losses(recon: Tensor, attn: Tensor | None, ident: Tensor | None, recon_weights: Tensor | None = None,
                   attn_weight: float = 2.5, id_weight: float = 0.25, *,
                   attn_mask: Tensor | None = None, id_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Total ``L = mean_b (w_b L_mask,b + attn_weight L_attn,b + id_weight L_id,b)``.

    recon, attn, ident: per-sample terms [B]. ``recon_weights`` [B] weights the reconstruction term
    alone (None = 1): the released code (``loss_step`` in ``lora_diffusion_/magicapture_train.py``)
    doubles the reconstruction loss of style and composed samples in the first half of each phase and
    leaves the refocusing and identity terms unweighted. The mean divides by B, not by sum(w), so a
    batch of the three tasks gives the same total as averaging the three tasks run one at a time.
    ``attn_mask`` / ``id_mask`` (bool [B], optional) mark the samples a term applies to; other samples
    contribute 0 to that term (a NaN placeholder there does not leak into the total).

    Returns {"loss": the scalar total, "mask": ..., "attn": ..., "id": ...}; the per-term entries are
    the unweighted means over the samples the term applies to (0 when none does), for logging; a term
    that is None is omitted.
    """
    recon = recon.float()
    w = torch.ones_like(recon) if recon_weights is None else torch.as_tensor(recon_weights, device=recon.device).float().expand_as(recon)
    per = w * recon
    out: dict[str, Tensor] = {"mask": recon.mean()}
    for name, term, valid, k in (("attn", attn, attn_mask, attn_weight), ("id", ident, id_mask, id_weight)):
        if term is None:
            continue
        term, v = _masked_term(term, valid)
        per = per + k * term
        out[name] = term.sum() / v.sum().clamp_min(1.0)
    return {"loss": per.mean(), **out}
