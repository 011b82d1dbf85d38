"""The row log-sum-exp of an attention's logits, ``LSE_i = log sum_j exp(q_i . k_j * scale + bias_j)``,
computed over chunks of queries so that the full query x key matrix is never held (forward or backward).

Attention refocusing on a joint (text + image) attention needs the probability the joint softmax gives to a
special token's key, ``exp(l_ik - LSE_i)``; with 4096 image queries and 4096 + 512 keys per head the full
matrix is what the fused kernels avoid, and autograd through a plain ``torch.logsumexp`` would keep it
(its backward needs the logits). Here the backward is written out: with ``P_ij = exp(l_ij - LSE_i)`` (the
softmax), ``dLSE_i/dq_i = scale * sum_j P_ij k_j`` and ``dLSE_i/dk_j = scale * P_ij q_i``, recomputed
chunk by chunk, so only q, k and LSE are saved (the softmax-gradient identity, e.g. FlashAttention,
Dao et al. 2022, sec. 3.1, where the same LSE is kept for the backward).
"""
from __future__ import annotations

import torch

__all__ = ["chunked_logsumexp", "DEFAULT_CHUNK_BYTES"]

# bytes of float32 logits one chunk may hold (forward and backward); 64 MiB keeps the transient small next
# to a step's activations and the chunks few (a 1024 px Z-Image layer: 30 heads x 4608 keys -> 121 rows)
DEFAULT_CHUNK_BYTES = 64 * 2**20


def _rows_per_chunk(q: torch.Tensor, n_keys: int, chunk_bytes: int) -> int:
    per_row = q.shape[0] * q.shape[1] * max(n_keys, 1) * 4
    return max(1, chunk_bytes // per_row)


def _logits(q_c: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    logits = torch.matmul(q_c, k.transpose(-1, -2)) * scale
    return logits if bias is None else logits + bias


class _ChunkedLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, bias, scale, rows):
        n = q.shape[2]
        out = q.new_empty(q.shape[:3])
        for start in range(0, n, rows):
            out[:, :, start:start + rows] = torch.logsumexp(_logits(q[:, :, start:start + rows], k, bias, scale), dim=-1)
        ctx.save_for_backward(q, k, bias, out)
        ctx.scale, ctx.rows = scale, rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, bias, lse = ctx.saved_tensors
        scale, rows = ctx.scale, ctx.rows
        grad_q = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        grad_k = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        for start in range(0, q.shape[2], rows):
            stop = start + rows
            q_c = q[:, :, start:stop]
            # g_i * P_ij; a fully masked row (LSE = -inf) has no probabilities and gets no gradient
            p = torch.exp(_logits(q_c, k, bias, scale) - lse[:, :, start:stop, None]).nan_to_num_(0.0)
            gp = p * grad[:, :, start:stop, None]
            if grad_q is not None:
                grad_q[:, :, start:stop] = torch.matmul(gp, k) * scale
            if grad_k is not None:
                grad_k += torch.matmul(gp.transpose(-1, -2), q_c) * scale
        return grad_q, grad_k, None, None, None


def chunked_logsumexp(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """``logsumexp_j(q_i . k_j * scale + bias_j)`` for every query row -> [B, H, N] (q's dtype).

    q [B, H, N, d], k [B, H, S, d] (same dtype; float32 for the capture), bias None or an additive mask
    broadcastable to [B, H, N, S] (0 where a key is attended, -inf where masked; it gets no gradient).
    Differentiable in q and k; neither direction holds more than one chunk of ``chunk_bytes`` of logits.
    Raises ValueError on mismatched shapes.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q [B, H, N, d] and k [B, H, S, d] expected, got {tuple(q.shape)} and {tuple(k.shape)}")
    if bias is not None:
        bias = bias.detach().to(q.dtype)
    return _ChunkedLSE.apply(q, k, bias, float(scale), _rows_per_chunk(q, k.shape[2], chunk_bytes))
