"""Load Stable Diffusion 1.x or SDXL: a diffusers folder, one original-layout checkpoint file, or a hub id.

The family is read from the model (:mod:`library.models.kind`), never from a flag. Single files (what
A1111 users have on disk) load OFFLINE with the component configs and tokenizers shipped in
``configs/<family>/`` (:class:`library.models.family.ModelFamily.config_dir`); `.ckpt`/`.pt` only through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from library.files.messages import one_line
from library.files.weights import WeightsFileError, describe_load_error, load_pickled_weights

from library.models.family import SD1, ModelFamily, family_for
from library.models.kind import (  # ModelLoadError re-exported: callers catch it from here
    SD1_EPSILON,
    ModelKind,
    ModelLoadError,
    SINGLE_FILE_SUFFIXES,
    check_trainable,
    identify_folder,
    identify_state,
    local_model_path,
    read_json,
    safetensors_shapes,
    sidecar_parameterization,
)

__all__ = ["DTYPES", "ModelLoadError", "StableDiffusionParts", "load_stable_diffusion", "load_vae"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # config names -> torch


@dataclass
class StableDiffusionParts:
    """The loaded components. SDXL has a second text encoder and tokenizer (OpenCLIP-G); SD 1.x has None
    there. Code that handles both asks :attr:`text_encoders` / :attr:`tokenizers` (in ``family`` order)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler with the model's betas: what training noises with
    name: str  # file or folder name, no directories (goes into metadata)
    kind: ModelKind = SD1_EPSILON  # what the checkpoint was identified as (goes into metadata)
    vae_name: str | None = None  # model.vae's file or folder name when it replaced the checkpoint's VAE
    family: ModelFamily = SD1
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return tuple(getattr(self, name) for name in self.family.text_encoders)

    @property
    def tokenizers(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.family.tokenizers)


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


def _read_pickled_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt/.pth/.bin, read without unpickling arbitrary objects."""
    try:
        state = load_pickled_weights(path)
    except WeightsFileError as err:  # a pickle that would run code, or a broken file: one line either way
        raise ModelLoadError(str(err)) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file (.safetensors, or a pickle read with weights_only)."""
    if path.suffix.lower() != ".safetensors":
        return _read_pickled_state(path)
    from safetensors.torch import load_file

    safetensors_shapes(path)  # a broken header gets its one-line refusal before anything is read
    return load_file(str(path))


