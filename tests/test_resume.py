"""Interrupted runs and `--resume`: killed at any point, a run resumed from its newest whole checkpoint ends
with the same files as a run that was never interrupted; no file under an output name is ever partial; a
changed configuration is checked against the checkpoint's before anything is written.

The interruption tests run the real entry point (`train_magicapture.main`) in child processes of
`tests/forked_training.py`, which kill themselves at exact points through hooks that exist only there;
the uninterrupted reference is a plain `python train_magicapture.py` subprocess. On a CPU with one
thread the resumed run's files are *bitwise* equal to the reference's (tolerance 0): a resumed run
restores the trainable tensors, optimiser, LR schedule, task sampler and noise generator exactly, and
signals stop training between two steps, never inside one.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_magicapture
from library import checkpoint as ckpt
from library.config import Config, load_config, save_config
from library.resume import RULES, compare_configs, prepare_resume, rewind_history, rule_for
from library.testing import save_random_arcface, write_prepared

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
OUTPUT_FILES = {"magicapture.safetensors", "mcv1.safetensors", "mcv2.safetensors"}


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume_inputs")
    return {"model": tiny_model[0], "single": tiny_model[1],
            "source": write_prepared(root / "source", "source", "mcv1", seed=1),
            "reference": write_prepared(root / "reference", "reference", "mcv2", seed=2),
            "arcface": save_random_arcface(root / "arcface.pth")}


def cli_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """configs/test_tiny.toml (3 + 3 steps, a checkpoint every 2, resolution 64) on the shared inputs."""
    return ["--config", "configs/test_tiny.toml", f'model.pretrained="{inputs["model"]}"',
            f'data.source_dir="{inputs["source"]}"', f'data.reference_dir="{inputs["reference"]}"',
            f'loss.identity_weights="{inputs["arcface"]}"', f'output.dir="{out}"',
            "logging.tensorboard=false", "sample.every=0", *extra]


class Forked:
    """tests/forked_training.py: one process that imported everything, forking a child per run."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forked_training.py")], cwd=ROOT, env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], logs: Path, kill: str | None = None) -> tuple[int, str, str]:
        """(exit code, negative for a signal; stdout; stderr) of one child."""
        out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
        self.proc.stdin.write(json.dumps({"argv": argv, "kill": kill, "out": str(out), "err": str(err)}) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return rc, out.read_text(), err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forked():
    server = Forked()
    yield server
    server.close()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_nothing_partial(out: Path) -> list[str]:
    """Every file under an output name is whole; only `*.tmp` names may be partial. Returns the names seen."""
    names = []
    for path in sorted(out.iterdir()):
        names.append(path.name)
        if path.name.endswith(".tmp"):
            continue
        if path.name.startswith("checkpoint-"):
            ckpt.load_checkpoint(ckpt.checkpoint_at(path))  # raises on a truncated or damaged file
        elif path.suffix == ".safetensors":
            assert tensors(path), path
        elif path.name == "effective_config.toml":
            tomllib.loads(path.read_text())
        elif path.name == "loss_history.jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        else:
            raise AssertionError(f"unexpected file {path}")
    return names


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


# ------------------------------------------------------------------ interruption, end to end
def test_killed_at_every_kind_of_point_and_resumed_ends_equal_to_an_uninterrupted_run(inputs, forked, tmp_path):
    reference_out, out = tmp_path / "reference", tmp_path / "interrupted"
    reference = subprocess.Popen([sys.executable, "train_magicapture.py", *cli_args(inputs, reference_out)], cwd=ROOT,
                                 env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    args = cli_args(inputs, out)

    # 1. Ctrl-C twice in phase 1 step 1: stops at once, saves nothing (the step was incomplete)
    rc, _, err = forked.run(args, tmp_path / "1", kill="int2:1:1")
    assert rc == 130 and "Traceback" not in err
    assert last_line(err) == ("interrupted (SIGINT): stopped at once in phase 1 after step 0; not saved (the step in "
                              "progress was incomplete), last checkpoint: none; continue with --resume latest")
    assert not ckpt.list_checkpoints(out)
    # 2. a new run, Ctrl-C once in phase 1 step 1: that step finishes, is saved, and the run says how to go on
    rc, _, err = forked.run(args, tmp_path / "2", kill="int:1:1")
    assert rc == 130 and "Traceback" not in err
    assert last_line(err) == (f"interrupted (SIGINT): stopped in phase 1 at step 1/3: saved {out}/checkpoint-p1-000001; "
                              f"continue with --resume latest")
    assert assert_nothing_partial(out) == ["checkpoint-p1-000001", "effective_config.toml", "loss_history.jsonl"]
    # 3. SIGKILL after phase 1 step 3 was computed, before the end of the phase saved it
    rc, _, _ = forked.run([*args, "--resume"], tmp_path / "3", kill="kill:1:3")
    assert rc == -9
    assert [c.path.name for c in ckpt.list_checkpoints(out)] == ["checkpoint-p1-000001", "checkpoint-p1-000002"]
    assert_nothing_partial(out)
    # 4. SIGTERM in phase 2 step 1: as Ctrl-C (the step finishes, is saved, exit 128 + 15)
    rc, stdout, err = forked.run([*args, "--resume"], tmp_path / "4", kill="term:2:1")
    assert rc == 143 and "Traceback" not in err
    assert "resuming from checkpoint-p1-000002: phase 1, step 2" in stdout
    assert last_line(err) == (f"interrupted (SIGTERM): stopped in phase 2 at step 1/3: saved {out}/checkpoint-p2-000001; "
                              f"continue with --resume latest")
    assert assert_nothing_partial(out)[:2] == ["checkpoint-p1-000003", "checkpoint-p2-000001"]
    # 5. SIGKILL in the middle of writing checkpoint-p2-000002 (half of trainable.safetensors on disk)
    rc, _, _ = forked.run([*args, "--resume"], tmp_path / "5", kill="write:checkpoint-p2-000002")
    assert rc == -9
    assert "checkpoint-p2-000002.tmp" in assert_nothing_partial(out)
    assert ckpt.list_checkpoints(out)[-1].path.name == "checkpoint-p2-000001"
    # 6. SIGKILL after phase 2 step 3 was computed; the half-written folder of the last kill is gone
    rc, _, _ = forked.run([*args, "--resume"], tmp_path / "6", kill="kill:2:3")
    assert rc == -9
    assert [n for n in assert_nothing_partial(out) if n.startswith("checkpoint")] == ["checkpoint-p2-000001",
                                                                                      "checkpoint-p2-000002"]
    # 7. SIGKILL in the middle of the export (mcv1 written, mcv2 half written, the LoRA not yet)
    rc, _, _ = forked.run([*args, "--resume"], tmp_path / "7", kill="write:mcv2.safetensors")
    assert rc == -9
    names = assert_nothing_partial(out)
    assert "mcv2.safetensors.tmp" in names and "mcv2.safetensors" not in names and "magicapture.safetensors" not in names
    # 8. the final checkpoint damaged on disk: --resume latest falls back to the one before, with one line
    final = out / "checkpoint-p2-000003" / "trainable.safetensors"
    whole = final.stat().st_size
    os.truncate(final, whole - 100)
    rc, stdout, err = forked.run([*args, "--resume", "logging.print_every=1"], tmp_path / "8")
    assert rc == 0, err
    assert [line for line in stdout.splitlines() if line.startswith(("warning", "resum"))] == [
        f"warning: {final}: {whole - 100} bytes, the manifest says {whole} (truncated or "
        f"overwritten); resuming from checkpoint-p2-000002, the newest whole checkpoint (the damaged one is removed at "
        f"the next save)",
        "resume: changed since checkpoint-p2-000002, and safe to change: logging.print_every 100 -> 1",
        "resuming from checkpoint-p2-000002: phase 2, step 2",
    ]

    assert reference.wait(timeout=300) == 0, reference.communicate()[1]
    names = assert_nothing_partial(out)
    assert names == assert_nothing_partial(reference_out) == [
        "checkpoint-p2-000002", "checkpoint-p2-000003", "effective_config.toml", "loss_history.jsonl",
        "magicapture.safetensors", "mcv1.safetensors", "mcv2.safetensors"]
    for name in [*sorted(OUTPUT_FILES), "checkpoint-p2-000003/trainable.safetensors"]:
        got, want = tensors(out / name), tensors(reference_out / name)
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), f"{name} differs from the uninterrupted run"
    with safe_open(str(out / "magicapture.safetensors"), "pt") as a, safe_open(str(reference_out / "magicapture.safetensors"), "pt") as b:
        got, want = a.metadata(), b.metadata()
        assert got.pop("modelspec.date") >= want.pop("modelspec.date")  # the export's time: the only difference
        assert got == want
    assert history(out) == history(reference_out)  # every step's losses, once each, as in one run
    assert [(h["phase"], h["step"]) for h in history(out)] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]


def test_sigterm_before_training_is_one_line_and_leaves_no_checkpoint(inputs, forked, tmp_path):
    out = tmp_path / "out"
    rc, _, err = forked.run(cli_args(inputs, out), tmp_path / "log", kill="term-at-load")
    assert rc == 143
    assert err.strip().splitlines()[-1] == ("interrupted (SIGTERM): outside a training step; the checkpoints written so "
                                            "far are kept (continue with --resume latest)")
    assert "Traceback" not in err and not ckpt.list_checkpoints(out)
