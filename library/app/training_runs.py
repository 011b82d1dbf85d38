"""Training runs started from the page: `train_magicapture.py` as a subprocess in its own session, so that a
closed browser (or a restarted page) does not stop it; one run per output folder.

The output folder holds everything about a run: ``app_run.lock`` (the running process's id, made with
O_EXCL so two starts cannot both win), ``app_config.toml`` (the TOML the page started it with),
``app_train.log`` (its stdout and stderr) and the trainer's own files (loss_history.jsonl, samples/,
attention/, checkpoints). Stop sends SIGTERM: the trainer finishes the step, saves a checkpoint and exits
(library/training/interrupt.py). Resume starts the same config with ``--resume`` (latest checkpoint).
A run started from the command line has no lock; the page still shows its progress from its files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from library.files.atomic import write_text
from library.files.pids import pid_alive
from library.files.text import TextFileError, read_text_file
from library.app.state import for_people, relative
from library.training.run_lock import lock_holder

ROOT = Path(__file__).resolve().parents[2]
LOCK = "app_run.lock"
CONFIG = "app_config.toml"
LOG = "app_train.log"
HISTORY = "loss_history.jsonl"
START_MARK = "--- the page starts training ---"  # in the log before each start: a failure is read after the last


class RunRefused(RuntimeError):
    """Start refused (a run already holds the output folder) or Stop with nothing to stop; one line."""


def read_lock(out_dir: Path) -> dict | None:
    """The lock's record {"pid", "started" (unix s), "command"} if a live process holds `out_dir`; a lock
    whose process is gone (killed page, crash) is removed and None returned."""
    path = Path(out_dir) / LOCK
    try:
        rec = json.loads(read_text_file(path))
        pid = int(rec["pid"])
    except FileNotFoundError:
        return None
    except (TextFileError, ValueError, KeyError, TypeError):
        rec, pid = None, 0
    if rec is not None and pid > 0 and pid_alive(pid):
        return rec
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return None


def check_config(config_text: str, out_dir: Path, sandbox) -> None:
    """Refuse, before anything starts, a config that library.config refuses, that names a path outside the
    page's folders (`sandbox`: library.app.state.Sandbox; PathRefused) or whose inputs the trainer's cheap
    checks refuse (library.training.preflight: prepared folders, weights files, the base model), or that
    gives a Z-Image / FLUX.2 Klein transformer file alone without its text-encoder file, VAE file and
    tokenizer folder (library.app.presets.missing_split_files). Each is
    one line that speaks of the config the user sees, never of the file it is checked through. Relative
    paths count from the repository root, where the trainer runs."""
    from library.config import load_config
    from library.training.preflight import check_run_inputs

    if not config_text.strip():
        raise ValueError("the config is empty: choose a base model and a preset, then press Compose config")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check = out_dir / ".app_check.toml"  # load_config reads a file; the run's own copy is written by start_run
    write_text(check, config_text)
    try:
        cfg = load_config(check)
    except ValueError as exc:
        raise type(exc)(str(exc).replace(str(check), "the config")) from None
    finally:
        check.unlink(missing_ok=True)
    reads = (cfg.model.pretrained, cfg.model.vae, cfg.model.text_encoder, cfg.model.tokenizer, cfg.model.config_dir,
             cfg.data.source_dir, cfg.data.reference_dir, cfg.loss.identity_weights, cfg.evaluation.clip,
             cfg.evaluation.aesthetic)
    for p in (x for x in reads if x):
        sandbox.resolve(p, base=ROOT)
    sandbox.resolve(cfg.output.dir, write=True, base=ROOT)
    if cfg.model.pretrained:  # a DiT transformer file alone: say what else it needs, in one line
        from library.app.presets import missing_split_files

        missing = missing_split_files(str(sandbox.resolve(cfg.model.pretrained, base=ROOT)), cfg.model.text_encoder,
                                      cfg.model.vae, cfg.model.tokenizer)
        if missing:
            raise ValueError(missing)
    check_run_inputs(cfg)


def start_run(config_text: str, out_dir: Path, resume: bool = False, python: str = sys.executable) -> int:
    """Write `config_text` to OUT/app_config.toml and start ``train_magicapture.py --config it
    --output_dir OUT [--resume]``; returns the process id. RunRefused (one line) when a live run holds
    OUT. The caller checks the config first (library.config.load_config)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    held = read_lock(out_dir) or lock_holder(out_dir)  # the page's runs, or one started from a terminal
    if held is not None:
        raise RunRefused(f"{relative(out_dir)}: a training run (process {held['pid']}) is already using this output "
                         "folder; stop it first or choose another output name")
    lock = out_dir / LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # another start won the race between read_lock and here
        raise RunRefused(f"{relative(out_dir)}: a training run is already starting in this output folder") from None
    cfg_path = out_dir / CONFIG
    command = [python, str(ROOT / "train_magicapture.py"), "--config", str(cfg_path), "--output_dir", str(out_dir)]
    if resume:
        command.append("--resume")
    try:
        write_text(cfg_path, config_text)
        log = open(out_dir / LOG, "ab")
        log.write(f"{START_MARK}\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        log.close()
        last = read_history(out_dir)[-1:] if resume else []
        since = [int(last[0].get("phase", 1)), int(last[0]["step"])] if last else [1, 0]
        os.write(fd, json.dumps({"pid": proc.pid, "started": time.time(), "since": since, "command": command}).encode())
    except BaseException:
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise
    os.close(fd)
    # reap the child when it ends (no zombie holding the lock) and free the folder
    threading.Thread(target=_wait_and_unlock, args=(proc, lock), daemon=True).start()
    return proc.pid


def _wait_and_unlock(proc: subprocess.Popen, lock: Path) -> None:
    proc.wait()
    lock.unlink(missing_ok=True)


def stop_run(out_dir: Path) -> int:
    """SIGTERM the run holding `out_dir` (it saves a checkpoint after the current step); returns its pid.
    RunRefused when no run started from the page holds it."""
    held = read_lock(Path(out_dir))
    if held is None:
        raise RunRefused(f"{relative(out_dir)}: no training run from this page is running there")
    os.kill(int(held["pid"]), signal.SIGTERM)
    return int(held["pid"])


def format_seconds(s: float) -> str:
    """`s` seconds as "1 h 02 min", "3 min 05 s" or "12 s"."""
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def read_history(out_dir: Path) -> list[dict]:
    """OUT/loss_history.jsonl's records (the trainer's progress plot reader)."""
    from library.training.progress_plot import read_history as read_jsonl

    return read_jsonl(Path(out_dir) / HISTORY)


def tail(path: Path, lines: int = 40, max_bytes: int = 65536) -> str:
    """The last `lines` lines of a text file (progress-bar carriage returns keep only their last state)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    rows = [row.split("\r")[-1] for row in data.split("\n")]
    return "\n".join(rows[-lines:])


def overall_step(phase: int, step: int, total: tuple[int, int]) -> int:
    """Steps done over both phases after `step` of `phase`."""
    return step if phase == 1 else total[0] + step


def mtime(p: Path) -> float:
    """`p`'s modification time, 0 when it is gone."""
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def error_line(exc: BaseException) -> str:
    """What the page shows for a failed action: ``error: <one line>``, in the page's words (state.for_people)."""
    return f"error: {for_people(str(exc) or type(exc).__name__)}"
