"""The row log-sum-exp of an attention's logits, ``LSE_i = log sum_j exp(q_i . k_j * scale + bias_j)``,
computed over chunks of queries so that the full query x key matrix is never held (forward or backward).

Attention refocusing on a joint (text + image) attention needs the probability the joint softmax gives to a
special token's key, ``exp(l_ik - LSE_i)``; with 4096 image queries and 4096 + 512 keys per head the full
matrix is what the fused kernels avoid, and autograd through a plain ``torch.logsumexp`` would keep it
(its backward needs the logits). Here the backward is written out: with ``P_ij = exp(l_ij - LSE_i)`` (the
softmax), ``dLSE_i/dq_i = scale * sum_j P_ij k_j`` and ``dLSE_i/dk_j = scale * P_ij q_i``, recomputed
chunk by chunk, so only q, k and LSE are saved (the softmax-gradient identity, e.g. FlashAttention,
Dao et al. 2022, sec. 3.1, where the same LSE is kept for the backward).

Both functions compute in float32 but save their inputs as given: in a bf16 model those are the attention's
own q and k (views of what its kernel keeps anyway), so the capture adds no float32 copies of them to the
step's saved activations (bench/measure_joint_attention.py measures it).
"""
from __future__ import annotations

import torch

__all__ = ["chunked_logsumexp", "float32_matmul_t", "DEFAULT_CHUNK_BYTES"]

# bytes of float32 one chunk may hold: the logits of a chunk of queries (x3 in backward: logits, P, g * P), and
# the float32 keys of a group of heads with their gradient. 16 MiB keeps the transient of a 1024 px layer
# (30 heads x 4608 keys) near 100 MiB, under 10 % of a checkpointed step (bench/RESULTS.md), in chunks big
# enough for a GPU (3 heads x 303 query rows)
DEFAULT_CHUNK_BYTES = 16 * 2**20


def _chunks(q: torch.Tensor, k: torch.Tensor, chunk_bytes: int) -> tuple[int, int]:
    """(heads per group, query rows per chunk) for q [B, H, N, d], k [B, H, S, d]."""
    b, _, _, d = q.shape
    n_keys = max(k.shape[2], 1)
    heads = max(1, chunk_bytes // (2 * 4 * b * n_keys * d))
    rows = max(1, chunk_bytes // (4 * b * heads * n_keys))
    return heads, rows


def _logits(q_c: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    logits = torch.matmul(q_c.to(k.dtype), k.transpose(-1, -2)) * scale
    return logits if bias is None else logits + bias


class _ChunkedLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, bias, scale, heads, rows):
        n = q.shape[2]
        out = q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))
        for h0 in range(0, q.shape[1], heads):
            hs = slice(h0, h0 + heads)
            k32 = k[:, hs].to(out.dtype)  # transient: one head group's keys in float32
            for r0 in range(0, n, rows):
                out[:, hs, r0:r0 + rows] = torch.logsumexp(_logits(q[:, hs, r0:r0 + rows], k32, bias, scale), dim=-1)
        ctx.save_for_backward(q, k, bias, out)
        ctx.scale, ctx.heads, ctx.rows = scale, heads, rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, bias, lse = ctx.saved_tensors
        scale, heads, rows = ctx.scale, ctx.heads, ctx.rows
        grad_q = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        grad_k = torch.empty_like(k) if ctx.needs_input_grad[1] else None
        for h0 in range(0, q.shape[1], heads):
            hs = slice(h0, h0 + heads)
            k32 = k[:, hs].to(lse.dtype)
            grad_k32 = torch.zeros_like(k32)  # accumulated over the query chunks in float32
            for r0 in range(0, q.shape[2], rows):
                rs = slice(r0, r0 + rows)
                q_c = q[:, hs, rs].to(lse.dtype)
                # g_i * P_ij; a fully masked row (LSE = -inf) has no probabilities and gets no gradient
                gp = torch.exp(_logits(q_c, k32, bias, scale) - lse[:, hs, rs, None]).nan_to_num_(0.0)
                gp *= grad[:, hs, rs, None]
                if grad_q is not None:
                    grad_q[:, hs, rs] = torch.matmul(gp, k32) * scale
                grad_k32 += torch.matmul(gp.transpose(-1, -2), q_c)
            if grad_k is not None:
                grad_k[:, hs] = grad_k32 * scale
        return grad_q, grad_k, None, None, None, None


class _Float32MatMulT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return torch.matmul(a.to(dtype), b.to(dtype).transpose(-1, -2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = torch.matmul(grad, b.to(grad.dtype)).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_b = torch.matmul(grad.transpose(-1, -2), a.to(grad.dtype)).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def float32_matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` in float32 -> [..., N, K] float32 (a [..., N, d], b [..., K, d], any float dtypes), saving a and
    b as given rather than float32 copies (what ``a.float() @ b.float().mT`` would keep); gradients in their
    dtypes, as autograd through ``.float()`` gives them."""
    return _Float32MatMulT.apply(a, b)


def chunked_logsumexp(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """``logsumexp_j(q_i . k_j * scale + bias_j)`` for every query row -> [B, H, N] (q's dtype).

    q [B, H, N, d], k [B, H, S, d] (any float dtypes: computed in float32, or float64 for float64 inputs;
    the result is float32 or float64), bias None or an additive key mask [B or 1, 1, 1, S] (0 where a key is
    attended, -inf where masked; it gets no gradient). Differentiable in q and k (gradients in their dtypes);
    neither direction holds more than a few chunks of ``chunk_bytes`` besides its inputs and gradients.
    Raises ValueError on mismatched shapes.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q [B, H, N, d] and k [B, H, S, d] expected, got {tuple(q.shape)} and {tuple(k.shape)}")
    if bias is not None:
        if bias.dim() != 4 or bias.shape[1] != 1 or bias.shape[2] != 1 or bias.shape[3] != k.shape[2]:
            raise ValueError(f"bias must be a key mask [B, 1, 1, {k.shape[2]}], got {tuple(bias.shape)}")
        bias = bias.detach().to(torch.promote_types(q.dtype, torch.float32))
    return _ChunkedLSE.apply(q, k, bias, float(scale), *_chunks(q, k, chunk_bytes))
