"""Sampling with the trained files: base model + the two embeddings + the LoRA, then optional post-processing.

What `generate()` does (docs/method.md, "Inference and post-processing"; released: Euler ancestral, 50 steps,
CFG 7, LoRA 0.6 on the UNet and 0.9 on the text encoder):

1. checks everything a user can get wrong *before* loading anything heavy: the sampler name, the size,
   the trained files (``<output.dir>/<output.name>.safetensors`` and ``<output.dir>/<token>.safetensors``),
   the post-processing weights (loaded, so a wrong file fails before any sampling);
2. loads the base model from the config's ``[model]`` exactly as training does (offline by default);
3. adds each token to the tokenizer (``word``, ``word_1``, ... for multi-vector embeddings, the rule of
   training and of diffusers' textual inversion loader) and writes the saved vectors into new rows of the
   token-embedding table;
   (SDXL: into both tokenizers and text encoders, ``clip_l`` and ``clip_g``);
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

A flow-matching transformer base (Z-Image, FLUX.2 Klein 4B / 9B; identified from its files) goes through
library/generation/dit_generation.py instead at steps 2-4 (its pipeline, diffusers' own LoRA loader, the
Qwen3 tokens) with its family's sampler settings (library/generation/dit_sampling.py); step 5 is shared.

This module is the orchestration (`load_model`, `generate`); the parts live beside it and every name is
re-exported here: generation_options (GenerationError, defaults, device, precision, post-processing
setup), trained_files (finding the files, adding the embeddings), samplers (the sampler table and the
model's scheduler config) and infotext (A1111's "parameters" text, short hashes, the PNGs carrying it).
"""

from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from library.config import ConfigError
from library.files.atomic import ensure_folder
from library.models.dit_family import DitFamily
from library.models.family import SD1, ModelFamily
from library.generation.dit_generation import check_dit_scheduler, dit_family_of, load_dit_pipeline
from library.generation.dit_generation import token_ids as dit_token_ids
from library.generation.dit_sampling import DEFAULT_DIT_LORA_SCALE, DIT_SAMPLING, FLOW_SAMPLER_NAME, unknown_variant_note
from library.generation.options import (
    DEFAULT_CFG,
    DEFAULT_FIDELITY,
    DEFAULT_LORA_SCALE,
    DEFAULT_STEPS,
    DEFAULT_TE_SCALE,
    RESTORERS,
    GenerationError,
    PostProcessing,
    default_side,
    one_line,
    resolve_device,
    resolve_precision,
    setup_postprocessing,
)
from library.export.infotext import a1111_hashes, a1111_model_name, image_grid, infotext, lora_tag, parse_infotext, save_png
from library.generation.samplers import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    Sampler,
    check_scheduler,
    make_scheduler,
    scheduler_base_config,
    scheduler_names,
)
from library.generation.trained_files import (
    TrainedFiles,
    add_embeddings,
    composed_prompt,
    find_trained_files,
    read_embedding,
    trained_tokens,
)

