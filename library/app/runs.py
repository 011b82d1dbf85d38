"""The runs in the output folder as a list a person picks from: each run's state (running, queued, finished,
stopped, failed with the reason), step, best step and likeness, read from its folder, so runs started from a
terminal show too. Also the queue (one training at a time on this computer) and the progress of the run
being watched (a bar per phase, speed measured from the first step after loading, device memory).

A queued run is a folder holding ``app_queued.json`` next to the ``app_config.toml`` it will start with; the
page's timer starts the oldest one when no run holds any folder (:func:`start_next`), so a queue survives
a page restart.
"""

from __future__ import annotations

import fcntl
import html
import json
import os
import shutil
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from library.app import training_runs
from library.app.state import within
from library.files.atomic import append_text, write_text
from library.files.messages import one_line
from library.files.text import TextFileError, read_text_file
from library.training.run_lock import LOCK_NAME, lock_holder
from library.training.training_scores import best_step

QUEUED = "app_queued.json"
QUEUE_LOCK = ".app_queue.lock"  # in the output folder: two pages' timers never start two runs at once
RUN_FILES = ("effective_config.toml", training_runs.CONFIG, training_runs.HISTORY, LOCK_NAME, training_runs.LOCK,
             QUEUED)
LOSS_TERMS = ("loss", "mask", "attn", "id")  # the trainer's loss_history.jsonl keys worth a chart
SCORE_PREFIX = "eval/"
SCORES = ("csim", "face_found", "same_person", "style")  # library/training/training_scores.py's eval/* keys


@dataclass
class RunInfo:
    """What a run's folder says about it; `state` is one of running, queued, finished, stopped, failed,
    not started."""

    name: str
    folder: Path
    state: str = "not started"
    reason: str = ""  # failed: the error line of its log; queued: what it waits for
    phase: int = 0
    step: int = 0
    total: tuple[int, int] = (0, 0)  # (phase-1, phase-2) steps of its config, 0 when unknown
    best_step: str = ""  # "phase 2 step 20": the step whose samples looked most like the person
    likeness: float | None = None  # eval/identity (cosine with the source faces' centroid) at best_step
    pid: int | None = None
    history: tuple = ()

    def state_text(self) -> str:
        """One line: the state, then the step of the phase (or the failure's reason, or what it waits for)."""
        if self.state == "failed":
            return f"failed: {self.reason}"
        if self.state == "queued":
            return f"queued: {self.reason}"
        if not self.phase:
            return self.state
        steps = self.total[self.phase - 1] if self.phase in (1, 2) else 0
        return f"{self.state}: phase {self.phase} step {self.step}" + (f"/{steps}" if steps else "")

    def row(self) -> list:
        """The run list's row: name, state, step, best step, likeness."""
        done = training_runs.overall_step(self.phase, self.step, self.total) if self.phase else 0
        return [self.name, self.state_text(), f"{done}/{sum(self.total)}" if any(self.total) else str(done),
                self.best_step, "" if self.likeness is None else f"{self.likeness:.3f}"]


COLUMNS = ["run", "state", "step", "best step", "likeness"]


def config_steps(folder: Path) -> tuple[int, int]:
    """(phase-1, phase-2) steps of the run's newest config (see saved_config), (0, 0) when unknown."""
    _, values = saved_config(folder)
    try:
        return int(values.get("steps1", 0)), int(values.get("steps2", 0))
    except (TypeError, ValueError):
        return 0, 0


def last_error(log: Path) -> str:
    """The reason of the last start's failure: its log's last ``error: ...`` line after the page's last
    start mark, without the prefix; "" when that start has not failed."""
    text = training_runs.tail(log, lines=400, max_bytes=262144)
    text = text.rsplit(training_runs.START_MARK, 1)[-1]
    errors = [row.strip() for row in text.splitlines() if row.strip().startswith("error:")]
    return one_line(errors[-1][len("error:"):].strip()) if errors else ""


