"""Special tokens [V1] / [V2]: tokenizer entries, initialisation, and their trainable embedding rows.

Only the new rows train. Instead of letting the whole 49408 x 768 table receive (zero) gradients and
restoring it after every step, the text encoder's token embedding is wrapped: the frozen table serves
every ordinary id and a small `nn.Parameter` serves the new ids, so optimiser state, weight decay and
checkpoints only ever see the new vectors.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from library.models.prompts import token_words


class TrainableTokenEmbedding(nn.Module):
    """A frozen token table plus trainable rows for ids >= `first_new_id`."""

    def __init__(self, base: nn.Embedding, first_new_id: int, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.new_vectors = nn.Parameter(vectors.clone().float())

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads .weight (e.g. resize_token_embeddings, tied heads): give the full table.
        return torch.cat([self.base.weight[: self.first_new_id], self.new_vectors.to(self.base.weight.dtype)])

    @property
    def num_embeddings(self) -> int:
        return self.first_new_id + self.new_vectors.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        old = self.base(input_ids.clamp(max=self.first_new_id - 1))
        new = self.new_vectors[(input_ids - self.first_new_id).clamp(min=0)].to(old.dtype)
        return torch.where(is_new.unsqueeze(-1), new, old)


def _input_embedding(text_encoder: nn.Module) -> nn.Module:
    """The token table the encoder reads its input ids through (CLIP's ``token_embedding``, Qwen3's
    ``embed_tokens``): transformers' ``get_input_embeddings``, the same call for every text encoder."""
    return text_encoder.get_input_embeddings()


def add_special_tokens(
    tokenizer,
    text_encoder: nn.Module,
    words: list[str],
    init_words: list[str],
    vectors: int,
    random_std: float,
    generator: torch.Generator | None = None,
) -> dict[str, list[int]]:
    """Add each word (x `vectors`) to the tokenizer and wrap the text encoder's embedding table.

    A word initialises from the mean embedding of its init word's tokens, or from N(0, random_std)
    when the init word is empty (the released code: [V1] from "person", [V2] random N(0, 0.017)).
    Returns word -> token ids.
    """
    base = _input_embedding(text_encoder)
    if isinstance(base, TrainableTokenEmbedding):
        raise ValueError("special tokens were already added to this text encoder")
    # the tokenizer numbers new entries from its length; Qwen3's table has unused rows past it (151936 rows,
    # 151669 entries), which no prompt reaches, so the new rows take over from the tokenizer's length
    first_new_id = len(tokenizer)
    if first_new_id > base.num_embeddings:
        raise ValueError(f"tokenizer has {len(tokenizer)} entries but the text encoder {base.num_embeddings} rows")
    ids: dict[str, list[int]] = {}
    rows = []
    for word, init in zip(words, init_words):
        entries = token_words(word, vectors)
        for entry in entries:
            if tokenizer.convert_tokens_to_ids(entry) != tokenizer.unk_token_id:
                raise ValueError(f"token '{entry}' is already in the vocabulary: choose a made-up word")
        added = tokenizer.add_tokens(entries)
        if added != len(entries):
            raise ValueError(f"could not add token '{word}' to the tokenizer")
        ids[word] = tokenizer.convert_tokens_to_ids(entries)
        dim = base.embedding_dim
        if init:
            init_ids = tokenizer(init, add_special_tokens=False).input_ids
            vec = base.weight.detach()[torch.tensor(init_ids, device=base.weight.device)].float().mean(0).cpu()
            rows.extend([vec.clone() for _ in entries])
        else:
            for _ in entries:
                rows.append(torch.randn(dim, generator=generator) * random_std)
    wrapped = TrainableTokenEmbedding(base, first_new_id, torch.stack(rows))
    base.weight.requires_grad_(False)
    text_encoder.set_input_embeddings(wrapped)
    text_encoder.config.vocab_size = max(wrapped.num_embeddings, text_encoder.config.vocab_size)
    return ids


def get_token_embedding(text_encoder: nn.Module) -> TrainableTokenEmbedding:
    emb = _input_embedding(text_encoder)
    if not isinstance(emb, TrainableTokenEmbedding):
        raise ValueError("the text encoder has no special tokens (add_special_tokens was not called)")
    return emb


