"""Prompts as token ids: the special tokens' tokenizer entries and a prompt's CLIP ids.

Shared by training (the ids a step feeds the text encoder) and generation (the entries a trained
embedding is loaded under), so both spell a multi-vector token the same way.
"""

from __future__ import annotations

import torch


def token_words(word: str, vectors: int) -> list[str]:
    """The tokenizer entries of one special token: `word`, `word_1`, ... (diffusers' multi-vector rule)."""
    return [word] + [f"{word}_{i}" for i in range(1, vectors)]


def expand_prompt(prompt: str, tokens: dict[str, int]) -> str:
    """Write each multi-vector token as its sequence of entries ("mcv1" -> "mcv1 mcv1_1 mcv1_2")."""
    out = []
    for piece in prompt.split(" "):
        n = tokens.get(piece, 1)
        out.append(" ".join(token_words(piece, n)) if n > 1 else piece)
    return " ".join(out)


def prompt_input_ids(tokenizer, prompt: str, vector_counts: dict[str, int], truncate: bool = True) -> torch.Tensor:
    """The CLIP ids [L] (int64) of `prompt` with each multi-vector token expanded (:func:`expand_prompt`).

    With `truncate` (what training feeds the text encoder): cut and padded to the tokenizer's
    ``model_max_length`` (77), so L = 77 and anything past CLIP's limit is gone. Without: the whole prompt
    between BOS and EOS, to see what truncation drops.
    """
    text = expand_prompt(prompt, vector_counts)
    if truncate:
        return tokenizer(text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids[0]
    return tokenizer(text, verbose=False, return_tensors="pt").input_ids[0]  # verbose: no too-long warning
