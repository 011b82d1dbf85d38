"""Capture the special tokens' attention maps in the joint (text + image) attention of flow-matching DiTs:
Z-Image's single-stream ``layers`` and FLUX.2 Klein's double-stream ``transformer_blocks`` and
single-stream ``single_transformer_blocks`` (diffusers 0.42.1).

A joint attention has no cross-attention to read: text and image tokens are one sequence and every query
attends to every key. A special token's map is what the *image* queries give to that token's *text* key,
on the latent token grid (image tokens -> (H/p, W/p)). The capture processors below compute the layer's
output exactly as diffusers' own processors do (same projections, norms, RoPE, ``dispatch_attention_fn``)
and, in a side branch, only the image queries' logits against the K special tokens' keys (after the same
norms and RoPE, in float32): [B, H, N_img, K] instead of the N x N matrix. Two normalisations:

- ``"joint"``: the exact probability of the joint softmax, ``exp(l_ik - LSE_i)`` with ``LSE_i`` the row
  log-sum-exp over every key the real attention uses (text, text padding, image, the attention mask
  applied), from :func:`library.training.joint_lse.chunked_logsumexp` (chunked, gradient through LSE);
- ``"text"``: a softmax over the text keys only (the same LSE restricted to the text segment), i.e. the
  cross-attention a text-to-image layer would have; the image keys (4096 at 1024 px against 512 text
  keys) no longer dilute it.

Sequence layouts, read from diffusers 0.42.1: Z-Image (``_build_unified_sequence``, basic mode) joins
``[image, caption]``, the image padded to a multiple of ``SEQ_MULTI_OF`` (32) tokens and the caption too,
batch padding masked by a [B, S] bool mask; RoPE (complex, ``freqs_cis``) after the q/k RMS norms. Klein
joins ``[text, image]`` (``Flux2AttnProcessor``: encoder q/k/v first; single blocks get the joined
sequence), RoPE (``image_rotary_emb``, text then image) after the q/k norms. Token positions index the
text sequence the transformer is given (Z-Image's ``cap_feats`` item, Klein's ``encoder_hidden_states``).
Text-to-image training only: Z-Image's omni mode ([caption, image, SigLIP]) and Klein's reference-image
tokens (``num_ref_tokens``, the KV cache) join other sequences, which these layouts do not describe.

Use::

    store = JointAttentionMapStore()
    install_joint_attention_capture(transformer, store, ["layers.14", "layers.15"], normalisation="text")
    store.set_token_positions(positions, grid=(h, w))     # [B, K], -1 absent; grid = latent / patch size
    pred = transformer(...)
    maps = store.maps()                                   # [B, K, M, h, w], M = layers x heads
    loss = multi_token_refocus_loss(maps, masks, present) # S(.) and eq. 8 as for SD

Gradient checkpointing (non-reentrant, diffusers' default) and the replay of a checkpointed block in
backward work as in library/training/attention.py: the store is keyed by the RoPE tensor each transformer
forward builds once and hands to every block unchanged, so a recomputation replays its own forward.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttnProcessor,
    _get_qkv_projections,
)
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, ZSingleStreamAttnProcessor

from library.training.attention import AttentionMapStore
from library.training.joint_lse import DEFAULT_CHUNK_BYTES, chunked_logsumexp, float32_matmul_t

__all__ = [
    "DEFAULT_NORMALISATION",
    "NORMALISATIONS",
    "JointAttentionMapStore",
    "special_token_maps",
    "install_joint_attention_capture",
    "remove_joint_attention_capture",
]

NORMALISATIONS = ("joint", "text")
# "text": the quantity the SD path captures (a softmax over the prompt's keys); "joint" multiplies it, query by
# query, by the share of that query's attention that goes to the text at all (measured 0.016 to 0.48 on the
# tiny Z-Image), a token-independent factor eq. 8 could lower instead of moving a token (bench/RESULTS.md)
DEFAULT_NORMALISATION = "text"


class _Call(NamedTuple):
    positions: torch.Tensor  # [B, K] long on the layer's device
    grid: tuple[int, int]  # image tokens (rows, columns)


class JointAttentionMapStore(AttentionMapStore):
    """:class:`AttentionMapStore` that also holds the latent token grid of the next forward (a joint
    sequence does not tell where its image ends or how it folds). :meth:`maps` -> [B, K, M, h, w]."""

    def __init__(self) -> None:
        super().__init__()
        self._grid: tuple[int, int] | None = None

    def set_token_positions(self, positions: torch.Tensor, grid: tuple[int, int] | None = None) -> None:
        """positions [B, K] into the transformer's text sequence (-1: absent); grid = (h, w) image tokens,
        i.e. the latent's (height, width) divided by the patch size. Raises ValueError on a bad grid."""
        if grid is None or len(grid) != 2 or min(int(grid[0]), int(grid[1])) < 1:
            raise ValueError(f"grid must be (h, w) image tokens, both >= 1, got {grid!r}")
        super().set_token_positions(positions)
        self._grid = (int(grid[0]), int(grid[1]))

    def clear(self) -> None:
        super().clear()
        self._grid = None

    def _current_positions(self, device: torch.device) -> _Call | None:
        pos = super()._current_positions(device)
        return None if pos is None else _Call(pos, self._grid)


