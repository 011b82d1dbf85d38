"""What a base-model path holds, found before anything is built: family, prediction type, UNet input
channels and which components are present.

Single files are identified from their keys and shapes (the safetensors header, or the state dict a
`.ckpt` yields under `torch.load(weights_only=True)`) and from A1111's sidecar `NAME.yaml`; diffusers
folders from `model_index.json` and the component configs. Nothing here allocates a network, so a
model the trainer cannot use is refused in one line before any weights are converted or latents cached.
Complete SD 1.x and SDXL base models with epsilon prediction train; everything else is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from library.files.messages import UserError, one_line
from library.files.paths import looks_like_hub_id
from library.files.text import TextFileError, read_text_file
from library.files.weights import WeightsFileError, check_weights_file, check_weights_in, open_safetensors
from library.models.dit_family import DIT_FAMILIES
from library.models.dit_kind import DitIdentity, identify_dit_configs, identify_transformer_keys
from library.models.family import FAMILIES

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
SD2_OPENCLIP = "cond_stage_model.model."  # SD 2.x's OpenCLIP ViT-H
SDXL_EMBEDDERS = "conditioner.embedders."  # SDXL's two text encoders (the refiner has one)
SDXL_REFINER_TEXT = "conditioner.embedders.0.model."  # the refiner's one text encoder (OpenCLIP-G)
# what the user should give instead, said once
USE_SD1 = "use an SD 1.x text-to-image model such as v1-5-pruned-emaonly.safetensors"
USE_SUPPORTED = ("use an SD 1.x, SDXL, Z-Image or FLUX.2 Klein text-to-image model such as "
                 "v1-5-pruned-emaonly.safetensors or sd_xl_base_1.0.safetensors")
# what ModelKind.missing calls a pipeline component
PART_NAMES = {"unet": "UNet", "transformer": "transformer", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "second text encoder",
              "tokenizer": "tokenizer", "tokenizer_2": "second tokenizer", "scheduler": "scheduler"}


class ModelLoadError(UserError, ValueError):
    """The model could not be loaded; the message is one line naming the path, what was found, what to do."""


@dataclass(frozen=True)
class ModelKind:
    """What a model path holds.

    family: "sd1" | "sd2" | "sdxl" | a flow-matching transformer base, a key of
        :data:`~library.models.dit_family.DIT_FAMILIES` ("zimage", "klein4b", "klein9b") | "other" (a model
        but not one of these: `found` says what)
    prediction: "epsilon" | "v_prediction" | "sample" (what the UNet predicts) | "flow" (the transformer
        bases predict the flow-matching velocity)
    in_channels: the UNet's conv_in input channels (4 text-to-image, 9 inpainting, 8 InstructPix2Pix); a
        transformer's latent channels
    missing: components absent from the checkpoint, from PART_NAMES' values ("UNet", "VAE", "text encoder",
        "second text encoder", ...)
    evidence: what the family and prediction were read from, for the messages
    found, advice: for family "other", what the path is instead (e.g. "a LoRA (lora_* keys), not a base
    model") and what to give instead
    """

    family: str = "sd1"
    prediction: str = "epsilon"
    in_channels: int = 4
    missing: tuple[str, ...] = ()
    evidence: str = ""
    found: str = ""
    advice: str = ""

    @property
    def base_model_version(self) -> str:
        """kohya's ss_base_model_version: the trained families' from :data:`~library.models.family.FAMILIES`;
        "sd_v2" for SD 2.x, which is identified but not trained."""
        if self.family in FAMILIES:
            return FAMILIES[self.family].base_model_version
        if self.family in DIT_FAMILIES:
            return DIT_FAMILIES[self.family].base_model_version
        return {"sd2": "sd_v2"}.get(self.family, self.family)

    @property
    def v_parameterization(self) -> bool:
        return self.prediction == "v_prediction"

    def describe(self) -> str:
        """'an SD 1.x inpainting model (9-channel conv_in)', 'an SD 1.x v-prediction model (...)', ..."""
        if self.family == "other":
            return self.found
        if self.family in DIT_FAMILIES:
            return f"a {DIT_FAMILIES[self.family].label} model" + (f" ({self.evidence})" if self.evidence else "")
        name = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[self.family]
        extra = []
        if self.in_channels == 9:
            name += " inpainting"
            extra.append("9-channel conv_in")
        elif self.in_channels == 8:
            name += " InstructPix2Pix-style"
            extra.append("8-channel conv_in")
        elif self.in_channels != 4:
            extra.append(f"{self.in_channels}-channel conv_in")
        if self.prediction == "v_prediction":
            name += " v-prediction"
        elif self.prediction != "epsilon":
            name += f" {self.prediction}-prediction"
        if self.evidence:
            extra.insert(0, self.evidence)
        return f"an {name} model" + (f" ({'; '.join(extra)})" if extra else "")


SD1_EPSILON = ModelKind()


# --------------------------------------------------------------------------------------------------
# the one reader of the small text files a model comes with (model_index.json, configs, sidecar .yaml)


def read_text(path: Path) -> str:
    """A text file as str through the project's one reader (library.files.text); ModelLoadError naming the
    file when it is not UTF-8 or UTF-16 with a byte-order mark."""
    try:
        return read_text_file(path)
    except TextFileError as err:
        raise ModelLoadError(str(err)) from err


def read_json(path: Path) -> dict:
    """A JSON object from `path` (through read_text); ModelLoadError naming the file if it is not one."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); fix or replace the file") from err
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def sidecar_parameterization(checkpoint: Path) -> str | None:
    """'v' or 'eps' from A1111's `NAME.yaml` next to a single-file checkpoint (model.params.parameterization);
    None without a sidecar or without the key."""
    import yaml

    sidecar = checkpoint.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    text = read_text(sidecar)
    try:  # ValueError: a value YAML cannot build (2001-13-45); RecursionError: collections nested ~1000 deep
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        why = one_line(str(err).split("\n")[0] or err, 200)
        raise ModelLoadError(f"{sidecar}: not valid YAML ({why}); fix or remove it") from err
    model = doc.get("model") if isinstance(doc, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    value = params.get("parameterization") if isinstance(params, dict) else None
    return str(value) if value is not None else None


# --------------------------------------------------------------------------------------------------
# single files


def _not_a_model(keys: list[str]) -> ModelKind:
    """What a file without UNet or text-encoder keys is instead, and what to give instead."""
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return ModelKind(family="other", found="a LoRA (lora_* keys), not a base model",
                         advice="give the SD 1.x model it was trained on as model.pretrained")
    if any(k.startswith((VAE_PREFIX, "encoder.down", "decoder.up")) for k in keys):
        return ModelKind(family="other", found="a VAE alone, not a full model",
                         advice="give it as model.vae, and a full SD 1.x checkpoint as model.pretrained")
    if "emb_params" in keys or any(k.startswith(("clip_l", "clip_g", "string_to_param")) for k in keys):
        found = "a textual-inversion embedding, not a base model"
    elif any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        found = "a diffusers UNet alone, not a full model"
    else:
        found = "not a Stable Diffusion checkpoint (no model.diffusion_model.* or cond_stage_model.* keys)"
    return ModelKind(family="other", found=found, advice=USE_SD1)


def identify_state(shapes: Mapping[str, tuple[int, ...]], parameterization: str | None = None) -> ModelKind:
    """A single-file checkpoint's kind from its keys -> shapes (original CompVis / A1111 layout).

    `parameterization` is the sidecar .yaml's value ("v" marks v-prediction; SD 1.x and 2.x files carry no
    scheduler config). A `v_pred` key (the marker ComfyUI and Forge read) also means v-prediction.
    """
    keys = list(shapes)
    dit = identify_transformer_keys(shapes)
    if dit is not None:  # a Z-Image / FLUX transformer file: the other components come as files of their own
        return _dit_kind(dit, missing=())

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    unet, text = has(UNET_PREFIX), has("cond_stage_model.") or has(SDXL_EMBEDDERS)
    if not unet and not text:
        return _not_a_model(keys)
    context = next((s[1] for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") and len(s) == 2), None)
    if has(SDXL_REFINER_TEXT):
        family, evidence = "sdxl", f"a refiner: one text encoder, {SDXL_REFINER_TEXT}*"
    elif has(SDXL_EMBEDDERS):
        family, evidence = "sdxl", "conditioner.embedders.* keys"
    elif has(SD2_OPENCLIP):
        family, evidence = "sd2", "OpenCLIP ViT-H text encoder: cond_stage_model.model.* keys"
    elif context in (1280, 2048):
        family, evidence = "sdxl", f"cross-attention dim {context}"
    elif context == 1024:
        family, evidence = "sd2", "cross-attention dim 1024"
    else:
        family, evidence = "sd1", ""
    prediction = "epsilon"
    if parameterization == "v":
        prediction, evidence = "v_prediction", "; ".join(filter(None, [evidence, 'parameterization: "v" in its .yaml']))
    elif "v_pred" in shapes:
        prediction, evidence = "v_prediction", "; ".join(filter(None, [evidence, "a v_pred key"]))
    conv_in = shapes.get(CONV_IN)
    in_channels = int(conv_in[1]) if conv_in is not None and len(conv_in) == 4 else 4
    parts = [("UNet", unet), ("VAE", has(VAE_PREFIX))]
    if has(SDXL_REFINER_TEXT):  # the refiner's one encoder is OpenCLIP-G: what it lacks is the base's CLIP-L
        parts.append(("CLIP-L text encoder", False))
    elif family in FAMILIES:  # each of the family's text encoders under its own prefix
        names = [PART_NAMES[name] for name in FAMILIES[family].text_encoders]
        parts += [(name, has(prefix)) for name, prefix in zip(names, FAMILIES[family].checkpoint_text_prefixes)]
    else:
        parts.append(("text encoder", text))
    missing = tuple(name for name, ok in parts if not ok)
    return ModelKind(family=family, prediction=prediction, in_channels=in_channels, missing=missing, evidence=evidence)


def _dit_kind(dit: DitIdentity, missing: tuple[str, ...]) -> ModelKind:
    """The ModelKind of what library/models/dit_kind.py identified."""
    if dit.family == "other":
        return ModelKind(family="other", found=dit.found, advice=dit.advice)
    return ModelKind(family=dit.family, prediction="flow", in_channels=dit.in_channels, missing=missing,
                     evidence=dit.evidence)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a .safetensors header, without reading any tensor data; ModelLoadError (one line)
    for a header that lies or does not parse."""
    try:
        with open_safetensors(path) as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except WeightsFileError as err:
        raise ModelLoadError(str(err)) from err


# --------------------------------------------------------------------------------------------------
# diffusers folders


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _has_weights(folder: Path) -> bool:
    """Whether a component folder holds a weights file, each one checked cheaply (check_weights_in):
    a Git LFS pointer, a web page or a truncated file is a one-line ModelLoadError here, before any
    component is built, not when diffusers reaches that component."""
    if not folder.is_dir():
        return False
    try:
        return bool(check_weights_in(folder))
    except WeightsFileError as err:
        raise ModelLoadError(str(err)) from err


def identify_configs(model_index: dict, configs: Mapping[str, dict | None], check_weights: Path | None = None) -> ModelKind:
    """A diffusers pipeline's kind from `model_index.json` and its components' configs.

    `configs` maps "unet", "vae", "text_encoder", "tokenizer", "scheduler" (and SDXL's "text_encoder_2",
    "tokenizer_2") to the component's config dict (None where the component has none); which of them a
    complete model needs is the family's (:mod:`library.models.family`). With `check_weights` (the
    folder), a component whose subfolder holds no weight file counts as missing.
    """
    cls = str(model_index.get("_class_name", ""))
    listed = {k for k, v in model_index.items() if isinstance(v, list) and len(v) == 2 and v[0] and v[1]}
    dit = identify_dit_configs(model_index, configs)
    if dit is not None:
        parts = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
        missing = [PART_NAMES[p] for p in parts if configs.get(p) is None or (
            p in ("transformer", "vae", "text_encoder") and check_weights is not None and not _has_weights(check_weights / p))]
        return _dit_kind(dit, missing=tuple(missing))
    if "transformer" in listed or ("unet" not in listed and model_index):
        return ModelKind(family="other", found=f"a {cls or 'diffusers'} model without a UNet, not Stable Diffusion 1.x",
                         advice=USE_SD1)
    unet = configs.get("unet") or {}
    context = unet.get("cross_attention_dim")
    family, evidence = "sd1", ""
    if "text_encoder_2" in listed:
        family, evidence = "sdxl", f"{cls or 'a pipeline'} with text_encoder_2"
    elif "XL" in cls:
        family, evidence = "sdxl", cls
    elif unet.get("addition_embed_type") == "text_time":  # SDXL's size/crop conditioning
        family, evidence = "sdxl", "UNet addition_embed_type text_time"
    elif context == 1024:
        family, evidence = "sd2", "cross-attention dim 1024"
    scheduler = configs.get("scheduler") or {}
    prediction = str(scheduler.get("prediction_type", "epsilon"))
    if prediction != "epsilon":
        evidence = "; ".join(filter(None, [evidence, f'scheduler prediction_type = "{prediction}"']))
    missing = []
    own = FAMILIES[family] if family in FAMILIES else FAMILIES["sd1"]
    wanted = ("unet", "vae", *own.text_encoders, *own.tokenizers, "scheduler")
    for part in wanted:
        weighted = part in ("unet", "vae", *own.text_encoders)
        if configs.get(part) is None or (weighted and check_weights is not None and not _has_weights(check_weights / part)):
            missing.append(PART_NAMES[part])
    return ModelKind(family=family, prediction=prediction, in_channels=int(unet.get("in_channels", 4)),
                     missing=tuple(missing), evidence=evidence)


def read_folder_configs(folder: Path) -> tuple[dict, dict[str, dict | None]]:
    """(model_index.json, {component: config dict or None}) of a diffusers folder, through read_json."""
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    names = {"unet": "config.json", "transformer": "config.json", "vae": "config.json", "text_encoder": "config.json", "text_encoder_2": "config.json",
             "tokenizer": "tokenizer_config.json", "tokenizer_2": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
    configs: dict[str, dict | None] = {}
    for part, name in names.items():
        path = folder / part / name
        if path.is_file():
            configs[part] = read_json(path)
        elif part.startswith("tokenizer") and (folder / part / "vocab.json").is_file():
            configs[part] = {}
        else:
            configs[part] = None
    return index, configs


def identify_folder(folder: Path, check_weights: bool = True) -> ModelKind:
    """A diffusers folder's kind; ModelLoadError if it is no diffusers pipeline at all."""
    if not (folder / "model_index.json").is_file() and not (folder / "unet").is_dir():
        if (folder / "config.json").is_file() and read_json(folder / "config.json").get("_class_name") == "AutoencoderKL":
            return ModelKind(family="other", found="a VAE folder, not a full model",
                             advice="give it as model.vae, and a full SD 1.x model as model.pretrained")
        raise ModelLoadError(f"{folder}: not a diffusers model folder (no model_index.json or unet/ inside); "
                             "give a diffusers folder or an SD 1.x or SDXL .safetensors file")
    index, configs = read_folder_configs(folder)
    return identify_configs(index, configs, folder if check_weights else None)


def local_model_path(pretrained: str, offline: bool) -> Path | None:
    """model.pretrained as a local folder or single file, or None for a hub id (allowed when not `offline`).

    Raises ModelLoadError (one line) for a path that does not exist or is not a model file, and for a hub
    id while `offline`.
    """
    path = Path(pretrained)
    if path.is_dir() or (path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()):
        return path
    if not looks_like_hub_id(pretrained):
        raise ModelLoadError(
            f"{pretrained}: not found or not a model; give a diffusers folder or an SD 1.x or SDXL .safetensors file"
        )
    if offline:
        raise ModelLoadError(
            f"'{pretrained}' looks like a hub id but model.offline is true; set model.offline = false "
            "to download, or give a local folder or .safetensors file"
        )
    return None


def check_model_files(pretrained: str, vae: str = "", offline: bool = True) -> ModelKind | None:
    """The cheap check of the base model (and `vae`, model.vae) before anything is loaded: every weights
    file it will read is checked (:func:`~library.files.weights.check_weights_file`: no Git LFS pointer,
    web page, truncated file or lying header) and the model identified from its header or configs and
    refused if it cannot train (:func:`check_trainable`). Returns its kind; None for a pickled checkpoint
    (identified when it is read, the only way to see its keys) or a hub id.

    Reads headers and the first KiB of each file only. Raises ModelLoadError, one line naming the file.
    """
    path = local_model_path(pretrained, offline)
    kind = None
    if path is not None and path.is_dir():
        kind = identify_folder(path)
    elif path is not None:
        try:
            check_weights_file(path)
        except WeightsFileError as err:
            raise ModelLoadError(str(err)) from err
        if path.suffix.lower() == ".safetensors":
            kind = identify_state(safetensors_shapes(path), sidecar_parameterization(path))
    if kind is not None:
        check_trainable(kind, str(pretrained), vae_given=bool(vae))
    if vae:
        vae_path = Path(vae)
        if vae_path.is_dir():
            _has_weights(vae_path if (vae_path / "config.json").is_file() else vae_path / "vae")
        else:
            try:
                check_weights_file(vae_path)
            except (WeightsFileError, FileNotFoundError) as err:
                raise ModelLoadError(f"model.vae: {err}") from err
    return kind


# --------------------------------------------------------------------------------------------------
# the decision


def check_trainable(kind: ModelKind, where: str, vae_given: bool = False) -> None:
    """Refuse, in one line naming `where`, anything but a complete SD 1.x or SDXL epsilon text-to-image model,
    or a Z-Image / FLUX.2 Klein base (a whole diffusers folder, or a transformer file whose companions
    library/models/dit_loading.py checks as it loads them).

    A missing VAE is accepted when `vae_given` (model.vae replaces it). Raises ModelLoadError.
    """
    what = kind.describe()
    if kind.family == "other":
        raise ModelLoadError(f"{where}: {what}; {kind.advice}")
    if kind.family in DIT_FAMILIES:
        if kind.missing:
            label = DIT_FAMILIES[kind.family].label
            raise ModelLoadError(f"{where}: an incomplete {label} folder: no {' and no '.join(kind.missing)}; "
                                 f"give the whole {DIT_FAMILIES[kind.family].pipeline_class} folder")
        return
    if kind.family not in FAMILIES:
        raise ModelLoadError(f"{where}: {what}; this trainer trains SD 1.x, SDXL, Z-Image and FLUX.2 Klein: {USE_SUPPORTED}")
    family = FAMILIES[kind.family]
    label, example = family.label, family.example_checkpoint
    if kind.in_channels != 4:
        raise ModelLoadError(f"{where}: {what}; training needs a text-to-image model (4-channel conv_in): "
                             f"use the model it was made from, e.g. {example}")
    if kind.prediction != "epsilon":
        raise ModelLoadError(f"{where}: {what}; this trainer trains epsilon-prediction models only: "
                             f"use an {label} text-to-image model such as {example} (not a v-prediction fine-tune)")
    fatal = [m for m in kind.missing if m != "VAE"]
    if fatal:
        found = f" ({kind.evidence})" if kind.evidence else ""
        raise ModelLoadError(f"{where}: an incomplete {label} model{found}: no {' and no '.join(fatal)}; "
                             f"use a full checkpoint ({family.complete_parts}), e.g. {example}")
    if "VAE" in kind.missing and not vae_given:
        raise ModelLoadError(f"{where}: an {label} model without a VAE; "
                             f"set model.vae to a VAE file or folder, e.g. {family.example_vae}")