def _vae_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A VAE state dict in diffusers' layout, from diffusers' layout or the original one (`first_stage_model.`,
    `vae.` or bare `encoder.down.0...` keys; what A1111's VAE files and full checkpoints hold)."""
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        return state
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if any(k.startswith("first_stage_model.") for k in state):  # a full checkpoint given as model.vae
        state = {k: v for k, v in state.items() if k.startswith("first_stage_model.")}
    return convert_ldm_vae_checkpoint(state, config)


def load_vae(vae: str, config_source: Path, dtype: torch.dtype = torch.float32, family: ModelFamily = SD1) -> torch.nn.Module:
    """model.vae: an AutoencoderKL from a diffusers VAE folder (`config.json` inside, or a pipeline's `vae/`),
    or from one weights file in the original or the diffusers layout, shaped by `config_source` (a folder
    with the base model's VAE config.json; SD 1.x and SDXL VAEs share the layout, not the config). Every
    weight must fit (strict): ModelLoadError naming the base model's `family` otherwise."""
    from diffusers import AutoencoderKL

    path = Path(vae)
    where = f"model.vae = '{vae}'"
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "vae"
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{where}: a folder without config.json or vae/config.json; give a VAE file or a diffusers VAE folder")
        if read_json(folder / "config.json").get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ModelLoadError(f"{where}: {folder / 'config.json'} is not an AutoencoderKL config")
        try:
            model = AutoencoderKL.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise ModelLoadError(f"{where}: cannot load this VAE folder ({one_line(err, first_line=True)})") from err
        return model.to(dtype)
    if not path.is_file():
        raise ModelLoadError(f"{where}: not found; give a VAE .safetensors file or a diffusers VAE folder")
    state = _read_state(path)
    config = AutoencoderKL.load_config(config_source)
    model = AutoencoderKL.from_config(config)
    state = _vae_state_dict(state, dict(config))
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or wrong:
        bad = missing or wrong
        raise ModelLoadError(
            f"{where}: not an {family.label} VAE for this model ({len(missing)} weights missing, {len(wrong)} of another shape, "
            f"e.g. {bad[0]}); give the VAE file of an {family.label} model, e.g. {family.example_vae}"
        )
    model.load_state_dict({k: state[k] for k in want})
    return model.to(dtype)


def identify(path: Path) -> tuple[ModelKind, dict[str, torch.Tensor] | None]:
    """What a local model path holds, read from headers and configs only; for a pickled checkpoint also its
    tensors (reading them is the only way to see its keys; they are converted from there)."""
    if path.is_dir():
        return identify_folder(path), None
    if path.suffix.lower() == ".safetensors":
        return identify_state(safetensors_shapes(path), sidecar_parameterization(path)), None
    state = _read_pickled_state(path)
    return identify_state({k: tuple(v.shape) for k, v in state.items()}, sidecar_parameterization(path)), state


def _hub_kind(repo_id: str) -> ModelKind:
    """A hub repository's kind from its configs alone (downloaded before any weights)."""
    from huggingface_hub import snapshot_download

    configs = ["model_index.json", "*/config.json", "*/scheduler_config.json", "*/tokenizer_config.json", "*/vocab.json"]
    return identify_folder(Path(snapshot_download(repo_id, allow_patterns=configs)), check_weights=False)


def _vae_config_source(path: Path, config_dir: Path) -> Path:
    """Where the VAE config that model.vae's weights must fit comes from: the base model's own, else config_dir's."""
    return path / "vae" if (path / "vae" / "config.json").is_file() else config_dir / "vae"


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
    pretrained: str,
    config_dir: str | Path | None = None,
    offline: bool = True,
    dtype: torch.dtype = torch.float32,
    vae: str = "",
) -> StableDiffusionParts:
    """SD 1.x or SDXL from a diffusers folder, one original-layout checkpoint or a hub id (only with offline false).

    The path is identified first (:mod:`library.models.kind`): anything but a complete SD 1.x or SDXL
    epsilon text-to-image model is refused with a one-line ModelLoadError before any network is built.
    The family comes from the model itself. A single file (CompVis layout for SD 1.x, SGM layout for SDXL:
    ``model.diffusion_model.*``, ``conditioner.embedders.0/1.*``, ``first_stage_model.*``) is built by
    diffusers' ``from_single_file`` with `config_dir`'s component configs and tokenizers (default: the
    family's ``config_dir``, configs/sd15 or configs/sdxl), offline. `vae` (model.vae) replaces the
    checkpoint's VAE, and is required when the checkpoint has none. The returned parts carry the
    family; SDXL's have ``text_encoder_2`` / ``tokenizer_2``; ``noise_scheduler`` is a DDPMScheduler with
    the model's own betas (for SDXL: scaled_linear 0.00085-0.012 over 1000 steps, epsilon).
    """
    import diffusers

    path = Path(pretrained)
    state = None
    local = local_model_path(pretrained, offline)
    is_file = local is not None and local.is_file()
    if local is not None:
        kind, state = identify(path)
    else:
        kind = _hub_kind(pretrained)
    check_trainable(kind, str(pretrained), vae_given=bool(vae))
    family = family_for(kind.family)
    pipeline_class = getattr(diffusers, family.pipeline_class)
    config_dir = Path(config_dir) if config_dir else family.config_dir
    components = {}
    if vae:
        components["vae"] = load_vae(vae, _vae_config_source(path, config_dir) if path.is_dir() else config_dir / "vae", dtype, family)
    common = dict(dtype=dtype, **dict(family.pipeline_kwargs), **components)
    if path.is_dir():
        try:
            with _no_pickle_fallback_notes():
                pipe = pipeline_class.from_pretrained(path, local_files_only=offline, **common)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            # diffusers reads .bin weights with weights_only=True too, but reports a refusal as "Unable to
            # load weights" and keeps the reason in the exception chain
            raise ModelLoadError(_folder_error(path, err)) from err
    elif is_file:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:  # removed once the weights are in memory
            source = str(path)
            if state is not None:
                # diffusers would unpickle the file itself; we read it safely and hand over tensors.
                from safetensors.torch import save_file

                source = str(Path(scratch) / (path.stem + ".safetensors"))
                save_file({k: v.contiguous() for k, v in state.items()}, source)
                del state
            try:
                pipe = pipeline_class.from_single_file(source, config=str(config_dir), local_files_only=True, **common)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                # e.g. weights of other shapes than config_dir's configs (a model.config_dir of another model)
                raise ModelLoadError(f"{path}: cannot load it with the configs in {config_dir}: {one_line(err, 200).rstrip('.')}; "
                                     "set model.config_dir to a diffusers folder whose configs fit this model") from err
    else:
        pipe = pipeline_class.from_pretrained(pretrained, **common)
    return StableDiffusionParts(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        noise_scheduler=_ddpm_from(dict(pipe.scheduler.config)),
        name=path.name if path.exists() else str(pretrained),
        kind=kind,
        vae_name=Path(vae).name if vae else None,
        family=family,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
    )
