"""Load Z-Image or FLUX.2 Klein: a diffusers folder, or ComfyUI's split files (one transformer, one Qwen3
text-encoder and one VAE ``.safetensors``, each in its original key layout) with a Qwen3 tokenizer folder
and the component configs, all offline.

The base is identified from the files first (library/models/kind.py, library/models/dit_kind.py); anything
that is not Z-Image or FLUX.2 Klein 4B / 9B, an incomplete folder, a missing split file and a text encoder
of the wrong width are refused in one line (ModelLoadError) before any network is built. The split
transformer goes through diffusers' own single-file converter (``from_single_file`` with the configs'
``transformer/``); the VAE through ``convert_ldm_vae_checkpoint`` (FLUX.2's BatchNorm statistics and quant
convs keep their names); the text encoder is transformers' layout under ``model.`` (ComfyUI's
``qwen_3_4b.safetensors``), loaded strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from library.files.messages import one_line
from library.models.dit_family import DIT_FAMILIES, DitFamily
from library.models.kind import ModelKind, ModelLoadError, identify_folder, identify_state, read_json, safetensors_shapes

__all__ = ["DitParts", "load_dit", "load_dit_folder", "load_dit_files"]


@dataclass
class DitParts:
    """The loaded components of a flow-matching transformer base (what its diffusers pipeline takes)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # FlowMatchEulerDiscreteScheduler with the model's shift settings
    family: DitFamily
    kind: ModelKind
    name: str  # the folder's or transformer file's name, no directories (goes into metadata)

    def pipeline(self, **kwargs):
        """The family's diffusers pipeline over these components (``ZImagePipeline`` / ``Flux2KleinPipeline``)."""
        import diffusers

        parts = dict(transformer=self.transformer, vae=self.vae, text_encoder=self.text_encoder,
                     tokenizer=self.tokenizer, scheduler=self.scheduler)
        return getattr(diffusers, self.family.pipeline_class)(**parts, **kwargs)


def _family_of(kind: ModelKind, where: str) -> DitFamily:
    """The DiT family of `kind`, or a one-line refusal naming `where`."""
    if kind.family == "other":
        raise ModelLoadError(f"{where}: {kind.describe()}; {kind.advice}")
    if kind.family not in DIT_FAMILIES:
        raise ModelLoadError(f"{where}: {kind.describe()}, not a Z-Image or FLUX.2 Klein model; load it as Stable Diffusion")
    return DIT_FAMILIES[kind.family]


def load_dit_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> DitParts:
    """A ``ZImagePipeline`` / ``Flux2KleinPipeline`` diffusers folder, offline. ModelLoadError (one line)
    for another model or a folder that lacks a component ("no transformer and no tokenizer")."""
    import diffusers

    folder = Path(folder)
    kind = identify_folder(folder)
    family = _family_of(kind, str(folder))
    if kind.missing:
        raise ModelLoadError(f"{folder}: an incomplete {family.label} folder: no {' and no '.join(kind.missing)}; "
                             f"give the whole {family.pipeline_class} folder")
    try:
        pipe = getattr(diffusers, family.pipeline_class).from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"{folder}: cannot load this {family.label} folder: {one_line(err, 200, first_line=True)}") from err
    return DitParts(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                    scheduler=pipe.scheduler, family=family, kind=kind, name=folder.name)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    safetensors_shapes(path)  # a broken header gets its one-line refusal before anything is read
    return load_file(str(path))


def _strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> None:
    """Load `state` into `module`, every weight present and of its shape; one line naming `where` otherwise."""
    want = module.state_dict()
    missing = [k for k in want if k not in state]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or wrong:
        raise ModelLoadError(f"{where}: not {what} ({len(missing)} weights missing, {len(wrong)} of another shape, "
                             f"e.g. {(missing or wrong)[0]})")
    module.load_state_dict({k: state[k] for k in want})


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # diffusers warns on any .to(dtype) of a model built outside from_pretrained; fp32 needs none
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def _text_encoder(path: Path, config_dir: Path, family: DitFamily, dtype: torch.dtype) -> torch.nn.Module:
    """The Qwen3 text encoder from ComfyUI's file (transformers' names under ``model.``)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
    model = getattr(transformers, family.text_encoder_class)(config)
    state = _state(path)
    width = next((tuple(v.shape)[1] for k, v in state.items() if k.endswith("embed_tokens.weight")), None)
    if width is not None and width != config.hidden_size:
        raise ModelLoadError(f"model.text_encoder = '{path}': a Qwen3 of width {width}; {family.label} reads "
                             f"width {config.hidden_size} (Qwen3-{'8B' if family.text_width == 4096 else '4B'}); give that text encoder")
    if family.text_encoder_class == "Qwen3Model":  # no language-model head: transformers' names without "model."
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    elif "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as ComfyUI's files leave it out
    _strict(model, state, f"model.text_encoder = '{path}'", f"the Qwen3 text encoder of this {family.label} model")
    return _cast(model, dtype)


def _vae(path: Path, config_dir: Path, family: DitFamily, dtype: torch.dtype) -> torch.nn.Module:
    """The VAE from its original-layout file (FLUX.1's ae.safetensors for Z-Image, FLUX.2's VAE for Klein)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cls = getattr(diffusers, family.vae_class)
    config = cls.load_config(config_dir / "vae")
    model = cls.from_config(config)
    state = _state(path)
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):
        coder = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}, dict(config))
        state = {**{k: v for k, v in state.items() if not k.startswith(("encoder.", "decoder."))}, **coder}
    _strict(model, state, f"model.vae = '{path}'", f"a {family.label} VAE")
    return _cast(model, dtype)


