"""Training that would learn nothing, caught before it starts and reported when it ends.

Before: with ``data.captions = "sidecar"`` a caption is the whole prompt, so a caption without the set's
token, or with it only past CLIP's 77-token limit (where truncation drops it), gives that token no
gradient. Training still runs and exits 0, and the exported embedding is its initial value.
:func:`check_caption_tokens` looks at the ids training will actually feed the text encoder.

After: :func:`nothing_learned_warnings` compares each token's vectors with their initialisation and
measures what the LoRA changes, so a run with a zero learning rate or an unreachable token says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from library.training.data import DatasetError
from library.training.lora import lora_relative_change
from library.training.tokens import token_vectors

# a vector whose direction moved less than this has learned nothing: weight decay and the phase-1 norm
# pull change a token's length even when no prompt holds it, so the length is no evidence of training
STILL_COSINE = 0.9999
# ||scale B A|| / ||W|| of every LoRA layer below this: the LoRA changes nothing (peft starts B at zero;
# one AdamW step at the default rates already gives ~1e-4 on SD 1.5 and on the tiny test model)
STILL_LORA = 1e-5
SHOWN_NAMES = 3


def _names(names: list[str]) -> str:
    return ", ".join(names[:SHOWN_NAMES]) + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def check_caption_tokens(
    folder: str | Path,
    token: str,
    token_ids: Sequence[int],
    captions: Sequence[tuple[str, str]],
    encode: Callable[[str, bool], torch.Tensor],
    max_length: int,
) -> str | None:
    """Check that the sidecar captions of one image set can train the set's token.

    `captions`: (caption file name, caption) per image; an empty caption trains from a template, which
    holds the token. `encode(caption, truncate)` gives the ids training uses (truncate=True: CLIP's
    `max_length` window) or the whole prompt (truncate=False). A caption trains `token` when all of its
    `token_ids` (one per vector) are in the truncated ids.

    Returns None when every caption trains the token, else one warning line with the count and up to
    three file names per cause. Raises DatasetError (one line naming the folder) when no image can.
    """
    missing, truncated = [], []
    for name, caption in captions:
        if not caption:
            continue
        ids = set(encode(caption, True).tolist())
        if all(t in ids for t in token_ids):
            continue
        whole = set(encode(caption, False).tolist())
        (truncated if all(t in whole for t in token_ids) else missing).append(name)
    bad = len(missing) + len(truncated)
    if not bad:
        return None
    causes = []
    if missing:
        causes.append(f"without it: {_names(missing)}")
    if truncated:
        causes.append(f"only after CLIP's {max_length}-token limit: {_names(truncated)}")
    what = f"{bad} of {len(captions)} captions cannot train {token} ({'; '.join(causes)})"
    if bad == len(captions):
        raise DatasetError(
            f"{folder}: {what}, so {token} would learn nothing; put {token} near the start of each caption, "
            f"or set data.captions = \"template\""
        )
    return f"warning: {folder}: {what}; those images do not train {token}: put it near the start of their captions"


def _cosines(initial: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Cosine [n] between matching rows of two [n, dim] tensors."""
    return F.cosine_similarity(initial.float(), final.float(), dim=-1, eps=1e-12)


def nothing_learned_warnings(
    initial_vectors: dict[str, torch.Tensor],
    text_encoder: torch.nn.Module,
    token_ids: dict[str, list[int]],
    lora_models: dict[str, torch.nn.Module],
) -> list[str]:
    """Warning lines for what training left at its initial value.

    `initial_vectors`: token word -> its vectors [n, dim] at the start; compared with the vectors of
    `token_ids[word]` in `text_encoder` now. A token is reported when any of its vectors kept its
    direction (cosine > STILL_COSINE). `lora_models`: a description ("UNet" or "transformer", "text encoder") -> a model
    that may hold the LoRA; reported when no layer's LoRA changes its weight by STILL_LORA of the weight's
    norm (models without LoRA layers are ignored). Returns [] when everything moved.
    """
    lines = []
    for word, start in initial_vectors.items():
        cos = _cosines(start, token_vectors(text_encoder, token_ids[word])).max().item()
        if cos > STILL_COSINE:
            lines.append(
                f"warning: the embedding of {word} is still its initial value (cosine {cos:.6f}): it learned "
                f"nothing; check that {word} is in the captions (data.captions) and that phase1.lr_embeddings "
                f"or phase2.lr_embeddings and the step counts are above 0"
            )
    for part, model in lora_models.items():
        change = lora_relative_change(model)
        if change is not None and change < STILL_LORA:
            key = "phase2.lr_text_encoder" if part.startswith("text encoder") else "phase2.lr_unet"
            lines.append(
                f"warning: the LoRA of the {part} is still (near) zero (largest change of a layer: {change:.2g} "
                f"of its weight): it changes nothing; check phase2.steps and {key} are above 0"
            )
    return lines
