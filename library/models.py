"""Load Stable Diffusion 1.x: a diffusers folder, one original-layout checkpoint file, or a hub id.

Single files (what A1111 users have on disk) load OFFLINE with the component configs and the CLIP
tokenizer shipped in configs/sd15/; `.ckpt`/`.pt` only through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .files.messages import one_line
from .files.weights import WeightsFileError, describe_load_error, load_pickled_weights, open_safetensors

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "sd15"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # config names -> torch


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says which path and what to do."""


@dataclass
class StableDiffusionParts:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler with the model's betas: what training noises with
    name: str  # file or folder name, no directories (goes into metadata)


def _ddpm_from(scheduler_config: dict):
    """The training noise scheduler: a DDPM with the model's betas, carrying its sampling settings too.

    Only the betas and the prediction type shape training noise. The sampling keys are kept in the
    config because samplers are built from it (`EulerAncestralDiscreteScheduler.from_config(...)` for the
    previews): dropping them would sample SD 1.5 with diffusers' defaults (steps_offset 0, linspace
    spacing) instead of its own (steps_offset 1, leading).
    """
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    kwargs = {k: scheduler_config[k] for k in keys if k in scheduler_config}
    # DDPM takes these two; passing them explicitly (even at DDPM's default) also keeps them out of
    # `_use_default_values`, which from_config would otherwise skip in favour of the target's defaults
    kwargs["steps_offset"] = scheduler_config.get("steps_offset", 1)
    if "timestep_spacing" in scheduler_config:
        kwargs["timestep_spacing"] = scheduler_config["timestep_spacing"]
    scheduler = DDPMScheduler(**kwargs, clip_sample=False)
    # DDIM / PNDM settings DDPM does not take: recorded in the config (as diffusers' own from_config does
    # for a compatible class's keys) so that from_config of DDIM or PNDM picks them up
    extra = {k: scheduler_config[k] for k in ("set_alpha_to_one", "skip_prk_steps") if k in scheduler_config}
    if extra:
        scheduler.register_to_config(**extra)
    return scheduler


def _checkpoint_to_safetensors_state(path: Path) -> dict:
    """Read a .ckpt/.pt without unpickling arbitrary objects."""
    try:
        state = load_pickled_weights(path)
    except WeightsFileError as err:  # a pickle that would run code, or a broken file: one line either way
        raise ModelLoadError(str(err)) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(k.startswith("model.diffusion_model.") for k in state):
        raise ModelLoadError(f"{path.name}: not a Stable Diffusion 1.x checkpoint (no model.diffusion_model.* keys)")
    return state


def _check_sd1_single_file(path: Path) -> None:
    try:
        with open_safetensors(path) as f:
            keys = list(f.keys())
    except WeightsFileError as err:
        raise ModelLoadError(str(err)) from None
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError(
            f"{path.name}: no model.diffusion_model.* keys; expected a Stable Diffusion 1.x checkpoint"
        )
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        raise ModelLoadError(f"{path.name}: this is an SDXL checkpoint; this trainer needs SD 1.x")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelLoadError(f"{path.name}: this is an SD 2.x checkpoint (OpenCLIP text encoder); use SD 1.x")


class _PickleFallbackFilter(logging.Filter):
    """Drops the two records diffusers logs for a component folder that has .bin weights only: an ERROR
    ("An error occurred while trying to fetch ... no file named ...safetensors") and "Defaulting to unsafe
    serialization". The .bin is then read with weights_only=True, which is not unsafe; a file that it
    refuses is reported by load_stable_diffusion in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not msg.startswith(("An error occurred while trying to fetch", "Defaulting to unsafe serialization"))


@contextmanager
def _no_pickle_fallback_notes():
    logger = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _PickleFallbackFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _folder_error(path: Path, err: BaseException) -> str:
    """One line for a diffusers folder that failed to load; a refused pickle is named with its file."""
    text = describe_load_error(err)
    if text.startswith("refused"):
        found = re.search(r"checkpoint file for '([^']+)'", str(err))
        return f"{found.group(1) if found else path}: {text}"
    return f"{path}: cannot load this diffusers folder: {one_line(err, 200)}"


def load_stable_diffusion(
    pretrained: str, config_dir: str | Path | None = None, offline: bool = True, dtype: torch.dtype = torch.float32
) -> StableDiffusionParts:
    from diffusers import StableDiffusionPipeline

    config_dir = Path(config_dir) if config_dir else CONFIG_DIR
    path = Path(pretrained)
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise ModelLoadError(f"{path}: not a diffusers folder (no unet/ inside)")
        try:
            with _no_pickle_fallback_notes():
                pipe = StableDiffusionPipeline.from_pretrained(
                    path, safety_checker=None, requires_safety_checker=False, dtype=dtype, local_files_only=offline
                )
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            # diffusers reads .bin weights with weights_only=True too, but reports a refusal as "Unable to
            # load weights" and keeps the reason in the exception chain
            raise ModelLoadError(_folder_error(path, err)) from None
    elif path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file():
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:  # removed once the weights are in memory
            if path.suffix.lower() == ".safetensors":
                _check_sd1_single_file(path)
                source = str(path)
            else:
                # diffusers would unpickle the file itself; we read it safely and hand over tensors.
                from safetensors.torch import save_file

                state = _checkpoint_to_safetensors_state(path)
                source = str(Path(scratch) / (path.stem + ".safetensors"))
                save_file({k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}, source)
                del state
            pipe = StableDiffusionPipeline.from_single_file(
                source,
                config=str(config_dir),
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
                dtype=dtype,
            )
    elif path.suffix or path.exists() or str(pretrained).startswith((".", "/")):
        raise ModelLoadError(
            f"{pretrained}: not found or not a model; give a diffusers folder or an SD 1.x .safetensors file"
        )
    else:
        if offline:
            raise ModelLoadError(
                f"'{pretrained}' looks like a hub id but model.offline is true; set model.offline = false "
                "to download, or give a local folder or .safetensors file"
            )
        pipe = StableDiffusionPipeline.from_pretrained(
            pretrained, safety_checker=None, requires_safety_checker=False, dtype=dtype
        )
    return StableDiffusionParts(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        noise_scheduler=_ddpm_from(dict(pipe.scheduler.config)),
        name=path.name if path.exists() else str(pretrained),
    )
