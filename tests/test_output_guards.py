"""What a run writes is never lost: output names that would overwrite each other are refused before any
work, one output folder takes one run at a time (a dead run's lock is taken over), a checkpoint holds
finite tensors only, and a write that fails (a full disk, a read-only folder) is one line that names the
folder and keeps the last whole checkpoint (issue 16, kinds 1 to 3).

Each test runs the user's situation through the real entry point (`train_magicapture.main`, or the
script as a subprocess where the disk must fill while it runs) and asserts the line the user sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_magicapture
from cli_output import one_error_line
from library.training import checkpoint as ckpt
from library.training.run_lock import LOCK_NAME, hold_output_folder, lock_holder

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def tiny_args(model: Path, data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    source, reference = data
    return ["--config", str(ROOT / "configs" / "test_tiny.toml"), f'model.pretrained="{model}"',
            f'data.source_dir="{source}"', f'data.reference_dir="{reference}"', f'output.dir="{out}"',
            "logging.tensorboard=false", "sample.every=0", *extra]


def error_line(capsys) -> str:
    return one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------- kind 1: names and folders

@pytest.mark.parametrize("name, expected", [
    ("mcv1", "the LoRA (output.name = 'mcv1') and the embedding of tokens.source = 'mcv1' would both be written as "
             "{out}/mcv1.safetensors, one over the other; give output.name another name, e.g. mcv1_lora"),
    ("MCV2", "the LoRA (output.name = 'MCV2') and the embedding of tokens.reference = 'mcv2' would both be written as "
             "{out}/MCV2.safetensors, one over the other; give output.name another name, e.g. MCV2_lora"),
    ("", "output.name is empty: give the LoRA a name, e.g. my_portrait (it becomes my_portrait.safetensors)"),
    ("loras/me", "output.name = 'loras/me' holds '/': a file name, not a path; put the folder in output.dir and a "
                 "plain name here, e.g. my_portrait"),
    (".me", "output.name = '.me': a name may not start with a dot (a hidden file) or start or end with a space or a "
            "dot; use e.g. my_portrait"),
])
def test_output_names_that_lose_files_are_refused_before_any_work(tiny_model, prepared_data, tmp_path, capsys,
                                                                 model_loads, name, expected):
    out = tmp_path / "out"
    rc = train_magicapture.main(tiny_args(tiny_model[0], prepared_data, out, f'output.name="{name}"'))
    line = error_line(capsys)
    assert rc == 2
    assert line.endswith(expected.format(out=out)), line
    assert model_loads["n"] == 0
    assert not out.exists()  # nothing written, not even the folder


def test_a_step_named_lora_that_equals_a_token_step_file_is_refused(tiny_model, prepared_data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = train_magicapture.main(tiny_args(tiny_model[0], prepared_data, out, 'output.name="mcv1-step00000001"',
                                          "output.save_lora_every=1"))
    assert rc == 2
    assert (f"the LoRA (output.name = 'mcv1-step00000001') and the embedding of tokens.source = 'mcv1' would both be "
            f"written as {out}/mcv1-step00000001.safetensors") in error_line(capsys)


HOLDER = """
import sys, time
from library.training.run_lock import hold_output_folder
with hold_output_folder(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


def test_a_second_run_on_a_held_output_folder_is_refused_and_writes_nothing(tiny_model, prepared_data, tmp_path,
                                                                            capsys, model_loads):
    out = tmp_path / "out"
    out.mkdir()
    history = out / "loss_history.jsonl"
    history.write_text('{"phase": 1, "step": 1, "loss": 0.5}\n')
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # the event: the first run holds the folder
        assert lock_holder(out)["pid"] == holder.pid
        rc = train_magicapture.main(tiny_args(tiny_model[0], prepared_data, out))
        line = error_line(capsys)
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    assert rc == 2
    assert line.startswith(f"error: {out}: another training is writing to this folder (process {holder.pid} on ")
    assert line.endswith("; wait for it to end or stop it, or set output.dir (--output_dir) to another folder")
    assert model_loads["n"] == 0
    assert history.read_text() == '{"phase": 1, "step": 1, "loss": 0.5}\n'  # the first run's history untouched
    assert lock_holder(out) is None and not (out / LOCK_NAME).exists()  # the first run let go when it ended


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_line(tiny_model, prepared_data, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "box", "started": 0, "command": "train"}))
    rc = train_magicapture.main(tiny_args(tiny_model[0], prepared_data, out))
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"note: {out}: took over the lock left by process {pid} on box, started ")
               and line.endswith(", which is no longer running") for line in lines), lines
    assert (out / "magicapture.safetensors").is_file() and not (out / LOCK_NAME).exists()


