"""Speed switches that change how a step runs, never what it computes: torch.compile of the UNet
(``train.compile``) and the channels-last memory layout (``train.channels_last``).

Measured on/off by ``bench/paper_schedule.py --levers``; the defaults are what measured fastest.
"""

from __future__ import annotations

import torch

from library.config import ConfigError

__all__ = ["COMPILE_CHOICES", "compile_enabled", "compile_unet", "use_channels_last"]

COMPILE_CHOICES = ("auto", "on", "off")


def compile_enabled(setting: str, device: torch.device) -> bool:
    """Whether ``train.compile = setting`` compiles the UNet on `device`.

    "on" / "off" as written; "auto" compiles on CUDA only: on an H200 the compiled UNet took a batched
    phase-2 step from 234 to 211 ms (bench/results_h200_bench_train.json), while on the CPU inductor's
    code generation costs minutes for nothing the tiny model could win back. Raises ConfigError (one line)
    for another value.
    """
    if setting not in COMPILE_CHOICES:
        raise ConfigError(f"train.compile = {setting!r}: use auto, on or off")
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def compile_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(unet, dynamic=False)``: one graph per micro-batch shape.

    A phase's micro-batch shape never changes, so static shapes cost nothing; with dynamic shapes (what
    torch switches to after a second shape) inductor's CPU code generation fails on this UNet with
    ``InductorError: TypeError: cannot determine truth value of Relational: 32*s20*s33 < 32`` (torch 2.9),
    a symbolic size compared where only a concrete one works.
    """
    return torch.compile(unet, dynamic=False)


def use_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Store `model`'s 4-d weights channels-last (NHWC), which tensor-core convolutions read without a
    transpose; the inputs follow the weights' layout in cuDNN. Same values, another memory order."""
    return model.to(memory_format=torch.channels_last)
