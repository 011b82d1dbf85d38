"""Does attention refocusing drain the tokens' attention? The collapse guard's figures, literal vs attached S.

    python bench/measure_collapse.py --tiny --ar-only --steps 60 --lr 2e-3 --lr-scheduler constant  # CPU, ~20 s
    python bench/measure_collapse.py --steps 200 --json collapse.json     # SD 1.5 shapes, 512 px, bf16, GPU

For `loss.attn_detach_extremes` = true (the released literal S) and false (the default), phase 2 runs
from the same start through the trainer's own loop (MagiCaptureTrainer.run_phase), and the per-token
raw attention inside the token's region (`inside/<token>`) and the share outside it (`outside/<token>`)
are read from loss_history.jsonl: start (mean of the first 5 steps), end (mean of the last 5), their
ratio, and the step at which the guard tripped. `--ar-only` replaces the reconstruction term by 0, so
only refocusing moves the weights. Then, for the default, the step time with the guard's figures
computed vs not (`--skip-timing` to leave it out): the figures must cost under 2% of a step.
Random weights show no refocusing (their attention means nothing); they show the collapse direction,
which is a property of the loss's gradient, and the cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.training import trainer as trainer_module  # noqa: E402
from library.config import load_config  # noqa: E402
from library.models.loading import StableDiffusionParts, _ddpm_from  # noqa: E402
from testkit.tiny import build_components, write_prepared  # noqa: E402


def make_trainer(args, root: Path, out: Path, detach: bool, extra: list[str] = ()):
    comps = build_components(sd15_size=not args.tiny, seed=args.seed)
    parts = StableDiffusionParts(
        unet=comps["unet"], vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
        noise_scheduler=_ddpm_from(dict(comps["scheduler"].config)), name="random",
    )
    res = args.resolution
    source = root / "source"
    reference = root / "reference"
    if not source.is_dir():
        write_prepared(source, "source", "mcv1", n=4, size=res, seed=1)
        write_prepared(reference, "reference", "mcv2", n=4, size=res, seed=2)
    cfg = load_config(None, [
        'model.pretrained="unused"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
        f"data.resolution={res}", f'output.dir="{out}"', f'train.mixed_precision="{args.precision}"',
        'optimizer.name="AdamW"', "logging.tensorboard=false", "logging.print_every=0", "sample.every=0",
        "output.save_every=0", f"phase2.steps={args.steps}", f"phase2.batch_size={args.batch}",
        f"phase2.lr_unet={args.lr}", f"phase2.lr_text_encoder={args.lr * 0.4}", f"phase2.lr_embeddings={args.lr * 0.1}",
        f"loss.attn_detach_extremes={'true' if detach else 'false'}", f"train.seed={args.seed}",
        f"phase2.lr_scheduler=\"{args.lr_scheduler}\"", *extra,
    ])
    return trainer_module.MagiCaptureTrainer(cfg, parts=parts)


def figures(history: list[dict], words: tuple[str, str]) -> dict:
    out = {}
    for w in words:
        inside = [h[f"inside/{w}"] for h in history if f"inside/{w}" in h]
        outside = [h[f"outside/{w}"] for h in history if f"outside/{w}" in h]
        start, end = statistics.mean(inside[:5]), statistics.mean(inside[-5:])
        out[w] = {"inside_start": start, "inside_end": end, "inside_ratio": end / start,
                  "inside_min_ratio": min(inside) / start,
                  "outside_start": statistics.mean(outside[:5]), "outside_end": statistics.mean(outside[-5:])}
    return out


def run(args, root: Path, detach: bool) -> dict:
    out = root / f"out_{'detached' if detach else 'attached'}"
    trainer = make_trainer(args, root, out, detach, ["loss.attn_collapse_action=\"warn\""])
    tripped = {}
    real_print = trainer.print

    def note(message: str) -> None:
        if message.startswith("warning: attention to "):
            tripped[message.split()[3]] = trainer.history[-1]["step"]
        real_print(message)

    trainer.print = note
    trainer.run_phase(2, 0, None, None)
    result = {"detach_extremes": detach, "tripped_at": tripped, **figures(trainer.history, trainer.prompts.words)}
    print(json.dumps(result), flush=True)
    return result


def time_guard(args, root: Path) -> dict:
    """Step time of the default with the figures computed vs skipped (same trainer, same samples)."""
    trainer = make_trainer(args, root, root / "out_timing", False)
    pcfg, opt, sched, sampler, params = trainer.setup_phase(2)
    draws = [sampler.draw(pcfg.batch_size) for _ in range(args.timing_steps)]
    real = trainer_module.attention_figures
    none = lambda maps, masks, present: (torch.zeros(2), torch.zeros(2), torch.zeros(2))  # noqa: E731
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    times = {"on": [], "off": []}
    for rep in range(args.timing_reps):
        for name, fn in (("on", real), ("off", none)) if rep % 2 == 0 else (("off", none), ("on", real)):
            trainer_module.attention_figures = fn
            for i, samples in enumerate(draws):
                sync()
                t0 = time.perf_counter()
                trainer.optimizer_step(samples, i, 2, pcfg, opt, sched, params)
                sync()
                if i >= 2:  # warm-up
                    times[name].append(time.perf_counter() - t0)
    trainer_module.attention_figures = real
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    result = {"step_s_guard_on": on, "step_s_guard_off": off, "guard_cost": on / off - 1}
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (CPU), not SD 1.5 shapes")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4, help="phase2.batch_size (4: the shipped configs)")
    parser.add_argument("--lr", type=float, default=1e-4, help="LoRA lr (text encoder 0.4x, embeddings 0.1x); 1e-4: the paper's")
    parser.add_argument("--lr-scheduler", default="linear", help="phase2.lr_scheduler (linear: the default)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--precision", default=None, help="no | fp16 | bf16 (default: bf16 on CUDA, no on CPU)")
    parser.add_argument("--ar-only", action="store_true", help="reconstruction term replaced by 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--timing-steps", type=int, default=12)
    parser.add_argument("--timing-reps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.precision = args.precision or ("bf16" if cuda else "no")
    if args.ar_only:
        trainer_module.masked_reconstruction_loss = lambda pred, target, mask, area=True: pred.float().sum((1, 2, 3)) * 0
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results["runs"] = [run(args, root, detach) for detach in (True, False)]
        if not args.skip_timing:
            results["timing"] = time_guard(args, root)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
