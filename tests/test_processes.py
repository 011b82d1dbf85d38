"""Several processes (issue 17): a run on 2 processes is the training of 1 process with twice the batch,
resumes on 2 processes to the same end, accepts another process count with a line, and writes once.

The runs are the real entry point under `torchrun` on the CPU (gloo standing in for NCCL), each process
with one thread; the 1-process reference is plain `python train_magicapture.py` with the batch of both
processes in `grad_accum` 2 micro-batches, which is exactly what the 2 processes compute together.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cli_output import one_error_line
from testkit.tiny import save_random_arcface
from library.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
OUTPUTS = ("magicapture.safetensors", "mcv1.safetensors", "mcv2.safetensors")


def run_args(inputs: dict[str, Path], out: Path, processes: int, *extra: str) -> list[str]:
    """configs/test_tiny.toml with the identity loss on; the per-process batch halves with 2 processes."""
    per = {"phase1.batch_size": 4 // processes, "phase2.batch_size": 6 // processes}
    accum = ["phase1.grad_accum=2", "phase2.grad_accum=2"] if processes == 1 else []
    return ["train_magicapture.py", "--config", "configs/test_tiny.toml", f'model.pretrained="{inputs["model"]}"',
            f'data.source_dir="{inputs["source"]}"', f'data.reference_dir="{inputs["reference"]}"',
            f'loss.identity_weights="{inputs["arcface"]}"', f'output.dir="{out}"', "logging.tensorboard=false",
            "sample.every=0", *(f"{k}={v}" for k, v in per.items()), *accum, *extra]


def launch(processes: int, args: list[str], **kwargs) -> subprocess.Popen:
    command = [sys.executable, *args] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    from testkit.tiny import write_prepared

    root = tmp_path_factory.mktemp("processes")
    return {"model": tiny_model[0], "root": root,
            "source": write_prepared(root / "source", "source", "mcv1", seed=1),
            "reference": write_prepared(root / "reference", "reference", "mcv2", seed=2),
            "arcface": save_random_arcface(root / "arcface.pth")}


@pytest.fixture(scope="module")
def runs(inputs) -> dict[str, tuple[Path, str]]:
    """The 1-process reference and the uninterrupted 2-process run, started together."""
    one, two = inputs["root"] / "one", inputs["root"] / "two"
    procs = {"one": (one, launch(1, run_args(inputs, one, 1))), "two": (two, launch(2, run_args(inputs, two, 2)))}
    return {name: (out, finish(proc)[0]) for name, (out, proc) in procs.items()}


def test_two_processes_train_what_one_trains_with_twice_the_batch(runs):
    (one, _), (two, stdout) = runs["one"], runs["two"]
    for name in OUTPUTS:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert sorted(a) == sorted(b)
        for key in a:  # relative to each tensor's norm: Adam's m / sqrt(v) magnifies rounding where a gradient is ~0
            x, y = a[key].float(), b[key].float()
            assert (x - y).norm() <= 5e-3 * x.norm() + 1e-7, (name, key, ((x - y).norm() / x.norm()).item())
    h1, h2 = history(one), history(two)
    assert [(e["phase"], e["step"]) for e in h2] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]  # written once
    assert [e["lr"] for e in h2] == [e["lr"] for e in h1]  # the schedule steps once per optimiser step
    assert h2[2]["lr"] == 0.0 and h2[1]["lr"] > 0  # linear to 0 at the phase's end, not halfway
    for a, b in zip(h1, h2):  # the figures of both processes, not rank 0's half batch
        for key in ("loss", "mask", "attn", "id"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["phase"], a["step"], key)
    assert stdout.count("processes: 2; batch per process 2 / 3 (phase 1 / 2), effective 4 / 6 per optimiser step") == 1
    assert sum(line.startswith(f"wrote {two / 'magicapture.safetensors'} and ") for line in stdout.splitlines()) == 1
    with safe_open(str(two / "magicapture.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_processes"], meta["ss_batch_size_per_device"], meta["ss_total_batch_size"]) == ("2", "3", "6")
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(two)[-1])[1]
    assert state["processes"] == 2 and ckpt.list_checkpoints(two)[-1].path.name == "checkpoint-p2-000003"


def test_a_two_process_run_killed_after_a_checkpoint_resumes_to_the_same_end(inputs, runs, tmp_path):
    two = runs["two"][0]
    out = tmp_path / "killed"
    proc = launch(2, run_args(inputs, out, 2, "output.save_every=1"))
    try:
        for _ in range(12000):  # the event: its first phase-2 checkpoint
            if any(c.phase == 2 for c in ckpt.list_checkpoints(out)) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert any(c.phase == 2 for c in ckpt.list_checkpoints(out)), proc.communicate()[1][-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both processes, at once
        proc.communicate()
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    stdout, _ = finish(launch(2, [*run_args(inputs, out, 2, "output.save_every=1"), "--resume", "latest"]))
    assert "resuming from checkpoint-p" in stdout
    for name in OUTPUTS:
        a, b = load_file(str(two / name)), load_file(str(out / name))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert [e["loss"] for e in history(out)] == [e["loss"] for e in history(two)]

    # the same checkpoint continued on one process: accepted, and said
    stdout, _ = finish(launch(1, [*run_args(inputs, kept, 2, "output.save_every=1"), "--resume", "latest"]))
    lines = [line for line in stdout.splitlines() if line.startswith("resume: 1 process instead of 2")]
    assert lines and lines[0] == ("resume: 1 process instead of 2: the effective batch is 3 instead of 6 samples "
                                  "per step from here on"), stdout
    assert (kept / "magicapture.safetensors").is_file()


def test_fsdp_and_deepspeed_are_refused_in_one_line(inputs, tmp_path):
    proc = subprocess.run([sys.executable, *run_args(inputs, tmp_path / "out", 1)], cwd=ROOT, capture_output=True,
                          text=True, env={**ENV, "ACCELERATE_USE_FSDP": "true"}, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert line.startswith("error: accelerate is set up for FSDP, which this trainer does not use: ")
    assert line.endswith("or `accelerate config` and choose multi-GPU)")
    assert not (tmp_path / "out").exists()


def test_weights_that_blow_up_stop_both_processes_with_one_line(inputs, tmp_path):
    out = tmp_path / "out"
    proc = launch(2, run_args(inputs, out, 2, "phase2.lr_unet=inf", "phase2.lr_text_encoder=inf", "output.save_every=1"))
    _, err = proc.communicate(timeout=900)  # no process is left waiting for the other
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0
    assert len(errors) == 1 and errors[0].startswith("error: phase 2 step 1: the trained tensors are no longer finite ("), err[-3000:]
    assert errors[0].endswith("last good checkpoint: checkpoint-p1-000003; lower the learning rate (or use bf16 instead "
                              "of fp16), then continue with --resume latest")
    assert [c.path.name for c in ckpt.list_checkpoints(out)][-1] == "checkpoint-p1-000003"
