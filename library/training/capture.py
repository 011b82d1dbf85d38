"""The attention capture of a run, by the kind of attention the family's denoiser has
(``family.attention_kind``): "cross" (the UNet's cross-attention, library/training/attention.py) or
"joint" (a DiT's joint text + image attention, library/training/joint_attention.py). Both stores give
maps [B, K, M, h, w] and take token positions the same way."""

from __future__ import annotations

from typing import Sequence

from library.training.attention import AttentionMapStore, install_attention_capture


def install_capture(attention_kind: str, model, layers: Sequence[str], backend: str = "sdpa",
                    normalisation: str = "text") -> AttentionMapStore:
    """A store recording the special tokens' maps at `layers` of `model`. `backend` (sdpa / xformers) is the
    UNet's attention kernel; `normalisation` ("text" / "joint") how a joint attention's logits become
    probabilities. ValueError for unknown layers or settings (the caller names the config key)."""
    if attention_kind == "joint":
        from library.training.joint_attention import JointAttentionMapStore, install_joint_attention_capture

        store = JointAttentionMapStore()
        install_joint_attention_capture(model, store, layers, normalisation)
        return store
    store = AttentionMapStore()
    install_attention_capture(model, store, layers, backend)
    return store
