"""Training checkpoints: written atomically, pruned, verified and read back without unpickling objects.

A checkpoint is a folder `checkpoint-p{phase}-{step:06d}/` holding the trainable tensors
(`trainable.safetensors`), the rest of the training state (`state.pt`: optimiser, LR scheduler, RNG and
sampler state, only tensors and plain containers, read with `weights_only=True`), the configuration it
was made with (`config.toml`, what `--resume` compares the new configuration with) and `manifest.json`
(size and SHA-256 of each of those files). The folder is written by the atomic writer under a hidden
temporary name and renamed once complete, so a folder under a checkpoint name is whole unless something outside the trainer damaged it;
the manifest is what notices that.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

import toml
import torch
from library.files.atomic import (atomic_folder, ensure_folder, remove_tree, stale_temporaries, write_safetensors,
                                  write_text, write_torch)
from library.files.messages import UserError, one_line
from library.files.text import TextFileError, read_text_file
from library.files.weights import WeightsFileError, load_pickled_weights, load_safetensors, non_finite_summary
from library.export.metadata import file_sha256

_NAME = re.compile(r"^checkpoint-p([12])-(\d{6})$")
TRAINABLE, STATE, CONFIG, MANIFEST = "trainable.safetensors", "state.pt", "config.toml", "manifest.json"
STATE_KEYS = ("optimizer", "scheduler", "sampler", "generator")


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be resumed from; the message is one line naming the file."""


class NonFiniteCheckpoint(CheckpointError):
    """The tensors to be saved hold NaN or infinite values: nothing was written. The message is one line
    (how many, in which tensor) without a file name; the caller says which checkpoint is the last good one."""


@dataclass
class CheckpointInfo:
    path: Path
    phase: int
    step: int  # optimiser steps completed in that phase

    @property
    def order(self) -> tuple[int, int]:
        return self.phase, self.step


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Every folder named like a checkpoint in `root`, oldest first (damaged ones included)."""
    found = []
    for child in Path(root).glob("checkpoint-p*"):
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append(CheckpointInfo(child, int(match.group(1)), int(match.group(2))))
    return sorted(found, key=lambda c: c.order)


def save_checkpoint(
    root: Path, phase: int, step: int, trainable: dict[str, torch.Tensor], state: dict, keep: int,
    config: dict | None = None,
) -> Path:
    """Write `checkpoint-p{phase}-{step:06d}/` atomically; returns its path.

    Only finite tensors are saved: a NaN or infinite value anywhere in `trainable` or `state` (the optimiser's
    moments included) raises NonFiniteCheckpoint and writes nothing, so every checkpoint on disk can be
    continued from. `config` (``Config.to_dict()``) is stored as config.toml for `--resume` to compare. Afterwards the
    `keep` newest checkpoints up to this one stay (0: all); checkpoints *after* this one are removed:
    they belong to a run that was resumed from an earlier point, and `--resume latest` must continue
    this one.
    """
    broken = non_finite_summary({"trainable": trainable, "state": state})
    if broken:
        raise NonFiniteCheckpoint(f"phase {phase} step {step}: the trained tensors are no longer finite ({broken}); "
                                  f"checkpoint-p{phase}-{step:06d} not written")
    root = ensure_folder(root)
    final = root / f"checkpoint-p{phase}-{step:06d}"
    with atomic_folder(final) as tmp:  # ordinary modes, fsynced, an existing folder swapped out whole
        write_safetensors(tmp / TRAINABLE, {k: v.detach().contiguous().cpu() for k, v in trainable.items()})
        write_torch(tmp / STATE, state)
        names = [TRAINABLE, STATE]
        if config is not None:
            write_text(tmp / CONFIG, toml.dumps(config))
            names.append(CONFIG)
        files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": file_sha256(tmp / n)} for n in names}
        write_text(tmp / MANIFEST, json.dumps({"phase": phase, "step": step, "files": files}, indent=1))
    found = list_checkpoints(root)
    for later in (c for c in found if c.order > (phase, step)):
        shutil.rmtree(later.path, ignore_errors=True)
    earlier = [c for c in found if c.order <= (phase, step)]
    if keep > 0:
        for old in earlier[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete checkpoint folders that a killed run left half-written (the atomic writer's hidden
    `.checkpoint-pN-NNNNNN.*.tmp` / `.old`); returns them."""
    stale = stale_temporaries(root, r"checkpoint-p[12]-\d{6}")
    for path in stale:
        remove_tree(path)
    return stale


