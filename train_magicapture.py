"""MagiCapture training: `accelerate launch train_magicapture.py --config configs/x.toml [section.key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train MagiCapture ([V1] person + [V2] style) and export a kohya LoRA and A1111 embeddings.",
        epilog="Overrides: section.key=value, e.g. phase2.steps=100 output.dir=out/x train.mixed_precision=bf16",
    )
    parser.add_argument("--config", required=True, help="TOML file (see configs/)")
    parser.add_argument("--output_dir", help="same as output.dir=...")
    parser.add_argument("--max_steps", type=int, help="cap both phases at this many steps (quick tries)")
    parser.add_argument("--resume", nargs="?", const="latest", help="a checkpoint folder, or nothing/latest for the newest")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from library.checkpoint import CheckpointError
    from library.config import ConfigError, load_config
    from library.data import DatasetError
    from library.models import ModelLoadError
    from library.trainer import MagiCaptureTrainer, TrainingStopped

    try:
        cfg = load_config(args.config, list(args.overrides))
        if args.output_dir:
            cfg.output.dir = args.output_dir
        if args.max_steps is not None:
            cfg.phase1.steps = min(cfg.phase1.steps, args.max_steps)
            cfg.phase2.steps = min(cfg.phase2.steps, args.max_steps)
        trainer = MagiCaptureTrainer(cfg)
        trainer.run(resume=args.resume)
    except (ConfigError, DatasetError, ModelLoadError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # one line; the last good checkpoint is kept
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
