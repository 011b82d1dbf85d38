"""Prompts in a training step: each tokenizer's ids (cached), the family's encoding of a batch's distinct
prompts, the UNet call with the family's added conditioning, the special tokens' positions.

A mixin of :class:`~library.training.trainer.MagiCaptureTrainer` (it reads ``cfg``, ``family``,
``tokenizers``, ``text_encoders``, ``token_ids``, ``unet_forward`` and ``_prompt_cache``), kept apart so
that the trainer module holds the loop.
"""

from __future__ import annotations

import torch

from library.models.prompts import prompt_input_ids
from library.training.batching import prompt_rows, token_positions


class PromptsMixin:
    """Prompt ids, encoding and the conditioned UNet call of a training step."""

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """[77] the first tokenizer's ids of `prompt` (where the tokens' positions are read)."""
        return self.encoder_ids(prompt)[0]

    def encoder_ids(self, prompt: str) -> torch.Tensor:
        """[E, 77] the ids of `prompt` in each tokenizer, family order (cached per prompt)."""
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = torch.stack(
                [prompt_input_ids(tk, prompt, self.vector_counts()) for tk in self.tokenizers])
        return self._prompt_cache[prompt]

    def prompt_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """:func:`library.training.batching.prompt_rows` of `prompts` with this trainer's ids."""
        return prompt_rows(prompts, self.encoder_ids)

    def encode_prompts(self, unique_input_ids: torch.Tensor, prompt_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden [B, 77, D], pooled [B, Dg] or None) of :meth:`prompt_batch`'s ids: the family's
        encoding (:meth:`~library.models.family.ModelFamily.encode_prompt`) of the distinct prompts (each once), indexed
        back to the samples (gradients of repeated rows add up in the shared encoding)."""
        hidden, pooled = self.family.encode_prompt(self.text_encoders, list(unique_input_ids))
        return hidden[prompt_index], (pooled[prompt_index] if pooled is not None else None)

    def unet_call(self, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
                  time_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction [B, 4, h, w], with the family's added conditioning (SDXL: pooled text
        embedding and the size / crop ids)."""
        return self.unet_forward(noisy, timesteps, hidden,
                                 added_cond_kwargs=self.family.added_cond_kwargs(pooled, time_ids)).sample

    def vector_counts(self) -> dict[str, int]:
        """Token word -> its number of vectors (tokens.vectors), as expand_prompt takes it."""
        return {self.cfg.tokens.source: self.cfg.tokens.vectors, self.cfg.tokens.reference: self.cfg.tokens.vectors}

    def token_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, 2] position of the first vector of [V1] and [V2] in each prompt (-1 where absent)."""
        return token_positions(ids, [self.token_ids[w][0] for w in self.token_words()])

    def token_words(self) -> tuple[str, str]:
        """([V1], [V2]) as configured: tokens.source, tokens.reference."""
        return self.cfg.tokens.source, self.cfg.tokens.reference
