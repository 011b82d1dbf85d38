"""Capture the special tokens' cross-attention maps in the lowest-resolution cross-attention layers
(SD 1.x's 16x16 at 512 px, SDXL's 32x32 at 1024 px: ``ModelFamily.capture_layers``).

The attention refocusing loss (docs/method.md, eq. 8) needs the cross-attention *probabilities* of the
special tokens ([V1], [V2]) in the 16x16 layers of SD 1.5: ``down_blocks.2.attentions.{0,1}`` and
``up_blocks.1.attentions.{0,1,2}`` (``transformer_blocks.0.attn2``), 5 layers x 8 heads. The fused
kernels (PyTorch SDPA, xformers) return no probabilities, so :class:`CaptureCrossAttnProcessor` keeps
the fused kernel for the layer's output and recomputes, for those layers alone, ``softmax(Q K^T *
attn.scale)`` in float32 (256 x 77 per head at SD size: cheap), over all the keys, then keeps only the
special tokens' columns. Every other attention stays on :class:`AttnProcessor2_0` (or
``XFormersAttnProcessor``). Layers are selected by module name, never by spatial size.

Use from the trainer::

    store = AttentionMapStore()
    install_attention_capture(unet, store)               # after unet.add_adapter(...): LoRA still applies
    store.set_token_positions(positions)                  # [B, K] long, -1 where a token is absent
    pred = unet(noisy, t, encoder_hidden_states=ctx).sample
    maps = store.maps()                                   # [B, K, M, h, w], M = 5 layers x heads
    loss = ... attention_refocus_loss(maps[:, k], mask_k) ...
    loss.backward()                                       # read maps() BEFORE backward
    store.clear()

Gradient checkpointing: diffusers 0.42.1's ``enable_gradient_checkpointing()`` uses
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (``ModelMixin.enable_gradient_checkpointing``),
under which the maps recorded in the forward carry their autograd graph and the refocusing loss reaches
the LoRA weights of ``to_q`` / ``to_k``. Do NOT switch to reentrant checkpointing
(``use_reentrant=True``, e.g. through ``enable_gradient_checkpointing(gradient_checkpointing_func=...)``
or by setting ``module._gradient_checkpointing_func``): reentrant checkpointing runs the forward under
``no_grad``, so the maps come out with no graph and the refocusing loss silently gives the LoRA no
gradient (the trap docs/method.md describes). To pass a custom function, keep ``use_reentrant=False``::

    unet.enable_gradient_checkpointing(
        gradient_checkpointing_func=lambda m, *a: torch.utils.checkpoint.checkpoint(m.__call__, *a, use_reentrant=False))

With checkpointing a block runs again during backward. The store is a dict by layer name (overwrite,
never append), and the re-run inside backward writes nothing: it replays exactly the computation of the
forward it recomputes (same token positions, even if the store was cleared or given new positions in
between, as torch's checkpoint requires) and leaves the maps of the forward in place.

The fused SDPA call is AttnProcessor2_0's, which (diffusers 0.42.1, a TODO there) does not pass
``attn.scale`` and so uses 1/sqrt(head_dim); the probabilities use ``attn.scale``. In SD 1.x the two
are equal. The maps hold their autograd graph until the next set_token_positions() / clear().

Mixed precision: the probabilities are computed in float32 with autocast off, whatever the model dtype;
the maps are float32.
"""
from __future__ import annotations

import math
import typing
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor

from library.config import AttentionBackend
from library.files.messages import one_line
from library.models.family import SD1

__all__ = [
    "DEFAULT_CAPTURE_LAYERS",
    "AttentionMapStore",
    "CaptureCrossAttnProcessor",
    "install_attention_capture",
    "remove_attention_capture",
    "capture_module_name",
]

# SD 1.x's; the trainer takes its model family's (ModelFamily.capture_layers) unless attention.layers names some
DEFAULT_CAPTURE_LAYERS: tuple[str, ...] = SD1.capture_layers

_BACKENDS = typing.get_args(AttentionBackend)  # declared once, in library/config.py


