"""Pretrain the toy base (testkit/toyworld/base.py) on the toy world, resumably and seeded, and measure its
quality gate on held-out scenes.

    python bench/toyworld_pretrain.py OUT [--device cuda] [--vae-steps 3000] [--unet-steps 20000] [--batch 64]
    python bench/toyworld_pretrain.py OUT --gate-only       # the gate of OUT/toy_base (or of an unfinished OUT/state)

Stages: (1) the VAE alone (reconstruction + a small KL, as SD's VAE), then its latent scale is measured
(``scaling_factor = 1 / std``); (2) the UNet and the CLIP text encoder together on frozen-VAE latents with
SD's epsilon objective and 10 % empty captions (for classifier-free guidance). Every batch is drawn from
``(seed, stage, step)``, so a run resumed from OUT/state continues exactly as if it had not stopped.
OUT/state holds the weights (safetensors), the optimiser (``torch.load(weights_only=True)``) and
progress.json; OUT/toy_base the finished diffusers folder with recipe.json (arguments, seed, steps, the
sha256 of every weights file) and gate.json.

The gate (issue 22): on held-out scenes, each object's shape word gives its object at least 2x the
object's area share of its attention (the 16 x 16 cross-attention layers of ``CAPTURE_LAYERS``, mean over
noise levels t = 300, 500, 700), and samples of "a photo of a <colour> <shape> on a plain background"
show that colour (the nearest named colour to the median object pixel) on most of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.files.atomic import write_atomic, write_text  # noqa: E402
from library.training.attention import AttentionMapStore, install_attention_capture, remove_attention_capture  # noqa: E402
from library.training.attention_guard import attention_figures  # noqa: E402
from testkit.toyworld.base import CAPTURE_LAYERS, build_components, save_base  # noqa: E402
from testkit.toyworld.sampling import pretraining_scene  # noqa: E402
from testkit.toyworld.scenes import COLOURS, SHAPES, caption, render  # noqa: E402

STAGES = ("vae", "unet")
GATE_RATIO = 2.0  # inside share / area share, per shape word
GATE_COLOUR = 0.6  # share of samples whose colour agrees with the caption
GATE_TIMESTEPS = (300, 500, 700)
HELD_OUT = 10_000  # held-out scenes are drawn from seed + this, never seen in training


def scene_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str], list]:
    """n pretraining scenes: (images [n, 3, 64, 64] in [-1, 1], captions, the scenes)."""
    scenes = [pretraining_scene(rng) for _ in range(n)]
    images = np.stack([render(s)[0] for s in scenes])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [caption(s) for s in scenes], scenes


def _rng(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, STAGES.index(stage), step])


def _ids(tok, captions: list[str], device) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device)


def vae_loss(vae, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MSE of the reconstruction of a posterior sample + 1e-6 x KL (SD's VAE keeps the KL weight tiny)."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device="cpu").to(x.device)
    return F.mse_loss(vae.decode(z).sample, x) + 1e-6 * post.kl().mean()


def unet_loss(parts: dict, x: torch.Tensor, captions: list[str], gen: torch.Generator) -> torch.Tensor:
    """SD's objective: || eps - eps_hat(z_t, t, c) ||^2 with z = VAE mean x scaling_factor, t uniform."""
    vae, unet, te, tok, sched = (parts[k] for k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    noise = torch.randn(z.shape, generator=gen).to(z.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],), generator=gen).to(z.device)
    drop = torch.rand(len(captions), generator=gen) < 0.1
    text = [("" if d else c) for c, d in zip(captions, drop.tolist())]
    hidden = te(_ids(tok, text, z.device))[0]
    pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=hidden).sample
    return F.mse_loss(pred, noise)


def _trainable(parts: dict, stage: str) -> list[torch.nn.Module]:
    return [parts["vae"]] if stage == "vae" else [parts["unet"], parts["text_encoder"]]


def save_state(out: Path, parts: dict, optimizer, progress: dict) -> None:
    """Weights, optimiser and progress.json under out/state, each written atomically; progress last."""
    state = out / "state"
    state.mkdir(parents=True, exist_ok=True)
    weights = {f"{k}.{n}": v.detach().cpu().contiguous() for k in ("vae", "unet", "text_encoder")
               for n, v in parts[k].state_dict().items()}
    write_atomic(state / "weights.safetensors", lambda tmp: save_file(weights, str(tmp)))
    write_atomic(state / "optimizer.pt", lambda tmp: torch.save(optimizer.state_dict(), tmp))
    write_text(state / "progress.json", json.dumps(progress, indent=1))