def token_vectors(text_encoder: nn.Module, ids: list[int]) -> torch.Tensor:
    """The current vectors [n, dim] of one special token (detached, float32)."""
    emb = get_token_embedding(text_encoder)
    rows = torch.tensor(ids) - emb.first_new_id
    return emb.new_vectors.detach()[rows].float().cpu()


def norm_regulariser(vectors: torch.Tensor, target: float) -> torch.Tensor:
    """Mean squared distance of the vectors' norms from `target` (pulls norms toward it)."""
    return ((vectors.float().norm(dim=-1) - target) ** 2).mean()


def pull_norms(vectors: torch.Tensor, target: float, rate: float) -> torch.Tensor:
    """The released phase-1 renormalisation: each row keeps its direction and its norm moves toward
    ``target``: ``|v| <- |v| + rate (target - |v|)``, ``rate`` in [0, 1] (the released code uses
    ``min(1, 100 x the current learning rate)``, ``lora_diffusion_/magicapture_train.py``,
    ``train_inversion``). vectors [n, dim]; returns a new tensor of the same shape and dtype.

    A norm far above CLIP's ordinary ~0.4 is what makes a textual-inversion token drown every other
    word of a prompt; a soft penalty (:func:`norm_regulariser`) at its usual weight barely moves it.
    """
    norm = vectors.norm(dim=-1, keepdim=True)
    return vectors / norm.clamp_min(1e-12) * (norm + rate * (target - norm))


def embedding_scale(text_encoder: nn.Module) -> tuple[float, float]:
    """(mean row norm, element standard deviation) of the text encoder's ordinary token table (the
    frozen rows, also after :func:`add_special_tokens` wrapped it).

    What the trainer scales the norm target and the random init by for an encoder other than the
    first: CLIP-L's table (SD 1.x, and SDXL's first encoder) has a mean row norm of about 0.39 (what
    ``tokens.norm_target = 0.4`` is) and an element std of about 0.014; OpenCLIP-G's table is on its
    own scale, so [V1] / [V2] in it are held to that table's scale, not CLIP-L's.
    """
    emb = _input_embedding(text_encoder)
    table = (emb.base if isinstance(emb, TrainableTokenEmbedding) else emb).weight.detach().float()
    return float(table.norm(dim=-1).mean()), float(table.std())


def add_tokens_to_encoders(
    tokenizers: Sequence, text_encoders: Sequence[nn.Module], words: list[str], init_words: list[str], vectors: int,
    random_std: float, norm_target: float, generator: torch.Generator | None = None,
    reference: tuple[float, float] | None = None,
) -> tuple[dict[str, list[int]], tuple[float, ...]]:
    """:func:`add_special_tokens` on every (tokenizer, text encoder) pair, in the family's order
    -> (word -> token ids, the norm target of each encoder's new rows).

    Each encoder initialises its rows from the init word's tokens in its own table. The first encoder
    (CLIP-L in both families) takes `random_std` and `norm_target` as they are; any other one scales them
    by its table's element std and mean row norm over the first encoder's (:func:`embedding_scale`), so
    OpenCLIP-G's rows start and stay on OpenCLIP-G's scale. `reference` (mean row norm, element std), when
    given, takes the first encoder's place: a family without CLIP (Qwen3) gives CLIP-L's, in whose units
    ``tokens.norm_target`` and ``reference_init_std`` are written. Random rows are drawn from `generator` in
    encoder order. The ids must be the same in every tokenizer (SDXL's two share CLIP's vocabulary: one
    prompt spelling, one token position for attention refocusing); ValueError otherwise.
    """
    scales = [embedding_scale(te) for te in text_encoders]
    ref_norm, ref_std = reference or scales[0]
    ids, targets = None, []
    for tokenizer, encoder, (norm, std) in zip(tokenizers, text_encoders, scales):
        got = add_special_tokens(tokenizer, encoder, words, init_words, vectors, random_std * std / ref_std, generator)
        if ids is not None and got != ids:
            raise ValueError(f"the special tokens got ids {got} in one tokenizer and {ids} in another; "
                             f"the model's tokenizers must share one vocabulary")
        ids = got
        targets.append(norm_target * norm / ref_norm)
    return ids, tuple(targets)
