"""The device and precision a training run uses, decided once, before any model is loaded.

Two combinations cannot train and are caught here rather than mid-run:

- fp16 on a CPU: torch's CPU autocast runs the UNet in fp16 but the VAE decode of the identity loss stops
  with "mixed dtype (CPU)" at the first phase-2 step, and a CPU has no fp16 arithmetic to gain from. The
  run falls back to fp32 (the one precision every CPU trains in) and says so in one line.
- bf16 on a CUDA GPU without native bf16 (before compute capability 8.0): refused with a ConfigError,
  because the alternative (fp16) can overflow where bf16 would not, which the user should choose knowingly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.config import ConfigError, TrainConfig

NAMES = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}  # train.mixed_precision -> what the weights run in


@dataclass(frozen=True)
class PrecisionPlan:
    mixed_precision: str  # what runs: "no" | "fp16" | "bf16" (accelerate's names)
    line: str  # the one line said before any work: device, precision and, on a fallback, why


def describe_device(device: torch.device) -> str:
    """'cpu', 'cuda:0 (NVIDIA H200)'."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def cuda_bf16_supported() -> bool:
    """Native bf16 on the current CUDA device (emulated bf16 counts as none: it is slow and only partly covered)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def plan_precision(
    requested: str,
    device: torch.device,
    vae_fp32: bool = False,
    bf16_supported: bool | None = None,
    device_name: str | None = None,
) -> PrecisionPlan:
    """What `train.mixed_precision = requested` becomes on `device`, and the line that says so.

    `bf16_supported` and `device_name` default to asking torch about `device` (tests pass them to stand in
    for hardware this machine lacks). Raises ConfigError (one line) for bf16 on a CUDA GPU without it.
    """
    name = device_name or describe_device(device)
    setting = f'train.mixed_precision = "{requested}"'
    if device.type == "cuda" and requested == "bf16":
        supported = cuda_bf16_supported() if bf16_supported is None else bf16_supported
        if not supported:
            raise ConfigError(
                f'{setting}: {name} has no native bf16 (it needs compute capability 8.0 or newer); '
                'set train.mixed_precision = "fp16" (with train.vae_fp32 = true if images turn black) or "no"'
            )
    if device.type == "cpu" and requested == "fp16":
        return PrecisionPlan(
            "no",
            f"warning: device: {name}, precision: fp32 instead of fp16 ({setting}: torch cannot train in fp16 "
            'on a CPU, it fails at the first identity-loss step with "mixed dtype (CPU)"); '
            'set train.mixed_precision = "no" or "bf16" here, or train on a CUDA GPU for fp16',
        )
    vae = ", VAE fp32" if vae_fp32 and requested != "no" else ""
    return PrecisionPlan(requested, f"device: {name}, precision: {NAMES[requested]}{vae} ({setting})")


def settle_precision(train: TrainConfig) -> PrecisionPlan:
    """Plan `train.mixed_precision` on this process's device, say the plan's line (main process), and set
    `train.mixed_precision` to what will run, so that effective_config.toml and the LoRA's metadata record
    it. Raises ConfigError where the combination cannot run."""
    from tqdm.auto import tqdm

    from library.training.processes import process_state

    state = process_state()
    plan = plan_precision(train.mixed_precision, state.device, train.vae_fp32)
    if state.is_main_process:
        tqdm.write(plan.line)
    train.mixed_precision = plan.mixed_precision
    return plan
