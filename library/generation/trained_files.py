"""The files training wrote (library/training/outputs.py), found and read for sampling.

``<output.dir>/<output.name>.safetensors`` is the kohya LoRA and ``<output.dir>/<token>.safetensors`` (or
a legacy ``.pt``) each token's embedding; a LoRA may also bundle the embeddings (``bundle_emb.*``, the
names of :mod:`library.export.embeddings`, old ``.emb_params`` bundles included). Each token becomes
tokenizer words (``word``, ``word_1``, ... for multi-vector embeddings, the rule of training and of
diffusers' textual inversion loader) whose new rows in each text encoder's token-embedding table hold the
saved vectors (SDXL: ``clip_l`` in CLIP-L's, ``clip_g`` in OpenCLIP-G's; the two tokenizers share one
vocabulary, so a word gets the same ids in both). A missing or unreadable file, or one made for the other
model family, is a one-line GenerationError that says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from library import config
from library.export.embeddings import bundle_tensor_names, bundled_tokens
from library.files.weights import WeightsFileError, open_safetensors
from library.generation.options import GenerationError, one_line
from library.models.family import FAMILIES, SD1, ModelFamily


@dataclass
class TrainedFiles:
    """What find_trained_files found: the LoRA (or None) and each token's embedding file."""

    lora: Path | None  # None: generate without a LoRA (a run with no phase 2 writes none)
    embeddings: dict[str, Path | None]  # token word -> file (None: bundled in the LoRA)


def composed_prompt(cfg) -> str:
    """docs/method.md's composed prompt, the default: "a photo of a {source} person in the style of {reference}"."""
    return config.composed_prompt(cfg.tokens.source, cfg.tokens.reference)


def _bundled_tokens(lora: Path) -> set[str]:
    """Token words whose embedding the LoRA carries whole, for any family (read once the model is known)."""
    try:
        with open_safetensors(lora) as f:
            keys = list(f.keys())
    except (WeightsFileError, OSError) as err:
        raise GenerationError(f"{err} (the trained LoRA)") from err
    return set().union(*(bundled_tokens(keys, family) for family in FAMILIES.values()))


def find_trained_files(cfg, use_lora: bool = True) -> TrainedFiles:
    """The LoRA and the two embeddings training wrote (library/training/outputs.py); one-line error when missing."""
    out = Path(cfg.output.dir)
    hint = f"run training first: python train_magicapture.py --config {_config_name(cfg)}"
    lora: Path | None = out / f"{cfg.output.name}.safetensors"
    if not use_lora:
        lora = None
    elif not lora.is_file():
        if cfg.phase2.steps == 0 and any((out / f"{w}.safetensors").is_file() for w in trained_tokens(cfg)):
            lora = None  # phase 2 (the LoRA phase) was off: training wrote embeddings only
        else:
            raise GenerationError(f"trained LoRA not found: {lora}; {hint}")
    bundled = _bundled_tokens(lora) if lora is not None else set()
    embeddings: dict[str, Path | None] = {}
    for word in trained_tokens(cfg):
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


def trained_tokens(cfg) -> list[str]:
    """The two made-up token words, source first."""
    return [cfg.tokens.source, cfg.tokens.reference]


def _config_name(cfg) -> str:
    """The config file to name in "run training first" hints (a placeholder for in-memory configs)."""
    src = getattr(cfg, "source_file", "") or ""
    return src if src and not src.startswith("<") else "CONFIG.toml"


def read_embedding(word: str, path: Path | None, lora: Path | None, family: ModelFamily = SD1) -> dict[str, torch.Tensor]:
    """Token `word`'s vectors ``{embedding key: [n, width]}`` (``family.embedding_keys``) from its file, or
    from the LoRA when `path` is None (bundled). GenerationError (one line) for a file that cannot be read
    or holds the other family's embedding."""
    from library.export.embeddings import as_vectors, load_embedding_vectors

    if path is None:  # bundled in the LoRA
        try:
            with open_safetensors(lora) as f:
                present = set(f.keys())
                vectors = {}
                for key, names in bundle_tensor_names(word, family).items():
                    name = next((n for n in names if n in present), None)
                    if name is None:
                        raise GenerationError(f"{lora}: bundles no {family.label} embedding for '{word}' (no {names[0]})")
                    vectors[key] = f.get_tensor(name)
        except (WeightsFileError, OSError) as err:
            raise GenerationError(f"{err} (the trained LoRA)") from err
        try:
            return as_vectors(vectors, family)
        except ValueError as err:
            raise GenerationError(f"{lora}: {err}") from err
    try:
        _, vectors = load_embedding_vectors(path, family)
    except WeightsFileError as err:  # already one line naming the file
        raise GenerationError(str(err)) from err
    except ValueError as err:  # not an embedding, or the other family's: named by its full path here
        msg = one_line(err).removeprefix(f"{path.name}: ")
        raise GenerationError(f"{path}: {msg}") from err
    except Exception as err:
        raise GenerationError(f"{path}: not a readable embedding ({one_line(err)})") from err
    return vectors


def add_embeddings(
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    vectors: Mapping[str, Mapping[str, torch.Tensor]],
    family: ModelFamily = SD1,
) -> dict[str, list[int]]:
    """Add each word (word, word_1, ... for n vectors) to every tokenizer and its vectors as new rows of the
    matching text encoder's table; returns word -> ids (the same in every tokenizer).

    `tokenizers` / `text_encoders`: in family order; `vectors`: word -> ``{embedding key: [n, width]}``.
    GenerationError (one line) for a width that does not fit, a word already in the vocabulary, or
    tokenizers that give a word different ids.
    """
    from library.models.prompts import token_words

    ids: dict[str, list[int]] = {}
    for key, tokenizer, text_encoder in zip(family.embedding_keys, tokenizers, text_encoders):
        got = _add_to_one(tokenizer, text_encoder, {w: v[key] for w, v in vectors.items()}, key, token_words)
        if ids and got != ids:
            raise GenerationError(f"the tokenizers gave the trained tokens different ids ({ids} and {got})")
        ids = got
    return ids


def _add_to_one(tokenizer, text_encoder, vectors: dict[str, torch.Tensor], key: str, token_words) -> dict[str, list[int]]:
    emb = text_encoder.get_input_embeddings()
    dim = emb.weight.shape[1]
    entries: dict[str, list[str]] = {}
    vocab = tokenizer.get_vocab()
    for word, vec in vectors.items():
        if vec.ndim != 2 or vec.shape[1] != dim:
            raise GenerationError(
                f"embedding '{word}' ({key}) has shape {tuple(vec.shape)} but this model's text encoder has width {dim}: "
                "trained on another base model?"
            )
        entries[word] = token_words(word, vec.shape[0])
        for entry in entries[word]:
            if entry in vocab:
                raise GenerationError(f"token '{entry}' is already in the tokenizer's vocabulary")
    all_entries = [e for es in entries.values() for e in es]
    if tokenizer.add_tokens(all_entries) != len(all_entries):
        raise GenerationError(f"could not add the tokens {all_entries} to the tokenizer")
    if len(tokenizer) > emb.weight.shape[0]:  # Qwen3's table has spare rows past its vocabulary: no resize there
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    ids: dict[str, list[int]] = {}
    with torch.no_grad():
        for word, vec in vectors.items():
            ids[word] = tokenizer.convert_tokens_to_ids(entries[word])
            table[torch.tensor(ids[word])] = vec.to(device=table.device, dtype=table.dtype)
    return ids