# Everything this module offered before it was split (generate.py and the tests import from here).
__all__ = [
    # defined here
    "GenerationModel", "generate", "image_grid", "load_model", "quiet_libraries",
    # generation_options
    "DEFAULT_CFG", "DEFAULT_FIDELITY", "DEFAULT_LORA_SCALE", "DEFAULT_STEPS", "DEFAULT_TE_SCALE", "RESTORERS",
    "GenerationError", "PostProcessing", "resolve_device", "resolve_precision", "setup_postprocessing",
    # samplers
    "DEFAULT_SCHEDULER", "SCHEDULERS", "Sampler", "check_scheduler", "make_scheduler", "scheduler_names",
    # trained_files
    "TrainedFiles", "add_embeddings", "composed_prompt", "find_trained_files",
    # infotext
    "infotext", "lora_tag", "parse_infotext", "save_png",
]


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationModel:
    """A loaded pipeline and what the "parameters" text needs to describe it; reusable across generate()."""

    pipe: object  # the family's diffusers pipeline (StableDiffusionPipeline / StableDiffusionXLPipeline)
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
    family: ModelFamily | DitFamily = SD1  # what the base model was identified as (default size, names)
    default_steps: int = DEFAULT_STEPS  # what generate() samples with when not told
    default_cfg: float = DEFAULT_CFG
    defaults_note: str = ""  # said when the defaults are used and their variant was guessed
    size_multiple: int = 8  # image sides must be multiples of this
    sampler_call: Callable | None = None  # a DiT base's DitSampler; None: the Stable Diffusion pipeline call
    fixed_sampler: Sampler | None = None  # a DiT base's one sampler; None: any of SCHEDULERS

    def set_scheduler(self, name: str | None) -> None:
        """Switch the sampler (schedulers hold no weights: cheap, no reload); None: the default one."""
        if self.fixed_sampler is not None:
            check_dit_scheduler(name)
            return
        name = name or DEFAULT_SCHEDULER
        if name != self.scheduler:
            self.pipe.scheduler = make_scheduler(name, self.scheduler_config)
            self.scheduler = name

    def runs_cfg(self, cfg: float) -> bool:
        """Whether sampling at guidance `cfg` runs classifier-free guidance, the only use of a negative prompt
        (Stable Diffusion pipelines: above 1; a DiT base: its family's rule)."""
        return self.sampler_call.runs_cfg(cfg) if self.sampler_call is not None else cfg > 1

    @property
    def sampler(self) -> Sampler:
        """The sampler in use (its A1111 name goes into "parameters")."""
        return self.fixed_sampler or check_scheduler(self.scheduler)

    def sample(self, prompt: str, negative: str, steps: int, cfg: float, width: int, height: int, count: int,
               generator, output_type: str = "pil") -> list:
        """`count` images (PIL, or a [count, 3, H, W] tensor in [0, 1] for output_type "pt") of `prompt`;
        `generator`: one CPU generator, or a list of `count` (image i from generator i)."""
        if self.sampler_call is not None:
            return self.sampler_call(prompt, negative, steps, cfg, width, height, count, generator, output_type)
        return self.pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=cfg,
                         width=width, height=height, num_images_per_prompt=count, generator=generator,
                         output_type=output_type).images


def load_model(
    cfg,
    trained: TrainedFiles | None = None,
    lora_scale: float | None = None,
    te_scale: float | None = None,
    scheduler: str | None = None,
    device: str | torch.device | None = "auto",
    precision: str | None = "auto",
) -> GenerationModel:
    """The pipeline with the tokens added and the LoRA merged (fp32 merge, then cast and move).

    The base model's family (SD 1.x or SDXL, read from the model) picks the pipeline class, the
    embedding tensors each text encoder gets and the LoRA's names; a Z-Image / FLUX.2 Klein base is
    loaded by :func:`_load_dit_model`. `lora_scale` / `te_scale` / `scheduler` None: the base's defaults
    (Stable Diffusion: 0.6 / 0.9 / euler_a). GenerationError / ModelLoadError (one line) for files that
    do not fit the model.
    """
    from library.export.kohya import apply_kohya_lora, load_lora
    from library.models.loading import ModelLoadError, load_stable_diffusion

    dit = dit_family_of(cfg)
    if dit is not None:
        return _load_dit_model(cfg, dit, trained, lora_scale, scheduler, device, precision)
    scheduler = scheduler or DEFAULT_SCHEDULER
    lora_scale = DEFAULT_LORA_SCALE if lora_scale is None else lora_scale
    te_scale = DEFAULT_TE_SCALE if te_scale is None else te_scale
    check_scheduler(scheduler)
    trained = trained if trained is not None else find_trained_files(cfg)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_precision(precision, dev)
    try:
        parts = load_stable_diffusion(cfg.model.pretrained, cfg.model.config_dir or None, cfg.model.offline, vae=cfg.model.vae)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot load model.pretrained = '{cfg.model.pretrained}': {one_line(err)}") from err

    family = parts.family
    vectors = {w: read_embedding(w, p, trained.lora, family) for w, p in trained.embeddings.items()}
    token_ids = add_embeddings(parts.tokenizers, parts.text_encoders, vectors, family)

    lora_name = None
    patched = 0
    if trained.lora is not None:
        lora_name = trained.lora.stem
        try:
            state, _meta = load_lora(trained.lora)
        except Exception as err:
            raise GenerationError(f"{trained.lora}: not a readable LoRA ({one_line(err)})") from err
        try:
            patched = apply_kohya_lora(parts.unet, parts.text_encoders, state, unet_scale=lora_scale,
                                       te_scale=te_scale, family=family)
        except ValueError as err:  # names, shapes or tensors that do not fit: nothing was merged
            raise GenerationError(
                f"{trained.lora} does not fit model.pretrained = '{cfg.model.pretrained}': {one_line(err)}"
            ) from err
    # hashed after the merge: a LoRA that does not fit fails before its file is read a second time
    hashes = a1111_hashes(trained.lora, trained.embeddings)

    scheduler_config = scheduler_base_config(cfg, parts)
    pipe = family.assemble_pipeline(parts.unet, parts.vae, make_scheduler(scheduler, scheduler_config),
                                    parts.text_encoders, parts.tokenizers)
    pipe.to(dev)
    if dtype != torch.float32:  # merged in fp32 above; cast once, after the merge
        for part in (getattr(pipe, family.denoiser), pipe.vae, *parts.text_encoders):
            part.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return GenerationModel(
        pipe=pipe,
        model_name=a1111_model_name(parts.name),
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
        family=family,
    )


