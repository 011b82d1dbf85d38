"""The tiny Z-Image and FLUX.2 Klein models (testkit/tiny_zimage.py, tiny_klein.py): both forms load offline
and agree, what is missing or does not fit is said in one line, and an exported LoRA follows ComfyUI's key
rule, loads in diffusers and, applied the way ComfyUI applies it, reproduces the trained model."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.export.dit_lora import peft_pieces, save_dit_lora
from library.models.dit_loading import ModelLoadError, load_dit, load_dit_files, load_dit_folder
from library.models.kind import identify_folder, identify_state, safetensors_shapes

pytestmark = pytest.mark.slow  # builds and runs tiny models

# The exported names, read from ComfyUI's loader and not from our exporter: comfy/lora.py
# model_lora_keys_unet maps each model weight "diffusion_model.<module>.weight" to the LoRA name
# "diffusion_model.<module>", whose tensors load_lora reads as "<name>.lora_up/.lora_down.weight",
# "<name>.lora_B/.lora_A.weight" or "<name>.lora.up/.lora.down.weight", with an optional "<name>.alpha".
# The modules are those of ComfyUI's models (comfy/utils.py z_image_to_diffusers for Z-Image's fused
# attention.qkv; comfy/ldm/flux/layers.py for FLUX.2's double and single blocks) that the LoRA targets.
RULES = {
    "zimage": re.compile(r"diffusion_model\.(layers|noise_refiner|context_refiner)\.\d+\."
                         r"(attention\.(qkv|out)|feed_forward\.w[123])\.(lora\.down\.weight|lora\.up\.weight|alpha)"),
    "klein4b": re.compile(r"diffusion_model\.(double_blocks\.\d+\.(img_attn\.(qkv|proj)|txt_attn\.(qkv|proj)|img_mlp\.[02]|txt_mlp\.[02])"
                          r"|single_blocks\.\d+\.linear[12])\.lora_[AB]\.weight"),
}
COMFY_SUFFIXES = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
                  (".lora.up.weight", ".lora.down.weight"))
RULES["klein9b"] = RULES["klein4b"]
TARGETS = {  # diffusers module names the LoRA trains
    "zimage": r".*\.(attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123])$",
    "klein4b": r"(.*transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|ff\.linear_(in|out)"
               r"|ff_context\.linear_(in|out)))|(single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))",
}


@pytest.fixture(scope="module", params=["zimage", "klein4b", "klein9b"])
def tiny(request, tmp_path_factory):
    """(family name, diffusers folder, SplitFiles) of a tiny model written by its command line."""
    dest = tmp_path_factory.mktemp(request.param) / request.param
    if request.param == "zimage":
        from testkit.tiny_zimage import main, SPLIT_NAMES as names
    else:
        from testkit.tiny_klein import main, split_names

        names = split_names(request.param[-2:])
    assert main([str(dest)] + (["--9b"] if request.param == "klein9b" else [])) == 0
    comfy = dest.parent / f"{dest.name}_comfy"
    from testkit.tiny_dit import SplitFiles

    split = SplitFiles(comfy / "diffusion_models" / names["transformer"], comfy / "text_encoders" / names["text_encoder"],
                       comfy / "vae" / names["vae"], comfy / "config")
    return request.param, dest, split


def _load_split(split, **change):
    args = dict(transformer=split.transformer, text_encoder=split.text_encoder, vae=split.vae, tokenizer=split.tokenizer,
                config_dir=split.config_dir)
    args.update(change)
    return load_dit_files(**args)


def _forward(parts):
    """The transformer's output on one fixed input (seeded), [..] as the pipeline calls it."""
    g = torch.Generator().manual_seed(0)
    width = parts.text_encoder.config.hidden_size
    if parts.family.name == "zimage":
        x, cap = torch.randn(16, 1, 4, 4, generator=g), torch.randn(5, width, generator=g)
        return lambda t: t([x.clone()], torch.tensor([0.3]), [cap.clone()], return_dict=False)[0][0]
    hidden, text = torch.randn(1, 4, 16, generator=g), torch.randn(1, 5, 3 * width, generator=g)
    img_ids = torch.tensor([[[0.0, i // 2, i % 2, 0.0] for i in range(4)]])
    txt_ids = torch.tensor([[[0.0, 0.0, 0.0, float(i)] for i in range(5)]])
    return lambda t: t(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([0.3]), img_ids=img_ids,
                       txt_ids=txt_ids, guidance=None, return_dict=False)[0]


def test_both_forms_load_offline_identify_alike_and_agree(tiny):
    name, folder, split = tiny
    assert identify_folder(folder).family == identify_state(safetensors_shapes(split.transformer)).family == name
    a = load_dit(folder)
    b = load_dit(split.transformer, split.text_encoder, split.vae, split.tokenizer, split.config_dir)
    for part in ("transformer", "text_encoder", "vae"):  # the same weights, bit for bit
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), part
    run = _forward(a)
    with torch.no_grad():
        # the same output up to float32 rounding: CPU kernels may sum in another order for weights that
        # sit at other memory alignments (each model alone is deterministic)
        torch.testing.assert_close(run(a.transformer), run(b.transformer), rtol=0, atol=1e-6)
        ids = a.tokenizer(["a photo of sks"], return_tensors="pt").input_ids
        assert torch.equal(a.text_encoder(ids).last_hidden_state if name == "zimage" else a.text_encoder(ids).logits,
                           b.text_encoder(ids).last_hidden_state if name == "zimage" else b.text_encoder(ids).logits)
    # the whole pipeline, sampled from each form with the same seed, gives the same image
    images = []
    for parts in (a, b):
        pipe = parts.pipeline(**({} if name == "zimage" else {"is_distilled": True}))
        images.append(pipe(prompt="a photo", height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
                           generator=torch.Generator().manual_seed(1), output_type="pt", max_sequence_length=32).images)
    assert tuple(images[0].shape) == (1, 3, 32, 32)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-5)


def test_what_is_missing_or_does_not_fit_is_one_line(tiny, tmp_path):
    name, folder, split = tiny
    label = {"zimage": "Z-Image", "klein4b": "FLUX.2 Klein 4B", "klein9b": "FLUX.2 Klein 9B"}[name]
    with pytest.raises(ModelLoadError) as err:
        _load_split(split, vae=None, tokenizer=tmp_path / "nowhere")
    assert str(err.value) == (f"{split.transformer}: a {label} transformer alone; also needs model.vae (the VAE .safetensors), "
                              "model.tokenizer (a Qwen3 tokenizer folder)")
    wide = {k: (torch.zeros(v.shape[0], 48) if k.endswith("embed_tokens.weight") else v)
            for k, v in load_file(split.text_encoder).items()}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ModelLoadError, match=rf"a Qwen3 of width 48; {label} reads width 32 \(Qwen3-{'8B' if name == 'klein9b' else '4B'}\); give that text encoder$"):
        _load_split(split, text_encoder=tmp_path / "wide.safetensors")
    # a whole 48-wide Qwen3 with its own config: loads, but is not what the transformer reads
    from testkit.tiny_qwen3 import build_text_encoder, qwen3_config, qwen3_to_comfy

    other = build_text_encoder(qwen3_config(48, 2, len(load_dit_folder(folder).tokenizer)), causal_lm=name != "zimage", seed=3)
    save_file(qwen3_to_comfy(other.state_dict()), tmp_path / "qwen48.safetensors")
    configs = tmp_path / "configs"
    shutil.copytree(split.config_dir, configs)
    other.config.to_json_file(configs / "text_encoder" / "config.json")
    with pytest.raises(ModelLoadError) as err:
        _load_split(split, text_encoder=tmp_path / "qwen48.safetensors", config_dir=configs)
    assert str(err.value) == (f"model.text_encoder: a Qwen3 of width 48; this {label} transformer reads width 32; "
                              "give the text encoder that came with it")
    with pytest.raises(ModelLoadError) as err:  # the tiny weights against the real model's shipped configs
        _load_split(split, config_dir=None)
    real = {"zimage": "configs/zimage", "klein4b": "configs/klein4b", "klein9b": "configs/klein9b"}[name]
    assert str(err.value).startswith(f"{split.transformer}: does not fit the configs in ")
    assert str(err.value).endswith("; set model.config_dir to this model's configs (a diffusers folder of it)")
    assert real in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as err:
        _load_split(split, tokenizer=tmp_path / "empty")
    assert str(err.value) == (f"model.tokenizer = '{tmp_path / 'empty'}': no tokenizer.json (or vocab.json and merges.txt) "
                              "inside; give the Qwen3 tokenizer folder")
    with pytest.raises(ModelLoadError, match=rf"not found; give the model's transformer .safetensors file$"):
        _load_split(split, transformer=tmp_path / "none.safetensors")
    for p in (folder / "vae").iterdir():
        p.rename(tmp_path / p.name)  # a folder without VAE weights: named before anything is built
    try:
        with pytest.raises(ModelLoadError) as err:
            load_dit_folder(folder)
        assert str(err.value).startswith(f"{folder}: an incomplete {label} folder: no VAE;")
    finally:
        for p in tmp_path.iterdir():
            if p.name in ("config.json", "diffusion_pytorch_model.safetensors"):
                p.rename(folder / "vae" / p.name)


def _comfy_apply(native: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> tuple[dict, set]:
    """The weights ComfyUI patches in: for each LoRA name x (the keys' common stem), the model weight
    x[len("diffusion_model."):] + ".weight" gets alpha / rank x up @ down (1 x up @ down without alpha)."""
    out, used = dict(native), set()
    stems = {k[: -len(sfx)] for k in lora for pair in COMFY_SUFFIXES for sfx in pair if k.endswith(sfx)}
    for stem in stems:
        up_key, down_key = next((stem + u, stem + d) for u, d in COMFY_SUFFIXES if stem + u in lora)
        up, down = lora[up_key].double(), lora[down_key].double()
        alpha = float(lora[stem + ".alpha"]) / down.shape[0] if stem + ".alpha" in lora else 1.0
        target = stem[len("diffusion_model."):] + ".weight"
        out[target] = (native[target].double() + alpha * up @ down).float()
        used |= {up_key, down_key, stem + ".alpha"} & set(lora)
    return out, used


def test_exported_lora_follows_comfyui_rule_and_reproduces_in_diffusers_and_comfyui(tiny, tmp_path):
    from peft import LoraConfig

    name, folder, split = tiny
    parts = load_dit_folder(folder)
    run = _forward(parts)
    with torch.no_grad():
        base = run(parts.transformer)
    parts.transformer.add_adapter(LoraConfig(r=2, lora_alpha=3.0, target_modules=TARGETS[name], init_lora_weights="gaussian"))
    torch.manual_seed(1)
    with torch.no_grad():
        for param_name, param in parts.transformer.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.5)
        trained = run(parts.transformer)
    assert (trained - base).abs().max() > 0.1  # the LoRA matters on this input
    path = tmp_path / "lora.safetensors"
    save_dit_lora(path, peft_pieces(parts.transformer), parts.family, {"ss_base_model_version": parts.family.base_model_version},
                  dtype=torch.float32)
    lora = load_file(path)
    native = load_file(split.transformer)
    native_modules = {"diffusion_model." + k[: -len(".weight")] for k in native if k.endswith(".weight")}
    for key in lora:
        assert RULES[name].fullmatch(key), key
        stem = re.sub(r"\.(lora\.(down|up)\.weight|lora_[AB]\.weight|alpha)$", "", key)
        assert stem in native_modules, key  # a weight of ComfyUI's model
    # diffusers: the family's pipeline loads the file and reproduces the in-memory LoRA
    pipe = load_dit_folder(folder).pipeline()
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        torch.testing.assert_close(run(pipe.transformer), trained, rtol=1e-4, atol=1e-5)
    # ComfyUI: every tensor is used, and the patched native weights, read back through diffusers' own
    # single-file converter, give the same output
    patched, used = _comfy_apply(native, lora)
    assert used == set(lora)
    save_file(patched, tmp_path / "patched.safetensors")
    merged = _load_split(split, transformer=tmp_path / "patched.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(run(merged.transformer), trained, rtol=1e-4, atol=1e-5)


TARGETS["klein9b"] = TARGETS["klein4b"]
