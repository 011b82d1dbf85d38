"""Speed switches that change how a step runs, never what it computes: torch.compile of the UNet
(``train.compile``) and the channels-last memory layout (``train.channels_last``).

Measured on/off by ``bench/paper_schedule.py --levers``; the defaults are what measured fastest.
"""

from __future__ import annotations

import typing

import torch

from library.config import Compile, ConfigError

__all__ = ["COMPILE_CHOICES", "compile_enabled", "compile_unet", "use_channels_last"]

COMPILE_CHOICES = typing.get_args(Compile)  # declared once, in library/config.py


# "auto" compiles a phase only when its steps can win back the compilation. Estimates until the GPU lever
# table (bench/paper_schedule.py --levers: the compile row's warm-up and ms/step) measures them on this UNet:
# bench_train.py measured 234 -> 211 ms per batched phase-2 step on an H200 (23 ms saved per step), and a
# compile of the SD UNet with its attention capture (graph breaks at the capture layers) costs about a
# minute, so it pays after some 2600 steps: more than either phase of the paper's schedule (1200, 1500).
COMPILE_SAVED_S_PER_STEP = 0.023
COMPILE_COST_S = 60.0


def compile_enabled(setting: str, device: torch.device, steps: int) -> bool:
    """Whether ``train.compile = setting`` compiles the UNet for a phase of `steps` steps on `device`.

    "on" / "off" as written; "auto" compiles on CUDA only, and only when ``steps x COMPILE_SAVED_S_PER_STEP
    > COMPILE_COST_S`` (the step time it saves outweighs the compilation; see the constants). On a CPU,
    inductor's code generation takes minutes for the tiny model and the attention capture makes dynamo
    recompile per layer. Raises ConfigError (one line) for another value.
    """
    if setting not in COMPILE_CHOICES:
        raise ConfigError(f"train.compile = {setting!r}: use auto, on or off")
    if setting == "auto":
        return device.type == "cuda" and steps * COMPILE_SAVED_S_PER_STEP > COMPILE_COST_S
    return setting == "on"


def compile_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(unet, dynamic=False)``: one graph per micro-batch shape.

    A phase's micro-batch shape never changes, so static shapes cost nothing; with dynamic shapes (what
    torch switches to after a second shape) inductor's CPU code generation fails on this UNet with
    ``InductorError: TypeError: cannot determine truth value of Relational: 32*s20*s33 < 32`` (torch 2.14),
    a symbolic size compared where only a concrete one works. With static shapes the same CPU run compiles
    and trains (bench/bench_train.py --tiny --device cpu --variants compile).
    """
    return torch.compile(unet, dynamic=False)


def use_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Store `model`'s 4-d weights channels-last (NHWC), which tensor-core convolutions read without a
    transpose; the inputs follow the weights' layout in cuDNN. Same values, another memory order."""
    return model.to(memory_format=torch.channels_last)