def _load_dit_model(cfg, family: DitFamily, trained: TrainedFiles | None, lora_scale: float | None,
                    scheduler: str | None, device, precision: str | None) -> GenerationModel:
    """load_model for a flow-matching transformer base (library/generation/dit_generation.py): the LoRA
    through diffusers' loader at `lora_scale` (default 1, as trained; there is no text-encoder LoRA), the
    family's sampler and settings (library/generation/dit_sampling.py); "auto" precision is bf16 on CUDA."""
    from library.models.loading import ModelLoadError

    check_dit_scheduler(scheduler)
    sampling = DIT_SAMPLING[family.name]
    trained = trained if trained is not None else find_trained_files(cfg)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_precision(precision, dev)
    if precision in (None, "", "auto") and dev.type == "cuda":
        dtype = sampling.cuda_dtype
    scale = DEFAULT_DIT_LORA_SCALE if lora_scale is None else float(lora_scale)
    try:
        sampler, parts, patched = load_dit_pipeline(cfg, family, trained.lora, trained.embeddings, scale, dev, dtype)
    except (GenerationError, ModelLoadError):
        raise
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot load model.pretrained = '{cfg.model.pretrained}': {one_line(err)}") from err
    defaults = sampler.defaults
    return GenerationModel(
        pipe=sampler.pipe,
        model_name=a1111_model_name(parts.name),
        token_ids=dit_token_ids(parts.tokenizer, sampler.vector_counts),
        lora_name=trained.lora.stem if trained.lora is not None else None,
        lora_modules=patched,
        lora_scale=scale,
        te_scale=scale,  # no text-encoder LoRA: one multiplier in the <lora:...> tag
        hashes=a1111_hashes(trained.lora, trained.embeddings),
        device=dev,
        dtype=dtype,
        scheduler=FLOW_SAMPLER_NAME,
        family=family,
        default_steps=defaults.steps,
        default_cfg=defaults.cfg,
        defaults_note="" if sampler.variant_known else unknown_variant_note(sampling),
        size_multiple=sampler.size_multiple,
        sampler_call=sampler,
        fixed_sampler=sampling.sampler,
    )


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
    """The config keys generation reads (base model, token words), checked with one-line ConfigErrors."""
    origin = getattr(cfg, "source_file", "") or "<config>"
    if not cfg.model.pretrained:
        raise ConfigError(f"{origin}: model.pretrained is empty: give the base model training used")
    words = trained_tokens(cfg)
    for key, word in zip(("tokens.source", "tokens.reference"), words):
        if not word or not word.replace("_", "").isalnum():
            raise ConfigError(f"{origin}: {key} = {word!r}: use one made-up word such as mcv1")
    if words[0] == words[1]:
        raise ConfigError(f"{origin}: tokens.source and tokens.reference must differ")


