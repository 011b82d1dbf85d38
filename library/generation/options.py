"""What a user gives generate(), checked before anything heavy loads: defaults, device and precision, and
the post-processing options (whose weights are loaded here, so a wrong file fails before any sampling).

GenerationError lives here, at the bottom of the generation modules (samplers, trained_files and
generation import it), so that none of them has to import library.generation.pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from library.export.infotext import a1111_number
from library.models.loading import DTYPES as _PRECISIONS
from library.files.messages import UserError


class GenerationError(UserError, ValueError):
    """A user error (missing trained file, bad option, weights that do not fit); the message is one line."""


def one_line(err: BaseException) -> str:
    """The first line of an exception's message, at most 300 characters: errors here are one line."""
    lines = str(err).strip().splitlines()
    msg = lines[0] if lines else type(err).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


DEFAULT_STEPS = 50
DEFAULT_CFG = 7.0
DEFAULT_LORA_SCALE = 0.6  # UNet (released code)
DEFAULT_TE_SCALE = 0.9  # text encoder (released code)
DEFAULT_FIDELITY = 0.5
RESTORERS = ("codeformer", "gfpgan", "none")
_RESTORER_ARCH = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN"}


def default_side(cfg, family) -> int:
    """The image side, pixels, when no width / height is given: ``data.resolution`` when the config sets one
    (what training used), else (0, the default) the model family's (512 SD 1.x, 1024 SDXL)."""
    return int(cfg.data.resolution or family.resolution)


def resolve_device(device: str | None) -> torch.device:
    """The device for "auto"/None (CUDA when there is one) or a name; GenerationError when unusable."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise GenerationError(f"unknown device '{device}'; use auto, cpu or cuda") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return dev


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype:
    """The dtype for "auto"/None (fp16 on CUDA, fp32 elsewhere: CPU fp16 is slow) or fp32/fp16/bf16."""
    if precision in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in _PRECISIONS:
        raise GenerationError(f"unknown precision '{precision}'; valid: auto, {', '.join(_PRECISIONS)}")
    return _PRECISIONS[precision]


# --------------------------------------------------------------------------------------------------
# post-processing setup
# --------------------------------------------------------------------------------------------------


@dataclass
class PostProcessing:
    """The loaded post-processing models and options, and the "parameters" fields that describe them."""

    upscaler: object | None
    restorer: object | None
    upscale: float
    fidelity: float
    restore: str  # codeformer | gfpgan | none
    upscaler_name: str

    @property
    def active(self) -> bool:
        """Whether the samples change at all (otherwise no raw/ copy is written)."""
        return self.upscaler is not None or self.restorer is not None or self.upscale != 1

    def infotext_fields(self) -> dict[str, str]:
        """A1111's names for the post-processing it did, so PNG Info shows what was applied."""
        fields: dict[str, str] = {}
        if self.upscaler is not None or self.upscale != 1:
            fields["Postprocess upscale by"] = a1111_number(self.upscale)
            fields["Postprocess upscaler"] = self.upscaler_name
        if self.restorer is not None:
            fields["Face restoration"] = _RESTORER_ARCH[self.restore]
            if self.restore == "codeformer":
                fields["CodeFormer weight"] = a1111_number(self.fidelity)
        return fields


def setup_postprocessing(
    upscale: float | None,
    restore: str | None,
    restore_weights: str | os.PathLike | None,
    sr_weights: str | os.PathLike | None,
    fidelity: float,
    device: torch.device,
) -> PostProcessing:
    """Check the options and load the weights (so a bad file fails before any sampling)."""
    if restore is None:
        restore = "codeformer" if restore_weights else "none"
    if restore not in RESTORERS:
        raise GenerationError(f"unknown restorer '{restore}'; valid: {', '.join(RESTORERS)}")
    if not 0.0 <= fidelity <= 1.0:
        raise GenerationError(f"fidelity must be in [0, 1], got {fidelity:g}")
    if upscale is not None and not upscale > 0:
        raise GenerationError(f"upscale must be positive, got {upscale:g}")
    if restore != "none":
        if not restore_weights:
            raise GenerationError(f"--restore {restore} needs --restore-weights PATH (the {restore} .pth), or --restore none")
        if not Path(restore_weights).is_file():
            raise GenerationError(f"face restoration weights not found: {restore_weights}")
    if sr_weights and not Path(sr_weights).is_file():
        raise GenerationError(f"super-resolution weights not found: {sr_weights}")
    upscaler = restorer = None
    name = "Lanczos"
    if sr_weights or restore != "none":
        from library import postprocess as pp

        try:
            if sr_weights:
                upscaler = pp.load_upscaler(sr_weights, device=device)
                name = f"{Path(sr_weights).stem}"
            if restore != "none":
                restorer = pp.load_face_restorer(restore_weights, device=device)
                arch = str(restorer.architecture.id)
                if arch != _RESTORER_ARCH[restore]:
                    raise GenerationError(
                        f"{restore_weights}: spandrel detected {arch}, but --restore {restore} expects {_RESTORER_ARCH[restore]}"
                    )
        except GenerationError:
            raise
        except (OSError, ValueError) as err:
            raise GenerationError(one_line(err)) from err
    if upscale is None:
        upscale = float(upscaler.scale) if upscaler is not None else 1.0
    return PostProcessing(upscaler, restorer, float(upscale), float(fidelity), restore, name)
