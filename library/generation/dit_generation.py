"""Sampling from a flow-matching transformer base (Z-Image, FLUX.2 Klein 4B / 9B) with the trained files.

What :func:`load_dit_model` does, the DiT counterpart of library/generation/pipeline.py's ``load_model``:

1. loads the base with :func:`library.models.dit_loading.load_dit` (a diffusers folder, or ComfyUI's split
   files: ``model.pretrained`` + ``model.text_encoder`` / ``model.vae`` / ``model.tokenizer`` /
   ``model.config_dir``), identified from the files (library/models/kind.py, dit_kind.py);
2. adds each trained token to the Qwen3 tokenizer as the entries ``word``, ``word_1``, ... (the rule of
   :func:`library.models.prompts.token_words`) and writes the saved rows -- the ``<family.embedding_key>``
   tensor [n, width] of ``<output.dir>/<word>.safetensors``, what ComfyUI reads -- into new rows of the
   text encoder's input embedding (``get_input_embeddings()``); prompts are spelled with those entries
   before the pipeline's chat template wraps them, so a multi-vector token expands as in training;
3. loads ``<output.dir>/<output.name>.safetensors`` through the pipeline's own ``load_lora_weights``
   (diffusers' converters read our ComfyUI-native keys for both families; library/export/dit_lora.py
   says which spelling each needs), after checking every LoRA module names a module of this transformer
   (:func:`lora_modules`, the inverse of library/models/dit_keys.py) and afterwards that diffusers
   patched each of them: a LoRA for another base fails in one line instead of loading partly;
4. builds the family's pipeline (``ZImagePipeline`` / ``Flux2KleinPipeline``) with the sampler settings
   of library/generation/dit_sampling.py.

Nothing here tests which family it has: every difference is read from the DitFamily
(library/models/dit_family.py) or its DitSampling entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from library.files.weights import WeightsFileError, open_safetensors
from library.generation.dit_sampling import (
    DIT_SAMPLING,
    FLOW_SAMPLER_NAME,
    DitSampling,
    SamplerDefaults,
    distilled_variant,
    sampler_defaults,
)
from library.generation.options import GenerationError, one_line
from library.models.dit_family import DIT_FAMILIES, DitFamily
from library.models.dit_keys import native_module

ADAPTER = "magicapture"  # the adapter name the trained LoRA is loaded under
LORA_PREFIX = "diffusion_model."
_LORA_SUFFIX = re.compile(r"\.(lora\.(down|up)\.weight|lora_(down|up)\.weight|lora_[AB]\.weight|alpha)$")


def dit_family_of(cfg) -> DitFamily | None:
    """The DiT family of ``cfg.model.pretrained``, read from its files (a diffusers folder's configs or a
    .safetensors header; nothing is loaded); None for anything else (a Stable Diffusion model, a missing
    path, a hub id: the Stable Diffusion loader then says what it is)."""
    from library.models.kind import ModelLoadError, identify_folder, identify_state, safetensors_shapes

    path = Path(cfg.model.pretrained)
    try:
        if path.is_dir():
            kind = identify_folder(path, check_weights=False)
        elif path.is_file() and path.suffix.lower() == ".safetensors":
            kind = identify_state(safetensors_shapes(path))
        else:
            return None
    except (ModelLoadError, WeightsFileError, OSError, ValueError):
        return None
    return DIT_FAMILIES.get(kind.family)


def check_dit_scheduler(name: str | None) -> None:
    """A DiT base samples with its own flow-matching Euler sampler only; GenerationError for another name."""
    if name not in (None, "", FLOW_SAMPLER_NAME):
        raise GenerationError(f"unknown scheduler '{name}' for this base; a Z-Image / FLUX.2 Klein base samples with "
                              f"its own flow-matching Euler sampler ({FLOW_SAMPLER_NAME}): leave --scheduler out")


# --------------------------------------------------------------------------------------------------
# embeddings
# --------------------------------------------------------------------------------------------------


def read_dit_embedding(path: Path, family: DitFamily, width: int) -> torch.Tensor:
    """The rows [n, width] (fp32) of one token's file ``<word>.safetensors``: its ``family.embedding_key``
    tensor, as ComfyUI reads it. GenerationError (one line naming the file) for an unreadable file, one
    without that tensor (another family's, or a Stable Diffusion embedding) or rows of another width."""
    key = family.embedding_key
    if path.suffix.lower() != ".safetensors":
        raise GenerationError(f"{path}: not a .safetensors embedding; a {family.label} embedding is <word>.safetensors "
                              f"with a '{key}' tensor")
    try:
        with open_safetensors(path) as f:
            keys = list(f.keys())
            rows = f.get_tensor(key) if key in keys else None
    except WeightsFileError as err:
        raise GenerationError(str(err)) from err
    except OSError as err:
        raise GenerationError(f"{path}: {one_line(err)}") from err
    if rows is None:
        held = ", ".join(sorted(keys)[:4]) or "no tensors"
        raise GenerationError(f"{path}: no '{key}' tensor (it holds {held}); not a {family.label} embedding: "
                              "trained on another base model?")
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != width:
        raise GenerationError(f"{path}: '{key}' has shape {tuple(rows.shape)}; this {family.label} text encoder "
                              f"takes rows [n, {width}]: trained on another base model?")
    if not torch.isfinite(rows).all():
        raise GenerationError(f"{path}: '{key}' holds NaN or infinite values")
    return rows.float()


def add_dit_embeddings(tokenizer, text_encoder: torch.nn.Module, vectors: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """Add each word's entries (``word``, ``word_1``, ...) to the Qwen3 tokenizer and its rows [n, width]
    as new rows of ``text_encoder.get_input_embeddings()``; returns word -> ids. GenerationError (one
    line) for a word already in the vocabulary. The same rule as Stable Diffusion's tokens
    (library/generation/trained_files.py)."""
    from library.generation.trained_files import _add_to_one
    from library.models.prompts import token_words

    return _add_to_one(tokenizer, text_encoder, dict(vectors), "Qwen3", token_words)


def spell_tokens(prompt: str, counts: Mapping[str, int]) -> str:
    """`prompt` with each trained word of n > 1 vectors written as its n entries ("mcv1" -> "mcv1 mcv1_1");
    a word counts where it stands alone (not inside a longer word), the rule generate's prompt check uses.
    For space-separated prompts this is :func:`library.models.prompts.expand_prompt`."""
    from library.models.prompts import token_words

    for word, n in counts.items():
        if n > 1:
            prompt = re.sub(rf"(?<![\w]){re.escape(word)}(?![\w])", " ".join(token_words(word, n)), prompt)
    return prompt


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def lora_modules(transformer: torch.nn.Module, family: DitFamily) -> dict[str, list[str]]:
    """Native (ComfyUI) module name -> the diffusers modules of `transformer` it is made of (three for a
    fused q/k/v matrix, in q, k, v order; one otherwise): library/models/dit_keys.py's map, inverted over
    the model's own linear layers, the one place the two names meet at sampling time."""
    out: dict[str, list[tuple[int, str]]] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            native, index = native_module(family.arch, name)
            out.setdefault(native, []).append((index or 0, name))
    return {native: [name for _, name in sorted(parts)] for native, parts in out.items()}


def _lora_stems(path: Path) -> tuple[list[str], dict[str, str]]:
    """The LoRA names (keys without prefix and suffix, sorted) and the metadata of a trained LoRA file."""
    try:
        with open_safetensors(path) as f:
            keys, meta = list(f.keys()), dict(f.metadata() or {})
    except WeightsFileError as err:
        raise GenerationError(f"{err} (the trained LoRA)") from err
    except OSError as err:
        raise GenerationError(f"{path}: {one_line(err)} (the trained LoRA)") from err
    stems = set()
    for key in keys:
        if not key.startswith(LORA_PREFIX) or not _LORA_SUFFIX.search(key):
            raise GenerationError(f"{path}: '{key}' is not a transformer LoRA key (diffusion_model.<module>.lora_*); "
                                  "not a LoRA this trainer wrote for a Z-Image / FLUX.2 Klein base")
        stems.add(_LORA_SUFFIX.sub("", key[len(LORA_PREFIX):]))
    if not stems:
        raise GenerationError(f"{path}: holds no LoRA tensors")
    return sorted(stems), meta


def load_dit_lora(pipe, path: Path, family: DitFamily, scale: float) -> int:
    """Load the trained LoRA into ``pipe.transformer`` with diffusers' ``pipe.load_lora_weights`` and set its
    multiplier to `scale`; returns how many diffusers modules it patched. GenerationError (one line naming
    the file) for a LoRA made for another base (its metadata's ``ss_base_model_version``, a module this
    transformer lacks, shapes that do not fit) or one that diffusers loads only partly."""
    stems, meta = _lora_stems(path)
    made_for = meta.get("ss_base_model_version", "")
    known = {f.base_model_version: f for f in DIT_FAMILIES.values()}
    if made_for in known and made_for != family.base_model_version:
        raise GenerationError(f"{path}: a LoRA for {known[made_for].label}; the base model is {family.label}")
    modules = lora_modules(pipe.transformer, family)
    missing = [s for s in stems if s not in modules]
    if missing:
        raise GenerationError(f"{path}: module '{missing[0]}' ({len(missing)} of {len(stems)}) is not in this {family.label} "
                              "transformer: trained on another base model?")
    try:
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError, TypeError) as err:  # shapes or names diffusers refuses
        raise GenerationError(f"{path} does not fit this {family.label} model: {one_line(err)}") from err
    from peft.tuners.lora import LoraLayer

    layers = dict(pipe.transformer.named_modules())
    wanted = [name for s in stems for name in modules[s]]
    unpatched = [n for n in wanted if not (isinstance(layers.get(n), LoraLayer) and ADAPTER in layers[n].lora_A)]
    if unpatched:
        raise GenerationError(f"{path}: diffusers loaded no LoRA into '{unpatched[0]}' ({len(unpatched)} of {len(wanted)} "
                              "modules); the file's layout is not one diffusers reads")
    if scale != 1.0:
        pipe.set_adapters([ADAPTER], adapter_weights=[float(scale)])
    return len(wanted)


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


@dataclass
class DitSampler:
    """A loaded DiT pipeline with the trained tokens and LoRA, and how its family samples."""

    pipe: object
    family: DitFamily
    sampling: DitSampling
    defaults: SamplerDefaults
    variant_known: bool
    distilled: bool  # what the pipeline was told (False when unknown)
    vector_counts: dict[str, int]  # trained word -> vectors (entries in the tokenizer)

    def runs_cfg(self, cfg: float) -> bool:
        """Whether the pipeline runs classifier-free guidance at scale `cfg` (and so reads a negative prompt)."""
        return cfg > self.sampling.cfg_above and not (self.sampling.distilled_flag and self.distilled)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling x the transformer's 2x2 patches."""
        return int(self.pipe.vae_scale_factor) * 2

    def __call__(self, prompt: str, negative: str, steps: int, cfg: float, width: int, height: int, count: int,
                 generator, output_type: str = "pil") -> list:
        """`count` images of `prompt` (each trained word spelled as its entries); `generator`: one CPU
        generator or a list of `count`; `output_type` as diffusers' ("pil", or "pt" for a [count, 3, H, W]
        tensor in [0, 1])."""
        kwargs = dict(prompt=spell_tokens(prompt, self.vector_counts), num_inference_steps=steps, guidance_scale=cfg,
                      width=width, height=height, num_images_per_prompt=count, generator=generator,
                      output_type=output_type)
        negative = spell_tokens(negative, self.vector_counts)
        if self.sampling.negative == "argument":
            kwargs["negative_prompt"] = negative or None
        elif negative:
            embeds = self.pipe.encode_prompt(prompt=negative, device=self.pipe._execution_device, num_images_per_prompt=count)
            kwargs["negative_prompt_embeds"] = embeds[0]
        return self.pipe(**kwargs).images


def load_dit_pipeline(cfg, family: DitFamily, lora: Path | None, embeddings: Mapping[str, Path | None],
                      lora_scale: float, device: torch.device, dtype: torch.dtype) -> tuple[DitSampler, object, int]:
    """The base of ``cfg.model`` with the embeddings and the LoRA, on `device` in `dtype`; returns (sampler,
    DitParts, modules the LoRA patched). `embeddings`: word -> its file (None, a LoRA-bundled embedding,
    is refused: DiT LoRAs bundle none). ModelLoadError / GenerationError, one line."""
    from library.models.dit_loading import load_dit

    m = cfg.model
    parts = load_dit(m.pretrained, m.text_encoder or None, m.vae or None, m.tokenizer or None, m.config_dir or None,
                     dtype=dtype)
    width = int(parts.text_encoder.get_input_embeddings().weight.shape[1])
    vectors: dict[str, torch.Tensor] = {}
    for word, path in embeddings.items():
        if path is None:
            raise GenerationError(f"{lora}: bundles the embedding of '{word}'; a {family.label} LoRA carries none: "
                                  f"give <output.dir>/{word}.safetensors")
        vectors[word] = read_dit_embedding(Path(path), family, width)
    add_dit_embeddings(parts.tokenizer, parts.text_encoder, vectors)
    sampling = DIT_SAMPLING[family.name]
    distilled = distilled_variant(m.pretrained, m.config_dir or None)
    flags = {sampling.distilled_flag: bool(distilled)} if sampling.distilled_flag else {}
    pipe = parts.pipeline(**flags)
    patched = load_dit_lora(pipe, Path(lora), family, lora_scale) if lora is not None else 0
    pipe.to(device)
    if dtype != torch.float32:  # the LoRA layers and the new embedding rows too
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    sampler = DitSampler(pipe=pipe, family=family, sampling=sampling, defaults=sampler_defaults(sampling, distilled),
                         variant_known=distilled is not None, distilled=bool(distilled), vector_counts={w: int(v.shape[0]) for w, v in vectors.items()})
    return sampler, parts, patched


def token_ids(tokenizer, counts: Mapping[str, int]) -> dict[str, list[int]]:
    """word -> the tokenizer ids of its entries (after :func:`add_dit_embeddings`)."""
    from library.models.prompts import token_words

    return {w: list(tokenizer.convert_tokens_to_ids(token_words(w, n))) for w, n in counts.items()}