def best_score(history: list[dict] | tuple) -> tuple[str, float | None]:
    """("phase P step S", identity) of training_scores.best_step (the step with the highest centroid
    identity whose copy share is under the limit; "..., copies" when no step was), ("", None) without one."""
    top = best_step(history)  # the trainer's own rule, so the page names the step the run's last line names
    if top is None:
        return "", None
    return f"phase {top.phase} step {top.step}" + ("" if top.passed else " (copies: no step under the copy limit)"), top.identity


def holder(folder: Path) -> dict | None:
    """The live process training in `folder`: one this page started, or one from a terminal; else None."""
    return training_runs.read_lock(folder) or lock_holder(folder)


def run_info(folder: Path, waits_for: str = "") -> RunInfo:
    """Read one run's folder (see RunInfo); a link in it that leads outside it is not read."""
    folder = Path(folder)
    info = RunInfo(name=folder.name, folder=folder, total=config_steps(folder))
    hist = folder / training_runs.HISTORY
    info.history = tuple(training_runs.read_history(folder)) if within(hist, (folder.resolve(),)) else ()
    if info.history:
        info.phase, info.step = int(info.history[-1].get("phase", 1)), int(info.history[-1]["step"])
    info.best_step, info.likeness = best_score(info.history)
    held = holder(folder)
    log = folder / training_runs.LOG
    reason = last_error(log) if within(log, (folder.resolve(),)) else ""
    if held is not None:
        info.state, info.pid = "running", int(held["pid"]) if str(held.get("pid")).isdigit() else None
    elif (folder / QUEUED).is_file():
        info.state, info.reason = "queued", f"waits for {waits_for or 'the running training'} to end"
    elif reason:
        info.state, info.reason = "failed", reason
    elif info.phase == 2 and info.total[1] and info.step >= info.total[1]:
        info.state = "finished"
    elif info.history or any(folder.glob("checkpoint-p*")):
        info.state = "stopped"
    return info


def run_folders(output_dir: Path) -> list[Path]:
    """The folders under `output_dir` that hold a run (a config, a history, a lock or a queue entry),
    newest first."""
    output_dir = Path(output_dir)
    found = [d for d in output_dir.iterdir() if d.is_dir() and any((d / f).exists() for f in RUN_FILES)] \
        if output_dir.is_dir() else []
    return sorted(found, key=lambda d: max(training_runs.mtime(d / f) for f in (".", *RUN_FILES)), reverse=True)


def list_runs(output_dir: Path) -> list[RunInfo]:
    """Every run under `output_dir`, newest first (queued ones name the run they wait for)."""
    infos = [run_info(d) for d in run_folders(output_dir)]
    running = next((i.name for i in infos if i.state == "running"), "")
    for i in infos:
        if i.state == "queued":
            i.reason = f"waits for {running or 'the running training'} to end"
    return infos


def has_run(folder: Path) -> bool:
    """Whether `folder` already holds a run's results (history, checkpoints or a LoRA) that a new start
    would overwrite."""
    folder = Path(folder)
    return (folder / training_runs.HISTORY).is_file() or any(folder.glob("checkpoint-p*")) \
        or any(folder.glob("*.safetensors"))


def keep_aside(folder: Path) -> Path:
    """Rename a run's folder to the first free NAME-2, NAME-3, ... (so that starting over keeps the old
    run, listed under that name); returns the new folder."""
    target = Path(folder).with_name(keep_aside_name(folder))
    os.replace(folder, target)
    for lock in (training_runs.LOCK, LOCK_NAME, QUEUED):
        (target / lock).unlink(missing_ok=True)  # a finished run's leftovers: it is not running
    return target


def keep_aside_name(folder: Path) -> str:
    """The first free name NAME-2, NAME-3, ... beside `folder`."""
    folder, n = Path(folder), 2
    while folder.with_name(f"{folder.name}-{n}").exists():
        n += 1
    return f"{folder.name}-{n}"