def _mask_bias(mask: torch.Tensor | None, batch: int, seq: int, layer: str) -> torch.Tensor | None:
    """The attention mask as an additive float32 bias [B, 1, 1, S] (0 attended, -inf masked)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[-1] != seq:
        raise ValueError(f"{layer}: attention capture supports a key mask [B, S] or [B, 1, 1, S], got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf")).expand(batch, -1, -1, -1)
    return mask.float().expand(batch, -1, -1, -1)


def special_token_maps(
    query: torch.Tensor,
    key: torch.Tensor,
    image: tuple[int, int],
    text: tuple[int, int],
    positions: torch.Tensor,
    grid: tuple[int, int],
    normalisation: str,
    mask: torch.Tensor | None = None,
    layer: str = "layer",
    max_position: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """The special tokens' attention probabilities from the image queries -> [B, H, K, h, w] float32.

    query, key [B, S, H, d]: the joint sequence after the norms and RoPE, as the attention kernel gets them;
    image = (start, count) of the image tokens in it (count = h * w for grid (h, w)), text = (start, length)
    of the text segment; positions [B, K] index the text segment (-1: absent -> a zero map), mask the
    attention's key mask ([B, S] or [B, 1, 1, S], bool or additive) or None. Logits use SDPA's default scale
    1/sqrt(d) (what ``dispatch_attention_fn`` is called with). ``normalisation`` "joint": exp(l - LSE over
    all S keys, mask applied); "text": exp(l - LSE over the text segment's keys, mask applied).
    Raises ValueError when the grid does not fit the sequence or ``max_position`` (the largest position,
    a host int given by the caller so that nothing waits on the device) is past the text.
    """
    b, seq, heads, d = query.shape
    h, w = grid
    (i0, n_img), (t0, n_txt) = image, text
    if n_img != h * w or i0 + n_img > seq or n_txt < 1 or t0 + n_txt > seq:
        raise ValueError(f"{layer}: a {h}x{w} token grid does not fit a joint sequence of {seq} tokens "
                         "(grid = latent size / patch size)")
    if max_position is not None and max_position >= n_txt:
        raise ValueError(f"{layer}: token position {max_position} >= {n_txt} text positions")
    if positions.shape[0] != b:
        raise ValueError(f"{layer}: token positions are for {positions.shape[0]} samples, the batch has {b}")
    k = positions.shape[1]
    bias = _mask_bias(mask, b, seq, layer)
    # float32 whatever autocast says; meta tensors (bench/measure_joint_attention.py's accounting) have no autocast
    no_autocast = torch.autocast(query.device.type, enabled=False) if query.device.type != "meta" else contextlib.nullcontext()
    with no_autocast:
        # views of the kernel's q and k, not float32 copies: the functions below upcast chunk by chunk
        q = query[:, i0:i0 + n_img].transpose(1, 2)  # [B, H, N, d]
        keys = key.transpose(1, 2)  # [B, H, S, d]
        index = (t0 + positions.clamp(min=0)).view(b, 1, k, 1)
        special = keys.gather(2, index.expand(b, heads, k, d))  # [B, H, K, d]
        logits = float32_matmul_t(q, special) / math.sqrt(d)  # [B, H, N, K] float32
        if bias is not None:
            logits = logits + bias[:, :, :, t0:t0 + n_txt].gather(-1, (index - t0).view(b, 1, 1, k))
        if normalisation == "joint":
            lse = chunked_logsumexp(q, keys, 1 / math.sqrt(d), bias, chunk_bytes)
        elif normalisation == "text":
            text_bias = None if bias is None else bias[..., t0:t0 + n_txt]
            lse = chunked_logsumexp(q, keys[:, :, t0:t0 + n_txt], 1 / math.sqrt(d), text_bias, chunk_bytes)
        else:
            raise ValueError(f"unknown normalisation {normalisation!r}; use one of {NORMALISATIONS}")
        probs = torch.exp(logits - lse.unsqueeze(-1)) * (positions >= 0).view(b, 1, 1, k)
    return probs.permute(0, 1, 3, 2).reshape(b, heads, k, h, w)


class _JointCapture:
    """Shared part of the capture processors: which forward to capture, the checks, the recording."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, store: JointAttentionMapStore, layer: str, normalisation: str, original,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {normalisation!r}; use one of {NORMALISATIONS}")
        self.store, self.layer_name, self.normalisation = store, layer, normalisation
        self.original, self.chunk_bytes = original, chunk_bytes
        # keep the backend the model was set to (set_attention_backend writes it on the processor)
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def _capture(self, query, key, key_of_forward, layout, mask=None) -> None:
        """layout(grid) -> ((image start, count), (text start, length)) in this layer's joint sequence."""
        call, record = self.store._positions_for_call(self.layer_name, key_of_forward)
        if call is None:
            return
        image, text = layout(call.grid)
        maps = special_token_maps(query, key, image, text, call.positions, call.grid, self.normalisation, mask,
                                  self.layer_name, self.store._max_position if record else None, self.chunk_bytes)
        if record:
            self.store._record(self.layer_name, maps)


