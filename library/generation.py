"""Sampling with the trained files: base model + the two embeddings + the LoRA, then optional post-processing.

What `generate()` does (METHOD.md, "Inference and post-processing"; released: Euler ancestral, 50 steps,
CFG 7, LoRA 0.6 on the UNet and 0.9 on the text encoder):

1. checks everything a user can get wrong *before* loading anything heavy: the sampler name, the size,
   the trained files (``<output.dir>/<output.name>.safetensors`` and ``<output.dir>/<token>.safetensors``),
   the post-processing weights (loaded, so a wrong file fails before any sampling);
2. loads the base model from the config's ``[model]`` exactly as training does (offline by default);
3. adds each token to the tokenizer (``word``, ``word_1``, ... for multi-vector embeddings, the rule of
   training and of diffusers' textual inversion loader) and writes the saved vectors into new rows of the
   token-embedding table;
4. merges the kohya LoRA into the weights with ``export.apply_kohya_lora`` and the two scales
   (W += scale * alpha / r * up @ down, in fp32, before any cast to fp16). Merging rather than diffusers'
   ``load_lora_weights``: no peft layers at sampling time (no per-step overhead), the per-component scales
   are exact, it reads exactly the names our exporter writes (``lora_te_text_model_*`` although
   transformers 5's CLIPTextModel has no ``text_model`` level, which diffusers' kohya converter maps to a
   module path that no longer exists), and a LoRA that does not fit the model fails with one line before
   any weight changes;
5. samples image i with seed + i (its own CPU generator: the same seed gives the same picture on any
   device and whatever the batch), writes each PNG atomically with an A1111 "parameters" text chunk, a
   grid, and, when asked, the post-processed image (the sample before post-processing goes to ``raw/``).

The "parameters" text is what A1111 writes, so PNG Info / "send to txt2img" reproduces the picture in
A1111 with the same files: the prompt carries ``<lora:NAME:te=T:unet=U>`` (A1111's syntax for separate
text-encoder and UNet multipliers), the token words are A1111 embedding names (the files are named after
them), and ``Lora hashes`` / ``TI hashes`` are A1111's short hashes of those files.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .config import ConfigError


class GenerationError(ValueError):
    """A user error (missing trained file, bad option, weights that do not fit); the message is one line."""


# --------------------------------------------------------------------------------------------------
# samplers: our name -> (diffusers class, extra config, A1111's sampler name)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
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
DEFAULT_STEPS = 50
DEFAULT_CFG = 7.0
DEFAULT_LORA_SCALE = 0.6  # UNet (released code)
DEFAULT_TE_SCALE = 0.9  # text encoder (released code)
DEFAULT_FIDELITY = 0.5
RESTORERS = ("codeformer", "gfpgan", "none")
_RESTORER_ARCH = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN"}
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def check_scheduler(name: str) -> Sampler:
    if name not in SCHEDULERS:
        raise GenerationError(f"unknown scheduler '{name}'; valid: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


# --------------------------------------------------------------------------------------------------
# the trained files
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainedFiles:
    lora: Path | None  # None: generate without a LoRA (a run with no phase 2 writes none)
    embeddings: dict[str, Path | None]  # token word -> file (None: bundled in the LoRA)


def composed_prompt(cfg) -> str:
    """METHOD.md's composed prompt, the default: "a photo of a {source} person in the style of {reference}"."""
    return f"a photo of a {cfg.tokens.source} person in the style of {cfg.tokens.reference}"


def _bundled_tokens(lora: Path) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(lora), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:
        raise GenerationError(f"{lora}: not a readable .safetensors LoRA ({_one_line(err)})") from None
    return {k.split(".")[1] for k in keys if k.startswith("bundle_emb.") and k.endswith(".emb_params")}


def find_trained_files(cfg, use_lora: bool = True) -> TrainedFiles:
    """The LoRA and the two embeddings training wrote (library/outputs.py); one-line error when missing."""
    out = Path(cfg.output.dir)
    hint = f"run training first: python train_magicapture.py --config {_config_name(cfg)}"
    lora: Path | None = out / f"{cfg.output.name}.safetensors"
    if not use_lora:
        lora = None
    elif not lora.is_file():
        if cfg.phase2.steps == 0 and any((out / f"{w}.safetensors").is_file() for w in _words(cfg)):
            lora = None  # phase 2 (the LoRA phase) was off: training wrote embeddings only
        else:
            raise GenerationError(f"trained LoRA not found: {lora}; {hint}")
    bundled = _bundled_tokens(lora) if lora is not None else set()
    embeddings: dict[str, Path | None] = {}
    for word in _words(cfg):
        path = out / f"{word}.safetensors"
        legacy = out / f"{word}.pt"
        if path.is_file():
            embeddings[word] = path
        elif legacy.is_file():
            embeddings[word] = legacy
        elif word in bundled:
            embeddings[word] = None
        else:
            raise GenerationError(f"trained embedding for token '{word}' not found: {path}; {hint}")
    return TrainedFiles(lora=lora, embeddings=embeddings)


