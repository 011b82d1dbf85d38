"""`--resume`: which checkpoint, and whether the configuration may have changed since it was written.

Everything here runs before the run writes anything: a refused change leaves the output folder as it
was. The split of the keys is the table `RULES` below; a test checks that it names every key of
`Config`, so a new key has to be placed in it.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import toml
import torch

from library.training import checkpoint as ckpt
from library.config import Config, ConfigError, path_keys, resolve_path
from library.files.atomic import write_text
from library.files.text import read_json_lines

# How a key may differ between a checkpoint's config.toml and the run that resumes it:
FIXED = "fixed"  # never: the checkpoint's tensors, optimiser or random streams were made under the old value
FROM_PHASE2 = "fixed from phase 2"  # free while the checkpoint is in phase 1; phase 2 builds on it, then fixed
PHASE = "per phase"  # phaseN.*: free before phase N starts, fixed once it has finished, see _running_phase
SAFE = "safe"  # read afresh every step, or only says how to compute, where files go or what is shown

RULES: dict[str, tuple[str, str]] = {
    "model.pretrained": (FIXED, "every trained tensor is relative to the base model"),
    "model.config_dir": (FIXED, "every trained tensor is relative to the base model"),
    "model.vae": (FIXED, "the latents the run trained on were encoded by this VAE"),
    "model.text_encoder": (FIXED, "every trained tensor is relative to the base model"),
    "model.tokenizer": (FIXED, "the token ids the new rows were trained under"),
    "model.offline": (SAFE, "only whether the hub may be asked"),
    "data.source_dir": (FIXED, "the images the tokens and the LoRA learn"),
    "data.reference_dir": (FIXED, "the images the tokens and the LoRA learn"),
    "data.resolution": (FIXED, "the cached latents the training state indexes"),
    "data.flip": (FIXED, "the cached latents the training state indexes"),
    "data.captions": (FIXED, "the prompts the tokens learn in"),
    "data.min_images": (SAFE, "a warning threshold"),
    "tokens.source": (FIXED, "the token words the vectors belong to"),
    "tokens.reference": (FIXED, "the token words the vectors belong to"),
    "tokens.vectors": (FIXED, "the shape of the trained vectors"),
    "tokens.source_init": (FIXED, "where the trained vectors started"),
    "tokens.reference_init": (FIXED, "where the trained vectors started"),
    "tokens.reference_init_std": (FIXED, "where the trained vectors started"),
    "tokens.norm_pull": (SAFE, "applied afresh after every step"),
    "tokens.norm_target": (SAFE, "applied afresh after every step"),
    "tokens.norm_rate": (SAFE, "applied afresh after every step"),
    "tokens.norm_weight": (SAFE, "applied afresh after every step"),
    "phase1.*": (PHASE, ""),
    "phase2.*": (PHASE, ""),
    "lora.*": (FROM_PHASE2, "the LoRA's shape and scale"),
    "attention.layers": (FROM_PHASE2, "the layers phase 2's refocusing and its collapse guard measure"),
    "attention.backend": (SAFE, "how attention is computed, not what"),
    "attention.normalisation": (FROM_PHASE2, "the maps phase 2's refocusing and its collapse guard measure"),
    "loss.*": (SAFE, "loss weights and switches, read every step"),
    "optimizer.name": (FIXED, "the checkpoint holds this optimiser's state"),
    "optimizer.*": (SAFE, "set from the config after the optimiser's state is loaded"),
    "train.seed": (FIXED, "the checkpoint continues the old seed's random streams"),
    "train.*": (SAFE, "how it is computed, not what"),
    "output.*": (SAFE, "where files go and how often"),
    "sample.*": (SAFE, "previews only"),
    "logging.*": (SAFE, "logs only"),
    "evaluation.*": (SAFE, "scores only"),
}
_PATH_KEYS = frozenset(path_keys())
# Before SDXL, these keys' defaults were SD 1.x's values; now an empty value means "the model family's".
# Only SD 1.x could be trained then (and model.pretrained is fixed), so a checkpoint that holds the old
# default and a config that leaves the key empty mean the same thing.
_FORMER_DEFAULTS = {
    "data.resolution": (0, 512),
    "attention.layers": ([], ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "up_blocks.1.attentions.0",
                              "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]),
}


def rule_for(key: str) -> tuple[str, str]:
    """(kind, why) of a dotted config key from RULES; KeyError for a key the table does not place."""
    return RULES[key] if key in RULES else RULES[key.split(".", 1)[0] + ".*"]


@dataclass
class Change:
    key: str
    old: object
    new: object
    why: str = ""  # empty: safe to change

    def __str__(self) -> str:
        text = f"{self.key} {json.dumps(self.old, default=str)} -> {json.dumps(self.new, default=str)}"
        return f"{text} ({self.why})" if self.why else text


def _refusal(key: str, new: object, phase: int, step: int) -> str:
    """Why `key` may not take a new value when resuming at (phase, step); empty if it may."""
    kind, why = rule_for(key)
    if kind == FIXED or (kind == FROM_PHASE2 and phase == 2):
        return why
    if kind == PHASE:
        section, name = key.split(".", 1)
        n = int(section[-1])
        if n < phase:
            return f"phase {n} has finished with the old value"
        if n == phase and name == "tasks":
            return "the phase's task cursor runs over this list"
        if n == phase and name == "steps" and isinstance(new, int) and new < step:
            return f"the checkpoint is at step {step}"
    return ""


def _normalise(values: dict) -> dict:
    """A config dict as it reads back from TOML (ints for floats, lists for tuples), so both sides compare alike."""
    return tomllib.loads(toml.dumps(values))


def _same(key: str, old: object, new: object) -> bool:
    if old == new:
        return True
    if key in _FORMER_DEFAULTS and (old, new) in (_FORMER_DEFAULTS[key], _FORMER_DEFAULTS[key][::-1]):
        return True
    if key in _PATH_KEYS and isinstance(old, str) and isinstance(new, str) and old and new:
        # checkpoints record absolute paths; one written before that holds the path as the user wrote it,
        # relative to the folder that run started in, which is taken to be the one this run starts in
        if resolve_path(old) == resolve_path(new):
            return True
        try:
            return os.path.samefile(old, new)  # the same folder written another way (a link)
        except OSError:
            return False
    return False


def compare_configs(saved: dict, new: dict, phase: int, step: int) -> tuple[list[Change], list[Change]]:
    """(refused, accepted): the keys of `new` (``Config.to_dict()``) that differ from a checkpoint's
    config.toml `saved`, for a checkpoint at `phase`, `step`. A key `saved` lacks (written by an older
    version) counts as its default."""
    defaults = _normalise(Config().to_dict())
    refused, accepted = [], []
    for section, values in _normalise(new).items():
        old_section = saved.get(section) if isinstance(saved.get(section), dict) else {}
        for key, value in values.items():
            dotted = f"{section}.{key}"
            old = old_section.get(key, defaults[section][key])
            if _same(dotted, old, value):
                continue
            why = _refusal(dotted, value, phase, step)
            (refused if why else accepted).append(Change(dotted, old, value, why))
    return refused, accepted


@dataclass
class ResumePoint:
    """A loaded checkpoint the current config may continue, and the lines to show about it."""

    info: ckpt.CheckpointInfo
    trainable: dict[str, torch.Tensor]
    state: dict
    notes: list[str] = field(default_factory=list)


def prepare_resume(cfg: Config, value: str, num_processes: int = 1) -> ResumePoint:
    """Resolve and load `--resume VALUE` for `cfg` and check the config against the checkpoint's.

    A run on another number of processes than the checkpoint's continues (every process's random state
    follows from the one saved, library/training/processes.py) with a line saying the effective batch
    changes, as a changed batch_size would.

    Raises FileNotFoundError (no checkpoint), CheckpointError (the named one is damaged, or none is
    whole) or ConfigError (a key changed that the checkpoint depends on), each with a one-line message.
    """
    info, trainable, state, notes = ckpt.find_resumable(value, Path(cfg.output.dir))
    before = int(state.get("processes", 1))
    if before != num_processes:
        pcfg = cfg.phase1 if info.phase == 1 else cfg.phase2
        notes.append(f"resume: {num_processes} process{'es' if num_processes > 1 else ''} instead of {before}: the "
                     f"effective batch is {num_processes * pcfg.batch_size} instead of {before * pcfg.batch_size} "
                     f"samples per step from here on")
    saved = ckpt.read_checkpoint_config(info)
    if saved is None:
        notes.append(f"warning: {info.path.name} has no config.toml (written by an older version): the "
                     f"configuration cannot be compared with it")
        return ResumePoint(info, trainable, state, notes)
    refused, accepted = compare_configs(saved, cfg.to_dict(), info.phase, info.step)
    if refused:
        raise ConfigError(
            f"{info.path / ckpt.CONFIG}: cannot resume with {', '.join(map(str, refused))} ; set "
            f"{'it' if len(refused) == 1 else 'them'} back as in that file, or train anew into another output.dir"
        )
    if accepted:
        notes.append(f"resume: changed since {info.path.name}, and safe to change: {', '.join(map(str, accepted))}")
    return ResumePoint(info, trainable, state, notes)


def rewind_history(path: Path, phase: int, step: int) -> None:
    """Drop the lines of loss_history.jsonl after (phase, step), the steps a resumed run does again
    (and a line a kill cut short), so that the file reads as one uninterrupted run."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line, entry in read_json_lines(path):
        try:
            if (int(entry["phase"]), int(entry["step"])) <= (phase, step):
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(kept))
