"""The paper's ablation on the toy world: MagiCapture trained by the project's own trainer on the toy base,
over arms and seeds, measured on held-out composed prompts.

    python bench/method_evidence.py --base out/toy/toy_base [--seeds 0 1 2] [--arms full no_ar ...] [--out out/evidence]

Arms (config overrides of configs/toy.toml): ``full`` (the method), ``no_ar`` (no attention refocusing),
``no_cp`` (no composed-prompt task), ``no_ar_cp`` (neither: the paper's "w/o AR & CP"), ``ar_detached``
(AR with the released code's detached min/max normalisation). Measures, per run:
  * ``subject``: in samples of the composed prompt, the share of pixels painted in the subject's two
    colours (nearest colour of the world's palette), against the same share in the ground-truth composed
    scenes; ``style``: the share painted in the style's two colours;
  * ``inside/<token>``: each special token's share of its attention inside its region (the subject for
    [V1], the background for [V2]) on the ground-truth composed scenes, at t = 300, 500, 700, and
    ``raw/<token>``, its mean probability inside (Fig. 3 as numbers); ``area/<token>``: the region's
    share of the image, what a token that attends everywhere alike gets;
  * ``recon``: the masked reconstruction term, mean of the last 20 % of phase 2 (from loss_history.jsonl).
Writes OUT/runs.jsonl (one line per run) and OUT/table.md (mean +- spread over seeds per arm).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.config import load_config  # noqa: E402
from library.files.atomic import write_text  # noqa: E402
from library.generation.pipeline import load_model  # noqa: E402
from library.training.attention import AttentionMapStore, install_attention_capture, remove_attention_capture  # noqa: E402
from library.training.attention_guard import attention_figures  # noqa: E402
from library.training.trainer import MagiCaptureTrainer  # noqa: E402
from testkit.toyworld.base import CAPTURE_LAYERS  # noqa: E402
from testkit.toyworld.scenes import BACKGROUNDS, COLOURS, NEUTRALS, STYLE, SUBJECT  # noqa: E402
from testkit.toyworld.sets import TOKENS, write_sets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARMS: dict[str, list[str]] = {
    "full": [],
    "no_ar": ["loss.attn_weight=0"],
    "no_cp": ['phase2.tasks=["source", "reference"]'],
    "no_ar_cp": ["loss.attn_weight=0", 'phase2.tasks=["source", "reference"]'],
    "ar_detached": ["loss.attn_detach_extremes=true"],
}
PROMPT = f"a photo of a {TOKENS['source']} person in the style of {TOKENS['reference']}"
TIMESTEPS = (300, 500, 700)
# every colour the world paints; a pixel counts for the subject / the style when its nearest one is theirs
PALETTE = {**{f"c:{k}": v for k, v in COLOURS.items()}, "subject:a": SUBJECT.colour, "subject:b": SUBJECT.second,
           "style:a": STYLE[1], "style:b": STYLE[2], **{f"n:{i}": v for i, v in enumerate(NEUTRALS)},
           **{f"bg:{k}:{i}": v for k, (_, *ab) in BACKGROUNDS.items() for i, v in enumerate(ab)}}


def colour_shares(images: np.ndarray) -> tuple[float, float]:
    """(subject share, style share) of pixels of images [N, H, W, 3] uint8, by nearest palette colour."""
    names = list(PALETTE)
    colours = np.array([PALETTE[n] for n in names], np.float32)  # [P, 3]
    px = images.reshape(-1, 3).astype(np.float32)
    nearest = np.argmin(((px[:, None, :] - colours[None]) ** 2).sum(-1), axis=1)
    kinds = np.array([n.split(":")[0] for n in names])[nearest]
    return float((kinds == "subject").mean()), float((kinds == "style").mean())


def _load_set(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, 64, 64] in [-1, 1], masks [N, 64, 64] in {0, 1}) of a toy-world folder."""
    from library.files.images import read_image

    stems = sorted(p.name[:-4] for p in folder.glob("*.png") if not p.name.endswith(".mask.png"))
    images = np.stack([np.asarray(read_image(folder / f"{s}.png").image) for s in stems])
    masks = np.stack([np.asarray(read_image(folder / f"{s}.mask.png", mode="L").image) for s in stems]) > 127
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, torch.from_numpy(masks).float()