def load_dit_files(transformer: str | Path, text_encoder: str | Path | None, vae: str | Path | None,
                   tokenizer: str | Path | None, config_dir: str | Path | None,
                   dtype: torch.dtype = torch.float32) -> DitParts:
    """ComfyUI's split files of a Z-Image / FLUX.2 Klein model, offline.

    transformer: the ``diffusion_models`` file (original or diffusers layout); text_encoder: the Qwen3
    ``text_encoders`` file; vae: the VAE file; tokenizer: a Qwen3 tokenizer folder (tokenizer.json with its
    chat template); config_dir: a folder laid out as the family's diffusers folder without weights
    (``transformer/``, ``text_encoder/``, ``vae/`` configs and ``scheduler/scheduler_config.json``);
    None: the real model's, shipped in ``configs/<family>/`` (DitFamily.config_dir).
    Raises ModelLoadError, one line: for another model, naming everything that is missing, or for a
    component that does not fit (the text encoder's width, a weight missing or of another shape).
    """
    import diffusers
    from transformers import AutoTokenizer

    transformer = Path(transformer)
    if not transformer.is_file():
        raise ModelLoadError(f"{transformer}: not found; give the model's transformer .safetensors file")
    family = _family_of(identify_state(safetensors_shapes(transformer)), str(transformer))
    given = {"model.text_encoder (the Qwen3 .safetensors)": text_encoder, "model.vae (the VAE .safetensors)": vae,
             "model.tokenizer (a Qwen3 tokenizer folder)": tokenizer,
             "model.config_dir (the component configs: a diffusers folder of this model)": config_dir or family.config_dir}
    absent = [name for name, path in given.items() if not path or not Path(path).exists()]
    if absent:
        raise ModelLoadError(f"{transformer}: a {family.label} transformer alone; also needs {', '.join(absent)}")
    config_dir = Path(config_dir or family.config_dir)
    no_config = [p for p in ("transformer/config.json", "text_encoder/config.json", "vae/config.json",
                             "scheduler/scheduler_config.json") if not (config_dir / p).is_file()]
    if no_config:
        raise ModelLoadError(f"model.config_dir = '{config_dir}': no {' and no '.join(no_config)}; "
                             f"give a {family.pipeline_class} folder (its weights are not read)")
    index = read_json(config_dir / "model_index.json") if (config_dir / "model_index.json").is_file() else {}
    if index.get("_class_name", family.pipeline_class) != family.pipeline_class:
        raise ModelLoadError(f"model.config_dir = '{config_dir}': configs of a {index['_class_name']}, "
                             f"not of {family.label} ({family.pipeline_class})")
    try:
        model = getattr(diffusers, family.transformer_class).from_single_file(
            str(transformer), config=str(config_dir), subfolder="transformer", local_files_only=True, dtype=dtype)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(config_dir, subfolder="scheduler")
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # e.g. weights of other shapes than the configs'
        why = one_line(str(err).split(". ")[0], 160, first_line=True)
        raise ModelLoadError(f"{transformer}: does not fit the configs in {config_dir} ({why}); set model.config_dir "
                             "to this model's configs (a diffusers folder of it)") from err
    folder = Path(tokenizer)
    if not ((folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise ModelLoadError(f"model.tokenizer = '{tokenizer}': no tokenizer.json (or vocab.json and merges.txt) inside; "
                             "give the Qwen3 tokenizer folder")
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"model.tokenizer = '{tokenizer}': not a tokenizer folder ({one_line(err, 160, first_line=True)}); "
                             "give the Qwen3 tokenizer folder (tokenizer.json, tokenizer_config.json)") from err
    parts = DitParts(transformer=model.eval(), vae=_vae(Path(vae), config_dir, family, dtype),
                     text_encoder=_text_encoder(Path(text_encoder), config_dir, family, dtype), tokenizer=tok,
                     scheduler=scheduler, family=family, kind=identify_state(safetensors_shapes(transformer)),
                     name=transformer.name)
    _check_widths(parts)
    return parts


def _check_widths(parts: DitParts) -> None:
    """The text encoder's width must be what the transformer reads: Z-Image's caption input is the width,
    FLUX.2's text input three hidden states side by side (layers 9, 18, 27)."""
    width = parts.text_encoder.config.hidden_size
    config = parts.transformer.config
    wanted = config.get("cap_feat_dim") if parts.family.name == "zimage" else config.get("joint_attention_dim", 0) // 3
    if width != wanted:
        raise ModelLoadError(f"model.text_encoder: a Qwen3 of width {width}; this {parts.family.label} transformer "
                             f"reads width {wanted}; give the text encoder that came with it")


def load_dit(pretrained: str | Path, text_encoder: str | Path | None = None, vae: str | Path | None = None,
             tokenizer: str | Path | None = None, config_dir: str | Path | None = None,
             dtype: torch.dtype = torch.float32) -> DitParts:
    """model.pretrained as a diffusers folder (:func:`load_dit_folder`; the other arguments are not used) or
    as a transformer file with its companions (:func:`load_dit_files`)."""
    if Path(pretrained).is_dir():
        return load_dit_folder(pretrained, dtype)
    return load_dit_files(pretrained, text_encoder, vae, tokenizer, config_dir, dtype)
