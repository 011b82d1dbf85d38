"""MagiCapture training: `accelerate launch train_magicapture.py --config configs/x.toml [section.key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path


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
    if args.resume and "=" in args.resume and not Path(args.resume).exists():  # `--resume phase2.steps=9`
        args.overrides.insert(0, args.resume)
        args.resume = "latest"

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from library.files.messages import UserError, report_error
    from library.training.interrupt import terminate_as_interrupt
    from library.training.trainer import TrainingStopped

    # with several processes (torchrun sets RANK) each meets the same refusal or stop: process 0 says it
    main_process = os.environ.get("RANK", "0") == "0"
    say = print if main_process else (lambda *a, **k: None)
    try:
        with terminate_as_interrupt():
            return _train(args)
    except (UserError, FileNotFoundError) as err:  # one line; MAGICAPTURE_DEBUG=1 adds the chain of causes
        if main_process:
            report_error(err)
        return 2
    except TrainingStopped as err:  # one line; the last good checkpoint is kept
        if main_process:
            report_error(err)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (made to raise the same); exit status 128 + signal
        signum = getattr(err, "signum", signal.SIGINT)
        what = str(err) or "outside a training step; the checkpoints written so far are kept (continue with --resume latest)"
        say(f"interrupted ({signal.Signals(signum).name}): {what}", file=sys.stderr)
        return 128 + signum


def _train(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from library.config import load_config, resolve_path
    from library.training.preflight import check_run_inputs
    from library.training.processes import process_state
    from library.training.resume import prepare_resume
    from library.training.run_lock import hold_output_folder
    from library.training.trainer import MagiCaptureTrainer

    cfg = load_config(args.config, list(args.overrides))
    if args.output_dir:
        cfg.output.dir = resolve_path(args.output_dir)
    if args.max_steps is not None:
        cfg.phase1.steps = min(cfg.phase1.steps, args.max_steps)
        cfg.phase2.steps = min(cfg.phase2.steps, args.max_steps)
    check_run_inputs(cfg)  # names, model and weights files, prepared folders: before anything loads
    state = process_state()
    main_process = state.is_main_process
    with hold_output_folder(cfg.output.dir) if main_process else nullcontext():
        point = None
        if args.resume is not None:  # checked before the models load and before anything is written
            point = prepare_resume(cfg, args.resume, state.num_processes)
            if main_process:
                for note in point.notes:
                    print(note)
        MagiCaptureTrainer(cfg).run(resume=point)
    return 0


if __name__ == "__main__":
    sys.exit(main())
