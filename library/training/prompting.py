"""Prompts in a training step: each tokenizer's ids (cached), the family's encoding of a batch's distinct
prompts, the special tokens' positions.

:class:`PromptEncoder` is an object the trainer owns, built from the loaded tokenizers and text encoders
and the family; it never tests which family it has (the family encodes, :meth:`ModelFamily.encode_prompt`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from library.models.prompts import expand_prompt
from library.training.batching import prompt_rows, token_positions


class PromptEncoder:
    """Prompt ids and their encoding for `family`.

    tokenizers / text_encoders: in the family's order (:attr:`ModelFamily.text_encoders`); token_ids: word ->
    the ids of its vectors (the same in every tokenizer); words: ([V1], [V2]); vectors: tokens.vectors (each
    word expands to that many ids in a prompt)."""

    def __init__(self, family, tokenizers: Sequence, text_encoders: Sequence, token_ids: dict[str, list[int]],
                 words: tuple[str, str], vectors: int) -> None:
        self.family, self.tokenizers, self.text_encoders = family, tuple(tokenizers), tuple(text_encoders)
        self.token_ids, self.words = token_ids, tuple(words)
        self.vector_counts = {w: vectors for w in self.words}  # as expand_prompt takes it
        self._cache: dict[str, torch.Tensor] = {}

    def ids(self, prompt: str, truncate: bool = True) -> torch.Tensor:
        """[77] the first tokenizer's ids of `prompt` (where the tokens' positions are read); `truncate`
        False keeps every id (to tell whether a caption's token would be cut)."""
        if not truncate:
            return self.family.prompt_ids(self.tokenizers[0], expand_prompt(prompt, self.vector_counts), truncate)
        return self.encoder_ids(prompt)[0]

    def encoder_ids(self, prompt: str) -> torch.Tensor:
        """[E, 77] the ids of `prompt` in each tokenizer, family order (cached per prompt)."""
        if prompt not in self._cache:
            text = expand_prompt(prompt, self.vector_counts)
            self._cache[prompt] = torch.stack([self.family.prompt_ids(tk, text) for tk in self.tokenizers])
        return self._cache[prompt]

    def batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """:func:`library.training.batching.prompt_rows` of `prompts` with these tokenizers' ids."""
        return prompt_rows(prompts, self.encoder_ids)

    def encode(self, unique_input_ids: torch.Tensor, prompt_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's conditioning (:meth:`~library.models.family.ModelFamily.encode_prompt`: ``hidden``
        [B, 77, D], and ``pooled`` [B, Dg] where the family has one) of :meth:`batch`'s ids: each distinct
        prompt encoded once, indexed back to the samples (gradients of repeated rows add up)."""
        cond = self.family.encode_prompt(self.text_encoders, list(unique_input_ids), self.tokenizers)
        return {k: v[prompt_index] for k, v in cond.items()}

    def positions(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, 2] position of the first vector of [V1] and [V2] in each prompt (-1 where absent)."""
        return token_positions(ids, [self.token_ids[w][0] for w in self.words])
