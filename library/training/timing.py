"""Wall time per stage of a training run (load, cache, each phase's steps, previews, checkpoints, export).

The trainer opens one :meth:`StageClock.stage` around each stage; a stage opened inside another one
(a preview inside phase 2) pauses the outer one, so every second is counted once and the per-phase
step rates exclude previews and saves. On CUDA the clock synchronises the device at stage edges only
(never inside a step), so queued kernels are charged to the stage that launched them.

The run writes ``timings.json`` next to ``loss_history.jsonl``; benchmarks read it from there.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from library.files.atomic import write_text

__all__ = ["StageClock"]


def _sync() -> None:
    # only when CUDA is in use: a stage edge must not start CUDA on a CPU run
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StageClock:
    """Exclusive seconds per stage name, plus per-phase step counts and first-step times."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps: dict[str, int] = {}  # "phase1" -> optimiser steps run in this process
        self.first_step: dict[str, float] = {}  # "phase1" -> seconds of its first step (compile, autotune)
        self._stack: list[list] = []  # [name, start of the running slice]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the time inside the block under `name`; an enclosing stage is paused meanwhile."""
        _sync()
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self._add(outer[0], now - outer[1])
        self._stack.append([name, now])
        self.counts[name] = self.counts.get(name, 0) + 1
        try:
            yield
        finally:
            _sync()
            now = time.perf_counter()
            _, start = self._stack.pop()
            self._add(name, now - start)
            if self._stack:
                self._stack[-1][1] = now  # the outer stage resumes

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def elapsed(self, name: str) -> float:
        """Seconds counted so far under `name`, including the running slice if it is the innermost stage."""
        total = self.seconds.get(name, 0.0)
        if self._stack and self._stack[-1][0] == name:
            total += time.perf_counter() - self._stack[-1][1]
        return total

    def mark_first_step(self, name: str) -> None:
        """Record how long the first step of stage `name` took (synchronises once, after that step)."""
        _sync()
        self.first_step[name] = self.elapsed(name)

    def to_dict(self) -> dict:
        """{"seconds": {stage: s}, "counts": {stage: times entered}, "steps": {phase: n},
        "first_step_seconds": {phase: s}, "steps_per_second": {phase: n / s}}."""
        rates = {k: n / self.seconds[k] for k, n in self.steps.items() if n and self.seconds.get(k)}
        return {"seconds": dict(self.seconds), "counts": dict(self.counts), "steps": dict(self.steps),
                "first_step_seconds": dict(self.first_step), "steps_per_second": rates}

    def write(self, path: Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")