def load_state(out: Path, parts: dict) -> tuple[dict | None, dict]:
    """(optimiser state or None, progress) from out/state; ({}, fresh progress) when there is none."""
    state = out / "state"
    if not (state / "progress.json").is_file():
        return None, {"stage": "vae", "step": 0, "scaling_factor": None}
    weights = load_file(str(state / "weights.safetensors"))
    for k in ("vae", "unet", "text_encoder"):
        parts[k].load_state_dict({n[len(k) + 1:]: v for n, v in weights.items() if n.startswith(k + ".")})
    progress = json.loads((state / "progress.json").read_text(encoding="utf-8"))
    return torch.load(state / "optimizer.pt", weights_only=True), progress


def latent_scale(parts: dict, seed: int, device, n: int = 256) -> float:
    """1 / std of the VAE means of n scenes (SD's ``scaling_factor`` was measured the same way)."""
    x, _, _ = scene_batch(np.random.default_rng([seed, HELD_OUT, 2]), n)
    with torch.no_grad():
        z = parts["vae"].encode(x.to(device)).latent_dist.mean
    return float(1.0 / z.std())


def train(out: Path, args) -> dict:
    """Run (or continue) both stages; returns the final progress record."""
    parts = build_components(seed=args.seed)
    opt_state, progress = load_state(out, parts)
    device = torch.device(args.device)
    for k in ("vae", "unet", "text_encoder"):
        parts[k].to(device)
    if progress["scaling_factor"]:
        parts["vae"].register_to_config(scaling_factor=progress["scaling_factor"])
    limits = {"vae": args.vae_steps, "unet": args.unet_steps}
    for stage in STAGES[STAGES.index(progress["stage"]):]:
        modules = _trainable(parts, stage)
        for m in ("vae", "unet", "text_encoder"):
            parts[m].requires_grad_(parts[m] in modules)
        optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=args.lr, weight_decay=0.0)
        if opt_state is not None and progress["stage"] == stage and progress["step"] > 0:
            optimizer.load_state_dict(opt_state)
        while progress["step"] < limits[stage]:
            step = progress["step"]
            rng = _rng(args.seed, stage, step)
            gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
            x, captions, _ = scene_batch(rng, args.batch)
            x = x.to(device)
            loss = vae_loss(parts["vae"], x, gen) if stage == "vae" else unet_loss(parts, x, captions, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress["step"] = step + 1
            if progress["step"] % args.log_every == 0:
                print(f"{stage} step {progress['step']}/{limits[stage]} loss {loss.item():.4f}", flush=True)
            if progress["step"] % args.save_every == 0 or progress["step"] == limits[stage]:
                save_state(out, parts, optimizer, progress)
        if stage == "vae":
            progress.update(stage="unet", step=0, scaling_factor=latent_scale(parts, args.seed, device))
            parts["vae"].register_to_config(scaling_factor=progress["scaling_factor"])
            opt_state = None
            save_state(out, parts, optimizer, progress)
    for k in ("vae", "unet", "text_encoder"):
        parts[k].to("cpu")
    save_base(parts, out / "toy_base")
    return progress


def word_positions(tok, captions: list[str], scenes: list) -> tuple[torch.Tensor, list[list[int]]]:
    """Per caption, the token index of each object's shape word ([B, K] with K = the most objects,
    -1 where absent) and, per caption, which object each column is. The shape word is the last word of
    an object's phrase; its first occurrence after the previous object's is taken."""
    k = max(len(s.things) for s in scenes)
    positions = torch.full((len(captions), k), -1, dtype=torch.long)
    for b, (text, scene) in enumerate(zip(captions, scenes)):
        ids = _ids(tok, [text], "cpu")[0].tolist()
        start = 0
        for j, thing in enumerate(scene.things):
            word = tok(thing.look.shape, add_special_tokens=False).input_ids
            assert len(word) == 1, f"{thing.look.shape!r} is not one CLIP token"
            start = ids.index(word[0], start)
            positions[b, j] = start
            start += 1
    return positions, [list(range(len(s.things))) for s in scenes]


@torch.no_grad()
def attention_gate(parts: dict, seed: int, device, n: int = 64) -> dict[str, float]:
    """Per shape word: mean over held-out objects of (share of the word's attention inside the object) /
    (the object's share of the image), at the 16 x 16 capture layers, averaged over GATE_TIMESTEPS."""
    x, captions, scenes = scene_batch(np.random.default_rng([seed + HELD_OUT]), n)
    unet, vae, sched = parts["unet"], parts["vae"], parts["scheduler"]
    store = AttentionMapStore()
    install_attention_capture(unet, store, CAPTURE_LAYERS)
    try:
        z = vae.encode(x.to(device)).latent_dist.mean * vae.config.scaling_factor
        hidden = parts["text_encoder"](_ids(parts["tokenizer"], captions, device))[0]
        positions, _ = word_positions(parts["tokenizer"], captions, scenes)
        masks = torch.zeros(n, positions.shape[1], 1, 64, 64)
        for b, scene in enumerate(scenes):
            for j, m in enumerate(render(scene)[1]):
                masks[b, j, 0] = torch.from_numpy(m)
        gen = torch.Generator().manual_seed(seed)
        ratios: dict[str, list[float]] = {s: [] for s in SHAPES}
        inside_by_t = []
        for t in GATE_TIMESTEPS:
            noise = torch.randn(z.shape, generator=gen).to(device)
            ts = torch.full((n,), t, device=device, dtype=torch.long)
            store.set_token_positions(positions)
            unet(sched.add_noise(z, noise, ts), ts, encoder_hidden_states=hidden)
            maps = store.maps().cpu()
            per_t = torch.zeros(n, positions.shape[1])
            for b in range(n):
                for j in range(len(scenes[b].things)):
                    _, outside, _ = attention_figures(maps[b:b + 1, j:j + 1], masks[b:b + 1, j:j + 1], torch.ones(1, 1, dtype=torch.bool))
                    per_t[b, j] = 1.0 - outside[0]
            inside_by_t.append(per_t)
        inside = torch.stack(inside_by_t).mean(0)
        for b, scene in enumerate(scenes):
            for j, thing in enumerate(scene.things):
                area = float(masks[b, j].mean())
                ratios[thing.look.shape].append(float(inside[b, j]) / area)
    finally:
        remove_attention_capture(unet)
    return {shape: float(np.mean(v)) for shape, v in ratios.items() if v}


def nearest_colour(pixels: np.ndarray) -> str:
    """The named colour nearest (euclidean RGB) to the median of `pixels` [N, 3]."""
    med = np.median(pixels.reshape(-1, 3), axis=0)
    return min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c]) - med) ** 2)))