def _words(cfg) -> list[str]:
    return [cfg.tokens.source, cfg.tokens.reference]


def _config_name(cfg) -> str:
    src = getattr(cfg, "source_file", "") or ""
    return src if src and not src.startswith("<") else "CONFIG.toml"


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    msg = lines[0] if lines else type(err).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationModel:
    pipe: object  # diffusers StableDiffusionPipeline
    model_name: str
    token_ids: dict[str, list[int]]  # token word -> tokenizer ids (word, word_1, ...)
    lora_name: str | None
    lora_modules: int  # modules the LoRA patched (0 without a LoRA)
    lora_scale: float
    te_scale: float
    hashes: dict[str, str] = field(default_factory=dict)  # "Lora hashes" / "TI hashes" values
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    scheduler_config: dict = field(default_factory=dict)  # the model's own; each sampler is built from it
    scheduler: str = DEFAULT_SCHEDULER

    def set_scheduler(self, name: str) -> None:
        """Switch the sampler (schedulers hold no weights: cheap, no reload)."""
        if name != self.scheduler:
            self.pipe.scheduler = make_scheduler(name, self.scheduler_config)
            self.scheduler = name


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GenerationError(f"unknown device '{device}'; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return dev


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype:
    if precision in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in _PRECISIONS:
        raise GenerationError(f"unknown precision '{precision}'; valid: auto, {', '.join(_PRECISIONS)}")
    return _PRECISIONS[precision]


def _read_embedding(word: str, path: Path | None, lora: Path | None) -> torch.Tensor:
    from .export import load_embedding

    if path is None:  # bundled in the LoRA
        from safetensors import safe_open

        with safe_open(str(lora), framework="pt") as f:
            vec = f.get_tensor(f"bundle_emb.{word}.emb_params")
        return vec[None] if vec.ndim == 1 else vec
    try:
        _, vec = load_embedding(path)
    except Exception as err:
        raise GenerationError(f"{path}: not a readable embedding ({_one_line(err)})") from None
    return vec


def add_embeddings(tokenizer, text_encoder, vectors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Add each word (word, word_1, ... for n vectors) to the tokenizer and its vectors as new table rows."""
    from .tokens import token_words

    emb = text_encoder.get_input_embeddings()
    dim = emb.weight.shape[1]
    entries: dict[str, list[str]] = {}
    vocab = tokenizer.get_vocab()
    for word, vec in vectors.items():
        if vec.ndim != 2 or vec.shape[1] != dim:
            raise GenerationError(
                f"embedding '{word}' has shape {tuple(vec.shape)} but this model's text encoder has width {dim}: "
                "trained on another base model?"
            )
        entries[word] = token_words(word, vec.shape[0])
        for entry in entries[word]:
            if entry in vocab:
                raise GenerationError(f"token '{entry}' is already in the tokenizer's vocabulary")
    all_entries = [e for es in entries.values() for e in es]
    if tokenizer.add_tokens(all_entries) != len(all_entries):
        raise GenerationError(f"could not add the tokens {all_entries} to the tokenizer")
    if len(tokenizer) != emb.weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    ids: dict[str, list[int]] = {}
    with torch.no_grad():
        for word, vec in vectors.items():
            ids[word] = tokenizer.convert_tokens_to_ids(entries[word])
            table[torch.tensor(ids[word])] = vec.to(device=table.device, dtype=table.dtype)
    return ids


def _scheduler_base_config(cfg, parts) -> dict:
    """The model's own scheduler config (steps_offset and friends), over the training DDPM's betas."""
    from .models import CONFIG_DIR

    config = dict(parts.noise_scheduler.config)
    pretrained = Path(cfg.model.pretrained)
    candidates = []
    if pretrained.is_dir():
        candidates.append(pretrained / "scheduler" / "scheduler_config.json")
    else:
        candidates.append(Path(cfg.model.config_dir or CONFIG_DIR) / "scheduler" / "scheduler_config.json")
    for path in candidates:
        if path.is_file():
            try:
                config.update(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                pass
            break
    else:
        config.setdefault("steps_offset", 1)
    # drop _class_name / _diffusers_version: the sampler's class is chosen by name
    return {k: v for k, v in config.items() if not k.startswith("_")}


def make_scheduler(name: str, base_config: dict):
    import diffusers

    sampler = check_scheduler(name)
    cls = getattr(diffusers, sampler.cls)
    return cls.from_config({**base_config, **sampler.extra})


def load_model(
    cfg,
    trained: TrainedFiles | None = None,
    lora_scale: float = DEFAULT_LORA_SCALE,
    te_scale: float = DEFAULT_TE_SCALE,
    scheduler: str = DEFAULT_SCHEDULER,
    device: str | torch.device | None = "auto",
    precision: str | None = "auto",
) -> GenerationModel:
    """The pipeline with the tokens added and the LoRA merged (fp32 merge, then cast and move)."""
    from .export import apply_kohya_lora, load_lora, safetensors_file_hash
    from .models import ModelLoadError, load_stable_diffusion

    check_scheduler(scheduler)
    trained = trained if trained is not None else find_trained_files(cfg)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_precision(precision, dev)
    try:
        parts = load_stable_diffusion(cfg.model.pretrained, cfg.model.config_dir or None, cfg.model.offline)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot load model.pretrained = '{cfg.model.pretrained}': {_one_line(err)}") from None

    vectors = {w: _read_embedding(w, p, trained.lora) for w, p in trained.embeddings.items()}
    token_ids = add_embeddings(parts.tokenizer, parts.text_encoder, vectors)

    hashes: dict[str, str] = {}
    lora_name = None
    patched = 0
    if trained.lora is not None:
        lora_name = trained.lora.stem
        try:
            state, _meta = load_lora(trained.lora)
        except Exception as err:
            raise GenerationError(f"{trained.lora}: not a readable LoRA ({_one_line(err)})") from None
        try:
            patched = apply_kohya_lora(parts.unet, parts.text_encoder, state, unet_scale=lora_scale, te_scale=te_scale)
        except (KeyError, ValueError) as err:
            msg = _one_line(err).strip("'\"")
            raise GenerationError(
                f"{trained.lora} does not fit model.pretrained = '{cfg.model.pretrained}': {msg}"
            ) from None
        hashes["Lora hashes"] = f"{lora_name}: {safetensors_file_hash(trained.lora)[:12]}"
    ti = [f"{w}: {_sha256(p)[:12]}" for w, p in trained.embeddings.items() if p is not None]
    if ti:
        hashes["TI hashes"] = ", ".join(ti)

    from diffusers import StableDiffusionPipeline

    scheduler_config = _scheduler_base_config(cfg, parts)
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=make_scheduler(scheduler, scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dev)
    if dtype != torch.float32:  # merged in fp32 above; cast once, after the merge
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):
            part.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return GenerationModel(
        pipe=pipe,
        model_name=_a1111_model_name(parts.name),
        token_ids=token_ids,
        lora_name=lora_name,
        lora_modules=patched,
        lora_scale=float(lora_scale),
        te_scale=float(te_scale),
        hashes=hashes,
        device=dev,
        dtype=dtype,
        scheduler_config=scheduler_config,
        scheduler=scheduler,
    )


def _a1111_model_name(name: str) -> str:
    """A1111's "Model" field is the checkpoint's file name without its extension."""
    from .models import SINGLE_FILE_SUFFIXES

    path = Path(name)
    return path.stem if path.suffix.lower() in SINGLE_FILE_SUFFIXES else name


def _sha256(path: Path) -> str:
    from .export import file_sha256

    return file_sha256(path)


# --------------------------------------------------------------------------------------------------
# A1111 infotext
# --------------------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    """A1111's infotext quoting: values with a comma, colon or newline become JSON strings."""
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _num(x: float) -> str:
    return f"{x:g}"


def lora_tag(name: str, unet_scale: float, te_scale: float) -> str:
    """A1111's prompt tag; ``<lora:NAME:te=T:unet=U>`` sets the two multipliers separately."""
    if unet_scale == te_scale:
        return f"<lora:{name}:{_num(unet_scale)}>"
    return f"<lora:{name}:te={_num(te_scale)}:unet={_num(unet_scale)}>"


def infotext(
    prompt: str,
    negative: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    extra: dict[str, str] | None = None,
) -> str:
    """The "parameters" text A1111 writes into its PNGs (and parses back in PNG Info)."""
    fields = {
        "Steps": str(steps),
        "Sampler": sampler,
        "CFG scale": _num(cfg_scale),
        "Seed": str(seed),
        "Size": f"{width}x{height}",
        "Model": model,
        **(extra or {}),
    }
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None and v != "")
    text = prompt
    if negative:
        text += f"\nNegative prompt: {negative}"
    return f"{text}\n{line}"


_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """The inverse (A1111's parser, reduced): Prompt, Negative prompt and every key: value of the last line."""
    *lines, last = text.strip().split("\n")
    out: dict[str, str] = {}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out["Prompt"] = "\n".join(prompt)
    out["Negative prompt"] = "\n".join(negative)
    for key, value in _FIELD.findall(last):
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        out[key.strip()] = value
    return out


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------

_NUMBERED = re.compile(r"^(\d{5})-")


def _next_index(folder: Path) -> int:
    """A1111-style running number: one more than the largest NNNNN- prefix in the folder."""
    best = -1
    if folder.is_dir():
        for p in folder.iterdir():
            m = _NUMBERED.match(p.name)
            if m:
                best = max(best, int(m.group(1)))
    return best + 1


def save_png(image: Image.Image, path: Path, parameters: str | None) -> Path:
    """Write a PNG with a "parameters" text chunk to a hidden temporary name, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def image_grid(images: Sequence[Image.Image]) -> Image.Image:
    cols = max(1, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / cols)
    w = max(im.size[0] for im in images)
    h = max(im.size[1] for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


# --------------------------------------------------------------------------------------------------
# post-processing setup
# --------------------------------------------------------------------------------------------------


@dataclass
class PostProcessing:
    upscaler: object | None
    restorer: object | None
    upscale: float
    fidelity: float
    restore: str  # codeformer | gfpgan | none
    upscaler_name: str

    @property
    def active(self) -> bool:
        return self.upscaler is not None or self.restorer is not None or self.upscale != 1

    def infotext_fields(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        if self.upscaler is not None or self.upscale != 1:
            fields["Postprocess upscale by"] = _num(self.upscale)
            fields["Postprocess upscaler"] = self.upscaler_name
        if self.restorer is not None:
            fields["Face restoration"] = _RESTORER_ARCH[self.restore]
            if self.restore == "codeformer":
                fields["CodeFormer weight"] = _num(self.fidelity)
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
        from . import postprocess as pp

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
            raise GenerationError(_one_line(err)) from None
    if upscale is None:
        upscale = float(upscaler.scale) if upscaler is not None else 1.0
    return PostProcessing(upscaler, restorer, float(upscale), float(fidelity), restore, name)


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    """diffusers / transformers chatter (component loading bars, deprecation notes): off, process-wide."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ..."
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def _check_config(cfg) -> None:
    origin = getattr(cfg, "source_file", "") or "<config>"
    if not cfg.model.pretrained:
        raise ConfigError(f"{origin}: model.pretrained is empty: give the base model training used")
    words = _words(cfg)
    for key, word in zip(("tokens.source", "tokens.reference"), words):
        if not word or not word.replace("_", "").isalnum():
            raise ConfigError(f"{origin}: {key} = {word!r}: use one made-up word such as mcv1")
    if words[0] == words[1]:
        raise ConfigError(f"{origin}: tokens.source and tokens.reference must differ")


def generate(
    cfg,
    prompt: str | None = None,
    negative: str = "",
    n: int = 4,
    seed: int | None = None,
    steps: int = DEFAULT_STEPS,
    cfg_scale: float = DEFAULT_CFG,
    lora_scale: float = DEFAULT_LORA_SCALE,
    te_scale: float = DEFAULT_TE_SCALE,
    scheduler: str = DEFAULT_SCHEDULER,
    width: int | None = None,
    height: int | None = None,
    upscale: float | None = None,
    restore: str | None = None,
    restore_weights: str | os.PathLike | None = None,
    sr_weights: str | os.PathLike | None = None,
    fidelity: float = DEFAULT_FIDELITY,
    out_dir: str | os.PathLike | None = None,
    device: str | None = "auto",
    precision: str | None = "auto",
    batch_size: int = 1,
    use_lora: bool = True,
    grid: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    model: GenerationModel | None = None,
    quiet: bool = False,
) -> list[Path]:
    """Sample `n` images (image i with seed + i) with the trained files; returns the image paths.

    Files: ``<out_dir>/NNNNN-SEED.png`` (NNNNN continues the folder's numbering), ``grid-NNNNN.png`` (when
    n > 1 and `grid`), and with post-processing the samples before it in ``raw/``. `out_dir` defaults to
    ``<output.dir>/generated``; `width`/`height` to ``data.resolution``; `seed` to a random one (also for
    -1, as in A1111); `upscale` to 1 (or the Real-ESRGAN model's factor when `sr_weights` is given);
    `restore` to codeformer when `restore_weights` is given, else none.

    `model` (from `load_model`) skips loading: its LoRA scales (merged into the weights) then rule, and
    its sampler is switched to `scheduler`. `quiet` silences diffusers' and transformers' loading bars and
    notes (the CLI's choice; it changes their process-wide logging settings). User errors raise
    `GenerationError` / `ConfigError` / `ModelLoadError` with a one-line message, before any sampling.
    """
    from tqdm import tqdm

    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    _check_config(cfg)
    sampler = check_scheduler(scheduler)
    width = int(width or cfg.data.resolution)
    height = int(height or cfg.data.resolution)
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise GenerationError(f"width and height must be positive multiples of 8, got {width}x{height}")
    if n < 1 or steps < 1 or batch_size < 1:
        raise GenerationError("n, steps and batch size must be at least 1")
    if seed is None or seed == -1:
        seed = random.randrange(2**32)
    if not 0 <= seed < 2**64 - n:
        raise GenerationError(f"seed must be a non-negative integer, got {seed}")
    prompt = composed_prompt(cfg) if prompt is None or not prompt.strip() else prompt
    trained = find_trained_files(cfg, use_lora=use_lora) if model is None else None
    dev = model.device if model is not None else resolve_device(device)
    if model is None:
        resolve_precision(precision, dev)
    post = setup_postprocessing(upscale, restore, restore_weights, sr_weights, fidelity, dev)
    out = Path(out_dir) if out_dir else Path(cfg.output.dir) / "generated"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GenerationError(f"cannot create the output folder {out}: {_one_line(err)}") from None
    missing = [w for w in _words(cfg) if not re.search(rf"(?<![\w]){re.escape(w)}(?![\w])", prompt)]
    if missing:
        say(f"note: the prompt does not contain {' or '.join(missing)}: the trained token{'s' if len(missing) > 1 else ''} will not be used")

    if model is None:
        if quiet:
            quiet_libraries()
        model = load_model(cfg, trained, lora_scale, te_scale, scheduler, dev, precision)
    else:
        model.set_scheduler(scheduler)
    pipe = model.pipe

    shown_prompt = prompt
    if model.lora_name:
        shown_prompt = f"{prompt} {lora_tag(model.lora_name, model.lora_scale, model.te_scale)}"
    extra = dict(model.hashes)

    start = _next_index(out)
    paths: list[Path] = []
    finals: list[Image.Image] = []
    bar = tqdm(total=n, unit="img", desc="generate", disable=not progress, file=sys.stderr)
    try:
        for first in range(0, n, batch_size):
            count = min(batch_size, n - first)
            seeds = [seed + first + k for k in range(count)]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            with torch.inference_mode():
                images = pipe(
                    prompt,
                    negative_prompt=negative or None,
                    num_inference_steps=steps,
                    guidance_scale=cfg_scale,
                    width=width,
                    height=height,
                    num_images_per_prompt=count,
                    generator=generators if count > 1 else generators[0],
                ).images
            for k, (image, s) in enumerate(zip(images, seeds)):
                index = start + first + k
                name = f"{index:05d}-{s}.png"
                text = infotext(shown_prompt, negative, steps, sampler.a1111, cfg_scale, s, width, height,
                                model.model_name, extra)
                if post.active:
                    from .postprocess import postprocess as run_post

                    save_png(image, out / "raw" / name, text)
                    try:
                        image, notes = run_post(image, upscaler=post.upscaler, restorer=post.restorer,
                                                upscale=post.upscale, fidelity=post.fidelity)
                    except ValueError as err:
                        raise GenerationError(f"post-processing {name}: {_one_line(err)}") from None
                    for note in notes:
                        if first + k == 0 or note.startswith("no face"):
                            say(f"{name}: {note}")
                    text = infotext(shown_prompt, negative, steps, sampler.a1111, cfg_scale, s, width, height,
                                    model.model_name, {**extra, **post.infotext_fields()})
                paths.append(save_png(image, out / name, text))
                finals.append(image)
                bar.update(1)
    finally:
        bar.close()
    if grid and len(finals) > 1:
        first_text = infotext(shown_prompt, negative, steps, sampler.a1111, cfg_scale, seed, width, height,
                              model.model_name, {**extra, **(post.infotext_fields() if post.active else {})})
        save_png(image_grid(finals), out / f"grid-{start:05d}.png", first_text)
    return paths
