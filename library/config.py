"""The training configuration: TOML sections as dataclasses whose defaults are docs/method.md's.

Unknown keys, wrong types and missing paths are `ConfigError`s whose one-line message names the key,
the file and (for a typo) the closest valid key. Overrides from the command line use the same dotted
names: `phase2.steps=100`, `output.dir=out/x`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import toml

from library.files.atomic import write_text
from library.files.paths import looks_like_hub_id
from library.files.text import TextFileError, read_text_file
from library.files.messages import UserError, one_line


# Every choice-valued key, declared once: the config checks it here when it loads, the module that acts on
# it reads its values from here (typing.get_args), and tests check the two agree.
Task = Literal["source", "reference", "composed"]
IdTask = Literal["source", "composed"]  # the tasks with an identity to compare
Captions = Literal["template", "sidecar"]  # library/training/data.py
NormPull = Literal["renormalize", "penalty", "none"]  # library/training/tokens.py
LoraTargets = Literal["cross_attn", "attn_geglu", "kohya_all"]  # library/training/lora.py
CollapseAction = Literal["warn", "stop"]  # library/training/attention_guard.py
IdFace = Literal["landmarks", "detector"]  # library/training/identity_term.py
JointNormalisation = Literal["text", "joint"]  # library/training/joint_attention.py
AttentionBackend = Literal["sdpa", "xformers"]  # library/training/attention.py
MixedPrecision = Literal["no", "fp16", "bf16"]  # library/training/precision.py
SavePrecision = Literal["fp16", "bf16", "fp32"]  # library/models/loading.py DTYPES
Compile = Literal["auto", "on", "off"]  # library/training/speed.py

PATH = {"path": True}  # a key that names a file or folder: resolved to an absolute path when the config loads
# what an output name may not hold: path separators, what Windows refuses in a file name, control characters
_NAME_FORBIDDEN = set('/\\:*?"<>|') | {chr(c) for c in range(32)} | {chr(127)}


class ConfigError(UserError, ValueError):
    """A bad configuration; the message is one line that says what to change."""

    def __init__(self, message: str):
        # keys, values and file names quoted in the message come from the user's TOML: a quoted key may
        # hold a newline, and the message must stay one line whatever they hold
        super().__init__(one_line(message, 500))


@dataclass
class ModelConfig:
    """The base model."""

    pretrained: str = field(default="", metadata=PATH)  # diffusers folder, single .safetensors / .ckpt file, or hub id (online only)
    config_dir: str = field(default="", metadata=PATH)  # component configs + tokenizers for single files; default the family's (configs/sd15, configs/sdxl)
    offline: bool = True  # never reach the hub unless this is false
    # a VAE file (.safetensors, original or diffusers layout) or diffusers VAE folder that replaces the
    # checkpoint's; required when the checkpoint ships without one
    vae: str = field(default="", metadata=PATH)
    text_encoder: str = field(default="", metadata=PATH)  # Z-Image / Klein split files (pretrained = the transformer .safetensors): the Qwen3 text-encoder .safetensors
    tokenizer: str = field(default="", metadata=PATH)  # Z-Image / Klein split files: a Qwen3 tokenizer folder (tokenizer.json); unused for a diffusers folder


@dataclass
class DataConfig:
    """The prepared photo folders."""

    source_dir: str = field(default="", metadata=PATH)  # the source set (the person): a folder made by `dataset_tools.prepare source`
    reference_dir: str = field(default="", metadata=PATH)  # the reference set (the style): a folder made by `dataset_tools.prepare reference`
    resolution: int = 0  # training side, pixels; 0: the model family's (512 SD 1.x, 1024 SDXL)
    flip: bool = True  # cache horizontally flipped latents too
    captions: Captions = "template"  # "template": docs/method.md's template lists; "sidecar": NAME.txt
    min_images: int = 3  # fewer gives a warning (the paper uses 4-6)


@dataclass
class TokensConfig:
    """The two made-up tokens, [V1] (the person) and [V2] (the style)."""

    source: str = "mcv1"  # [V1], the person's made-up word (what you type in a prompt)
    reference: str = "mcv2"  # [V2], the style's made-up word
    source_init: str = "person"  # released code: [V1] starts from "person"
    reference_init: str = ""  # empty: random N(0, reference_init_std)
    reference_init_std: float = 0.017  # std of [V2]'s random start when reference_init is empty
    vectors: int = 1  # embedding vectors per token
    # released code, phase 1 only, after every step: |v| <- |v| + min(1, norm_rate * lr) (norm_target - |v|)
    norm_pull: NormPull = "renormalize"  # renormalize (released) | penalty (soft, both phases) | none
    norm_target: float = 0.4  # the norm the new vectors are pulled to (CLIP's word vectors are about 0.4)
    norm_rate: float = 100.0  # how fast the released code's pull moves them, x the learning rate
    norm_weight: float = 0.001  # weight of the soft penalty (norm_pull = "penalty")


@dataclass
class PhaseConfig:
    """One phase: phase 1 learns the token rows alone, phase 2 adds the LoRA and the composed task."""

    steps: int = 1200  # optimiser steps of the phase (phase 1: 1200, phase 2: 1500, the paper's)
    batch_size: int = 4  # samples per process in one optimiser step, spread over the phase's tasks (x processes: the step)
    grad_accum: int = 1  # micro-batches per step (only to save memory: the batch is the same)
    lr_embeddings: float = 5e-4  # learning rate of the token rows (phase 1: 5e-4, phase 2: 1e-5)
    lr_unet: float = 1e-4  # learning rate of the UNet LoRA (phase 2)
    lr_text_encoder: float = 4e-5  # learning rate of the text-encoder LoRA (phase 2)
    lr_scheduler: str = "linear"  # released: linear decay to 0, no warm-up; any diffusers.optimization name
    lr_warmup_steps: int = 0  # linear warm-up steps of the LR schedule
    max_timestep: int = 1000  # t ~ U(0, max_timestep)
    tasks: list[Task] = field(default_factory=lambda: ["source", "reference"])  # the tasks the phase trains in turn (the composed task needs phase 2's LoRA)
    first_half_weight: float = 2.0  # x this on the reconstruction term of reference/composed samples, first half (released)


def _phase2_default() -> PhaseConfig:
    return PhaseConfig(
        steps=1500,
        lr_embeddings=1e-5,
        max_timestep=800,
        tasks=["source", "reference", "composed"],
    )


@dataclass
class LoraConfig:
    """The LoRA of phase 2."""

    rank: int = 4  # LoRA rank r
    alpha: float = 4.0  # LoRA alpha: the weight change is alpha / r x up @ down
    targets: LoraTargets = "cross_attn"  # cross_attn (paper) | attn_geglu (released) | kohya_all
    text_encoder: bool = True  # also a LoRA on the text encoders' self-attention (the layers that reach the UNet)


@dataclass
class LossConfig:
    """The loss terms and their weights (docs/method.md)."""

    mask_eps: float = 0.01  # mask softening (m + eps) / (1 + eps)
    area_normalize: bool = True  # divide the masked reconstruction by the mask's area (eq. 4)
    attn_weight: float = 2.5  # weight of attention refocusing (eq. 5-6), phase 2
    attn_detach_extremes: bool = False  # true: the released literal S (min, max detached); shrinks attention
    attn_collapse_ratio: float = 0.1  # guard: EMA of a token's inside probability below this x its start; 0 = off
    attn_collapse_action: CollapseAction = "warn"  # warn (once per token) | stop (clean stop, last checkpoint kept)
    id_weight: float = 0.25  # weight of the identity loss (eq. 7), phase 2
    id_max_timestep: int = 800  # the identity loss applies where t < this (x0 is too noisy above)
    id_tasks: list[IdTask] = field(default_factory=lambda: ["source", "composed"])  # released; ["composed"]: paper
    identity_weights: str = field(default="", metadata=PATH)  # empty: dlib's ResNet v1 (face_recognition_models); or an ArcFace .onnx/.pth
    id_decode_window: bool = True  # decode only the latent window around the face
    id_face: IdFace = "landmarks"  # landmarks: the reference's stored ones | detector: find it on x0_hat (released)


@dataclass
class AttentionConfig:
    """Where attention refocusing looks, and how attention is computed."""

    # empty: the model family's (ModelFamily.capture_layers: SD 1.x's five 16x16 layers, SDXL's 32x32 ones);
    # else transformer models ("down_blocks.2.attentions.0": its first block's attn2) or full attn2 paths
    layers: list[str] = field(default_factory=list)
    backend: AttentionBackend = "sdpa"  # sdpa | xformers
    # flow-matching DiTs (joint text + image attention): "text" normalises a special token's logits over the
    # text keys only, "joint" takes its exact probability in the joint softmax (library/training/joint_attention.py)
    normalisation: JointNormalisation = "text"


@dataclass
class OptimizerConfig:
    """The optimiser."""

    name: str = "AdamW8bit"  # AdamW8bit | AdamW | SGD | Adafactor-free names of torch.optim
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's (beta1, beta2)
    eps: float = 1e-8  # Adam's epsilon
    max_grad_norm: float = 1.0  # clip the gradient norm to this; 0 = no clipping


@dataclass
class TrainConfig:
    """Speed, memory and precision; the seed."""

    seed: int = 42  # every random draw of the run (token init, LoRA init, samples, noise)
    mixed_precision: MixedPrecision = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False  # recompute the UNet's activations in the backward pass: less memory, slower
    # keep the VAE in fp32 under fp16 (kohya's no_half_vae); under fp16 an SDXL VAE whose config says
    # force_upcast (the original SDXL VAE does, the fp16-fix VAE does not) runs in fp32 anyway
    vae_fp32: bool = False
    compile: Compile = "auto"  # torch.compile the UNet: auto (on CUDA only) | on | off (library/training/speed.py)
    channels_last: bool = False  # NHWC weights for the UNet and VAE; same values, another memory order


@dataclass
class OutputConfig:
    """What the run writes, and where."""

    dir: str = field(default="out/magicapture", metadata=PATH)  # where the LoRA, embeddings, checkpoints, samples and logs go
    name: str = "magicapture"  # the LoRA's file name, NAME.safetensors (not a token word, not a path)
    save_every: int = 500  # a checkpoint every this many steps (and at the end of each phase); 0 = only there
    keep_checkpoints: int = 2  # how many checkpoints stay (the newest); 0 = all
    # phase 2: also export the LoRA and embeddings every this many steps, named by step as kohya does
    # (NAME-step00000500.safetensors), to keep the step where identity peaked; 0 = only at the end
    save_lora_every: int = 0
    save_precision: SavePrecision = "fp16"  # fp16 | bf16 | fp32
    embeddings_pt: bool = False  # also A1111's legacy .pt embeddings
    bundle_embeddings: bool = False  # bundle_emb.* inside the LoRA (A1111 only; ComfyUI warns)


@dataclass
class SampleConfig:
    """The preview samples during training."""

    every: int = 500  # preview samples and attention maps every this many steps; 0 = never
    prompt: str = ""  # empty: the composed training prompt
    steps: int = 30  # sampling steps of a preview
    cfg: float = 7.0  # classifier-free guidance scale of a preview
    n: int = 2  # preview images each time
    seed: int = 1234  # the previews' seed (the same every time, to compare steps)


@dataclass
class LoggingConfig:
    """Logs."""

    tensorboard: bool = True  # TensorBoard logs in OUT/logs
    every: int = 10  # TensorBoard interval (loss_history.jsonl gets every step)
    print_every: int = 100  # a log line with the loss terms and each token's attention figures; 0 = never


@dataclass
class EvaluationConfig:
    """Weights for the likeness and style scores."""

    clip: str = field(default="", metadata=PATH)  # CLIP ViT-L/14 folder (transformers layout) for the style and aesthetic scores; empty: skipped
    aesthetic: str = field(default="", metadata=PATH)  # LAION improved aesthetic predictor .pth (sac+logos+ava1-l14-linearMSE.pth); empty: skipped


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    phase1: PhaseConfig = field(default_factory=PhaseConfig)
    phase2: PhaseConfig = field(default_factory=_phase2_default)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    source_file: str = field(default="", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: dataclasses.asdict(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("internal")
        }




def composed_prompt(source: str, reference: str) -> str:
    """docs/method.md's composed prompt: what previews, generate.py and the LoRA's metadata default to."""
    return f"a photo of a {source} person in the style of {reference}"


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _choices(values: tuple[str, ...]) -> str:
    """'a, b or c'."""
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field type; ints are accepted for floats; a Literal's value
    must be one of its choices ("<where> = 'x': use a, b or c (did you mean 'b'?)")."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        allowed = typing.get_args(kind)
        if not isinstance(value, str) or value not in allowed:
            near = _closest(value, list(allowed)) if isinstance(value, str) else ""
            raise ConfigError(f"{where} = {value!r}: use {_choices(allowed)}{near}")
        return value
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str) and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    sections = [f.name for f in dataclasses.fields(cfg) if not f.metadata.get("internal")]
    if section not in sections:
        raise ConfigError(f"{origin}: unknown section [{section}]{_closest(section, sections)}")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise ConfigError(f"{origin}: unknown key '{section}.{key}'{_closest(key, list(hints))}")
    if (section, key) == ("train", "compile") and isinstance(value, bool):  # it was a bool before "auto"
        value = "on" if value else "off"
    setattr(obj, key, _coerce(value, hints[key], f"{origin}: {section}.{key}"))


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{text}': write section.key=value, e.g. phase2.steps=100")
    name, raw = text.split("=", 1)
    section, key = name.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # RecursionError: arrays nested ~1000 deep
        value = raw  # bare strings: output.dir=out/x
    return section, key, value


def path_keys() -> list[str]:
    """The dotted names of the keys that name a file or folder (``model.pretrained``, ``data.source_dir``,
    ``output.dir``, ...): the fields marked ``PATH``."""
    sections = typing.get_type_hints(Config)
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(Config) if not section.metadata.get("internal")
            for f in dataclasses.fields(sections[section.name]) if f.metadata.get("path")]


def resolve_path(value: str) -> str:
    """A path key's value as an absolute path: ``~`` expanded, relative to the working directory (the rule of
    kohya's scripts), ``..`` folded, links kept. Empty stays empty."""
    return os.path.abspath(os.path.expanduser(value)) if value else value


