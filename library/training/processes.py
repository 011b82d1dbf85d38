"""How many processes a run has and how they share the work: one rule, decided before any model loads.

The rule (data parallel, as kohya's and diffusers' trainers): `phaseN.batch_size` is the batch of one
process; with N processes an optimiser step holds N x batch_size samples. Every process runs the same
task sampler and the same noise generator from the same seed and draws the whole step (all N x batch_size
samples, their noise and timesteps), then trains its own slice (process r: samples r x batch_size to
(r + 1) x batch_size), and the gradients of the small trainable tensors are averaged. So a run on N
processes is the same training as one process with N times the batch (or with `grad_accum` N), every
process's random state is the same and can be re-derived for any process count, and the special tokens'
random rows start identical everywhere.

On a machine without CUDA the process state is made with ``cpu=True``: only then does accelerate join the
processes `torchrun` starts (gloo); without it each believes it is alone and rank 0. FSDP and DeepSpeed
are refused: no network passes through ``accelerator.prepare`` (the trainable tensors are a LoRA and two
token rows, the frozen models fit one GPU), so sharding would buy nothing and is not wired.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

from library.config import Config, ConfigError

__all__ = ["on_main", "process_state", "processes_line", "rank_slice", "reduce_sum"]

T = TypeVar("T")
_SHARDED = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def process_state():
    """accelerate's process-wide state (``PartialState``), created the one right way: ``cpu=True`` when no
    CUDA device is there. Raises ConfigError (one line) when accelerate was set up for FSDP or DeepSpeed."""
    from accelerate import PartialState

    for variable, name in _SHARDED.items():
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"accelerate is set up for {name}, which this trainer does not use: it trains a LoRA and two "
                f"token rows while the frozen models fit one GPU, so sharding buys nothing; run plain data "
                f"parallel instead (`accelerate launch --multi_gpu --num_processes N train_magicapture.py ...`, "
                f"or `accelerate config` and choose multi-GPU)"
            )
    return PartialState(cpu=not torch.cuda.is_available())


def processes_line(cfg: Config, num_processes: int) -> str:
    """'processes: 2; batch per process 4 / 4 (phase 1 / 2), effective 8 / 8 per optimiser step'."""
    b1, b2 = cfg.phase1.batch_size, cfg.phase2.batch_size
    accum = ""
    if cfg.phase1.grad_accum > 1 or cfg.phase2.grad_accum > 1:
        accum = f" in {cfg.phase1.grad_accum} / {cfg.phase2.grad_accum} micro-batches"
    return (f"processes: {num_processes}; batch per process {b1} / {b2} (phase 1 / 2){accum}, "
            f"effective {num_processes * b1} / {num_processes * b2} per optimiser step")


def rank_slice(rank: int, per_process: int) -> slice:
    """Process `rank`'s samples of a step drawn for every process (see the module's rule)."""
    return slice(rank * per_process, (rank + 1) * per_process)


def reduce_sum(accelerator, values: torch.Tensor) -> torch.Tensor:
    """`values` summed over the run's processes (an all-reduce); `values` itself with one process."""
    return accelerator.reduce(values, reduction="sum") if accelerator.num_processes > 1 else values


def on_main(accelerator, work: Callable[[], T]) -> T | None:
    """``work()`` on the main process only (it writes the files); returns its result (None elsewhere).

    A write that fails (OutputWriteError) or tensors that are not finite (NonFiniteCheckpoint) there
    stop every process, not only the main one, so that none is left waiting for the others at the next
    step's all-reduce: the main process raises its error, the others a TrainingStopped."""
    from library.files.atomic import OutputWriteError
    from library.training.checkpoint import NonFiniteCheckpoint
    from library.training.interrupt import TrainingStopped

    result = error = None
    if accelerator.is_main_process:
        try:
            result = work()
        except (OutputWriteError, NonFiniteCheckpoint) as err:
            error = err
    failed = reduce_sum(accelerator, torch.tensor([float(error is not None)], device=accelerator.device)).item() > 0
    if error is not None:
        raise error
    if failed:
        raise TrainingStopped("stopped with the main process, which could not write its files (its error says why)")
    return result
