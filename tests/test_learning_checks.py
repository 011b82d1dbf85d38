"""Issue 8, item 4: training that silently learns nothing.

Fault kinds: sidecar captions without the set's token; captions holding it only past CLIP's 77-token
limit (one token, or the last vectors of a multi-vector token); a set where no caption trains its token;
a run whose token vectors or LoRA end where they started (zero learning rates). The checks run on the
ids training feeds the text encoder (the real CLIP tokenizer, multi-vector expansion included).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from library.config import load_config
from library.training.data import DatasetError
from library.training.learning_checks import check_caption_tokens, nothing_learned_warnings
from library.training.lora import lora_relative_change
from library.models.prompts import prompt_input_ids
from library.training.tokens import TrainableTokenEmbedding
from library.training.trainer import MagiCaptureTrainer

FOLDER = "data/me"
FIX_TAIL = "those images do not train mcv1: put it near the start of their captions"
LONG = "a photo of a person " + "with a hat " * 30 + "mcv1"  # mcv1 is token 95 of the prompt


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from testkit.tiny import CONFIG_DIR

    tok = CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer")
    tok.add_tokens(["mcv1", "mcv1_1"])
    return tok


def check(tokenizer, captions: list[tuple[str, str]], vectors: int = 1) -> str | None:
    ids = tokenizer.convert_tokens_to_ids(["mcv1", "mcv1_1"][:vectors])
    return check_caption_tokens(FOLDER, "mcv1", ids, captions,
                                lambda c, truncate: prompt_input_ids(tokenizer, c, {"mcv1": vectors}, truncate), 77)


def test_missing_and_truncated_captions_are_counted_and_named(tokenizer):
    captions = [("a.txt", "a photo of a mcv1 person"), ("b.txt", "a photo of a person"), ("c.txt", LONG)]
    assert check(tokenizer, captions) == (
        f"warning: {FOLDER}: 2 of 3 captions cannot train mcv1 (without it: b.txt; only after CLIP's 77-token "
        f"limit: c.txt); {FIX_TAIL}")
    assert check(tokenizer, captions[:1]) is None


def test_no_caption_that_trains_the_token_is_refused(tokenizer):
    with pytest.raises(DatasetError) as err:
        check(tokenizer, [("a.txt", "a photo of a person"), ("b.txt", LONG), ("c.txt", "a photo of mcv 1")])
    assert str(err.value) == (
        f"{FOLDER}: 3 of 3 captions cannot train mcv1 (without it: a.txt, c.txt; only after CLIP's 77-token "
        f"limit: b.txt), so mcv1 would learn nothing; put mcv1 near the start of each caption, or set "
        f'data.captions = "template"')


def test_empty_caption_trains_from_a_template_and_names_are_capped(tokenizer):
    assert check(tokenizer, [("a.txt", ""), ("b.txt", "a person")]) == (
        f"warning: {FOLDER}: 1 of 2 captions cannot train mcv1 (without it: b.txt); {FIX_TAIL}")
    captions = [(f"{c}.txt", "a person") for c in "abcde"] + [("f.txt", "mcv1")]
    assert check(tokenizer, captions) == (
        f"warning: {FOLDER}: 5 of 6 captions cannot train mcv1 (without it: a.txt, b.txt, c.txt and 2 more); {FIX_TAIL}")


def test_multi_vector_token_cut_by_the_limit(tokenizer):
    # BOS, 74 x "a" (positions 1-74), then mcv1 at 75: the last place before EOS. With two vectors the
    # prompt is "... mcv1 mcv1_1" and mcv1_1 falls at 76, where truncation puts EOS.
    edge = "a " * 74 + "mcv1"
    assert prompt_input_ids(tokenizer, edge, {"mcv1": 1})[75].item() == tokenizer.convert_tokens_to_ids("mcv1")
    captions = [("ok.txt", "a mcv1 person"), ("edge.txt", edge)]
    assert check(tokenizer, captions, vectors=1) is None
    assert check(tokenizer, captions, vectors=2) == (
        f"warning: {FOLDER}: 1 of 2 captions cannot train mcv1 (only after CLIP's 77-token limit: edge.txt); {FIX_TAIL}")


# ------------------------------------------------------------------------------ through the trainer


def _config(tiny_model, prepared_data, out: Path, *extra: str):
    folder, _ = tiny_model
    source, reference = prepared_data
    return load_config("configs/test_tiny.toml", [
        f'model.pretrained="{folder}"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
        f'output.dir="{out}"', "logging.tensorboard=false", "logging.print_every=0", *extra])


def _warnings(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("warning:")]


def test_trainer_refuses_a_sidecar_set_whose_captions_lack_the_token(tiny_model, prepared_data, tmp_path):
    _, reference = prepared_data
    for i in range(3):
        (reference / f"img{i}.txt").write_text("a painting of a person in the style of van gogh")
    cfg = _config(tiny_model, prepared_data, tmp_path / "out", 'data.captions="sidecar"')
    with pytest.raises(DatasetError) as err:
        MagiCaptureTrainer(cfg)
    assert str(err.value) == (
        f"{reference}: 3 of 3 captions cannot train mcv2 (without it: img0.txt, img1.txt, img2.txt), so mcv2 "
        f'would learn nothing; put mcv2 near the start of each caption, or set data.captions = "template"')


def test_trainer_warns_once_for_one_missing_and_one_truncated_caption(tiny_model, prepared_data, tmp_path, capsys):
    source, _ = prepared_data
    (source / "img0.txt").write_text("a photo of a person")
    (source / "img2.txt").write_text(LONG)
    MagiCaptureTrainer(_config(tiny_model, prepared_data, tmp_path / "out", 'data.captions="sidecar"'))
    assert _warnings(capsys.readouterr().out) == [
        f"warning: {source}: 2 of 3 captions cannot train mcv1 (without it: img0.txt; only after CLIP's "
        f"77-token limit: img2.txt); those images do not train mcv1: put it near the start of their captions"]
    MagiCaptureTrainer(_config(tiny_model, prepared_data, tmp_path / "out2"))  # templates: captions unread
    assert _warnings(capsys.readouterr().out) == []


TOKEN_STILL = ("warning: the embedding of {w} is still its initial value (cosine 1.000000): it learned nothing; "
               "check that {w} is in the captions (data.captions) and that phase1.lr_embeddings or "
               "phase2.lr_embeddings and the step counts are above 0")
LORA_STILL = ("warning: the LoRA of the {part} is still (near) zero (largest change of a layer: 0 of its weight): "
              "it changes nothing; check phase2.steps and {key} are above 0")


@pytest.mark.parametrize("frozen", ["embeddings", "lora"])
def test_after_training_what_did_not_move_is_named(tiny_model, prepared_data, tmp_path, capsys, frozen):
    lrs = (["phase1.lr_embeddings=0", "phase2.lr_embeddings=0"] if frozen == "embeddings"
           else ["phase2.lr_unet=0", "phase2.lr_text_encoder=0"])
    MagiCaptureTrainer(_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0", *lrs)).run()
    if frozen == "embeddings":  # the LoRA trained: only the tokens are reported
        expected = [TOKEN_STILL.format(w="mcv1"), TOKEN_STILL.format(w="mcv2")]
    else:  # the tokens trained in phase 1: only the LoRA is reported
        expected = [LORA_STILL.format(part="UNet", key="phase2.lr_unet"),
                    LORA_STILL.format(part="text encoder", key="phase2.lr_text_encoder")]
    assert _warnings(capsys.readouterr().out) == expected


# --------------------------------------------------------------------------------------- the measures


class _Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2, bias=False)


def test_lora_relative_change_is_scale_BA_over_W():
    from peft import LoraConfig, inject_adapter_in_model

    model = _Proj()
    assert lora_relative_change(model) is None
    with torch.no_grad():
        model.proj.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||W|| = 5
    inject_adapter_in_model(LoraConfig(r=1, lora_alpha=2, target_modules=["proj"]), model, "default")
    assert lora_relative_change(model) == 0.0  # peft starts B at zero
    with torch.no_grad():
        model.proj.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0]]))
        model.proj.lora_B["default"].weight.copy_(torch.tensor([[0.0], [0.5]]))
    # scale 2 x B A = [[0, 0], [1, 0]]: norm 1 over 5
    assert lora_relative_change(model) == pytest.approx(0.2, abs=1e-7)


class _TextEncoder(nn.Module):
    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = TrainableTokenEmbedding(nn.Embedding(4, 2), 4, vectors)

    def get_input_embeddings(self) -> nn.Module:  # transformers' accessor, as CLIPTextModel has it
        return self.embeddings.token_embedding


@pytest.mark.parametrize("one_minus_cos, warned", [(0.0, True), (5e-5, True), (2e-4, False), (1.0, False)])
def test_token_still_means_its_direction_kept(one_minus_cos, warned):
    angle = math.acos(1 - one_minus_cos)
    initial = {"mcv1": torch.tensor([[0.4, 0.0]])}
    # the length changed (norm pull, weight decay) in every case: only the direction counts
    final = torch.tensor([[0.3 * math.cos(angle), 0.3 * math.sin(angle)]])
    lines = nothing_learned_warnings(initial, _TextEncoder(final), {"mcv1": [4]}, {})
    assert len(lines) == int(warned)
    if warned:
        assert lines[0].startswith(f"warning: the embedding of mcv1 is still its initial value (cosine {1 - one_minus_cos:.6f})")


def test_a_misspelt_caption_mode_is_refused(tmp_path):
    """`data.captions = "sidecars"` used to train from templates without a word."""
    from library.config import ConfigError

    (tmp_path / "s").mkdir()
    with pytest.raises(ConfigError) as err:
        load_config(None, ['model.pretrained="x"', f'data.source_dir="{tmp_path / "s"}"',
                           f'data.reference_dir="{tmp_path / "s"}"', 'data.captions="sidecars"'])
    assert str(err.value) == "command line: data.captions = 'sidecars': use template or sidecar (did you mean 'sidecar'?)"
