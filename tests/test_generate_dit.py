"""generate.py on the tiny Z-Image and FLUX.2 Klein models (testkit/tiny_zimage.py, tiny_klein.py), with trained
files written by the exporters the trainer uses (library/export/dit_lora.save_dit_lora from a peft LoRA with
non-zero B matrices, library/export/dit_embeddings.save_dit_embedding): the LoRA loaded through diffusers
reproduces the peft-wrapped model, the embedding rows land at the new token ids with the saved values, the
family's sampler settings apply, and a missing or odd file is one line naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.config import load_config
from library.export.dit_embeddings import save_dit_embedding
from library.export.dit_lora import dit_lora_metadata, peft_pieces, save_dit_lora
from library.generation.pipeline import GenerationError, generate, load_model, parse_infotext
from library.models.dit_loading import load_dit_folder
from library.models.prompts import token_words

pytestmark = pytest.mark.slow  # builds and samples tiny models

SOURCE, REFERENCE = "mcv1", "mcv2"
RUN = "tinydit"
PROMPT = f"a photo of {SOURCE} person in the style of {REFERENCE}"
# diffusers module names the LoRA trains (as tests/test_dit_models.py): attention and MLP of every block
TARGETS = {
    "zimage": r".*\.(attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123])$",
    "klein4b": r"(.*transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|ff\.linear_(in|out)"
               r"|ff_context\.linear_(in|out)))|(single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))",
}
FAST = dict(steps=2, cfg_scale=2.0, width=64, height=64, device="cpu", progress=False)


def _write_config(path: Path, pretrained: Path, out: Path, **model: Path) -> Path:
    extra = "".join(f'{key} = "{value.as_posix()}"\n' for key, value in model.items())
    path.write_text(f"""
[model]
pretrained = "{pretrained.as_posix()}"
{extra}
[data]
resolution = 64

[tokens]
source = "{SOURCE}"
reference = "{REFERENCE}"

