"""Per-family sampler settings of the flow-matching transformer bases (Z-Image, FLUX.2 Klein 4B / 9B), as
data keyed by :attr:`~library.models.dit_family.DitFamily.name`: everything that differs between these
families at sampling time lives here, and library/generation/dit_generation.py only reads it.

Each family has a distilled variant (few steps, no classifier-free guidance) and an undistilled base
(many steps, CFG); the numbers and where they come from:

* Z-Image Turbo: 9 steps, guidance 0 -- the Turbo model card and diffusers' Z-Image PR #12725 example
  (``num_inference_steps=9  # This actually results in 8 DiT forwards``, ``guidance_scale=0.0  # Guidance
  should be 0 for the Turbo models``); ``ZImagePipeline`` runs CFG only when ``guidance_scale > 0``.
* Z-Image (Base): 50 steps, CFG 4 -- ``ZImagePipeline.__call__``'s ``num_inference_steps=50`` and the
  base model card's undistilled "full CFG" use; 4 is the middle of the 3-5 that card users report (the
  pipeline's own default is 5).
* FLUX.2 Klein (distilled): 4 steps, guidance 1 -- Black Forest Labs' Klein model cards ("4-step
  distilled"); ``Flux2KleinPipeline`` never runs CFG for a distilled model (``is_distilled``) and warns
  above 1.
* FLUX.2 Klein Base: 50 steps, CFG 4 -- ``Flux2KleinPipeline.__call__``'s defaults
  (``num_inference_steps=50``, ``guidance_scale=4.0``) and its docstring example on
  ``FLUX.2-klein-base-9B``.

Which variant a base is: a diffusers folder's ``model_index.json`` ``is_distilled`` (Klein's pipeline
config; also read from ``model.config_dir`` when the config names one); Z-Image Turbo and Base have the
same keys, shapes and configs (library/models/dit_kind.py), so a Z-Image base is always "unknown". When
unknown, the base's (undistilled) settings are used and generate says so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from library.generation.samplers import Sampler
from library.models.kind import ModelLoadError, read_json


@dataclass(frozen=True)
class SamplerDefaults:
    """steps: sampling steps; cfg: guidance scale (0 or 1: none, as each pipeline reads it); name: the
    variant these are for, in messages; source: where the numbers come from."""

    steps: int
    cfg: float
    name: str
    source: str


@dataclass(frozen=True)
class DitSampling:
    """How one DiT family samples.

    distilled / base: the settings of the two variants (module docstring).
    negative: how the family's pipeline takes a negative prompt: "argument" (``negative_prompt=``, as
        ZImagePipeline) or "embeddings" (``negative_prompt_embeds=`` from ``pipe.encode_prompt``:
        Flux2KleinPipeline has no ``negative_prompt`` and encodes "" otherwise).
    distilled_flag: the pipeline's constructor argument that says "distilled" ("" when it has none).
    cfg_above: the pipeline runs classifier-free guidance (and reads the negative prompt) only for a
        guidance scale above this (ZImagePipeline: ``guidance_scale > 0``; Flux2KleinPipeline:
        ``guidance_scale > 1 and not is_distilled``).
    cuda_dtype: the precision "auto" picks on CUDA (bf16: these models are trained and released in bf16;
        fp16 overflows in their activations).
    sampler: the one sampler (the pipeline's FlowMatchEulerDiscreteScheduler with the model's shift
        settings), under the name A1111 / Forge write into "parameters".
    """

    distilled: SamplerDefaults
    base: SamplerDefaults
    negative: str
    cfg_above: float
    distilled_flag: str = ""
    cuda_dtype: torch.dtype = torch.bfloat16
    sampler: Sampler = Sampler("FlowMatchEulerDiscreteScheduler", "Euler")


# The trained LoRA's multiplier when none is given: 1, the strength it was trained (and previewed) at and
# the default of ComfyUI's LoRA loader nodes (Stable Diffusion's 0.6 / 0.9 are the paper's, for its UNet).
DEFAULT_DIT_LORA_SCALE = 1.0
FLOW_SAMPLER_NAME = "flow_euler"  # the --scheduler name of a DiT base's one sampler

_ZIMAGE = DitSampling(
    distilled=SamplerDefaults(9, 0.0, "Z-Image Turbo", "Turbo model card / diffusers PR #12725: 9 steps, guidance 0"),
    base=SamplerDefaults(50, 4.0, "Z-Image Base", "ZImagePipeline default 50 steps; base model card: full CFG, ~4"),
    negative="argument",
    cfg_above=0.0,
)
_KLEIN = DitSampling(
    distilled=SamplerDefaults(4, 1.0, "FLUX.2 Klein", "Klein model cards: 4-step distilled, guidance 1"),
    base=SamplerDefaults(50, 4.0, "FLUX.2 Klein Base", "Flux2KleinPipeline defaults: 50 steps, guidance 4"),
    negative="embeddings",
    cfg_above=1.0,
    distilled_flag="is_distilled",
)
DIT_SAMPLING: dict[str, DitSampling] = {"zimage": _ZIMAGE, "klein4b": _KLEIN, "klein9b": _KLEIN}


def distilled_variant(pretrained: str | Path, config_dir: str | Path | None) -> bool | None:
    """Whether the base is the distilled variant: ``model_index.json`` ``is_distilled`` of the diffusers
    folder `pretrained`, else of `config_dir` (the configs a split transformer file loads with, when the
    config names them); None when neither says (Z-Image never does)."""
    for folder in (Path(pretrained), Path(config_dir) if config_dir else None):
        if folder is None or not (folder / "model_index.json").is_file():
            continue
        try:
            index = read_json(folder / "model_index.json")
        except (ModelLoadError, OSError, ValueError):
            continue  # the loader reads the same file and says what is wrong with it
        if isinstance(index, dict) and isinstance(index.get("is_distilled"), bool):
            return index["is_distilled"]
    return None


def sampler_defaults(sampling: DitSampling, distilled: bool | None) -> SamplerDefaults:
    """The variant's settings; the base's when `distilled` is None (unknown)."""
    return sampling.distilled if distilled else sampling.base


def unknown_variant_note(sampling: DitSampling) -> str:
    """The one line generate says when it cannot tell the variant from the files."""
    d, b = sampling.distilled, sampling.base
    return (f"note: cannot tell {d.name} from {b.name} from the files; the defaults are {b.name}'s "
            f"({b.steps} steps, CFG {b.cfg:g}); for {d.name} give --steps {d.steps} --cfg {d.cfg:g}")