@torch.no_grad()
def colour_gate(parts: dict, seed: int, device, n: int = 16, steps: int = 25) -> float:
    """Share of samples of "a photo of a <colour> <shape> on a plain background" (plain grey background)
    whose non-grey pixels' nearest named colour is the caption's colour (white excluded: it is near grey)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**{k: parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer")},
                                   scheduler=DDIMScheduler.from_config(parts["scheduler"].config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    rng = np.random.default_rng([seed + HELD_OUT, 1])
    colours = [c for c in COLOURS if c != "white"]
    asked = [(str(rng.choice(colours)), str(rng.choice(SHAPES))) for _ in range(n)]
    prompts = [f"a photo of a {c} {s} on a plain background" for c, s in asked]
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=4.0, height=64, width=64, output_type="np",
                  generator=torch.Generator(device).manual_seed(seed)).images
    agree = 0
    for image, (colour, _) in zip(images, asked):
        px = (image * 255).reshape(-1, 3)
        saturated = px[(px.max(1) - px.min(1)) > 40]  # the greys of a plain background are not the object
        agree += bool(len(saturated)) and nearest_colour(saturated) == colour
    return agree / n


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_from_state(out: Path, seed: int) -> Path:
    """OUT/toy_base_partial: the diffusers folder of an unfinished run's last saved state (OUT/state), to
    measure how far the gate has come; SystemExit (one line) when OUT holds no state."""
    parts = build_components(seed=seed)
    _, progress = load_state(out, parts)
    if progress["step"] == 0 and progress["stage"] == "vae":
        raise SystemExit(f"{out}: no toy_base/ and no state/ to measure; run the pretraining first")
    if progress["scaling_factor"]:
        parts["vae"].register_to_config(scaling_factor=progress["scaling_factor"])
    print(f"the gate of the saved state: {progress['stage']} step {progress['step']} (unfinished)", flush=True)
    save_base(parts, out / "toy_base_partial")
    return out / "toy_base_partial"


def measure_gate(base: Path, seed: int, device) -> dict:
    """The gate's figures for the diffusers folder `base`, and whether it passes."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False).to(device)
    parts = {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    ratios = attention_gate(parts, seed, device)
    colour = colour_gate(parts, seed, device)
    return {"attention_ratio": ratios, "colour_agreement": colour, "thresholds": {"ratio": GATE_RATIO, "colour": GATE_COLOUR},
            "passed": bool(min(ratios.values()) >= GATE_RATIO and colour >= GATE_COLOUR)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--unet-steps", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--gate-only", action="store_true")
    args = parser.parse_args(argv)
    base = args.out / "toy_base"
    if not args.gate_only:
        progress = train(args.out, args)
        weights = {str(p.relative_to(base)): sha256(p) for p in sorted(base.rglob("*.safetensors"))}
        recipe = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "progress": progress, "sha256": weights}
        write_text(base / "recipe.json", json.dumps(recipe, indent=1))
    if args.gate_only and not (base / "model_index.json").is_file():
        base = base_from_state(args.out, args.seed)  # an unfinished run: how far it has come
    figures = measure_gate(base, args.seed, torch.device(args.device))
    write_text(base / "gate.json", json.dumps(figures, indent=1))
    print(json.dumps(figures))
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