[output]
dir = "{out.as_posix()}"
name = "{RUN}"
""", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["zimage", "klein4b", "klein9b"])
def trained(request, tmp_path_factory):
    """(family name, config path, diffusers folder, SplitFiles, peft-wrapped DitParts, saved vectors): a
    tiny model, and in its output.dir the LoRA (r=2, alpha 3, B ~ N(0, 0.5)) and one embedding per token
    (mcv1: 1 vector, mcv2: 2 vectors) as the trainer writes them."""
    from peft import LoraConfig

    name = request.param
    base = tmp_path_factory.mktemp(name)
    if name == "zimage":
        from testkit.tiny_zimage import SPLIT_NAMES as names
        from testkit.tiny_zimage import save_zimage_model

        folder, split = save_zimage_model(base / name)
    else:
        from testkit.tiny_klein import save_klein_model, split_names

        folder, split = save_klein_model(base / name, name[-2:])
        names = split_names(name[-2:])
    assert split.transformer.name == names["transformer"]
    parts = load_dit_folder(folder)
    targets = TARGETS["zimage" if name == "zimage" else "klein4b"]
    parts.transformer.add_adapter(LoraConfig(r=2, lora_alpha=3.0, target_modules=targets, init_lora_weights="gaussian"))
    torch.manual_seed(1)
    with torch.no_grad():
        for param_name, param in parts.transformer.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.5)
    out = base / "out"
    out.mkdir()
    meta = dit_lora_metadata(parts.family, RUN, "2026-12-07T00:00:00", 2, 3.0)
    save_dit_lora(out / f"{RUN}.safetensors", peft_pieces(parts.transformer), parts.family, meta, dtype=torch.float32)
    width = parts.text_encoder.config.hidden_size
    gen = torch.Generator().manual_seed(2)
    vectors = {SOURCE: torch.randn(1, width, generator=gen), REFERENCE: torch.randn(2, width, generator=gen)}
    for word, rows in vectors.items():
        save_dit_embedding(out, word, rows, parts.family, width=width)
    config = _write_config(base / "run.toml", folder, out)
    return name, config, folder, split, parts, vectors


def _cfg(config: Path, *overrides: str):
    return load_config(config, list(overrides), check_paths=False)


def _reference_images(parts, vectors: dict[str, torch.Tensor], prompt: str, distilled: bool, seed: int) -> torch.Tensor:
    """The same sampling done by hand: the peft-wrapped transformer in the family's pipeline, the tokens added
    to the tokenizer as word, word_1, ... with their rows written into the input embedding, the prompt spelled
    with those entries."""
    import copy

    tokenizer = copy.deepcopy(parts.tokenizer)
    encoder = copy.deepcopy(parts.text_encoder)
    entries = {w: token_words(w, v.shape[0]) for w, v in vectors.items()}
    tokenizer.add_tokens([e for es in entries.values() for e in es])
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        table = encoder.get_input_embeddings().weight
        for word, rows in vectors.items():
            table[torch.tensor(tokenizer.convert_tokens_to_ids(entries[word]))] = rows
    import diffusers

    flags = {} if parts.family.name == "zimage" else {"is_distilled": distilled}
    pipe = getattr(diffusers, parts.family.pipeline_class)(transformer=parts.transformer, vae=parts.vae, text_encoder=encoder,
                                                           tokenizer=tokenizer, scheduler=parts.scheduler, **flags)
    pipe.set_progress_bar_config(disable=True)
    spelled = prompt
    for word, es in entries.items():
        spelled = spelled.replace(word, " ".join(es))
    with torch.no_grad():
        return pipe(prompt=spelled, num_inference_steps=FAST["steps"], guidance_scale=FAST["cfg_scale"], width=64, height=64,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images


def _sample(model, prompt: str, seed: int) -> torch.Tensor:
    with torch.no_grad():
        return model.sample(prompt, "", FAST["steps"], FAST["cfg_scale"], 64, 64, 1, torch.Generator().manual_seed(seed),
                            output_type="pt")


def test_lora_changes_the_image_and_equals_the_peft_wrapped_model(trained):
    name, config, folder, split, parts, vectors = trained
    cfg = _cfg(config)
    model = load_model(cfg, device="cpu")
    assert model.lora_name == RUN and model.lora_modules > 0 and model.lora_scale == 1.0
    ours = _sample(model, PROMPT, seed=3)
    distilled = name != "zimage"  # the tiny Klein folder says is_distilled; Z-Image never says
    reference = _reference_images(parts, vectors, PROMPT, distilled, seed=3)
    assert tuple(ours.shape) == (1, 3, 64, 64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    without = _sample(load_model(cfg, device="cpu", trained=_no_lora(cfg)), PROMPT, seed=3)
    assert (without - ours).abs().max() > 1e-2  # the LoRA matters
    # half the multiplier: between the two, and not either
    half = _sample(load_model(cfg, device="cpu", lora_scale=0.5), PROMPT, seed=3)
    assert (half - ours).abs().max() > 1e-3 and (half - without).abs().max() > 1e-3


def _no_lora(cfg):
    from library.generation.trained_files import find_trained_files

    return find_trained_files(cfg, use_lora=False)


def test_embedding_rows_land_at_the_new_token_ids(trained):
    name, config, folder, split, parts, vectors = trained
    model = load_model(_cfg(config), device="cpu")
    tokenizer, encoder = model.pipe.tokenizer, model.pipe.text_encoder
    vocab = len(parts.tokenizer)
    assert model.token_ids == {SOURCE: [vocab], REFERENCE: [vocab + 1, vocab + 2]}
    table = encoder.get_input_embeddings().weight
    for word, rows in vectors.items():
        ids = model.token_ids[word]
        assert tokenizer.convert_ids_to_tokens(ids) == token_words(word, rows.shape[0])
        torch.testing.assert_close(table[torch.tensor(ids)], rows, rtol=0, atol=0)
    # the prompt, spelled with the entries and wrapped in the chat template, reaches the encoder as those ids
    from library.generation.dit_generation import spell_tokens

    spelled = spell_tokens(PROMPT, {SOURCE: 1, REFERENCE: 2})
    assert spelled == f"a photo of {SOURCE} person in the style of {REFERENCE} {REFERENCE}_1"
    ids = tokenizer(spelled).input_ids
    assert [i for i in ids if i >= vocab] == [vocab, vocab + 1, vocab + 2]
    # the original rows are untouched
    torch.testing.assert_close(table[:vocab], parts.text_encoder.get_input_embeddings().weight, rtol=0, atol=0)


def test_generate_writes_pngs_with_the_familys_settings(trained, tmp_path):
    name, config, folder, split, parts, vectors = trained
    from generate import main

    out = tmp_path / "png"
    assert main(["--config", str(config), "--n", "2", "--seed", "5", "--width", "64", "--height", "64", "--device", "cpu",
                 "--steps", "2", "--out", str(out)]) == 0
    images = sorted(out.glob("0000*.png"))
    assert [p.name for p in images] == ["00000-5.png", "00001-6.png"] and (out / "grid-00000.png").is_file()
    info = parse_infotext(Image.open(images[0]).info["parameters"])
    assert info["Steps"] == "2" and info["Sampler"] == "Euler" and info["Size"] == "64x64"
    assert f"<lora:{RUN}:1>" in info["Prompt"] and SOURCE in info["TI hashes"]
    # the variant's guidance when --cfg is not given: Klein's folder says distilled (1); Z-Image cannot tell (Base's 4)
    assert info["CFG scale"] == ("4" if name == "zimage" else "1")


def test_unknown_variant_uses_the_base_settings_and_says_so(trained, tmp_path):
    name, config, folder, split, parts, vectors = trained
    messages: list[str] = []
    cfg = _cfg(config)
    model = load_model(cfg, device="cpu")
    (path,) = generate(cfg, n=1, seed=1, steps=1, width=64, height=64, out_dir=tmp_path, model=model, progress=False,
                       log=messages.append)
    notes = [m for m in messages if m.startswith("note: cannot tell")]
    if name == "zimage":
        assert notes == ["note: cannot tell Z-Image Turbo from Z-Image Base from the files; "
                         "the defaults are Z-Image Base's (50 steps, CFG 4); for Z-Image Turbo give --steps 9 --cfg 0"]
        assert (model.default_steps, model.default_cfg) == (50, 4.0)
    else:
        assert notes == [] and (model.default_steps, model.default_cfg) == (4, 1.0)


def test_split_files_sample_like_the_folder(trained, tmp_path):
    """ComfyUI's split files (model.text_encoder / vae / tokenizer / config_dir) give the same image."""
    name, config, folder, split, parts, vectors = trained
    out = Path(_cfg(config).output.dir)
    split_config = _write_config(tmp_path / "split.toml", split.transformer, out, text_encoder=split.text_encoder,
                                 vae=split.vae, tokenizer=split.tokenizer, config_dir=split.config_dir)
    a = _sample(load_model(_cfg(config), device="cpu"), PROMPT, seed=4)
    b = _sample(load_model(_cfg(split_config), device="cpu"), PROMPT, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _one_line_error(config: Path, capsys, *argv: str) -> str:
    from generate import main

    assert main(["--config", str(config), "--n", "1", "--device", "cpu", "--steps", "1", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    notes, err = lines[:-1], lines[-1]  # the error is one line, after any notes
    assert err.startswith("error: ") and all(n.startswith("note: ") for n in notes), lines
    return err


def test_missing_and_odd_files_are_one_line_naming_the_file(trained, tmp_path, capsys):
    name, config, folder, split, parts, vectors = trained
    good = Path(_cfg(config).output.dir)
    out = tmp_path / "out"
    shutil.copytree(good, out)
    bad = _write_config(tmp_path / "bad.toml", folder, out)
    emb = out / f"{REFERENCE}.safetensors"
    lora = out / f"{RUN}.safetensors"

    emb.unlink()
    assert f"trained embedding for token '{REFERENCE}' not found: {emb}" in _one_line_error(bad, capsys)
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(2, 768)}, emb)  # a Stable Diffusion embedding
    err = _one_line_error(bad, capsys)
    assert f"{emb}: no '{parts.family.embedding_key}' tensor (it holds clip_l)" in err
    save_file({parts.family.embedding_key: torch.zeros(2, 48)}, emb)  # another width
    assert f"{emb}: '{parts.family.embedding_key}' has shape (2, 48)" in _one_line_error(bad, capsys)
    emb.write_bytes(b"not a safetensors file")
    assert str(emb) in _one_line_error(bad, capsys)
    shutil.copy(good / emb.name, emb)

    lora.write_bytes(b"\x00" * 16)
    assert str(lora) in _one_line_error(bad, capsys)
    state = {"diffusion_model.no_such_block.0.linear.lora_A.weight": torch.zeros(2, 32),
             "diffusion_model.no_such_block.0.linear.lora_B.weight": torch.zeros(32, 2)}
    save_file(state, lora)
    err = _one_line_error(bad, capsys)
    assert f"{lora}: module 'no_such_block.0.linear' (1 of 1) is not in this {parts.family.label} transformer" in err
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 32)}, lora)  # a kohya SD LoRA
    assert f"{lora}: 'lora_unet_x.lora_down.weight' is not a transformer LoRA key" in _one_line_error(bad, capsys)
    other = "flux_2_klein_9b" if name == "zimage" else "z_image"
    from safetensors.torch import load_file

    save_file(load_file(good / lora.name), lora, metadata={"ss_base_model_version": other})
    assert f"{lora}: a LoRA for " in _one_line_error(bad, capsys)
    shutil.copy(good / lora.name, lora)
    err = _one_line_error(bad, capsys, "--scheduler", "euler_a")
    assert err.endswith("leave --scheduler out")
    assert "multiples of 16" in _one_line_error(bad, capsys, "--width", "72", "--height", "64")


