"""Issue 20: the two normalisations of the joint-attention capture, measured.

    python bench/measure_joint_attention.py [--json out.json]

1. Tiny Z-Image and FLUX.2 Klein transformers (diffusers classes, small configs, seed 0, a LoRA on the
   attention projections), a 16 x 16 token grid and 32 text tokens (the 4096 : 512 ratio of 1024 px):
   for each normalisation, the maps' magnitude, their share inside a synthetic mask (raw and after S(.)),
   the eq. 8 loss and the norm of its gradient on the LoRA, and the text's share of the joint attention.
2. The same LoRA trained 100 steps on eq. 8 alone with each normalisation: the token's share outside the
   mask under both, and the prompt's share of the image tokens' attention, before and after.
3. Memory of the capture, counted as the bytes autograd saves in the forward (storage by storage, parameters
   left out): on the tiny models (bf16), and at 1024 px on meta tensors with the real Z-Image 6B and
   Klein 4B dims (bf16, 4096 image + 512 text tokens), the attention kernel standing in as a flash kernel
   (saves q, k, v, out and the float32 row LSE, not the S x S matrix); against the formula.
Runs on the CPU (about 6 minutes on 2 busy cores, 5 of them the trainings of 2.); no weights are read.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffusers.models.transformers.transformer_flux2 as flux2_module  # noqa: E402
import diffusers.models.transformers.transformer_z_image as z_module  # noqa: E402

from library.training.joint_lse import DEFAULT_CHUNK_BYTES  # noqa: E402
from library.training.joint_attention import (  # noqa: E402
    NORMALISATIONS,
    JointAttentionMapStore,
    install_joint_attention_capture,
)
from library.training.losses import attention_refocus_loss, normalize_attention_maps  # noqa: E402

GRID = (16, 16)
TEXT = 32
POSITIONS = torch.tensor([[3, 10]])
MiB = 2**20


# --- models --------------------------------------------------------------------------------------------
def _z_image(real: bool):
    if real:  # diffusers' defaults are Z-Image's (6B): dim 3840, 30 layers, 30 heads of 128
        return z_module.ZImageTransformer2DModel()
    return z_module.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[128, 32, 32])


def _klein(real: bool):
    if real:  # FLUX.2 Klein 4B's transformer/config.json: 5 double + 20 single blocks, 24 heads of 128
        return flux2_module.Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, guidance_embeds=False)
    return flux2_module.Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)


def _inputs(family: str, model, grid, text, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype) if device == "cpu" else torch.empty(*shape, device=device, dtype=dtype)

    h, w = grid
    if family == "zimage":
        cfg = model.config
        return dict(x=[rand(cfg.in_channels, 1, 2 * h, 2 * w)], t=torch.tensor([0.5], device=device),
                    cap_feats=[rand(text, cfg.cap_feat_dim)])
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text)).to(device)
    return dict(hidden_states=rand(1, h * w, model.config.in_channels),
                encoder_hidden_states=rand(1, text, model.config.joint_attention_dim),
                timestep=torch.tensor([0.5], device=device), img_ids=img_ids, txt_ids=txt_ids)


FAMILIES = {"zimage": (_z_image, ["layers.0", "layers.1"]),
            "klein": (_klein, ["transformer_blocks.0", "single_transformer_blocks.0"])}


def _with_lora(model):
    import peft

    targets = ["to_q", "to_k", "to_v", "add_k_proj", "to_qkv_mlp_proj"]
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                      target_modules=[t for t in targets if t in present]))
    g = torch.Generator().manual_seed(1)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            if "lora_B" in name:
                p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
            p.requires_grad_(True)
    return model


# --- 1. contrast and gradient --------------------------------------------------------------------------
def _mask():
    m = torch.zeros(1, 1, *GRID)
    m[..., 4:12, 5:13] = 1.0  # 64 of 256 tokens: 25 %
    return m


def _capture(model, family, layers, normalisation, positions, grad=False) -> torch.Tensor:
    """One forward with the capture installed -> store.maps() [1, K, M, h, w]."""
    store = JointAttentionMapStore()
    install_joint_attention_capture(model, store, layers, normalisation=normalisation)
    store.set_token_positions(positions, grid=GRID)
    with torch.set_grad_enabled(grad):
        model(**_inputs(family, model, GRID, TEXT))
    return store.maps()


def _text_share(model, family, layers) -> torch.Tensor:
    """The text's share of each image query's joint attention, [1, M, h, w]: "text" maps = "joint" / it."""
    return _capture(model, family, layers, "joint", torch.arange(TEXT).view(1, -1)).sum(dim=1)


def contrast(family: str) -> dict:
    build, layers = FAMILIES[family]
    torch.manual_seed(0)
    model = _with_lora(build(False)).train()
    mask = _mask()
    out = {}
    for normalisation in NORMALISATIONS:
        model.zero_grad(set_to_none=True)
        maps = _capture(model, family, layers, normalisation, POSITIONS, grad=True)[:, 0]  # token 0: [1, M, h, w]
        loss = attention_refocus_loss(maps, mask).mean()
        loss.backward()
        grad = math.sqrt(sum(float(p.grad.pow(2).sum()) for n, p in model.named_parameters()
                             if "lora_" in n and p.grad is not None))
        raw = maps.detach()
        s = normalize_attention_maps(raw, False)
        out[normalisation] = {
            "mean_probability": float(raw.mean()),
            "share_inside_raw": float((raw * mask).sum() / raw.sum()),
            "inside_over_outside_raw": float((raw * mask).sum() / mask.sum() / ((raw * (1 - mask)).sum() / (1 - mask).sum())),
            "share_inside_S": float((s * mask).sum() / s.sum()),
            "eq8_loss": float(loss.detach()),
            "lora_grad_norm": grad,
        }
    text_share = _text_share(model, family, layers)
    out["text_share_of_joint_attention"] = {"mean": float(text_share.mean()), "min": float(text_share.min()),
                                            "max": float(text_share.max())}
    return out


def _shares(model, family, layers) -> dict:
    """Token 0's share outside the mask under each normalisation, and the text's share of the joint attention
    of the image tokens outside and inside the mask (means over maps)."""
    mask = _mask()
    out = {}
    for normalisation in NORMALISATIONS:
        maps = _capture(model, family, layers, normalisation, POSITIONS)[:, 0]
        out[f"outside_share_{normalisation}"] = float((maps * (1 - mask)).sum() / maps.sum())
    text_share = _text_share(model, family, layers)
    out["text_share_outside"] = float((text_share * (1 - mask)).sum() / ((1 - mask).sum() * text_share.shape[1]))
    out["text_share_inside"] = float((text_share * mask).sum() / (mask.sum() * text_share.shape[1]))
    return out


def refocus_training(family: str, steps: int = 100) -> dict:
    """Train the LoRA on eq. 8 alone (token 0, the synthetic mask; Adam, lr 1e-2) with each normalisation
    from the same start, and read the shares before and after: does the loss move which text token the
    image tokens outside the mask pick, or how much they look at the prompt at all?"""
    build, layers = FAMILIES[family]
    mask = _mask()
    out = {}
    for normalisation in NORMALISATIONS:
        torch.manual_seed(0)
        model = _with_lora(build(False)).train()
        if not out:
            out["before"] = _shares(model, family, layers)
        store = JointAttentionMapStore()
        install_joint_attention_capture(model, store, layers, normalisation=normalisation)
        params = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.Adam(params, lr=1e-2)
        for _ in range(steps):
            store.set_token_positions(POSITIONS, grid=GRID)
            model(**_inputs(family, model, GRID, TEXT))
            loss = attention_refocus_loss(store.maps()[:, 0], mask).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        out[f"after_{normalisation}_training"] = _shares(model, family, layers)
    return out


# --- 2. memory -----------------------------------------------------------------------------------------
def saved_bytes(run, params) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` runs, parameters excluded."""
    skip = {p.untyped_storage()._cdata for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in skip:
            seen[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


class _FlashStandIn(torch.autograd.Function):
    """Saves what a flash / memory-efficient kernel saves (q, k, v, out, float32 LSE [B, H, S])."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextlib.contextmanager
def _flash_kernels():
    saved = (z_module.dispatch_attention_fn, flux2_module.dispatch_attention_fn)
    import library.training.joint_attention as ja

    stand_in = lambda q, k, v, **kw: _FlashStandIn.apply(q, k, v)  # noqa: E731
    z_module.dispatch_attention_fn = flux2_module.dispatch_attention_fn = ja.dispatch_attention_fn = stand_in
    try:
        yield
    finally:
        z_module.dispatch_attention_fn, flux2_module.dispatch_attention_fn = saved
        ja.dispatch_attention_fn = saved[0]


def capture_bytes_formula(heads: int, head_dim: int, n_img: int, seq: int, k: int = 2) -> dict:
    """Per capture layer, batch 1, bytes. Saved for backward: the float32 LSE [H, N] and exp's output
    [H, N, K] (q and k are saved as the kernel's own bf16 tensors: no copy); held by the store: the maps
    [H, K, N] float32. Transient while that layer's capture runs its backward: the gradients of q and k
    it returns (bf16, as any backward through q and k makes them) and at most 4 chunks (a head group's
    float32 keys and their gradient, then logits and g * P of a query chunk)."""
    saved = 4 * heads * n_img + 4 * heads * n_img * k
    held = 4 * heads * n_img * k
    chunk = DEFAULT_CHUNK_BYTES
    transient = 2 * heads * (n_img + seq) * head_dim + 2 * min(chunk, 8 * heads * seq * head_dim) \
        + 2 * min(chunk, 4 * heads * n_img * seq)
    return {"saved": saved, "held": held, "transient_backward": transient}


def memory(family: str, real: bool) -> dict:
    build, layers = FAMILIES[family]
    grid, text = ((64, 64), 512) if real else (GRID, TEXT)
    device = "meta" if real else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = build(real).to(torch.bfloat16)
    model.train().requires_grad_(True)
    params = list(model.parameters())
    inputs = _inputs(family, model, grid, text, device=device, dtype=torch.bfloat16)
    ctx = _flash_kernels() if real else contextlib.nullcontext()
    with ctx:
        base = saved_bytes(lambda: model(**inputs), params)
        store = JointAttentionMapStore()
        install_joint_attention_capture(model, store, layers[:1])
        store.set_token_positions(POSITIONS, grid=grid)  # moved to the layer's device by the store
        captured = saved_bytes(lambda: model(**inputs), params)
    attn = model.get_submodule(layers[0]).attention if family == "zimage" else model.get_submodule(layers[0]).attn
    n_img = grid[0] * grid[1]
    seq = (n_img + (-n_img) % 32 + text + (-text) % 32) if family == "zimage" else n_img + text
    n_blocks = len(model.layers) if family == "zimage" else len(model.transformer_blocks) + len(model.single_transformer_blocks)
    dim = attn.heads * (attn.head_dim if family == "klein" else model.config.dim // attn.heads)
    formula = capture_bytes_formula(attn.heads, dim // attn.heads, n_img, seq)
    out = {
        "grid": list(grid), "text_tokens": text, "joint_blocks": n_blocks,
        "step_activations_MiB": base / MiB,
        "capture_per_layer_MiB": (captured - base) / MiB,
        "capture_per_layer_formula_MiB": {name: b / MiB for name, b in formula.items()},
        "per_layer_share_of_step_pct": 100 * (captured - base) / base,
    }
    # gradient checkpointing keeps each block's input ([S, dim] bf16) and recomputes one block at a time, the
    # capture's saved tensors with it (only the maps, [H, K, N] float32, stay): step ~ inputs + one block
    one_block = base / n_blocks  # an upper bound: the embedders and refiners are counted in with the blocks
    step = n_blocks * seq * dim * 2 + one_block
    out["checkpointed_step_MiB"] = step / MiB
    out["checkpointed_capture_share_pct"] = 100 * (captured - base) / step
    out["checkpointed_transient_share_pct"] = 100 * formula["transient_backward"] / step
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    for family in FAMILIES:
        results[family] = {"contrast_tiny": contrast(family), "refocus_training_tiny": refocus_training(family),
                           "memory_tiny_bf16": memory(family, False),
                           "memory_1024px_real_dims": memory(family, True)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
