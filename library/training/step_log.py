"""Each step's logged figures, kept on the device until a logging step brings them all back at once.

Reading a loss on the host (``.item()``, ``.tolist()``, ``float(t)``) waits for the GPU to finish every
kernel queued so far, which stalls the launch of the next step. The trainer therefore keeps each
step's figures as one device tensor (running sums and their weights, see :func:`step_figures`) and
converts them in one transfer every ``logging.every`` steps, or when a preview, a checkpoint, the end
of the phase or a stop needs them (:meth:`StepLog.take`).
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable

import torch

from library.config import Config

__all__ = ["FigureSums", "StepLog", "StepEntry", "logs_due", "non_finite_message"]


class FigureSums:
    """Running sums of a step's figures over its micro-batches, on the device.

    A plain figure (a loss term) is averaged over micro-batches; an attention figure (``inside/<t>``,
    ``outside/<t>``) is averaged over the samples that hold token ``t`` (weight ``_count/<t>``), and is
    left out of the step's figures when no sample held it."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}

    def add(self, figures: dict[str, torch.Tensor]) -> None:
        """Add one micro-batch's figures (0-dim tensors; ``_count/<t>`` weights the attention figures)."""
        for k, v in figures.items():
            if k.startswith("_count/"):
                continue
            v = v.detach().float()
            if k.startswith(("inside/", "outside/")):
                n = figures["_count/" + k.split("/", 1)[1]].detach().float()
                v = torch.where(n > 0, v * n, torch.zeros_like(v))  # a NaN of an absent token stays out
            else:
                n = torch.ones_like(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.weights[k] = self.weights[k] + n if k in self.weights else n

    def packed(self) -> tuple[tuple[str, ...], torch.Tensor]:
        """(keys, [2 K] tensor: the K sums then the K weights), still on the device."""
        keys = tuple(self.sums)
        return keys, torch.stack([self.sums[k] for k in keys] + [self.weights[k] for k in keys])


@dataclass
class StepEntry:
    phase: int
    step: int  # steps done in the phase after this one (1-based)
    lr: float  # the scheduler's first learning rate after this step (what TensorBoard logs as "lr")
    figures: dict[str, float]


class StepLog:
    """Steps whose figures are still on the device, in order."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, int, float, tuple[str, ...], torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, phase: int, step: int, lr: float, sums: FigureSums) -> None:
        """Queue one finished step (no host synchronisation)."""
        keys, values = sums.packed()
        self._pending.append((phase, step, lr, keys, values))

    def take(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[StepEntry]:
        """All queued steps with their figures as floats (sum / weight, where the weight is > 0), in one
        device-to-host transfer; empties the queue. `reduce` (e.g. a sum over the processes of a run, one
        collective for all the steps) is applied to the sums and weights first, so the figures are every
        process's and every process gets the same ones."""
        if not self._pending:
            return []
        flat = torch.cat([values for *_, values in self._pending])
        flat = (reduce(flat) if reduce is not None else flat).tolist()
        entries, at = [], 0
        for phase, step, lr, keys, _ in self._pending:
            n = len(keys)
            sums, weights = flat[at : at + n], flat[at + n : at + 2 * n]
            at += 2 * n
            entries.append(StepEntry(phase, step, lr, {k: s / w for k, s, w in zip(keys, sums, weights) if w > 0}))
        self._pending = []
        return entries


def logs_due(cfg: Config, phase: int, done: int, steps: int, event: bool) -> bool:
    """Whether the figures must be read after step `done` of `steps`: a multiple of logging.every,
    logging.print_every, output.save_every or (phase 2) output.save_lora_every, the phase's last step, or
    `event` (a preview or a stop request)."""
    hits = [cfg.logging.every, cfg.logging.print_every, cfg.output.save_every]
    if phase == 2:
        hits.append(cfg.output.save_lora_every)
    return done == steps or event or any(n and done % n == 0 for n in hits)


def preview_tag(cfg: Config, phase: int, done: int, steps: int) -> str | None:
    """The samples' name after step `done` of `steps`, or None: every sample.every steps, and at the end of phase 1."""
    every = cfg.sample.every
    if not every:
        return None
    if done % every == 0:
        return f"p{phase}-{done:06d}"
    return "p1-end" if phase == 1 and done == steps else None


def non_finite_message(entry: StepEntry, kept: str) -> str:
    """The one-line stop message for a step whose loss is not finite; `kept` names the last checkpoint."""
    values = entry.figures
    bad = ", ".join(k for k, v in values.items() if k != "loss" and not math.isfinite(v)) or "total"
    return (f"loss became {values['loss']} ({bad} term) at phase {entry.phase} step {entry.step - 1}; last good "
            f"checkpoint: {kept}. Lower the learning rate, or use bf16 instead of fp16.")