def test_sampler_table_is_per_family_and_the_loader_names_none():
    """Every DiT family has its sampler settings in library/generation/dit_sampling.py; the loader and
    generate's orchestration read them and test no family name (the project rule)."""
    import re

    from library.generation.dit_sampling import DIT_SAMPLING, distilled_variant
    from library.models.dit_family import DIT_FAMILIES

    assert set(DIT_SAMPLING) == set(DIT_FAMILIES)
    root = Path(__file__).resolve().parent.parent
    code = (root / "library/generation/dit_generation.py").read_text(encoding="utf-8")
    code = re.sub(r'""".*?"""', "", code, flags=re.S)  # docstrings may name them
    assert not re.search(r"\.name\s*[!=]=|[\"'](zimage|klein4b|klein9b)[\"']", code)
    assert distilled_variant(root / "configs/klein4b", None) is True  # the shipped Klein configs: distilled
    assert distilled_variant(root / "configs/zimage", None) is None


def test_negative_prompt_is_used_where_the_pipeline_runs_cfg(trained, tmp_path):
    """Z-Image reads negative_prompt when guidance > 0; Klein Base (is_distilled false) gets the negative's
    embeddings when guidance > 1; a distilled Klein runs no CFG, and generate says the negative is unused."""
    name, config, folder, split, parts, vectors = trained
    cfg = _cfg(config)
    if name != "zimage":  # the same weights as Klein Base: a copy of the folder whose model_index says undistilled
        base = tmp_path / "base"
        shutil.copytree(folder, base)
        index = json.loads((base / "model_index.json").read_text())
        (base / "model_index.json").write_text(json.dumps({**index, "is_distilled": False}))
        distilled = load_model(cfg, device="cpu")
        messages: list[str] = []
        generate(cfg, n=1, seed=1, steps=1, negative="blurry", width=64, height=64, out_dir=tmp_path / "o", model=distilled,
                 progress=False, log=messages.append)
        assert "note: no classifier-free guidance at CFG 1 with this model: the negative prompt is not used" in messages
        cfg = _cfg(config, f"model.pretrained={base.as_posix()}")
    model = load_model(cfg, device="cpu")
    if name != "zimage":
        assert (model.default_steps, model.default_cfg, model.defaults_note) == (50, 4.0, "")
    with torch.no_grad():
        plain, negative = (model.sample(PROMPT, neg, 2, 2.0, 64, 64, 1, torch.Generator().manual_seed(3), output_type="pt")
                           for neg in ("", f"blurry {REFERENCE}"))
    assert (plain - negative).abs().max() > 1e-3


