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
from typing import Any

import toml

from library.files.atomic import write_text
from library.files.text import TextFileError, read_text_file
from library.files.messages import one_line


PATH = {"path": True}  # a key that names a file or folder: resolved to an absolute path when the config loads
# what an output name may not hold: path separators, what Windows refuses in a file name, control characters
_NAME_FORBIDDEN = set('/\\:*?"<>|') | {chr(c) for c in range(32)} | {chr(127)}


class ConfigError(ValueError):
    """A bad configuration; the message is one line that says what to change."""

    def __init__(self, message: str):
        # keys, values and file names quoted in the message come from the user's TOML: a quoted key may
        # hold a newline, and the message must stay one line whatever they hold
        super().__init__(one_line(message, 500))


@dataclass
class ModelConfig:
    pretrained: str = field(default="", metadata=PATH)  # diffusers folder, single .safetensors / .ckpt file, or hub id (online only)
    config_dir: str = field(default="", metadata=PATH)  # component configs + tokenizers for single files; default the family's (configs/sd15, configs/sdxl)
    offline: bool = True  # never reach the hub unless this is false
    # a VAE file (.safetensors, original or diffusers layout) or diffusers VAE folder that replaces the
    # checkpoint's; required when the checkpoint ships without one
    vae: str = field(default="", metadata=PATH)


@dataclass
class DataConfig:
    source_dir: str = field(default="", metadata=PATH)
    reference_dir: str = field(default="", metadata=PATH)
    resolution: int = 0  # training side, pixels; 0: the model family's (512 SD 1.x, 1024 SDXL)
    flip: bool = True  # cache horizontally flipped latents too
    captions: str = "template"  # "template": docs/method.md's template lists; "sidecar": NAME.txt
    min_images: int = 3  # fewer gives a warning (the paper uses 4-6)


@dataclass
class TokensConfig:
    source: str = "mcv1"
    reference: str = "mcv2"
    source_init: str = "person"  # released code: [V1] starts from "person"
    reference_init: str = ""  # empty: random N(0, reference_init_std)
    reference_init_std: float = 0.017
    vectors: int = 1
    # released code, phase 1 only, after every step: |v| <- |v| + min(1, norm_rate * lr) (norm_target - |v|)
    norm_pull: str = "renormalize"  # renormalize (released) | penalty (soft, both phases) | none
    norm_target: float = 0.4
    norm_rate: float = 100.0
    norm_weight: float = 0.001  # weight of the soft penalty (norm_pull = "penalty")


@dataclass
class PhaseConfig:
    steps: int = 1200
    batch_size: int = 4  # samples per process in one optimiser step, spread over the phase's tasks (x processes: the step)
    grad_accum: int = 1  # micro-batches per step (only to save memory: the batch is the same)
    lr_embeddings: float = 5e-4
    lr_unet: float = 1e-4
    lr_text_encoder: float = 4e-5
    lr_scheduler: str = "linear"  # released: linear decay to 0, no warm-up; any diffusers.optimization name
    lr_warmup_steps: int = 0
    max_timestep: int = 1000  # t ~ U(0, max_timestep)
    tasks: list[str] = field(default_factory=lambda: ["source", "reference"])
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
    rank: int = 4
    alpha: float = 4.0
    targets: str = "cross_attn"  # cross_attn (paper) | attn_geglu (released) | kohya_all
    text_encoder: bool = True


@dataclass
class LossConfig:
    mask_eps: float = 0.01  # mask softening (m + eps) / (1 + eps)
    area_normalize: bool = True
    attn_weight: float = 2.5
    attn_detach_extremes: bool = False  # true: the released literal S (min, max detached); shrinks attention
    attn_collapse_ratio: float = 0.1  # guard: EMA of a token's inside probability below this x its start; 0 = off
    attn_collapse_action: str = "warn"  # warn (once per token) | stop (clean stop, last checkpoint kept)
    id_weight: float = 0.25
    id_max_timestep: int = 800
    id_tasks: list[str] = field(default_factory=lambda: ["source", "composed"])  # released; ["composed"]: paper
    identity_weights: str = field(default="", metadata=PATH)  # empty: dlib's ResNet v1 (face_recognition_models); or an ArcFace .onnx/.pth
    id_decode_window: bool = True  # decode only the latent window around the face
    id_face: str = "landmarks"  # landmarks: the reference's stored ones | detector: find it on x0_hat (released)


@dataclass
class AttentionConfig:
    # empty: the model family's (ModelFamily.capture_layers: SD 1.x's five 16x16 layers, SDXL's 32x32 ones);
    # else transformer models ("down_blocks.2.attentions.0": its first block's attn2) or full attn2 paths
    layers: list[str] = field(default_factory=list)
    backend: str = "sdpa"  # sdpa | xformers