def _z_image_rope(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # ZSingleStreamAttnProcessor's nested apply_rotary_emb (diffusers 0.42.1), which is not importable
    with torch.amp.autocast("cuda", enabled=False):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        x_out = torch.view_as_real(x * freqs_cis.unsqueeze(2)).flatten(3)
        return x_out.type_as(x_in)


class ZImageCaptureProcessor(_JointCapture):
    """ZSingleStreamAttnProcessor (diffusers 0.42.1) plus the capture; sequence [image (padded to 32), caption]."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _z_image_rope(query, freqs_cis), _z_image_rope(key, freqs_cis)
        dtype = query.dtype
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        seq = query.shape[1]

        def layout(grid):
            n = grid[0] * grid[1]
            start = n + (-n) % SEQ_MULTI_OF  # the caption follows the padded image (_pad_with_ids)
            return (0, n), (start, seq - start)

        self._capture(query, key, hidden_states if freqs_cis is None else freqs_cis, layout, attention_mask)
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(dtype)
        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)
        return output


class Flux2CaptureProcessor(_JointCapture):
    """Flux2AttnProcessor (double-stream, diffusers 0.42.1) plus the capture; sequence [text, image]."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        n_txt = 0
        if attn.added_kv_proj_dim is not None:
            n_txt = encoder_hidden_states.shape[1]
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        seq = query.shape[1]
        forward_key = hidden_states if image_rotary_emb is None else image_rotary_emb[0]
        self._capture(query, key, forward_key, lambda grid: ((n_txt, grid[0] * grid[1]), (0, n_txt)), attention_mask)

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes([n_txt, seq - n_txt], dim=1)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class Flux2ParallelCaptureProcessor(_JointCapture):
    """Flux2ParallelSelfAttnProcessor (single-stream, diffusers 0.42.1) plus the capture; the block joins
    [text, image], so the image is the last h * w tokens and the text everything before."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        seq = query.shape[1]

        def layout(grid):
            n = grid[0] * grid[1]
            return (seq - n, n), (0, seq - n)

        forward_key = hidden_states if image_rotary_emb is None else image_rotary_emb[0]
        self._capture(query, key, forward_key, layout, attention_mask)
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        return attn.to_out(torch.cat([hidden_states, mlp_hidden_states], dim=-1))


# the processor each family's joint attention runs in diffusers 0.42.1 -> its capturing twin
_CAPTURE_FOR = {
    ZSingleStreamAttnProcessor: ZImageCaptureProcessor,
    Flux2AttnProcessor: Flux2CaptureProcessor,
    Flux2ParallelSelfAttnProcessor: Flux2ParallelCaptureProcessor,
}
# Z-Image's refiners run the same processor over the image alone or the caption alone: not joint
_JOINT_PREFIXES = ("layers.", "transformer_blocks.", "single_transformer_blocks.")


def _attention_module(model, layer: str):
    """A block name ("layers.3", "single_transformer_blocks.0") -> (module name, its attention module)."""
    modules = dict(model.named_modules())
    for name in (layer, f"{layer}.attention", f"{layer}.attn"):
        module = modules.get(name)
        original = getattr(module, "processor", None)
        if original is not None:
            original = getattr(original, "original", original)  # already capturing: wrap the diffusers one
            if type(original) in _CAPTURE_FOR and name.startswith(_JOINT_PREFIXES):
                return name, module, original
    raise ValueError(
        f"capture layer {layer!r} is not a joint attention block of this transformer (Z-Image: 'layers.N', "
        "Klein: 'transformer_blocks.N' or 'single_transformer_blocks.N')"
    )


def install_joint_attention_capture(
    model,
    store: JointAttentionMapStore,
    layers: Sequence[str],
    normalisation: str = DEFAULT_NORMALISATION,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[str]:
    """Put the capturing twin of each named block's attention processor on it (every other attention
    keeps its processor); registers the layer order on ``store``; returns the attention module names.
    Works before or after peft LoRA layers are injected (the processors call ``attn.to_q`` etc.).
    Raises ValueError on an unknown, repeated or non-joint layer, or an unknown normalisation."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; use one of {NORMALISATIONS}")
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise ValueError("no capture layers given")
    if len(set(layers)) != len(layers):
        raise ValueError(f"capture layers repeat: {layers}")
    found = [_attention_module(model, layer) for layer in layers]
    for layer, (_, module, original) in zip(layers, found):
        module.set_processor(_CAPTURE_FOR[type(original)](store, layer, normalisation, original, chunk_bytes))
    store._layers = list(layers)
    store._maps = {}
    return [name for name, _, _ in found]


def remove_joint_attention_capture(model) -> None:
    """Give every capturing attention of ``model`` its diffusers processor back."""
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, _JointCapture):
            module.set_processor(processor.original)