@torch.no_grad()
def attention_measures(model, composed: Path, seed: int) -> dict[str, float]:
    """Inside share, raw inside probability and area share of each special token on the composed scenes."""
    pipe = model.pipe
    x, subject = _load_set(composed)
    n = len(x)
    regions = torch.stack([subject, 1.0 - subject], 1)[:, :, None]  # [N, 2, 1, 64, 64]: [V1] subject, [V2] background
    ids = pipe.tokenizer([PROMPT] * n, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    positions = torch.tensor([[ids[0].tolist().index(model.token_ids[TOKENS[k]][0]) for k in ("source", "reference")]] * n)
    hidden = pipe.text_encoder(ids)[0]
    z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    store = AttentionMapStore()
    install_attention_capture(pipe.unet, store, CAPTURE_LAYERS)
    gen = torch.Generator().manual_seed(seed)
    inside, raw = [], []
    try:
        for t in TIMESTEPS:
            ts = torch.full((n,), t, dtype=torch.long)
            store.set_token_positions(positions)
            pipe.unet(pipe.scheduler.add_noise(z, torch.randn(z.shape, generator=gen), ts), ts, encoder_hidden_states=hidden)
            raw_t, outside_t, _ = attention_figures(store.maps(), regions, torch.ones(n, 2, dtype=torch.bool))
            inside.append(1.0 - outside_t)
            raw.append(raw_t)
    finally:
        remove_attention_capture(pipe.unet)
    inside, raw = torch.stack(inside).mean(0), torch.stack(raw).mean(0)
    area = regions.mean((0, 2, 3, 4))
    out = {}
    for k, token in enumerate(TOKENS.values()):
        out[f"inside/{token}"], out[f"raw/{token}"], out[f"area/{token}"] = float(inside[k]), float(raw[k]), float(area[k])
    return out


def run_one(base: Path, world: dict[str, Path], arm: str, seed: int, out: Path, steps: tuple[int, int],
            samples: int) -> dict:
    """Train one arm with one seed, then measure it; returns the run's record."""
    run_dir = out / f"{arm}_seed{seed}"
    overrides = [f'model.pretrained="{base}"', f'data.source_dir="{world["source"]}"',
                 f'data.reference_dir="{world["reference"]}"', f'output.dir="{run_dir}"', f"train.seed={seed}",
                 f"phase1.steps={steps[0]}", f"phase2.steps={steps[1]}", *ARMS[arm]]
    cfg = load_config(str(ROOT / "configs" / "toy.toml"), overrides)
    MagiCaptureTrainer(cfg).run()
    model = load_model(cfg, lora_scale=1.0, te_scale=1.0, scheduler="ddim", device="cpu" if not torch.cuda.is_available() else "cuda",
                       precision="fp32")
    gen = torch.Generator(model.device).manual_seed(seed)
    images = model.pipe([PROMPT] * samples, num_inference_steps=25, guidance_scale=4.0, height=64, width=64,
                        output_type="np", generator=gen).images
    subject, style = colour_shares((images * 255).round().astype(np.uint8))
    history = [json.loads(line) for line in (run_dir / "loss_history.jsonl").read_text(encoding="utf-8").splitlines()]
    phase2 = [h["mask"] for h in history if h["phase"] == 2 and "mask" in h]
    record = {"arm": arm, "seed": seed, "subject": subject, "style": style,
              "recon": float(np.mean(phase2[-max(1, len(phase2) // 5):])) if phase2 else float("nan"),
              **attention_measures(model, world["composed"], seed)}
    return record


def table(records: list[dict], truth: tuple[float, float]) -> str:
    """Markdown: one row per arm, each measure as mean +- standard deviation over its seeds."""
    keys = ["subject", "style", *(f"{m}/{t}" for t in TOKENS.values() for m in ("inside", "area", "raw")), "recon"]
    lines = ["| arm | seeds | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    lines.append(f"| ground truth (composed scenes) | | {truth[0]:.3f} | {truth[1]:.3f} |" + " |" * (len(keys) - 2))
    for arm in dict.fromkeys(r["arm"] for r in records):
        rows = [r for r in records if r["arm"] == arm]
        cells = [f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows]):.3f}" for k in keys]
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=ROOT / "out" / "toy" / "toy_base")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", nargs=2, type=int, default=[100, 200], metavar=("PHASE1", "PHASE2"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "evidence")
    args = parser.parse_args(argv)
    world = write_sets(args.out / "world", seed=args.world_seed, n=8)
    truth_images = _load_set(world["composed"])[0].permute(0, 2, 3, 1).numpy() * 127.5 + 127.5
    truth = colour_shares(truth_images.round().astype(np.uint8))
    records = []
    for arm in args.arms:
        for seed in args.seeds:
            records.append(run_one(args.base.resolve(), world, arm, seed, args.out, tuple(args.steps), args.samples))
            write_text(args.out / "runs.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    text = table(records, truth)
    write_text(args.out / "table.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