def resolve_paths(cfg: Config) -> None:
    """Make every path key of `cfg` absolute (:func:`resolve_path`) in place, so that what the run records
    (effective_config.toml, each checkpoint's config.toml) reads the same from any working directory.
    A model.pretrained that is a hub id (``owner/name``, not on disk) is left as it is."""
    for dotted in path_keys():
        section, key = dotted.split(".")
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if dotted == "model.pretrained" and looks_like_hub_id(value):
            continue
        setattr(obj, key, resolve_path(value))


def _check_output_name(name: str, origin: str) -> None:
    """output.name becomes file names (NAME.safetensors, NAME-step00000500.safetensors): one plain name."""
    bad = sorted({c for c in name if c in _NAME_FORBIDDEN})
    if not name.strip():
        raise ConfigError(f"{origin}: output.name is empty: give the LoRA a name, e.g. my_portrait "
                          f"(it becomes my_portrait.safetensors)")
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise ConfigError(f"{origin}: output.name = {name!r} holds {shown}: a file name, not a path; put the folder "
                          f"in output.dir and a plain name here, e.g. my_portrait")
    if name.startswith(".") or name != name.strip() or name.endswith("."):
        raise ConfigError(f"{origin}: output.name = {name!r}: a name may not start with a dot (a hidden file) or start "
                          f"or end with a space or a dot; use e.g. my_portrait")
    if len(name.encode("utf-8")) > 200:
        raise ConfigError(f"{origin}: output.name is {len(name.encode('utf-8'))} bytes long: file systems allow 255 "
                          f"with the step suffix and extension; use a shorter name")