def test_a_refused_run_leaves_no_output_folder_behind(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with hold_output_folder(out):
            assert (out / LOCK_NAME).is_file()
            raise RuntimeError("the model was refused")
    assert not out.exists()


# ------------------------------------------------------------------------------- kind 2: finite checkpoints

def test_an_exploding_learning_rate_stops_without_writing_a_nan_checkpoint(tiny_model, prepared_data, tmp_path, capsys):
    # lr = inf: the first phase-2 update turns the zero-initialised LoRA weights into 0 * -inf = NaN, while
    # that step's loss (computed before the update) is still finite: only the checkpoint would hold them
    out = tmp_path / "out"
    rc = train_magicapture.main(tiny_args(tiny_model[0], prepared_data, out, "phase2.lr_text_encoder=inf",
                                          "phase2.lr_unet=inf", "output.save_every=1", "output.keep_checkpoints=0"))
    line = error_line(capsys)
    assert rc == 1
    assert line.startswith("error: phase 2 step 1: the trained tensors are no longer finite (")
    assert line.endswith("checkpoint-p2-000001 not written; last good checkpoint: checkpoint-p1-000003; lower the "
                         "learning rate (or use bf16 instead of fp16), then continue with --resume latest")
    names = sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", ".checkpoint")))
    assert names == ["checkpoint-p1-000001", "checkpoint-p1-000002", "checkpoint-p1-000003"]
    trainable, state = ckpt.load_checkpoint(ckpt.list_checkpoints(out)[-1])  # the named one loads, finite
    assert all(torch.isfinite(t).all() for t in trainable.values())
    assert not (out / "magicapture.safetensors").exists()  # no LoRA of NaNs


def test_a_nan_checkpoint_from_an_older_version_is_passed_over(tmp_path):
    good = {"emb": torch.ones(2, 4)}
    state = {k: {} for k in ckpt.STATE_KEYS}
    ckpt.save_checkpoint(tmp_path, 1, 2, good, state, keep=0)
    newer = ckpt.save_checkpoint(tmp_path, 1, 4, good, state, keep=0)
    # an older trainer wrote NaNs into its checkpoint, with a manifest that matches them
    nan = {"emb": torch.tensor([[float("nan")] * 4] * 2)}
    from safetensors.torch import save_file
    save_file(nan, str(newer / ckpt.TRAINABLE))
    manifest = json.loads((newer / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.TRAINABLE] = {"bytes": (newer / ckpt.TRAINABLE).stat().st_size,
                                         "sha256": ckpt.file_sha256(newer / ckpt.TRAINABLE)}
    (newer / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.last_good_checkpoint(tmp_path) == "checkpoint-p1-000002"
    info, _, _, warnings = ckpt.find_resumable("latest", tmp_path)
    assert info.path.name == "checkpoint-p1-000002"
    assert warnings == [f"warning: {newer / ckpt.TRAINABLE}: holds 8 NaN and 0 infinite values in 1 tensor (first: "
                        f"trainable.emb); the checkpoint cannot be continued; resuming from checkpoint-p1-000002, the "
                        f"newest whole checkpoint (the damaged one is removed at the next save)"]


# ------------------------------------------------------------------------------- kind 3: write errors

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs of its own (root only: mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_read_only_output_folder_is_one_line_before_any_work(tiny_model, prepared_data, tmp_path, capsys, model_loads):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(parent)], check=True)
    else:
        parent.chmod(0o555)
    try:
        rc = train_magicapture.main(tiny_args(tiny_model[0], prepared_data, parent / "out"))
    finally:
        subprocess.run(["umount", "-l", str(parent)], check=False) if os.geteuid() == 0 else parent.chmod(0o755)
    line = error_line(capsys)
    assert rc == 2
    reason = "Read-only file system; that disk is mounted read-only" if os.geteuid() == 0 else \
        "Permission denied; you may not write there"
    assert line == f"error: cannot write the folder out in {parent}: {reason}; choose a folder you can write to"
    assert model_loads["n"] == 0


def test_a_disk_that_fills_during_training_is_one_line_and_keeps_the_last_checkpoint(tiny_model, prepared_data,
                                                                                     small_disk):
    out = small_disk / "out"
    args = tiny_args(tiny_model[0], prepared_data, out, "phase1.steps=400", "phase2.steps=2", "output.save_every=1",
                     "logging.every=1", "output.keep_checkpoints=2")
    proc = subprocess.Popen([sys.executable, "train_magicapture.py", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):  # the event: the run has written its first checkpoint
            if ckpt.list_checkpoints(out) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert ckpt.list_checkpoints(out), proc.communicate()
        with open(small_disk / "filler", "wb") as f:  # the disk fills up while the run goes on
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    line = one_error_line(stderr)
    assert line.startswith("error: cannot write ") and f" in {out}" in line, line
    assert ": No space left on device; free some space on that disk, or choose a folder on another disk; " \
           "last good checkpoint: checkpoint-p1-" in line, line
    assert line.endswith("; continue with --resume latest once it can write"), line
    kept = line.split("last good checkpoint: ")[1].split(";")[0]
    ckpt.load_checkpoint(ckpt.CheckpointInfo(out / kept, 1, int(kept[-6:])))  # whole and finite
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]  # no temporaries
    assert not (out / LOCK_NAME).exists()
    # room again: the run continues from there and finishes
    (small_disk / "filler").unlink()
    resumed = subprocess.run([sys.executable, "train_magicapture.py", *args, "phase1.steps=" + str(int(kept[-6:]) + 1),
                              "--resume", "latest"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert load_file(str(out / "magicapture.safetensors"))