def capture_module_name(layer: str) -> str:
    """The cross-attention module a capture layer names: a transformer model (``down_blocks.2.attentions.0``)
    means its first block's (``down_blocks.2.attentions.0.transformer_blocks.0.attn2``); a full module path
    ending in ``.attn2`` (what ModelFamily.capture_layers holds, and the only way to name the other
    transformer blocks of SDXL's deeper attentions) is taken as it is."""
    return layer if layer.endswith(".attn2") else f"{layer}.transformer_blocks.0.attn2"


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread, i.e. when a checkpointed
    block is being recomputed (torch's own checkpoint code uses the same test)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def _eager(fn):
    """Keep bookkeeping (weak references, the autograd engine's state) out of torch.compile graphs."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


class AttentionMapStore:
    """Holds the token positions for the next forward and the maps the capture layers record.

    Maps are kept per layer name (a dict: a layer that runs again overwrites its entry). The layer
    order of :meth:`maps` is the order given to :func:`install_attention_capture`.
    """

    def __init__(self) -> None:
        self._positions: torch.Tensor | None = None
        self._max_position = -1
        self._positions_on: dict[torch.device, torch.Tensor] = {}
        self._maps: dict[str, torch.Tensor] = {}
        self._layers: list[str] = []
        # per layer: (weakref to the encoder_hidden_states of a forward, positions that forward used);
        # lets a checkpoint recomputation in backward replay the forward it recomputes.
        self._replay: dict[str, list[tuple[weakref.ref, torch.Tensor | None]]] = {}

    # -- set up ----------------------------------------------------------------------------------
    def set_token_positions(self, positions: torch.Tensor, grid: tuple[int, int] | None = None) -> None:
        """Token positions for the next forward: integer tensor [B, K], index into the text sequence
        (0..76), -1 where token k is absent from sample b's prompt. Drops maps of an earlier forward.
        `grid` (image tokens of a joint attention, :class:`JointAttentionMapStore`) is not needed here:
        a cross-attention's query count gives its square map."""
        positions = torch.as_tensor(positions)
        if positions.dim() != 2:
            raise ValueError(f"token positions must be [B, K], got shape {tuple(positions.shape)}")
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ValueError(f"token positions must be integers, got {positions.dtype}")
        lo, hi = (int(positions.min()), int(positions.max())) if positions.numel() else (-1, -1)
        if lo < -1:
            raise ValueError("token positions must be >= 0, or -1 for an absent token")
        self._positions = positions.long()
        self._max_position = hi  # checked against the key length in each layer without a device sync
        self._positions_on = {}
        self._maps = {}

    def clear(self) -> None:
        """Drop the recorded maps and the token positions (a following forward captures nothing until
        :meth:`set_token_positions` is called again)."""
        self._positions = None
        self._positions_on = {}
        self._maps = {}

    @property
    def layers(self) -> list[str]:
        """Layer names whose maps :meth:`maps` returns, in order."""
        return list(self._layers)

    @property
    def token_positions(self) -> torch.Tensor | None:
        return self._positions

    # -- read ------------------------------------------------------------------------------------
    def layer_maps(self) -> dict[str, torch.Tensor]:
        """The recorded maps by layer name, each [B, heads, K, h, w] (a shallow copy of the dict)."""
        return dict(self._maps)

    def maps(self) -> torch.Tensor:
        """[B, K, M, h, w] float32 probabilities, M = sum of the capture layers' heads, layers in the
        installed order, heads in order within a layer. Raises RuntimeError if a layer did not record."""
        if not self._layers:
            raise RuntimeError("no attention capture installed on this store: call install_attention_capture(unet, store)")
        missing = [name for name in self._layers if name not in self._maps]
        if missing:
            raise RuntimeError(
                f"no attention maps recorded for layer(s) {missing}: call store.set_token_positions(...) before "
                "the UNet forward and read store.maps() after it (before store.clear())"
            )
        parts = [self._maps[name] for name in self._layers]
        b, _, k, h, w = parts[0].shape
        for name, part in zip(self._layers, parts):
            if (part.shape[0], part.shape[2], part.shape[3], part.shape[4]) != (b, k, h, w):
                raise RuntimeError(
                    f"capture layers disagree in shape: {self._layers[0]} gave {tuple(parts[0].shape)}, "
                    f"{name} gave {tuple(part.shape)} ([B, heads, K, h, w]); capture layers of one resolution"
                )
        return torch.cat([p.transpose(1, 2) for p in parts], dim=2)

    # -- used by the processor -------------------------------------------------------------------
    def _current_positions(self, device: torch.device) -> torch.Tensor | None:
        if self._positions is None:
            return None
        pos = self._positions_on.get(device)
        if pos is None:
            pos = self._positions.to(device, non_blocking=True)
            self._positions_on[device] = pos
        return pos

    @_eager
    def _positions_for_call(self, layer: str, context: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """(positions to capture with or None, whether to record the result)."""
        entries = self._replay.setdefault(layer, [])
        entries[:] = [(ref, pos) for ref, pos in entries if ref() is not None]
        if _in_backward():
            # a checkpointed block recomputed during backward: redo exactly what its forward did.
            for ref, pos in reversed(entries):
                if ref() is context:
                    return pos, False
            # unknown forward (no checkpointing match): behave like the last forward of this layer
            return (entries[-1][1] if entries else self._current_positions(context.device)), False
        pos = self._current_positions(context.device)
        entries[:] = [(ref, p) for ref, p in entries if ref() is not context]
        entries.append((weakref.ref(context), pos))
        return pos, pos is not None

    def _record(self, layer: str, probs: torch.Tensor) -> None:
        self._maps[layer] = probs


class CaptureCrossAttnProcessor:
    """AttnProcessor2_0 (or XFormersAttnProcessor) for the output, plus the special tokens' attention
    probabilities, recorded in ``store`` under ``layer_name`` as [B, heads, K, h, w] float32.

    The probabilities are ``softmax(Q K^T * attn.scale)`` over all keys (the attention mask, if any,
    applied as the fused kernel applies it), computed in float32 from the same (LoRA-adapted) Q and K
    the fused kernel uses; column k of sample b is zero where the position is -1. h = w =
    sqrt(query length). Nothing extra is computed when the store has no positions set.
    """

    def __init__(self, store: AttentionMapStore, layer_name: str, backend: str = "sdpa", attention_op=None):
        if backend not in _BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; use one of {_BACKENDS}")
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError("CaptureCrossAttnProcessor needs torch.nn.functional.scaled_dot_product_attention")
        self.store = store
        self.layer_name = layer_name
        self.backend = backend
        self.attention_op = attention_op

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # --- as AttnProcessor2_0 (diffusers 0.42.1) ---
        residual = hidden_states
        raw_context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (batch, heads, query_length or 1, key_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # --- the special tokens' probabilities (before the fused kernel, from the same q and k) ---
        positions, record = self.store._positions_for_call(self.layer_name, raw_context)
        if positions is not None:
            probs = self._token_probs(attn, query, key, attention_mask, positions, check=record)
            if record:
                self.store._record(self.layer_name, probs)

        if self.backend == "sdpa":
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        else:
            import xformers.ops

            q_len, k_len = query.shape[2], key.shape[2]
            bias = None
            if attention_mask is not None:
                bias = attention_mask.expand(-1, -1, q_len, -1).reshape(batch_size * attn.heads, q_len, k_len)
            hidden_states = xformers.ops.memory_efficient_attention(
                query.reshape(batch_size * attn.heads, q_len, head_dim).contiguous(),
                key.reshape(batch_size * attn.heads, k_len, head_dim).contiguous(),
                value.reshape(batch_size * attn.heads, k_len, head_dim).contiguous(),
                attn_bias=bias,
                op=self.attention_op,
                scale=attn.scale,
            )
            hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _token_probs(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor,
        check: bool = True,
    ) -> torch.Tensor:
        """query [B, H, N, d], key [B, H, L, d] -> [B, H, K, h, w] float32."""
        b, heads, n, _ = query.shape
        n_keys = key.shape[2]
        if positions.shape[0] != b:
            raise ValueError(
                f"{self.layer_name}: token positions are for {positions.shape[0]} samples, the batch has {b}"
            )
        if check and self.store._max_position >= n_keys:
            raise ValueError(f"{self.layer_name}: token position {self.store._max_position} >= {n_keys} text positions")
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{self.layer_name}: query length {n} is not a square; attention capture needs a square latent"
            )
        k = positions.shape[1]
        with torch.autocast(device_type=query.device.type, enabled=False):
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale  # [B, H, N, L]
            if attention_mask is not None:
                if attention_mask.dtype == torch.bool:
                    scores = scores.masked_fill(~attention_mask, float("-inf"))
                else:
                    scores = scores + attention_mask.float()
            probs = scores.softmax(dim=-1)
            index = positions.clamp(min=0).view(b, 1, 1, k).expand(b, heads, n, k)
            cols = probs.gather(-1, index)  # [B, H, N, K]
            present = (positions >= 0).to(cols.dtype).view(b, 1, 1, k)
            cols = cols * present
        return cols.permute(0, 1, 3, 2).reshape(b, heads, k, side, side)


def _xformers_check(unet) -> None:
    """Raise a one-line RuntimeError unless xformers imports and runs on the UNet's device and dtype."""
    try:
        import xformers.ops

        param = next(unet.parameters())
        q = torch.randn(1, 2, 1, 40, device=param.device, dtype=param.dtype)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as exc:  # ImportError, kernels built for another torch, no CPU kernel, ...
        raise RuntimeError(
            f"xformers isn't usable here ({type(exc).__name__}: {one_line(exc, 200, first_line=True)}); "
            "use attention backend 'sdpa'"
        ) from exc


def install_attention_capture(
    unet,
    store: AttentionMapStore,
    layers: Sequence[str] = DEFAULT_CAPTURE_LAYERS,
    backend: str = "sdpa",
) -> list[str]:
    """Put :class:`CaptureCrossAttnProcessor` on each layer's module (:func:`capture_module_name`)
    and AttnProcessor2_0 (``backend="sdpa"``) or XFormersAttnProcessor (``"xformers"``) on every other
    attention of ``unet``. Registers the layer order on ``store``; returns the capture module names.
    Works before or after peft LoRA layers are injected (the processor calls ``attn.to_q`` etc.)."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {_BACKENDS}")
    if isinstance(layers, str):
        layers = (layers,)
    layers = list(layers)
    if not layers:
        raise ValueError("no capture layers given")
    if len(set(layers)) != len(layers):
        raise ValueError(f"capture layers repeat: {layers}")
    modules = dict(unet.named_modules())
    capture: dict[str, str] = {}  # module name -> layer name
    for layer in layers:
        name = capture_module_name(layer)
        module = modules.get(name)
        if not isinstance(module, Attention):
            raise ValueError(f"capture layer {layer!r} does not exist in this UNet (no attention module {name!r})")
        if not module.is_cross_attention:
            raise ValueError(f"capture layer {layer!r}: {name} is not a cross-attention")
        capture[name] = layer
    if backend == "xformers":
        _xformers_check(unet)

    processors = {}
    for key in unet.attn_processors:
        module_name = key[: -len(".processor")]
        if module_name in capture:
            processors[key] = CaptureCrossAttnProcessor(store, capture[module_name], backend=backend)
        else:
            processors[key] = XFormersAttnProcessor() if backend == "xformers" else AttnProcessor2_0()
    unet.set_attn_processor(processors)
    store._layers = list(layers)
    store._maps = {}
    return list(capture)


def remove_attention_capture(unet) -> None:
    """Back to AttnProcessor2_0 on every attention of ``unet``."""
    unet.set_attn_processor(AttnProcessor2_0())