def test_spare_rows_of_the_qwen3_table_take_the_new_tokens_without_a_resize():
    """Qwen3's input embedding has rows past its tokenizer's vocabulary (151936 for 151669 entries): the new
    entries take those rows and the table keeps its size (no copy of a 151936 x 2560 table)."""
    from library.generation.dit_generation import add_dit_embeddings
    from testkit.tiny_qwen3 import build_text_encoder, build_tokenizer, qwen3_config

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    encoder = build_text_encoder(qwen3_config(32, 2, vocab + 8), causal_lm=True, seed=0)
    table = encoder.get_input_embeddings().weight
    rows = torch.arange(96.0).reshape(3, 32)
    ids = add_dit_embeddings(tokenizer, encoder, {SOURCE: rows[:1], REFERENCE: rows[1:]})
    assert ids == {SOURCE: [vocab], REFERENCE: [vocab + 1, vocab + 2]}
    assert encoder.get_input_embeddings().weight is table and tuple(table.shape) == (vocab + 8, 32)
    torch.testing.assert_close(table[vocab:vocab + 3], rows, rtol=0, atol=0)
    with pytest.raises(GenerationError, match=f"token '{SOURCE}' is already in the tokenizer's vocabulary"):
        add_dit_embeddings(tokenizer, encoder, {SOURCE: rows[:1]})