def load_checkpoint(info: CheckpointInfo) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable tensors, state) of a checkpoint, after checking that it is whole.

    Raises CheckpointError naming the file when a file is missing, differs from the manifest (truncated,
    overwritten), does not load, or holds NaN or infinite values; checkpoints written before manifests existed are checked by loading.
    """
    path = Path(info.path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(read_text_file(manifest))["files"]
            expected = {str(n): (int(f["bytes"]), str(f["sha256"])) for n, f in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{manifest}: unreadable ({one_line(err, 160)})") from err
    else:
        expected = {TRAINABLE: None, STATE: None}
    for name, want in expected.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if want is not None:
            size = file.stat().st_size
            if size != want[0]:
                raise CheckpointError(f"{file}: {size} bytes, the manifest says {want[0]} (truncated or overwritten)")
            if file_sha256(file) != want[1]:
                raise CheckpointError(f"{file}: contents differ from the manifest's SHA-256 (damaged)")
    try:  # one line for every kind of bad file; state.pt only as plain tensors and containers
        trainable = load_safetensors(path / TRAINABLE)
        state = load_pickled_weights(path / STATE)
    except (WeightsFileError, OSError) as err:
        raise CheckpointError(one_line(err)) from err
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise CheckpointError(f"{path / STATE}: not a training state (needs {', '.join(STATE_KEYS)})")
    for name, tensors in ((TRAINABLE, {"trainable": trainable}), (STATE, {"state": state})):
        broken = non_finite_summary(tensors)
        if broken:  # written by a version that saved whatever it had
            raise CheckpointError(f"{path / name}: holds {broken}; the checkpoint cannot be continued")
    return trainable, state


def last_good_checkpoint(root: Path) -> str:
    """The name of the newest checkpoint in `root` that loads whole and finite, or "none yet"; for the
    messages of a run that stops."""
    for info in reversed(list_checkpoints(root)):
        try:
            load_checkpoint(info)
        except CheckpointError:
            continue
        return info.path.name
    return "none yet"


def read_checkpoint_config(info: CheckpointInfo) -> dict | None:
    """The configuration a checkpoint was made with, or None for checkpoints written before it was kept."""
    file = Path(info.path) / CONFIG
    if not file.is_file():
        return None
    try:
        return tomllib.loads(read_text_file(file))
    except (tomllib.TOMLDecodeError, TextFileError) as err:
        raise CheckpointError(f"{file}: unreadable ({one_line(err, 160)})") from err


def checkpoint_at(path: str | Path) -> CheckpointInfo:
    """The checkpoint folder `path` names (`--resume PATH`); FileNotFoundError if it is not one."""
    path = Path(path)
    match = _NAME.match(path.name)
    if not match or not path.is_dir():
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint folder (checkpoint-pN-NNNNNN)")
    return CheckpointInfo(path, int(match.group(1)), int(match.group(2)))


def find_resumable(
    value: str, output_dir: Path
) -> tuple[CheckpointInfo, dict[str, torch.Tensor], dict, list[str]]:
    """Resolve `--resume VALUE` and load it: (checkpoint, trainable, state, warnings to show).

    `latest` (or true, 1, empty) takes the newest checkpoint in `output_dir` that loads, with a one-line
    warning for each damaged newer one passed over; a folder path must itself load (CheckpointError).
    """
    if value not in ("latest", "true", "1", ""):
        info = checkpoint_at(value)
        trainable, state = load_checkpoint(info)
        return info, trainable, state, []
    found = list_checkpoints(output_dir)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint-p*-* folder in {output_dir}")
    problems: list[str] = []
    for info in reversed(found):
        try:
            trainable, state = load_checkpoint(info)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        warnings = [f"warning: {problem}; resuming from {info.path.name}, the newest whole checkpoint "
                    f"(the damaged one is removed at the next save)" for problem in problems]
        return info, trainable, state, warnings
    raise CheckpointError(
        f"{output_dir}: none of the {len(found)} checkpoints is whole (newest: {problems[0]}) ; "
        f"train again without --resume, or into another output.dir"
    )
