"""Everything a run needs, checked cheaply before anything loads: a refusal costs seconds, not a model load.

`check_run_inputs` reads headers, configs, sidecars and file names only (no network is built, no image
decoded, no tensor read): the names the run will write must not overwrite one another, every weights
file must be weights (not a Git LFS pointer, a web page or a truncated download), the base model must be
one this trainer trains, and the prepared folders must be what the config says they are.
"""

from __future__ import annotations

from pathlib import Path

from library.config import Config, ConfigError
from library.files.weights import WeightsFileError, check_weights_in
from library.models.kind import check_model_files
from library.training.data import check_prepared_sets
from library.training.outputs import output_paths

__all__ = ["check_output_names", "check_run_inputs"]


def _role(key: str, cfg: Config) -> str:
    """What an output_paths key is, in the config's words."""
    if key == "lora":
        return f"the LoRA (output.name = {cfg.output.name!r})"
    if key == "bundle":
        return f"the LoRA with bundled embeddings (output.name = {cfg.output.name!r}, output.bundle_embeddings)"
    word = key.removesuffix(".pt")
    which = "tokens.source" if word == cfg.tokens.source else "tokens.reference"
    return f"the embedding of {which} = {word!r}" + (" (.pt)" if key.endswith(".pt") else "")


def check_output_names(cfg: Config) -> None:
    """Refuse names that would make one output file overwrite another in output.dir: the LoRA named like
    a token (``mcv1.safetensors`` twice), names that differ only in case (one file on Windows and macOS
    disks), or a step-named file (``output.save_lora_every``) equal to another file's name.
    Raises ConfigError, one line naming both files' roles and what to change."""
    steps = [None]
    every = cfg.output.save_lora_every
    if every:
        steps += list(range(every, cfg.phase2.steps, every))
    seen: dict[str, tuple[str, Path]] = {}
    for step in steps:
        for key, path in output_paths(cfg, step).items():
            other = seen.setdefault(path.name.casefold(), (key, path))
            if other[0] != key:
                raise ConfigError(
                    f"{cfg.source_file}: {_role(other[0], cfg)} and {_role(key, cfg)} would both be written as "
                    f"{path.parent / other[1].name}, one over the other; give output.name another name, "
                    f"e.g. {cfg.output.name}_lora"
                )


def _check_weights(key: str, value: str) -> None:
    """A weights file (or a folder of them) a config key names: each file checked cheaply."""
    try:
        check_weights_in(value, recursive=True)
    except (WeightsFileError, FileNotFoundError) as err:
        raise ConfigError(f"{key}: {err}") from err


def check_run_inputs(cfg: Config) -> None:
    """Check what a training run reads and writes, cheaply, before anything loads (see the module).

    Raises ConfigError (names, weights files of loss.identity_weights and [evaluation]), DatasetError
    (the prepared folders: missing, unprepared, swapped, the same folder twice) or ModelLoadError (the
    base model and model.vae), each one line naming the file and the fix."""
    check_output_names(cfg)
    check_prepared_sets(cfg.data.source_dir, cfg.data.reference_dir)
    check_model_files(cfg.model.pretrained, cfg.model.vae, cfg.model.offline)
    for key, value in (("loss.identity_weights", cfg.loss.identity_weights), ("evaluation.clip", cfg.evaluation.clip),
                       ("evaluation.aesthetic", cfg.evaluation.aesthetic)):
        if value:
            _check_weights(key, value)
