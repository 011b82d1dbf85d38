"""The paper's Fig. 3 claim, measured: where do [V1] and [V2] attend at the end of a run?

    python bench/measure_attention.py --config configs/demo.toml out/ar_on out/ar_off

For each finished output folder (trained with that config, maybe with loss.attn_weight changed), loads
the last phase-2 checkpoint and prints the attention shares of previews.attention_report: the fraction
of each token's attention outside the region it should describe (lower is better), on the raw maps and
on the min-max normalised maps the AR loss uses, and the maps' contrast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.training import checkpoint as ckpt  # noqa: E402
from library.config import load_config  # noqa: E402
from library.training.previews import attention_report  # noqa: E402
from library.training.trainer import MagiCaptureTrainer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    results = {}
    for run in args.runs:
        phase2 = [c for c in ckpt.list_checkpoints(run) if c.phase == 2]
        if not phase2:
            print(f"{run}: no phase-2 checkpoint", file=sys.stderr)
            return 2
        cfg = load_config(args.config, [f'output.dir="{run}"', "logging.tensorboard=false"])
        trainer = MagiCaptureTrainer(cfg)
        trainable, _ = ckpt.load_checkpoint(phase2[-1])
        trainer.setup_phase(2, None, trainable)
        _, shares = attention_report(trainer)
        results[str(run)] = shares
        print(json.dumps({"run": str(run), "checkpoint": phase2[-1].path.name, **shares}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
