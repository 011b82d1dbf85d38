"""Training checkpoints: written atomically, pruned, and read back without unpickling objects.

A checkpoint is a folder `checkpoint-p{phase}-{step:06d}/` with the trainable tensors in
`trainable.safetensors` and the rest (optimiser, LR scheduler, RNG and sampler state, counters) in
`state.pt`, which holds only tensors and plain containers and is read with `weights_only=True`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .files.messages import one_line
from .files.weights import WeightsFileError, load_pickled_weights, load_safetensors

_NAME = re.compile(r"^checkpoint-p([12])-(\d{6})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message is one line naming the file."""


@dataclass
class CheckpointInfo:
    path: Path
    phase: int
    step: int  # optimiser steps completed in that phase


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    found = []
    for child in Path(root).glob("checkpoint-p*"):
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / "state.pt").is_file():
            found.append(CheckpointInfo(child, int(match.group(1)), int(match.group(2))))
    return sorted(found, key=lambda c: (c.phase, c.step))


def save_checkpoint(
    root: Path, phase: int, step: int, trainable: dict[str, torch.Tensor], state: dict, keep: int
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-p{phase}-{step:06d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def resolve_resume(value: str, output_dir: Path) -> CheckpointInfo:
    """`--resume latest` (or true) picks the newest checkpoint in the output folder; else a folder path."""
    if value in ("latest", "true", "1", ""):
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint-p*-* folder in {output_dir}")
        return found[-1]
    path = Path(value)
    match = _NAME.match(path.name)
    if not match or not (path / "state.pt").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint folder (checkpoint-pN-NNNNNN with state.pt)")
    return CheckpointInfo(path, int(match.group(1)), int(match.group(2)))


def load_checkpoint(info: CheckpointInfo) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable tensors, state) of a checkpoint folder; CheckpointError (one line) when either file is
    missing, broken, or a pickle that would run code (state.pt is read as plain tensors only)."""
    try:
        trainable = load_safetensors(info.path / "trainable.safetensors")
        state = load_pickled_weights(info.path / "state.pt")
    except (WeightsFileError, OSError) as err:
        raise CheckpointError(f"--resume: {one_line(err)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume: {info.path / 'state.pt'} holds a {type(state).__name__}, not a training state")
    return trainable, state
