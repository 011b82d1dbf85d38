"""Special tokens: added as new entries, initialised as the released code does, only their rows train."""

from __future__ import annotations

import pytest
import torch

from testkit.tiny import build_components
from library.models.prompts import expand_prompt
from library.training.tokens import add_special_tokens, get_token_embedding, norm_regulariser, token_vectors


@pytest.fixture(scope="module")
def parts():
    return build_components()


def test_add_init_and_train_only_new_rows(parts):
    c = build_components()
    tok, te = c["tokenizer"], c["text_encoder"]
    base = te.embeddings.token_embedding.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    ids = add_special_tokens(tok, te, ["mcv1", "mcv2"], ["person", ""], 2, 0.017, gen)
    assert ids == {"mcv1": [49408, 49409], "mcv2": [49410, 49411]}
    assert tok("a mcv1 person").input_ids[2] == 49408
    person = tok("person", add_special_tokens=False).input_ids
    assert torch.equal(token_vectors(te, ids["mcv1"])[0], base[person].mean(0))
    v2 = token_vectors(te, ids["mcv2"])
    assert 0.005 < v2.std().item() < 0.03  # N(0, 0.017)

    emb = get_token_embedding(te)
    prompt = tok(expand_prompt("a photo of mcv1 person in the style of mcv2", {"mcv1": 2, "mcv2": 2}),
                 padding="max_length", return_tensors="pt").input_ids
    assert (prompt >= 49408).sum() == 4
    out = te(prompt)[0]
    out.pow(2).mean().backward()
    assert emb.new_vectors.grad is not None and emb.new_vectors.grad.abs().sum() > 0
    assert emb.base.weight.grad is None and not emb.base.weight.requires_grad
    # the table a frontend sees: the old rows unchanged, the new rows appended
    assert emb.weight.shape == (49412, 32) and torch.equal(emb.weight[:49408], base)


def test_existing_word_is_refused(parts):
    c = build_components()
    with pytest.raises(ValueError, match="already in the vocabulary"):
        add_special_tokens(c["tokenizer"], c["text_encoder"], ["person"], [""], 1, 0.017)


def test_norm_regulariser_by_hand():
    v = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
    assert norm_regulariser(v, 2.0).item() == pytest.approx(((5 - 2) ** 2 + (1 - 2) ** 2) / 2)
