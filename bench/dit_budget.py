"""Memory and time of one MagiCapture training step on the flow-matching DiT bases, BY FORMULA (no GPU).

    python bench/dit_budget.py [--mfu 0.4] [--te-tokens 512] [--id-window 512] [--json out.json]

For full-size Z-Image (6B), FLUX.2 Klein 4B and Klein 9B at 1024 px, bf16, each with its shipped default
config (configs/magicapture_zimage.toml, magicapture_klein.toml) and 24 GB config (``*_24gb.toml``): peak
memory of a phase-2 step, its FLOPs and time on one H100 at a stated MFU, and the paper schedule's total
(phase 1 + phase 2 steps + the previews). These are formula figures, not measurements.

Where each number comes from (every size in the table is counted, the rest is the formula):

* Parameters: counted exactly by building the diffusers transformer, the transformers Qwen3 and the VAE
  from the configs shipped in configs/zimage, configs/klein4b, configs/klein9b on the ``meta`` device (no
  weights, no memory). The LoRA's parameters are counted on the same modules: rank x (in + out) for each
  Linear :data:`LORA_TARGETS` names (``lora.targets = "cross_attn"``: the attention projections).
* Frozen weights: 2 bytes each (bf16): transformer and text encoder; the VAE in float32 where its config says
  ``force_upcast`` (Z-Image's), else bf16.
* Trainable state (:func:`trainable_bytes`): the LoRA in float32 (4 B) + its float32 gradient (4 B) +
  AdamW8bit's two uint8 moments (2 B) + their block-wise float32 absmax (2 x 4 B per 256 values,
  bitsandbytes' block size) = 10.03 B per LoRA parameter. The new token rows are a few KB.
* Activations (:func:`block_activation_elems`): elements saved for backward per token per block, bf16
  (a float32 tensor counts as 2), with the base weights frozen (a frozen Linear saves no input for its
  weight gradient; the LoRA's down projection saves the same input tensor) and a flash kernel (saves q, k,
  v, out and a float32 row LSE, never the S x S matrix). Read off diffusers 0.42.1's block forwards:

  - Z-Image layer / refiner (pre- and post-norm RMSNorms upcast to float32, q/k RMSNorm, RoPE by a
    constant, SwiGLU w1/w3/w2): 4 RMSNorm inputs in float32 (8d), the 2 modulated Linear inputs (2d), q and
    k before their float32 norms (4d), flash q/k/v/out (4d), the 2 gated outputs (2d) = 20d, + SwiGLU w1
    and w3 outputs and their product (3f): **20 d + 3 f**;
  - FLUX.2 double-stream block, per stream (each stream's own weights on its own tokens): 2 LayerNorm
    inputs upcast by autocast (4d), 2 modulated inputs (2d), q/k norms (4d), flash (4d), 2 gates (2d) =
    16d, + SwiGLU (3f): **16 d + 3 f**;
  - FLUX.2 single-stream block (one fused qkv+MLP-in projection, one fused out projection): LayerNorm (2d),
    modulated input (d), q/k norms (4d), flash (4d), the concatenated [attention, MLP] input of to_out (d +
    f), gate (d) = 13d, + SwiGLU's two halves (2f) and the product inside the concat (f): **13 d + 4 f**;
  - a Qwen3 decoder layer (text encoder; the same pre-norm SwiGLU pattern, no modulation): taken as
    20 d + 3 f too (an upper bound: it has 2 norms, not 4, and GQA's k/v are 1/4 of q).

  The source of the method is Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (34 s b h bytes per GPT layer with a flash-style attention), redone block by block.
  Cross-check: bench/RESULTS.md ("Attention refocusing on joint attention", Memory) counted 48 375 MiB for
  a batch-1 Z-Image step on meta tensors with the whole model trainable (which saves every Linear input in
  addition); this formula gives 0.63 of it for the LoRA case (the printed cross-check line). Treat
  activation figures as +-50 %.
* Gradient checkpointing (the 24 GB configs; the transformer only, as trainer.py enables it on the
  denoiser): each block's input is kept (d bf16 per token per block) plus one block's activations at a
  time; the text encoder is not checkpointed.
* Attention refocusing capture (:func:`capture_bytes`, library/training/joint_attention.py and the
  formula of bench/measure_joint_attention.py ``capture_bytes_formula``): per captured layer and sample,
  saved 4 H N (float32 LSE) + 4 H N K (exp's output) and held 4 H N K (the maps [B, H, N_img, K] float32),
  N = image tokens, K = 2 special tokens; plus the transient of the layer's backward (2 H (N + S) d_head
  bf16 + at most 2 chunks of 16 MiB). :data:`CAPTURE_LAYERS` layers (the configs' ``attention.layers = []``:
  the family's middle joint blocks; 2 assumed).
* Identity loss: the VAE decoder run with gradient on a ``--id-window`` px face window for every sample
  (an upper bound: ``loss.id_tasks`` is source and composed only); its saved bytes and FLOPs are counted on
  meta (torch's FlopCounterMode and saved-tensor hooks), no formula.
* FLOPs (:func:`step_flops`): a Linear's forward is 2 x params x tokens. Where the gradient flows through
  frozen weights (the transformer, to the LoRA; the text encoder, to the new embedding rows), backward
  computes the input gradient only: 2 x params x tokens more; no weight gradient. So the trained path is
  4 P N, and 6 P N with gradient checkpointing (the forward is run again): the usual "6 x params x
  tokens" holds for the checkpointed configs and over-counts the others by 1.5x (printed too, as the
  upper bound). The LoRA's own matrices: 6 x params x tokens. Modulation and timestep MLPs see one token
  per sample. Attention: 4 S^2 d per layer forward (QK^T and PV), backward 2.5x that (FlashAttention-2's
  backward: 5 matmuls against 2), + 1x again when checkpointed.
* Time: FLOPs / (H100 SXM bf16 dense peak 989.4 TFLOP/s x MFU), MFU 0.40 by default (an assumption; a
  LoRA step of a 6B DiT at batch 1-4 is unlikely to do better). The schedule adds the previews
  (``sample.every``: n images x steps x 2 for CFG, forward only) and leaves out loading, latent caching and
  saving.

Targets (the issue): the paper schedule (1200 + 1500 steps) under 20 minutes on one H100 for Z-Image and
Klein 4B; the 24 GB config under 24 GiB peak. The last lines say which the formula meets.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 2**30
H100_BF16_DENSE = 989.4e12  # FLOP/s, H100 SXM5 bf16 dense (NVIDIA's datasheet: 1979 TFLOPS with sparsity)
DEFAULT_MFU = 0.40
SCHEDULE_MINUTES_TARGET = 20.0
MEMORY_TARGET_GIB = 24.0
CAPTURE_LAYERS = 2  # attention.layers = []: the family's middle joint blocks (library/training, on main)
SPECIAL_TOKENS = 2  # [V1] and [V2]
CAPTURE_CHUNK_BYTES = 16 * 2**20  # library/training/joint_lse.py DEFAULT_CHUNK_BYTES
ADAM8BIT_BLOCK = 256  # bitsandbytes' block-wise quantisation: one float32 absmax per 256 values per moment
FLASH_BACKWARD = 2.5  # FlashAttention-2: the backward's matmul FLOPs / the forward's
TE_TOKENS = 512  # the pipelines tokenise to max_sequence_length = 512 (padding="max_length")
# text tokens the transformer sees: Klein's pipeline passes all 512 padded tokens; Z-Image's drops the
# padding and pads the caption to a multiple of 32 (a templated prompt of <= 128 tokens assumed)
TRANSFORMER_TEXT_TOKENS = {"zimage": 128, "klein4b": 512, "klein9b": 512}
PATCH = {"zimage": 16, "klein4b": 16, "klein9b": 16}  # pixels per image token side (8x VAE, 2x2 patches)
CONFIGS = {"zimage": ("magicapture_zimage.toml", "magicapture_zimage_24gb.toml"),
           "klein4b": ("magicapture_klein.toml", "magicapture_klein_24gb.toml"),
           "klein9b": ("magicapture_klein.toml", "magicapture_klein_24gb.toml")}
LABELS = {"zimage": "Z-Image 6B", "klein4b": "FLUX.2 Klein 4B", "klein9b": "FLUX.2 Klein 9B"}
# lora.targets = "cross_attn" on a DiT (configs' comments): the attention projections
LORA_TARGETS = {
    "zimage": r".*\.attention\.(to_[qkv]|to_out\.0)$",
    "flux2": r".*\.attn\.(to_[qkv]|to_out(\.0)?|add_[qkv]_proj|to_add_out|to_qkv_mlp_proj)$",
}
# which tokens a Linear sees, by module name: first match wins; "sample": one token per sample
TOKEN_GROUPS = {
    "zimage": [(r".*(adaLN_modulation|t_embedder).*", "sample"), (r"^layers\.", "joint"),
               (r"^(noise_refiner|all_x_embedder|all_final_layer)", "image"), (r"^(context_refiner|cap_embedder)", "text")],
    "flux2": [(r".*(modulation|time_guidance_embed|norm_out).*", "sample"),
              (r"^transformer_blocks\.\d+\.(attn\.(add_[qkv]_proj|to_add_out)|ff_context)", "text"),
              (r"^(transformer_blocks|x_embedder|proj_out)", "image"), (r"^single_transformer_blocks", "joint"),
              (r"^context_embedder", "text")],
}


# ------------------------------------------------------------------------------------------ the formulas
@dataclass(frozen=True)
class BlockGroup:
    """`count` blocks of one kind whose activations scale with `tokens` ("joint", "image" or "text"):
    width d, MLP hidden f (SwiGLU's inner width), `heads` x `head_dim` attention over `attn_tokens`
    keys/queries (a double-stream block attends jointly but keeps each stream's activations apart)."""

    kind: str  # "zimage", "double_stream", "single_stream", "qwen3"
    count: int
    tokens: str
    d: int
    f: int
    heads: int
    head_dim: int
    attn_tokens: str = ""  # "" : no attention FLOPs counted for this group (a double block's second stream)


def block_activation_elems(kind: str, d: int, f: int) -> int:
    """bf16 elements saved for backward per token per block (module docstring; float32 counts as 2)."""
    coefficients = {"zimage": (20, 3), "qwen3": (20, 3), "double_stream": (16, 3), "single_stream": (13, 4)}
    a, b = coefficients[kind]
    return a * d + b * f


def trainable_bytes(lora_params: int) -> int:
    """LoRA float32 + float32 grad + AdamW8bit's 2 uint8 moments + their float32 absmax per 256 values, bytes."""
    absmax = 2 * 4 * math.ceil(lora_params / ADAM8BIT_BLOCK)
    return lora_params * (4 + 4 + 2) + absmax


def capture_bytes(heads: int, head_dim: int, n_img: int, seq: int, k: int = SPECIAL_TOKENS,
                  chunk: int = CAPTURE_CHUNK_BYTES) -> dict[str, int]:
    """One captured layer, one sample, bytes: "saved" (float32 LSE [H, N] + exp's output [H, N, K]), "held"
    (the maps [H, N, K] float32) and "transient" in its backward (q/k gradients bf16 + 2 chunks);
    bench/measure_joint_attention.py capture_bytes_formula, which the meta count there confirms."""
    saved = 4 * heads * n_img + 4 * heads * n_img * k
    held = 4 * heads * n_img * k
    transient = 2 * heads * (n_img + seq) * head_dim + 2 * min(chunk, 8 * heads * seq * head_dim) \
        + 2 * min(chunk, 4 * heads * n_img * seq)
    return {"saved": saved, "held": held, "transient": transient}


def linear_flops(params_by_tokens: dict[str, int], tokens: dict[str, int], factor: float) -> float:
    """factor x sum over token groups of (Linear params seeing that group) x (its tokens), one sample."""
    return factor * sum(p * tokens[g] for g, p in params_by_tokens.items())


def attention_flops(blocks: list[BlockGroup], tokens: dict[str, int]) -> float:
    """Forward attention FLOPs of one sample: 4 S^2 (heads x head_dim) per block (QK^T and PV)."""
    return sum(4 * b.count * tokens[b.attn_tokens] ** 2 * b.heads * b.head_dim for b in blocks if b.attn_tokens)


@dataclass
class Model:
    """What the formulas need of one family, counted on meta (:func:`count_family`) or written by hand."""

    family: str
    dit_params: int
    te_params: int  # what is held in memory
    vae_params: int
    vae_fp32: bool
    dit_linear: dict[str, int]  # Linear params by token group
    lora_linear: dict[str, int]  # LoRA params (rank 1) by token group: in + out of each target
    te_linear: int  # the text encoder's Linear params (all see the text encoder's tokens)
    blocks: list[BlockGroup]
    te_block: BlockGroup
    vae_decode: dict[str, float] = field(default_factory=dict)  # {"flops", "saved_bytes"} per sample


@dataclass
class Run:
    """One config: micro-batch, accumulation, checkpointing, LoRA rank, resolution, schedule, previews."""

    name: str
    batch: int
    grad_accum: int
    checkpointing: bool
    rank: int
    resolution: int
    steps1: int
    steps2: int
    sample_every: int
    sample_steps: int
    sample_n: int
    cfg: float

    @property
    def micro(self) -> int:
        return self.batch // self.grad_accum

    @classmethod
    def from_toml(cls, path: Path) -> "Run":
        doc = tomllib.loads(path.read_text())
        p1, p2 = doc.get("phase1", {}), doc.get("phase2", {})
        s = doc.get("sample", {})
        return cls(name=path.name, batch=int(p2.get("batch_size", 4)), grad_accum=int(p2.get("grad_accum", 1)),
                   checkpointing=bool(doc.get("train", {}).get("gradient_checkpointing", False)),
                   rank=int(doc.get("lora", {}).get("rank", 16)), resolution=int(doc.get("data", {}).get("resolution", 1024)),
                   steps1=int(p1.get("steps", 0)), steps2=int(p2.get("steps", 0)), sample_every=int(s.get("every", 0)),
                   sample_steps=int(s.get("steps", 0)), sample_n=int(s.get("n", 0)), cfg=float(s.get("cfg", 1.0)))


def token_counts(family: str, resolution: int, text_tokens: int | None = None) -> dict[str, int]:
    """Tokens per sample: image (resolution / 16)^2, text, joint = image + text, sample = 1."""
    image = (resolution // PATCH[family]) ** 2
    text = TRANSFORMER_TEXT_TOKENS[family] if text_tokens is None else text_tokens
    return {"image": image, "text": text, "joint": image + text, "sample": 1}


def step_flops(m: Model, run: Run, phase: int, te_tokens: int = TE_TOKENS, text_tokens: int | None = None,
               path_factor: float | None = None) -> float:
    """FLOPs of one optimiser step (run.batch samples). Phase 1: transformer and text encoder forward +
    input gradients (embeddings train); phase 2 adds the LoRA (6 x its params x tokens) and the identity
    decode. `path_factor` overrides the frozen path's factor (4, or 6 checkpointed)."""
    tokens = token_counts(m.family, run.resolution, text_tokens)
    ck = 1.0 if run.checkpointing else 0.0
    factor = (4.0 + 2.0 * ck) if path_factor is None else path_factor
    per = linear_flops(m.dit_linear, tokens, factor)
    per += attention_flops(m.blocks, tokens) * (1.0 + FLASH_BACKWARD + ck)
    per += 4.0 * m.te_linear * te_tokens  # text encoder, not checkpointed: forward + input gradient
    per += attention_flops([m.te_block], {"text": te_tokens}) * (1.0 + FLASH_BACKWARD)
    if phase == 2:
        per += linear_flops(m.lora_linear, tokens, 6.0 * run.rank)
        per += 3.0 * m.vae_decode.get("flops", 0.0)  # forward + input gradient (2x)
    return per * run.batch


def preview_flops(m: Model, run: Run, text_tokens: int | None = None) -> float:
    """One preview: n images x steps x (2 with CFG) transformer forwards."""
    tokens = token_counts(m.family, run.resolution, text_tokens)
    fwd = linear_flops(m.dit_linear, tokens, 2.0) + attention_flops(m.blocks, tokens)
    return run.sample_n * run.sample_steps * (2 if run.cfg > 1 else 1) * fwd


def step_memory(m: Model, run: Run, te_tokens: int = TE_TOKENS, text_tokens: int | None = None) -> dict[str, float]:
    """Peak bytes of a phase-2 step, by part (module docstring). Activations are per micro-batch."""
    tokens = token_counts(m.family, run.resolution, text_tokens)
    b = run.micro
    lora_params = run.rank * sum(m.lora_linear.values())
    acts = [blk.count * tokens[blk.tokens] * block_activation_elems(blk.kind, blk.d, blk.f) * 2 for blk in m.blocks]
    if run.checkpointing:  # block inputs kept + the largest block recomputed at a time
        kept = sum(blk.count * tokens[blk.tokens] * blk.d * 2 for blk in m.blocks)
        one = max(a / blk.count for a, blk in zip(acts, m.blocks))
        dit_acts = kept + one
    else:
        dit_acts = sum(acts)
    te = m.te_block
    big = max((blk for blk in m.blocks if blk.attn_tokens), key=lambda blk: blk.heads * blk.head_dim)
    cap = capture_bytes(big.heads, big.head_dim, tokens["image"], tokens[big.attn_tokens])
    held = cap["held"] if run.checkpointing else cap["saved"] + cap["held"]
    parts = {
        "weights": 2.0 * (m.dit_params + m.te_params) + (4.0 if m.vae_fp32 else 2.0) * m.vae_params,
        "lora_and_adam8bit": float(trainable_bytes(lora_params)),
        "transformer_activations": b * dit_acts,
        "text_encoder_activations": b * te.count * te_tokens * block_activation_elems(te.kind, te.d, te.f) * 2.0,
        "capture": b * CAPTURE_LAYERS * held + b * cap["transient"],
        "identity_decode": b * m.vae_decode.get("saved_bytes", 0.0),
    }
    parts["peak"] = sum(parts.values())
    return parts


def seconds(flops: float, mfu: float = DEFAULT_MFU, peak: float = H100_BF16_DENSE) -> float:
    return flops / (peak * mfu)


def schedule_seconds(m: Model, run: Run, mfu: float = DEFAULT_MFU, **kw) -> float:
    """phase-1 steps + phase-2 steps + previews every sample.every steps of each phase, seconds."""
    previews = (run.steps1 // run.sample_every + run.steps2 // run.sample_every) if run.sample_every else 0
    total = run.steps1 * step_flops(m, run, 1, **kw) + run.steps2 * step_flops(m, run, 2, **kw)
    total += previews * preview_flops(m, run, kw.get("text_tokens"))
    return seconds(total, mfu)


# ------------------------------------------------------------------------------------------ counted on meta
def _config(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_") and k != "architectures"}


def group_linears(model, rules: list[tuple[str, str]], target: str | None = None) -> dict[str, int]:
    """Params of `model`'s nn.Linear modules by token group (`rules`: (regex, group), first match wins; a
    Linear no rule matches is counted in "joint"); with `target`, the LoRA's rank-1 params (in + out) of
    the Linears whose name fully matches it instead."""
    import torch

    out: dict[str, int] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if target is not None and not re.fullmatch(target, name):
            continue
        group = next((g for pattern, g in rules if re.match(pattern, name)), "joint")
        n = mod.in_features + mod.out_features if target is not None else sum(p.numel() for p in mod.parameters())
        out[group] = out.get(group, 0) + n
    return out


def vae_decode_cost(vae, latent_side: int, dtype) -> dict[str, float]:
    """FLOPs (FlopCounterMode) and bytes saved for backward (saved-tensor hooks) of the VAE decoder on one
    [1, C, side, side] latent with gradient to the input, weights frozen, on meta."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    for p in vae.parameters():  # vae.to(dtype) would warn about modules kept in float32 (there are none)
        p.data = p.data.to(dtype)
    vae.requires_grad_(False)
    z = torch.empty(1, vae.config.latent_channels, latent_side, latent_side, device="meta", dtype=dtype, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if not isinstance(t, torch.nn.Parameter):
            seen[storage._cdata] = storage.nbytes()
        return t

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vae.decoder(vae.post_quant_conv(z) if getattr(vae, "post_quant_conv", None) is not None else z)
    return {"flops": float(counter.get_total_flops()), "saved_bytes": float(sum(seen.values()))}


def count_family(family: str, id_window: int = 512) -> Model:
    """The family's Model from its shipped configs, every module built on the meta device."""
    import torch
    import diffusers
    import transformers

    cdir = ROOT / "configs" / family
    index = json.loads((cdir / "model_index.json").read_text())
    arch = "zimage" if family == "zimage" else "flux2"
    tcfg = _config(cdir / "transformer" / "config.json")
    with torch.device("meta"):
        dit = getattr(diffusers, index["transformer"][1])(**tcfg)
        te_cls = getattr(transformers, index["text_encoder"][1])
        te_cfg = transformers.Qwen3Config(**_config(cdir / "text_encoder" / "config.json"))
        te = te_cls(te_cfg)
        vae = getattr(diffusers, index["vae"][1])(**_config(cdir / "vae" / "config.json"))
    core = te.model if hasattr(te, "model") else te  # lm_head is never run: the hidden states are read
    te_linear = sum(p.numel() for n, mod in core.named_modules() if isinstance(mod, torch.nn.Linear) for p in mod.parameters())
    if arch == "zimage":
        d, heads = tcfg["dim"], tcfg["n_heads"]
        f = dit.layers[0].feed_forward.w1.out_features
        blocks = [BlockGroup("zimage", tcfg["n_layers"], "joint", d, f, heads, d // heads, "joint"),
                  BlockGroup("zimage", tcfg["n_refiner_layers"], "image", d, f, heads, d // heads, "image"),
                  BlockGroup("zimage", tcfg["n_refiner_layers"], "text", d, f, heads, d // heads, "text")]
    else:
        heads, hd = tcfg["num_attention_heads"], tcfg["attention_head_dim"]
        d = heads * hd
        f = dit.transformer_blocks[0].ff.linear_out.in_features
        blocks = [BlockGroup("double_stream", tcfg["num_layers"], "image", d, f, heads, hd, "joint"),
                  BlockGroup("double_stream", tcfg["num_layers"], "text", d, f, heads, hd, ""),
                  BlockGroup("single_stream", tcfg["num_single_layers"], "joint", d, f, heads, hd, "joint")]
    tc = te_cfg
    te_block = BlockGroup("qwen3", tc.num_hidden_layers, "text", tc.hidden_size, tc.intermediate_size,
                          tc.num_attention_heads, tc.head_dim, "text")
    fp32 = bool(vae.config.get("force_upcast", False))
    # the decoder's input is the 8x latent for both VAEs (FLUX.2's 2x2 packing is the transformer's side)
    cost = vae_decode_cost(vae, id_window // 8, torch.float32 if fp32 else torch.bfloat16)
    return Model(family=family, dit_params=sum(p.numel() for p in dit.parameters()),
                 te_params=sum(p.numel() for p in te.parameters()), vae_params=sum(p.numel() for p in vae.parameters()),
                 vae_fp32=fp32, dit_linear=group_linears(dit, TOKEN_GROUPS[arch]),
                 lora_linear=group_linears(dit, TOKEN_GROUPS[arch], LORA_TARGETS[arch]), te_linear=te_linear,
                 blocks=blocks, te_block=te_block, vae_decode=cost)


# ------------------------------------------------------------------------------------------ the table
def budget(families=("zimage", "klein4b", "klein9b"), mfu: float = DEFAULT_MFU, te_tokens: int = TE_TOKENS,
           id_window: int = 512) -> list[dict]:
    """One row per (family, shipped config)."""
    rows = []
    for family in families:
        m = count_family(family, id_window)
        for name in CONFIGS[family]:
            run = Run.from_toml(ROOT / "configs" / name)
            mem = step_memory(m, run, te_tokens)
            f2 = step_flops(m, run, 2, te_tokens)
            f2_6 = step_flops(m, run, 2, te_tokens, path_factor=6.0)
            sched = schedule_seconds(m, run, mfu, te_tokens=te_tokens)
            sched6 = seconds(run.steps1 * step_flops(m, run, 1, te_tokens, path_factor=6.0) + run.steps2 * f2_6
                             + ((run.steps1 // run.sample_every + run.steps2 // run.sample_every) if run.sample_every else 0)
                             * preview_flops(m, run), mfu)
            rows.append({"family": family, "config": name, "dit_params": m.dit_params, "te_params": m.te_params,
                         "vae_params": m.vae_params, "lora_params": run.rank * sum(m.lora_linear.values()),
                         "micro_batch": run.micro, "grad_accum": run.grad_accum, "checkpointing": run.checkpointing,
                         "memory_GiB": {k: v / GiB for k, v in mem.items()},
                         "phase2_step_TFLOP": f2 / 1e12, "phase2_step_s": seconds(f2, mfu),
                         "phase2_step_s_6PN": seconds(f2_6, mfu),
                         "phase1_step_s": seconds(step_flops(m, run, 1, te_tokens), mfu),
                         "schedule_min": sched / 60, "schedule_min_6PN": sched6 / 60})
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    """The targets, one line each: met or missed, by the formula."""
    lines = []
    for r in rows:
        label = f"{LABELS[r['family']]}, {r['config']}"
        if "24gb" in r["config"]:
            peak = r["memory_GiB"]["peak"]
            ok = peak <= MEMORY_TARGET_GIB
            lines.append(f"{label}: peak {peak:.1f} GiB {'<=' if ok else '>'} {MEMORY_TARGET_GIB:.0f} GiB: "
                         f"{'met' if ok else 'MISSED'} by the formula")
        elif r["family"] in ("zimage", "klein4b"):
            t, t6 = r["schedule_min"], r["schedule_min_6PN"]
            ok = t <= SCHEDULE_MINUTES_TARGET
            lines.append(f"{label}: paper schedule {t:.1f} min (6PN bound {t6:.1f}) {'<=' if ok else '>'} "
                         f"{SCHEDULE_MINUTES_TARGET:.0f} min on one H100: {'met' if ok else 'MISSED'} by the formula")
        if "24gb" not in r["config"]:
            peak = r["memory_GiB"]["peak"]
            lines.append(f"{label}: peak {peak:.1f} GiB {'fits' if peak <= 80 else 'does NOT fit'} an 80 GB H100")
    return lines


def table(rows: list[dict]) -> str:
    """Markdown table of `rows`."""
    head = ("| model, config | params DiT / TE / LoRA | micro-batch x accum, ckpt | weights | LoRA+Adam8bit | DiT acts | "
            "TE acts | capture | ID decode | **peak GiB** | phase-2 step TFLOP | s/step p1 / p2 (6PN) | **schedule min** (6PN) |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        g = r["memory_GiB"]
        lines.append(
            f"| {LABELS[r['family']]}, `{r['config']}` | {r['dit_params'] / 1e9:.2f}B / {r['te_params'] / 1e9:.2f}B / "
            f"{r['lora_params'] / 1e6:.1f}M | {r['micro_batch']} x {r['grad_accum']}, {'yes' if r['checkpointing'] else 'no'} | "
            f"{g['weights']:.1f} | {g['lora_and_adam8bit']:.2f} | {g['transformer_activations']:.1f} | "
            f"{g['text_encoder_activations']:.1f} | {g['capture']:.2f} | {g['identity_decode']:.1f} | **{g['peak']:.1f}** | "
            f"{r['phase2_step_TFLOP']:.0f} | {r['phase1_step_s']:.2f} / {r['phase2_step_s']:.2f} ({r['phase2_step_s_6PN']:.2f}) | "
            f"**{r['schedule_min']:.1f}** ({r['schedule_min_6PN']:.1f}) |")
    return "\n".join(lines)


RESULTS_META_ZIMAGE_MIB = 48375  # bench/RESULTS.md: Z-Image step activations, batch 1, 512 text tokens, all trainable


def cross_check(m: Model) -> str:
    """The formula's Z-Image transformer activations (batch 1, 512 text tokens, no checkpointing) against
    the meta count in bench/RESULTS.md, one line."""
    run = Run("check", 1, 1, False, 16, 1024, 0, 0, 0, 0, 0, 1.0)
    mib = step_memory(m, run, text_tokens=512)["transformer_activations"] / 2**20
    return (f"cross-check: Z-Image transformer activations, batch 1, 512 text tokens: formula (LoRA, frozen base) "
            f"{mib:,.0f} MiB; meta count with the whole model trainable (bench/RESULTS.md) {RESULTS_META_ZIMAGE_MIB:,} MiB; "
            f"ratio {mib / RESULTS_META_ZIMAGE_MIB:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation (default 0.4)")
    parser.add_argument("--te-tokens", type=int, default=TE_TOKENS, help="text-encoder tokens per prompt (default 512)")
    parser.add_argument("--id-window", type=int, default=512, help="face window the identity loss decodes, px")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = budget(mfu=args.mfu, te_tokens=args.te_tokens, id_window=args.id_window)
    print(f"FORMULA figures, not measured: bf16, 1024 px, H100 bf16 dense {H100_BF16_DENSE / 1e12:.1f} TFLOP/s "
          f"x MFU {args.mfu:.2f}; GiB = 2^30 bytes")
    print(table(rows))
    print()
    print(cross_check(count_family("zimage", args.id_window)))
    for line in verdicts(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