def _check_size(width: int, height: int, multiple: int = 8) -> None:
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise GenerationError(f"width and height must be positive multiples of {multiple}, got {width}x{height}")


def generate(
    cfg,
    prompt: str | None = None,
    negative: str = "",
    n: int = 4,
    seed: int | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    lora_scale: float | None = None,
    te_scale: float | None = None,
    scheduler: str | None = None,
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
    ``<output.dir>/generated``; `width`/`height` to ``data.resolution`` when the config sets it, else the
    model family's (512 SD 1.x, 1024 SDXL; :func:`default_side`); `seed` to a random one (also for
    -1, as in A1111); `upscale` to 1 (or the Real-ESRGAN model's factor when `sr_weights` is given);
    `restore` to codeformer when `restore_weights` is given, else none.

    `steps`, `cfg_scale`, `lora_scale`, `te_scale`, `scheduler`: None is the base's default (Stable
    Diffusion: 50, 7, 0.6, 0.9, euler_a; a Z-Image / FLUX.2 Klein base: its family's and variant's,
    library/generation/dit_sampling.py, LoRA 1, its one flow-matching Euler sampler).

    `model` (from `load_model`) skips loading: its LoRA scales (merged into the weights) then rule, and
    its sampler is switched to `scheduler`. `quiet` silences diffusers' and transformers' loading bars and
    notes (the CLI's choice; it changes their process-wide logging settings). User errors raise
    `GenerationError` / `ConfigError` / `ModelLoadError` with a one-line message, before any sampling.
    """
    from tqdm import tqdm

    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    _check_config(cfg)
    flow = model.fixed_sampler is not None if model is not None else dit_family_of(cfg) is not None
    if flow:
        check_dit_scheduler(scheduler)
    else:
        check_scheduler(scheduler or DEFAULT_SCHEDULER)
    _check_size(width or 8, height or 8)  # the defaults come from the model, once it is loaded
    if n < 1 or (steps is not None and steps < 1) or batch_size < 1:
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
        ensure_folder(out)  # a read-only or full disk: one OutputWriteError line
    except OSError as err:
        raise GenerationError(f"cannot create the output folder {out}: {one_line(err)}") from err
    missing = [w for w in trained_tokens(cfg) if not re.search(rf"(?<![\w]){re.escape(w)}(?![\w])", prompt)]
    if missing:
        say(f"note: the prompt does not contain {' or '.join(missing)}: the trained token{'s' if len(missing) > 1 else ''} will not be used")

    if model is None:
        if quiet:
            quiet_libraries()
        model = load_model(cfg, trained, lora_scale, te_scale, scheduler, dev, precision)
    else:
        model.set_scheduler(scheduler)
    sampler = model.sampler
    if (steps is None or cfg_scale is None) and model.defaults_note:
        say(model.defaults_note)
    steps = model.default_steps if steps is None else int(steps)
    cfg_scale = model.default_cfg if cfg_scale is None else float(cfg_scale)
    if negative and not model.runs_cfg(cfg_scale):
        say(f"note: no classifier-free guidance at CFG {cfg_scale:g} with this model: the negative prompt is not used")
    width = int(width or default_side(cfg, model.family))
    height = int(height or default_side(cfg, model.family))
    _check_size(width, height, model.size_multiple)

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
                images = model.sample(prompt, negative, steps, cfg_scale, width, height, count,
                                      generators if count > 1 else generators[0])
            for k, (image, s) in enumerate(zip(images, seeds)):
                index = start + first + k
                name = f"{index:05d}-{s}.png"
                text = infotext(shown_prompt, negative, steps, sampler.a1111, cfg_scale, s, width, height,
                                model.model_name, extra)
                if post.active:
                    from library.postprocess import postprocess as run_post

                    save_png(image, out / "raw" / name, text)
                    try:
                        image, notes = run_post(image, upscaler=post.upscaler, restorer=post.restorer,
                                                upscale=post.upscale, fidelity=post.fidelity)
                    except ValueError as err:
                        raise GenerationError(f"post-processing {name}: {one_line(err)}") from err
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