_ESCAPE_ERRORS = ("Invalid hex value", "Unescaped '\\'", "escape")
WINDOWS_PATH_HINT = ("a backslash inside double quotes starts an escape in TOML: write Windows paths in single "
                     "quotes ('C:\\Users\\me\\model.safetensors') or with forward slashes (\"C:/Users/me/model.safetensors\")")


def validate(cfg: Config, origin: str) -> None:
    for phase_name in ("phase1", "phase2"):
        phase = getattr(cfg, phase_name)
        if phase.steps < 0 or phase.batch_size < 1 or phase.grad_accum < 1:
            raise ConfigError(f"{origin}: {phase_name}: steps >= 0, batch_size >= 1 and grad_accum >= 1 please")
        if phase.batch_size % phase.grad_accum:
            raise ConfigError(f"{origin}: {phase_name}.batch_size must be a multiple of grad_accum")
    if cfg.output.save_lora_every < 0:
        raise ConfigError(f"{origin}: output.save_lora_every = {cfg.output.save_lora_every}: use 0 (off) or a step count")
    if "composed" in cfg.phase1.tasks:
        raise ConfigError(f"{origin}: phase1.tasks: the composed task needs the LoRA phase (phase2) only")
    _check_output_name(cfg.output.name, origin)
    for dotted in path_keys():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if any(c in value for c in "\t\n\r\b\f\v"):  # "C:\temp" in double quotes is C:<tab>emp
            raise ConfigError(f"{origin}: {dotted} = {value!r} holds a control character; {WINDOWS_PATH_HINT}")
    if cfg.tokens.source == cfg.tokens.reference:
        raise ConfigError(f"{origin}: tokens.source and tokens.reference must differ")
    for name in ("source", "reference"):
        word = getattr(cfg.tokens, name)
        if not word or not word.replace("_", "").isalnum() or " " in word:
            raise ConfigError(f"{origin}: tokens.{name} = {word!r}: use one made-up word such as mcv1")
    if cfg.data.resolution < 0 or cfg.data.resolution % 8:
        raise ConfigError(f"{origin}: data.resolution = {cfg.data.resolution}: use a multiple of 8 (e.g. 512 or 1024), "
                          f"or 0 for the model's own")
    if not 0 <= cfg.loss.attn_collapse_ratio < 1:
        raise ConfigError(f"{origin}: loss.attn_collapse_ratio must be in [0, 1) (0 turns the guard off)")
    if not cfg.model.pretrained:
        raise ConfigError(f"{origin}: model.pretrained is empty: give a diffusers folder or an SD 1.x or SDXL .safetensors")
    for key, value in (("data.source_dir", cfg.data.source_dir), ("data.reference_dir", cfg.data.reference_dir)):
        if not value:
            raise ConfigError(f"{origin}: {key} is empty: point it at a folder made by dataset_tools.prepare")
        if not Path(value).is_dir():
            raise ConfigError(f"{origin}: {key} = '{value}' is not a folder")
    if cfg.model.vae and not Path(cfg.model.vae).exists():
        raise ConfigError(f"{origin}: model.vae = '{cfg.model.vae}' does not exist; give a VAE .safetensors file or folder")
    if cfg.loss.identity_weights and not Path(cfg.loss.identity_weights).is_file():
        raise ConfigError(f"{origin}: loss.identity_weights = '{cfg.loss.identity_weights}' does not exist")
    for key, value in (("model.config_dir", cfg.model.config_dir), ("evaluation.clip", cfg.evaluation.clip)):
        if value and not Path(value).is_dir():
            raise ConfigError(f"{origin}: {key} = '{value}' is not a folder; give a diffusers / transformers model folder")
    if cfg.evaluation.aesthetic and not Path(cfg.evaluation.aesthetic).is_file():
        raise ConfigError(f"{origin}: evaluation.aesthetic = '{cfg.evaluation.aesthetic}' does not exist")