@dataclass
class OptimizerConfig:
    name: str = "AdamW8bit"  # AdamW8bit | AdamW | SGD | Adafactor-free names of torch.optim
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    seed: int = 42
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    # keep the VAE in fp32 under fp16 (kohya's no_half_vae); under fp16 an SDXL VAE whose config says
    # force_upcast (the original SDXL VAE does, the fp16-fix VAE does not) runs in fp32 anyway
    vae_fp32: bool = False
    compile: str = "auto"  # torch.compile the UNet: auto (on CUDA only) | on | off (library/training/speed.py)
    channels_last: bool = False  # NHWC weights for the UNet and VAE; same values, another memory order


@dataclass
class OutputConfig:
    dir: str = field(default="out/magicapture", metadata=PATH)
    name: str = "magicapture"
    save_every: int = 500
    keep_checkpoints: int = 2
    # phase 2: also export the LoRA and embeddings every this many steps, named by step as kohya does
    # (NAME-step00000500.safetensors), to keep the step where identity peaked; 0 = only at the end
    save_lora_every: int = 0
    save_precision: str = "fp16"  # fp16 | bf16 | fp32
    embeddings_pt: bool = False  # also A1111's legacy .pt embeddings
    bundle_embeddings: bool = False  # bundle_emb.* inside the LoRA (A1111 only; ComfyUI warns)


@dataclass
class SampleConfig:
    every: int = 500
    prompt: str = ""  # empty: the composed training prompt
    steps: int = 30
    cfg: float = 7.0
    n: int = 2
    seed: int = 1234


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    every: int = 10  # TensorBoard interval (loss_history.jsonl gets every step)
    print_every: int = 100  # a log line with the loss terms and each token's attention figures; 0 = never


@dataclass
class EvaluationConfig:
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


_TASKS = ("source", "reference", "composed")


def composed_prompt(source: str, reference: str) -> str:
    """docs/method.md's composed prompt: what previews, generate.py and the LoRA's metadata default to."""
    return f"a photo of a {source} person in the style of {reference}"


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(kind)
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


def _looks_like_hub_id(value: str) -> bool:
    """'runwayml/stable-diffusion-v1-5': an `owner/name` that is not on disk and not written as a path."""
    return (not Path(value).expanduser().exists() and value.count("/") == 1 and not Path(value).suffix
            and not value.startswith((".", "/", "~")))


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
        if dotted == "model.pretrained" and _looks_like_hub_id(value):
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
        for task in phase.tasks:
            if task not in _TASKS:
                raise ConfigError(f"{origin}: {phase_name}.tasks: unknown task '{task}'{_closest(task, list(_TASKS))}")
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
    if cfg.data.captions not in ("template", "sidecar"):
        raise ConfigError(f"{origin}: data.captions = {cfg.data.captions!r}: use template or sidecar")
    if cfg.train.compile not in ("auto", "on", "off"):
        raise ConfigError(f"{origin}: train.compile = {cfg.train.compile!r}: use auto, on or off")
    if cfg.train.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"{origin}: train.mixed_precision must be no, fp16 or bf16")
    if cfg.output.save_precision not in ("fp16", "bf16", "fp32"):
        raise ConfigError(f"{origin}: output.save_precision must be fp16, bf16 or fp32")
    if cfg.lora.targets not in ("cross_attn", "attn_geglu", "kohya_all"):
        raise ConfigError(f"{origin}: lora.targets = {cfg.lora.targets!r}: use cross_attn, attn_geglu or kohya_all")
    for task in cfg.loss.id_tasks:
        if task not in ("source", "composed"):
            raise ConfigError(f"{origin}: loss.id_tasks: '{task}' has no identity to compare; use source and/or composed")
    if cfg.loss.attn_collapse_action not in ("warn", "stop"):
        raise ConfigError(f"{origin}: loss.attn_collapse_action must be warn or stop")
    if not 0 <= cfg.loss.attn_collapse_ratio < 1:
        raise ConfigError(f"{origin}: loss.attn_collapse_ratio must be in [0, 1) (0 turns the guard off)")
    if cfg.tokens.norm_pull not in ("renormalize", "penalty", "none"):
        raise ConfigError(f"{origin}: tokens.norm_pull must be renormalize, penalty or none")
    if cfg.loss.id_face not in ("landmarks", "detector"):
        raise ConfigError(f"{origin}: loss.id_face must be landmarks or detector")
    if cfg.attention.backend not in ("sdpa", "xformers"):
        raise ConfigError(f"{origin}: attention.backend must be sdpa or xformers")
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
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' does not exist") from None
        except TextFileError as err:
            raise ConfigError(str(err)) from None
        except tomllib.TOMLDecodeError as err:
            hint = f"; {WINDOWS_PATH_HINT}" if any(e in str(err) for e in _ESCAPE_ERRORS) else ""
            raise ConfigError(f"{path}: not valid TOML: {err}{hint}") from None
        except RecursionError:  # tomllib parses nested arrays and inline tables recursively
            raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
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