def busy(output_dir: Path) -> str:
    """The name of a run training now anywhere under `output_dir` ("" when none): one device, one run."""
    for d in run_folders(output_dir):
        if holder(d) is not None:
            return d.name
    return ""


def enqueue(config_text: str, folder: Path, resume: bool) -> None:
    """Keep `config_text` as the folder's app_config.toml and mark it queued (started by start_next)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / training_runs.CONFIG, config_text)
    write_text(folder / QUEUED, json.dumps({"queued": time.time(), "resume": bool(resume)}) + "\n")


def cancel(folder: Path) -> bool:
    """Take `folder` out of the queue (and remove it when nothing ever ran there); whether it was queued."""
    path = Path(folder) / QUEUED
    existed = path.is_file()
    path.unlink(missing_ok=True)
    if existed and not has_run(folder) and holder(folder) is None:  # nothing ran there: leave no empty run
        (Path(folder) / training_runs.CONFIG).unlink(missing_ok=True)
        try:
            Path(folder).rmdir()
        except OSError:
            pass  # other files the user keeps there
    return existed


def start_next(output_dir: Path, **kwargs) -> str:
    """Start the oldest queued run when no run trains under `output_dir`; its name, or "" when nothing
    started. A failed start is written to its log (the list shows it as failed) and leaves the queue."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return ""
    fd = os.open(output_dir / QUEUE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if busy(output_dir):
            return ""
        queued = []
        for d in run_folders(output_dir):
            try:
                queued.append((float(json.loads(read_text_file(d / QUEUED))["queued"]), d))
            except (FileNotFoundError, TextFileError, ValueError, KeyError, TypeError):
                continue
        if not queued:
            return ""
        _, folder = min(queued)
        resume = json.loads(read_text_file(folder / QUEUED)).get("resume", False)
        (folder / QUEUED).unlink()
        try:
            training_runs.start_run(read_text_file(folder / training_runs.CONFIG), folder, resume=bool(resume), **kwargs)
        except (OSError, RuntimeError, TextFileError) as exc:
            append_text(folder / training_runs.LOG, f"{training_runs.START_MARK}\nerror: {one_line(exc)}\n")
            return ""
        return folder.name
    finally:
        os.close(fd)  # closing releases the flock


# ------------------------------------------------------------------------------------------------ progress

_FIRST_STEP: dict[tuple[str, int | None], tuple[float, int]] = {}  # (folder, pid) -> (time, overall step) seen


def speed(info: RunInfo, since: int, now: float | None = None) -> float | None:
    """Steps per second of the running `info`, measured from the first step this page saw after the
    start (so loading the model is not counted); None until two steps have been seen. `since`: the
    overall step the run started (or resumed) at."""
    now = time.time() if now is None else now
    done = training_runs.overall_step(info.phase, info.step, info.total) if info.phase else 0
    key = (str(info.folder), info.pid)
    if info.state != "running" or done <= since:
        _FIRST_STEP.pop(key, None)
        return None
    first = _FIRST_STEP.setdefault(key, (now, done))
    if done <= first[1] or now <= first[0]:
        return None
    return (done - first[1]) / (now - first[0])


def device_memory(pid: int | None) -> str:
    """"2.1 GiB of device memory in use" for process `pid` from nvidia-smi, "" without a GPU or the figure."""
    smi = shutil.which("nvidia-smi")
    if not smi or pid is None:
        return ""
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    mib = 0.0
    for row in out.splitlines():  # one row per GPU the process uses: "PID, MiB"
        cells = [c.strip() for c in row.split(",")]
        # "[N/A]" or "[Not Supported]" (MIG, some drivers) is no figure, not an error on the page
        if len(cells) == 2 and cells[0] == str(pid) and cells[1].replace(".", "", 1).isdigit():
            mib += float(cells[1])
    return f"{mib / 1024:.1f} GiB of device memory in use" if mib else ""


def progress_html(info: RunInfo, steps_per_s: float | None, memory: str = "") -> str:
    """A bar per phase (HTML <progress>), with the speed and the time left on the running phase; "loading
    the model" while a run is running and no step has been seen since it started."""
    if info.state == "running" and steps_per_s is None:
        head = "loading the model (the bar starts at the first step)"
    else:
        head = info.state_text()
    rows = [f"<div class='mc-state'>{html.escape(head)}</div>"]
    for phase in (1, 2):
        steps = info.total[phase - 1]
        if not steps:
            continue
        done = steps if info.phase > phase else (info.step if info.phase == phase else 0)
        note = ""
        if phase == info.phase and info.state == "running" and steps_per_s:
            left = (sum(info.total) - training_runs.overall_step(info.phase, info.step, info.total)) / steps_per_s
            note = f", {steps_per_s:.2f} steps/s, about {training_runs.format_seconds(left)} left"
        rows.append(f"<div class='mc-phase' data-phase='{phase}'>phase {phase}: {done}/{steps} steps{note}<br>"
                    f"<progress value='{done}' max='{steps}' style='width:100%'></progress></div>")
    if memory:
        rows.append(f"<div class='mc-memory'>{html.escape(memory)}</div>")
    return "\n".join(rows)


def pictures(folder: Path, sub: str) -> list[Path]:
    """The PNGs of `folder`/`sub` (samples/, attention/), oldest first, that resolve inside `folder`."""
    root = Path(folder).resolve()
    return sorted((p for p in (Path(folder) / sub).glob("*.png") if within(p, (root,))), key=training_runs.mtime)


def saved_config(folder: Path) -> tuple[str, dict]:
    """The run's newest config (the page's app_config.toml when it is newer than the trainer's
    effective_config.toml: a Start that failed before training still counts) as (its text, the values the
    Train form shows: model, steps1, steps2, tok_src, tok_ref, id_weights, resolution, and a DiT transformer
    file's text_encoder, vae, tokenizer); ("", {}) when none."""
    paths = [p for p in (Path(folder) / training_runs.CONFIG, Path(folder) / "effective_config.toml") if p.is_file()]
    for path in sorted(paths, key=training_runs.mtime, reverse=True):
        try:
            text = read_text_file(path)
            doc = tomllib.loads(text)
        except (TextFileError, ValueError):
            continue
        def get(section: str, key: str, default=""):
            value = doc.get(section, {})
            return value.get(key, default) if isinstance(value, dict) else default
        return text, {"model": get("model", "pretrained"), "steps1": get("phase1", "steps", 0),
                      "steps2": get("phase2", "steps", 0), "tok_src": get("tokens", "source", "mcv1"),
                      "tok_ref": get("tokens", "reference", "mcv2"), "id_weights": get("loss", "identity_weights"),
                      "resolution": get("data", "resolution", 0), "text_encoder": get("model", "text_encoder"),
                      "vae": get("model", "vae"), "tokenizer": get("model", "tokenizer")}
    return "", {}


def chart_frames(history: list[dict] | tuple, total: tuple[int, int]):
    """(losses, scores) as the charts' tables (step, value, term / score) over the overall step; None
    for a chart with nothing to draw."""
    import pandas as pd

    rows, scores = [], []
    for rec in history:
        x = training_runs.overall_step(int(rec.get("phase", 1)), int(rec["step"]), total)
        # every series from the first point (a gap where a record lacks it): the chart keeps the series
        # of its first drawing, so a term that starts in phase 2 would never show otherwise
        rows += [{"step": x, "value": float(rec.get(k, "nan")), "term": k} for k in LOSS_TERMS]
        if any(key.startswith(SCORE_PREFIX) for key in rec):  # scores come on sampling steps only
            scores += [{"step": x, "value": float(rec.get(SCORE_PREFIX + k, "nan")), "score": k} for k in SCORES]
    losses = pd.DataFrame(rows) if rows else None
    score_df = pd.DataFrame(scores) if any(r["value"] == r["value"] for r in scores) else None  # NaN != NaN
    return losses, score_df
