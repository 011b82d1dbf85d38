"""Does phase 1 (pivotal tuning of [V1] / [V2] as Qwen3 rows) let phase 2 start lower on the DiT bases?

    python bench/measure_dit_phase1.py [--steps 0 40] [--seeds 0 1 2] [--families zimage klein4b]

For each family's tiny model (testkit/tiny_zimage.py, tiny_klein.py; random weights, CPU) and seed, phase 1
trains for each of ``--steps`` optimiser steps (the project's trainer, configs/test_tiny.toml at 64 px,
phase 2 of 0 steps), then the masked reconstruction loss (eq. 4, the flow target) is measured on ONE fixed
evaluation batch of phase 2's three tasks (the same samples, noise and noise levels for every arm: the
loss at the start of phase 2, without LoRA). Prints per family the mean and spread over seeds of each arm
and of its difference to 0 phase-1 steps.

What it can and cannot show: on random tiny weights a token's rows carry no meaning, so this measures
whether phase 1 lowers the reconstruction the embedding alone can reach, not whether it helps likeness on
a real base. The table and the command are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from library.config import load_config  # noqa: E402
from library.training.data import TaskSampler  # noqa: E402
from library.training.trainer import MagiCaptureTrainer  # noqa: E402
from testkit.tiny import write_prepared  # noqa: E402
from testkit.tiny_klein import save_klein_model  # noqa: E402
from testkit.tiny_zimage import save_zimage_model  # noqa: E402

BUILDERS = {"zimage": lambda d: save_zimage_model(d)[0], "klein4b": lambda d: save_klein_model(d, "4b")[0]}
EVAL_SAMPLES = 12


def start_of_phase2_loss(trainer: MagiCaptureTrainer, seed: int = 123) -> float:
    """Eq. 4's masked reconstruction (the trainer's own compute_loss, no LoRA) on a fixed batch of phase 2's
    tasks: samples, noise and noise levels drawn from `seed` alone, so every arm sees the same batch."""
    cfg = trainer.cfg
    sampler = TaskSampler(cfg.phase2.tasks, len(trainer.source), len(trainer.reference), cfg.tokens.source,
                          cfg.tokens.reference, seed=seed)
    samples = sampler.draw(EVAL_SAMPLES)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((EVAL_SAMPLES, *trainer.source.latents.shape[1:]), generator=gen)
    levels = trainer.objective.sample_levels(EVAL_SAMPLES, cfg.phase2.max_timestep, gen)
    with torch.no_grad():
        batch = trainer.build_batch(samples, cfg.phase2.steps, cfg.phase2, noise, levels)
        return float(trainer.compute_loss(batch, phase=1)["mask"])


def run(family: str, steps: int, seed: int, model: Path, sets: tuple[Path, Path], out: Path) -> float:
    cfg = load_config(ROOT / "configs" / "test_tiny.toml", [
        f'model.pretrained="{model}"', f'data.source_dir="{sets[0]}"', f'data.reference_dir="{sets[1]}"',
        f'output.dir="{out}"', f"phase1.steps={steps}", "phase2.steps=0", f"train.seed={seed}", "sample.every=0",
        "output.save_every=0", "logging.tensorboard=false", "logging.print_every=0"])
    trainer = MagiCaptureTrainer(cfg)
    trainer.run()
    return start_of_phase2_loss(trainer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 40], help="phase-1 steps of each arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        sets = (write_prepared(root / "source", "source", "mcv1", seed=1),
                write_prepared(root / "reference", "reference", "mcv2", seed=2))
        print("| family | phase-1 steps | start-of-phase-2 mask loss, mean +- sd over seeds | minus 0 steps, mean +- sd |")
        print("|---|---|---|---|")
        for family in args.families:
            model = BUILDERS[family](root / family)
            losses = {s: [run(family, s, seed, model, sets, root / f"out_{family}_{s}_{seed}") for seed in args.seeds]
                      for s in args.steps}
            base = losses[args.steps[0]]
            for s, values in losses.items():
                diff = [v - b for v, b in zip(values, base)]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                dspread = statistics.stdev(diff) if len(diff) > 1 else 0.0
                print(f"| {family} | {s} | {statistics.mean(values):.4f} +- {spread:.4f} | "
                      f"{statistics.mean(diff):+.4f} +- {dspread:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
