"""Is attention refocusing teaching the model to ignore its tokens? Figures and a guard, no extra forward.

A falling refocusing loss is not evidence of refocusing: S (eq. 8) is min-max normalised, so the loss
also falls when a token's maps merely get peakier, or when its attention drains away everywhere (the
collapse the released literal S drives, see :func:`library.training.losses.normalize_attention_maps`). What a
user must watch is the raw attention: per token, the mean probability inside its own target region and
the share of its attention that falls outside it. :func:`attention_figures` computes both from the maps
the trainer already holds; :class:`AttentionCollapseGuard` watches the inside probability over training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention_figures", "AttentionCollapseGuard", "format_figures", "BASELINE_STEPS", "EMA_DECAY"]

BASELINE_STEPS = 20  # the first phase-2 steps whose mean is the token's reference level
EMA_DECAY = 0.9  # ~10-step memory: one odd batch does not trip the guard, a trend does


@torch.no_grad()
def attention_figures(maps: Tensor, masks: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Raw per-token attention figures of one batch, averaged over the samples where the token is present.

    maps [B, K, M, h, w]: cross-attention probabilities (softmax over all keys) of K tokens in M maps;
    masks [B, K, 1, S, S] in {0, 1}: each token's target region at latent size; present [B, K] bool.
    The maps are averaged over M and upsampled bilinearly to S x S (as the refocusing loss does).

    Returns (inside [K], outside [K], count [K]):
    - inside: mean probability over the target's pixels, ``sum(A M) / sum(M)`` (a probability per
      pixel, the same unit as the maps);
    - outside: the share of the token's attention outside its target, ``sum(A (1 - M)) / sum(A)``;
    - count: samples that contributed. Where count is 0 the figures are 0.
    Samples whose target is empty (no face found) count for outside only if present is true; the caller
    marks them absent.
    """
    avg = maps.float().mean(2)  # [B, K, h, w]
    size = tuple(masks.shape[-2:])
    up = F.interpolate(avg, size=size, mode="bilinear", align_corners=False)  # [B, K, S, S]
    m = masks.float().squeeze(2)  # [B, K, S, S]
    inside = (up * m).sum((-2, -1)) / m.sum((-2, -1)).clamp_min(1.0)
    outside = (up * (1 - m)).sum((-2, -1)) / up.sum((-2, -1)).clamp_min(1e-30)
    w = present.to(up.device).float()
    count = w.sum(0)
    return (inside * w).sum(0) / count.clamp_min(1.0), (outside * w).sum(0) / count.clamp_min(1.0), count


class AttentionCollapseGuard:
    """Watches each token's inside probability during phase 2 and says when it has collapsed.

    Baseline = the mean of the first :data:`BASELINE_STEPS` values a token gets; an exponential moving
    average (decay :data:`EMA_DECAY`) follows it from the first value. Once the baseline exists, a token
    whose EMA falls below ``ratio`` x baseline has collapsed: :meth:`update` returns it, once per token.
    ``ratio = 0`` turns the guard off. Its state is plain numbers, saved in checkpoints.
    """

    def __init__(self, tokens: list[str], ratio: float) -> None:
        self.tokens = list(tokens)
        self.ratio = ratio
        self.sums = {t: 0.0 for t in self.tokens}
        self.counts = {t: 0 for t in self.tokens}
        self.ema: dict[str, float | None] = {t: None for t in self.tokens}
        self.tripped: set[str] = set()

    def baseline(self, token: str) -> float | None:
        """The token's reference level, or None before it has :data:`BASELINE_STEPS` values."""
        n = self.counts[token]
        return self.sums[token] / n if n >= BASELINE_STEPS else None

    def update(self, inside: dict[str, float]) -> list[str]:
        """Feed one optimiser step's inside probabilities (tokens absent from the step are left out);
        returns the tokens that collapsed at this step (each only the first time)."""
        new = []
        for token, value in inside.items():
            if self.counts[token] < BASELINE_STEPS:
                self.sums[token] += value
                self.counts[token] += 1
            ema = self.ema[token]
            self.ema[token] = value if ema is None else EMA_DECAY * ema + (1 - EMA_DECAY) * value
            base = self.baseline(token)
            if self.ratio > 0 and base is not None and token not in self.tripped and self.ema[token] < self.ratio * base:
                self.tripped.add(token)
                new.append(token)
        return new

    def describe(self, token: str) -> str:
        """What happened to a tripped token and what to do, for the warning or the stop message."""
        base, ema = self.baseline(token), self.ema[token]
        return (f"attention to {token} inside its region fell to {ema:.2g} ({ema / base:.1%} of its first "
                f"{BASELINE_STEPS} steps' {base:.2g}): the model is learning to ignore the token. Remedies: "
                "loss.attn_detach_extremes = false, a lower loss.attn_weight or phase2.lr_unet")

    def state(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "ema": dict(self.ema), "tripped": sorted(self.tripped)}

    def load_state(self, state: dict) -> None:
        self.sums.update(state["sums"])
        self.counts.update(state["counts"])
        self.ema.update(state["ema"])
        self.tripped = set(state["tripped"])


def format_figures(logs: dict[str, float], words: tuple[str, str]) -> str:
    """One log line: the loss terms, then per token its raw attention inside its region, the share
    outside it, and its embedding norm ("norm 2": in SDXL's text_encoder_2), those present in `logs`."""
    parts = [f"{k} {v:.4g}" for k, v in logs.items() if "/" not in k]
    for w in words:
        token = [f"{label} {logs[f'{key}/{w}']:.3g}" for key, label in
                 (("inside", "inside"), ("outside", "outside share"), ("norm", "norm"), ("norm_2", "norm 2"))
                 if f"{key}/{w}" in logs]
        if token:
            parts.append(f"{w}: " + ", ".join(token))
    return " | ".join(parts)