def load_config(path: str | Path | None, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Read a TOML file and `overrides` (``section.key=value``) into a Config.

    Relative paths (in the file or the overrides) are relative to the working directory, as in kohya's
    scripts, and are made absolute here (:func:`resolve_paths`): the Config, and everything a run writes
    from it, holds absolute paths. With `check_paths`, :func:`validate` also checks that the input
    folders and files exist. Raises ConfigError (one line naming the file and the key).
    """
    cfg = Config()
    origin = str(path) if path else "<defaults>"
    if path is not None:
        try:
            data = tomllib.loads(read_text_file(path))
        except FileNotFoundError as err:
            raise ConfigError(f"config file '{path}' does not exist") from err
        except TextFileError as err:
            raise ConfigError(str(err)) from err
        except tomllib.TOMLDecodeError as err:
            hint = f"; {WINDOWS_PATH_HINT}" if any(e in str(err) for e in _ESCAPE_ERRORS) else ""
            raise ConfigError(f"{path}: not valid TOML: {err}{hint}") from err
        except RecursionError as err:  # tomllib parses nested arrays and inline tables recursively
            raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from err
        for section, values in data.items():
            if not isinstance(values, dict):
                _apply(cfg, section, "", values, origin)  # raises: top-level keys are not allowed
            for key, value in values.items():
                _apply(cfg, section, key, value, origin)
    for text in overrides:
        section, key, value = _parse_override(text)
        _apply(cfg, section, key, value, "command line")
    cfg.source_file = origin
    resolve_paths(cfg)
    if check_paths:
        validate(cfg, origin)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as TOML (UTF-8) to `path`, atomically."""
    write_text(path, toml.dumps(cfg.to_dict()))
