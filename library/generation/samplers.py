"""The samplers generate.py offers, and building one from the base model's own scheduler config.

Each sampler is our short name -> a diffusers scheduler class, the extra config that makes it the A1111
sampler of the same name (DPM++ 2M Karras = DPMSolverMultistep + dpmsolver++ + Karras sigmas, ...), and
A1111's name for it, which goes into the "parameters" text so A1111 reproduces the picture. Every sampler
is built from the model's scheduler config (betas, steps_offset, timestep spacing), not from diffusers'
defaults: SD 1.5 samples with steps_offset 1 and "leading" spacing, and another base model may differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from library.files.text import TextFileError, read_text_file
from library.generation.options import GenerationError


@dataclass(frozen=True)
class Sampler:
    """A diffusers scheduler class name, A1111's name for the sampler, and the config that makes it so."""

    cls: str
    a1111: str
    extra: dict = field(default_factory=dict)


SCHEDULERS: dict[str, Sampler] = {
    "euler_a": Sampler("EulerAncestralDiscreteScheduler", "Euler a"),
    "euler": Sampler("EulerDiscreteScheduler", "Euler"),
    "heun": Sampler("HeunDiscreteScheduler", "Heun"),
    "lms": Sampler("LMSDiscreteScheduler", "LMS"),
    "dpm2": Sampler("KDPM2DiscreteScheduler", "DPM2"),
    "dpm2_a": Sampler("KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    "dpmpp_2m": Sampler(
        "DPMSolverMultistepScheduler", "DPM++ 2M", {"algorithm_type": "dpmsolver++", "solver_order": 2}
    ),
    "dpmpp_2m_karras": Sampler(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M Karras",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": Sampler(
        "DPMSolverMultistepScheduler", "DPM++ 2M SDE", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
    ),
    "dpmpp_2m_sde_karras": Sampler(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M SDE Karras",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2s_a": Sampler("DPMSolverSinglestepScheduler", "DPM++ 2S a", {"solver_order": 2}),
    "unipc": Sampler("UniPCMultistepScheduler", "UniPC"),
    "deis": Sampler("DEISMultistepScheduler", "DEIS"),
    "ddim": Sampler("DDIMScheduler", "DDIM", {"set_alpha_to_one": False}),
    "ddpm": Sampler("DDPMScheduler", "DDPM"),
    "pndm": Sampler("PNDMScheduler", "PLMS", {"skip_prk_steps": True, "set_alpha_to_one": False}),
}

DEFAULT_SCHEDULER = "euler_a"


def scheduler_names() -> list[str]:
    """The sampler names generate() accepts, in the order --help lists them."""
    return list(SCHEDULERS)


def check_scheduler(name: str) -> Sampler:
    """The sampler called `name`; GenerationError (one line, listing the valid names) when there is none."""
    if name not in SCHEDULERS:
        raise GenerationError(f"unknown scheduler '{name}'; valid: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def scheduler_base_config(cfg, parts) -> dict:
    """The model's own scheduler config (steps_offset and friends), over the training DDPM's betas."""
    config = dict(parts.noise_scheduler.config)
    pretrained = Path(cfg.model.pretrained)
    candidates = []
    if pretrained.is_dir():
        candidates.append(pretrained / "scheduler" / "scheduler_config.json")
    else:
        candidates.append(Path(cfg.model.config_dir or parts.family.config_dir) / "scheduler" / "scheduler_config.json")
    for path in candidates:
        if path.is_file():
            try:
                text = read_text_file(path)
            except TextFileError as err:  # a config that cannot be decoded is never silently replaced
                raise GenerationError(str(err)) from err
            try:
                config.update(json.loads(text))
            except ValueError:  # not JSON: diffusers, which read the same file to load the model, decides
                pass
            break
    else:
        config.setdefault("steps_offset", 1)
    # drop _class_name / _diffusers_version: the sampler's class is chosen by name
    return {k: v for k, v in config.items() if not k.startswith("_")}


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler of sampler `name` over `base_config` (from scheduler_base_config)."""
    import diffusers

    sampler = check_scheduler(name)
    cls = getattr(diffusers, sampler.cls)
    return cls.from_config({**base_config, **sampler.extra})
