"""SDXL training on the tiny SDXL model (built in memory, handed to the trainer as `parts`).

Pinned: the size / crop ids of a non-square image worked out by hand from kohya's and diffusers' rule,
the prompt encoding against transformers calls written out here (penultimate hidden states of CLIP-L
and OpenCLIP-G side by side, OpenCLIP-G's projected pooled output), the new rows of both encoders
against their documented initialisation, what phase 1 may change, the capture layers by name, the
checkpoint's tensor names. Meant to fail when the encoders' order is swapped, the pooled embedding is
dropped, or the crop's top and left are exchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.config import Config, ConfigError, load_config, validate
from testkit.tiny import save_random_arcface, write_prepared
from testkit.tiny_sdxl import build_sdxl_parts
from library.training import checkpoint as ckpt
from library.models.conditioning import size_crop_ids as sdxl_time_ids
from library.training.data import Sample
from library.training.resume import compare_configs
from library.training.trainer import MagiCaptureTrainer

PROMPTS = ["a photo of a mcv1 person", "a photo of a mcv1 person in the style of mcv2", "a photo of a mcv1 person"]
# SDXL's 32x32 cross-attention (the tiny model's lowest level), first transformer block of each attention
SDXL_LAYERS = [
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn2",
]


def widen(folder: Path, name: str, width: int, height: int, dx: int, dy: int) -> None:
    """Put a prepared image (and its mask, face box and landmarks) on a larger canvas at (dx, dy)."""
    image, mask = Image.open(folder / f"{name}.png"), Image.open(folder / f"{name}.mask.png")
    big, big_mask = Image.new("RGB", (width, height), (90, 90, 90)), Image.new("L", (width, height), 0)
    big.paste(image, (dx, dy))
    big_mask.paste(mask, (dx, dy))
    big.save(folder / f"{name}.png")
    big_mask.save(folder / f"{name}.mask.png")
    meta = json.loads((folder / f"{name}.json").read_text())
    box = meta["face_box"]
    meta["face_box"] = [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]
    meta["landmarks"] = [[x + dx, y + dy] for x, y in meta["landmarks"]]
    meta["width"], meta["height"] = width, height
    (folder / f"{name}.json").write_text(json.dumps(meta))


def test_time_ids_rule_by_hand():
    # a 200 x 120 (w x h) image, square crop of side 120 at left 53, top 0, resized to 64:
    # scale 64 / 120; crop top 0, crop left round(53 * 64 / 120) = round(28.27) = 28;
    # mirrored, the crop's left is 200 - 53 - 120 = 27 original pixels: round(27 * 64 / 120) = round(14.4) = 14
    assert sdxl_time_ids((120, 200), (53, 0, 120), 64).tolist() == [120, 200, 0, 28, 64, 64]
    assert sdxl_time_ids((120, 200), (53, 0, 120), 64, flipped=True).tolist() == [120, 200, 0, 14, 64, 64]
    # a portrait 90 x 300 image cropped at top 100: crop top round(100 * 1024 / 90) = round(1137.8) = 1138
    assert sdxl_time_ids((300, 90), (0, 100, 90), 1024).tolist() == [300, 90, 1138, 0, 1024, 1024]


def snapshot(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
            if "new_vectors" not in n}


def test_sdxl_two_phases_all_tasks(tmp_path):
    source = write_prepared(tmp_path / "source", "source", "mcv1", seed=1)
    reference = write_prepared(tmp_path / "reference", "reference", "mcv2", seed=2)
    # img0's face centre x = 96 * 0.45 = 43.2 -> 113.2 on the canvas; side 120; left = round(113.2 - 60) = 53
    widen(source, "img0", 200, 120, 70, 10)
    arcface = save_random_arcface(tmp_path / "arcface.pth")
    cfg = load_config("configs/test_tiny.toml", [
        f'model.pretrained="{tmp_path}"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
        f'output.dir="{tmp_path / "out"}"', f'loss.identity_weights="{arcface}"', "phase1.steps=2", "phase2.steps=3",
        "sample.every=3", "logging.tensorboard=false", "output.save_every=0",
    ])
    trainer = MagiCaptureTrainer(cfg, parts=build_sdxl_parts())
    te1, te2 = trainer.text_encoders
    tk1, tk2 = trainer.tokenizers
    assert (trainer.text_encoder, trainer.tokenizer) == (te1, tk1)
    assert trainer.store.layers == SDXL_LAYERS

    # -- the new rows: the same ids in both tokenizers, 49408 = CLIP's vocabulary size, then 49409
    assert trainer.token_ids == {"mcv1": [49408], "mcv2": [49409]}
    assert tk2.convert_tokens_to_ids(["mcv1", "mcv2"]) == [49408, 49409]
    tables = [te.get_input_embeddings().base.weight.detach() for te in (te1, te2)]
    rows = [te.get_input_embeddings().new_vectors.detach().clone() for te in (te1, te2)]
    assert [r.shape for r in rows] == [(2, 32), (2, 64)]
    person = tk1("person", add_special_tokens=False).input_ids
    assert len(person) == 1
    # [V1] = the init word's row in each encoder's own table
    assert torch.equal(rows[0][0], tables[0][person[0]]) and torch.equal(rows[1][0], tables[1][person[0]])
    # [V2] ~ N(0, 0.017) in CLIP-L, N(0, 0.017 x std(G table) / std(L table)) in OpenCLIP-G, drawn in that order
    gen = torch.Generator().manual_seed(cfg.train.seed)
    v2_l = torch.randn(32, generator=gen) * 0.017
    v2_g = torch.randn(64, generator=gen) * (0.017 * tables[1].std().item() / tables[0].std().item())
    assert torch.allclose(rows[0][1], v2_l, atol=1e-7) and torch.allclose(rows[1][1], v2_g, atol=1e-7)
    # norm targets: 0.4 for CLIP-L, 0.4 x the ratio of the tables' mean row norms for OpenCLIP-G
    ratio = (tables[1].norm(dim=-1).mean() / tables[0].norm(dim=-1).mean()).item()
    assert trainer.norm_targets == pytest.approx((0.4, 0.4 * ratio))

    # -- size / crop ids (test_time_ids_rule_by_hand's numbers); the square 96 px images: whole image, no offset
    assert trainer.source.size_ids[0].tolist() == [120, 200, 0, 28, 64, 64]
    assert trainer.source.size_ids[3].tolist() == [120, 200, 0, 14, 64, 64]  # img0 flipped
    assert trainer.source.size_ids[1].tolist() == [96, 96, 0, 0, 64, 64]
    assert trainer.reference.size_ids[2].tolist() == [96, 96, 0, 0, 64, 64]

    # -- prompt encoding, written out with transformers calls
    def ids(tokenizer, prompt):
        return tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    with torch.no_grad():
        hidden_l = te1(torch.cat([ids(tk1, p) for p in PROMPTS]), output_hidden_states=True).hidden_states[-2]
        out_g = te2(torch.cat([ids(tk2, p) for p in PROMPTS]), output_hidden_states=True)
        expected_hidden = torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1)  # [3, 77, 32 + 64]
        expected_pooled = out_g.text_embeds  # [3, 48]
        batch = trainer.prompts.batch(PROMPTS)
        assert batch["unique_input_ids"].shape == (2, 2, 77) and batch["prompt_index"].tolist() == [0, 1, 0]
        cond = trainer.prompts.encode(batch["unique_input_ids"], batch["prompt_index"])
        hidden, pooled = cond["hidden"], cond["pooled"]
    assert hidden.shape == (3, 77, 96) and torch.allclose(hidden, expected_hidden, atol=1e-6)
    assert torch.allclose(pooled, expected_pooled, atol=1e-6)

    # -- what the UNet gets in a step: the pooled embeddings and each sample's own time ids
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs["added_cond_kwargs"] or {})

    hook = trainer.unet.register_forward_pre_hook(record, with_kwargs=True)
    samples = [Sample("source", 0, PROMPTS[0], 0), Sample("source", 3, PROMPTS[2], 3), Sample("composed", 2, PROMPTS[1], 1)]
    with torch.no_grad():
        trainer.compute_loss(trainer.build_batch(samples, 0, cfg.phase2), phase=2)
    hook.remove()
    assert seen["time_ids"].tolist() == [[120, 200, 0, 28, 64, 64], [120, 200, 0, 14, 64, 64], [96, 96, 0, 0, 64, 64]]
    assert torch.allclose(seen["text_embeds"], expected_pooled[[0, 0, 1]], atol=1e-6)

    # -- phase 1 trains the new rows of both encoders and nothing else
    frozen = snapshot(trainer.unet, trainer.vae, te1, te2)
    trainer.run_phase(1, 0, None, None)
    assert all(not torch.equal(before, te.get_input_embeddings().new_vectors) for before, te in zip(rows, (te1, te2)))
    after = snapshot(trainer.unet, trainer.vae, te1, te2)
    assert set(after) == set(frozen) and all(torch.equal(frozen[n], after[n]) for n in frozen)

    # -- phase 2: LoRA on the UNet and both text encoders, every loss term, both encoders' norms logged
    trainer.run_phase(2, 0, None, None)
    names = trainer.trainables.named(2)
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(n.startswith(prefix) and "lora_B" in n for n in names), prefix
    assert [h["phase"] for h in trainer.history] == [1, 1, 2, 2, 2]
    for entry in trainer.history:
        assert {"loss", "mask", "norm/mcv1", "norm_2/mcv1", "norm/mcv2", "norm_2/mcv2"} <= set(entry)
        assert entry["phase"] == 1 or {"attn", "id"} <= set(entry)
    assert any(h["id"] > 0 for h in trainer.history if h["phase"] == 2), "the identity term never ran"
    assert any(h["attn"] > 0 for h in trainer.history if h["phase"] == 2)

    # -- previews with StableDiffusionXLPipeline and the attention picture
    out = Path(cfg.output.dir)
    assert (out / "samples" / "p2-000003.png").is_file() and (out / "attention" / "p2-000003.png").is_file()
    assert "reference_token_outside_region" in json.loads((out / "attention" / "p2-000003.json").read_text())

    # -- the checkpoint holds the rows of both encoders under their names
    saved = load_file(out / "checkpoint-p2-000003" / "trainable.safetensors")
    assert set(saved) == set(names)
    assert torch.equal(saved["token_embedding.new_vectors"], te1.get_input_embeddings().new_vectors.detach())
    assert torch.equal(saved["token_embedding_2.new_vectors"], te2.get_input_embeddings().new_vectors.detach())

    # -- and a resumed run puts them (and both encoders' LoRA) back
    info = ckpt.CheckpointInfo(out / "checkpoint-p2-000003", 2, 3)
    trainable, state = ckpt.load_checkpoint(info)
    resumed = MagiCaptureTrainer(cfg, parts=build_sdxl_parts())
    resumed.setup_phase(2, state, trainable)
    for name, p in resumed.trainables.named(2).items():
        assert torch.equal(p.detach(), saved[name]), name


def test_sdxl_configs_load(tmp_path):
    folders = [tmp_path / n for n in ("model", "me", "style")]
    for f in folders:
        f.mkdir()
    paths = [f'model.pretrained="{folders[0]}"', f'data.source_dir="{folders[1]}"', f'data.reference_dir="{folders[2]}"']
    full = load_config("configs/magicapture_sdxl.toml", paths)
    assert full.data.resolution == 1024 and full.attention.layers == []
    assert (full.phase1.steps, full.phase1.batch_size, full.phase1.lr_embeddings) == (1200, 4, 5e-4)
    assert (full.phase2.steps, full.phase2.batch_size, full.phase2.max_timestep) == (1500, 4, 800)
    assert full.phase2.tasks == ["source", "reference", "composed"] and full.lora.text_encoder
    low = load_config("configs/low_vram_sdxl.toml", paths)
    assert (low.train.mixed_precision, low.train.gradient_checkpointing, low.optimizer.name) == ("bf16", True, "AdamW8bit")
    assert (low.phase1.batch_size // low.phase1.grad_accum, low.phase2.batch_size // low.phase2.grad_accum) == (1, 1)
    assert low.data.resolution == 1024


def test_resolution_and_layers_default_to_the_family(tmp_path):
    assert Config().data.resolution == 0 and Config().attention.layers == []
    with pytest.raises(ConfigError, match="data.resolution = 100: use a multiple of 8"):
        validate(load_config(None, ["data.resolution=100"], check_paths=False), "x")
    # checkpoints written when SD 1.x's values were the defaults still resume with the keys left empty
    saved = Config().to_dict()
    saved["data"]["resolution"] = 512
    saved["attention"]["layers"] = ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "up_blocks.1.attentions.0",
                                    "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
    assert compare_configs(saved, Config().to_dict(), phase=2, step=5) == ([], [])
    saved["data"]["resolution"] = 768
    refused, _ = compare_configs(saved, Config().to_dict(), phase=2, step=5)
    assert [c.key for c in refused] == ["data.resolution"]


def test_vae_upcast_follows_force_upcast_where_the_family_obeys_it(tiny_model, prepared_data, tmp_path):
    """Under fp16 the SDXL VAE (config force_upcast = true) runs in fp32 without train.vae_fp32, one whose
    config says false stays in fp16; an SD 1.x
    VAE stays in fp16 although diffusers' AutoencoderKL config says force_upcast = true by default."""
    from accelerate import Accelerator

    source, reference = prepared_data
    base = [f'data.source_dir="{source}"', f'data.reference_dir="{reference}"', f'output.dir="{tmp_path / "out"}"',
            "logging.tensorboard=false", 'train.mixed_precision="fp16"']
    sdxl = MagiCaptureTrainer(load_config("configs/test_tiny.toml", [f'model.pretrained="{tmp_path}"', *base]),
                              accelerator=Accelerator(), parts=build_sdxl_parts())
    assert sdxl.vae.config.force_upcast is True
    assert (sdxl.vae.dtype, sdxl.unet.dtype) == (torch.float32, torch.float16)
    fixed = build_sdxl_parts()
    fixed.vae.register_to_config(force_upcast=False)  # as the fp16-fix SDXL VAE's config says
    sdxl = MagiCaptureTrainer(load_config("configs/test_tiny.toml", [f'model.pretrained="{tmp_path}"', *base]),
                              accelerator=Accelerator(), parts=fixed)
    assert sdxl.vae.dtype == torch.float16
    sd1 = MagiCaptureTrainer(load_config("configs/test_tiny.toml", [f'model.pretrained="{tiny_model[0]}"', *base]),
                             accelerator=Accelerator())
    assert sd1.vae.config.force_upcast is True
    assert (sd1.vae.dtype, sd1.unet.dtype) == (torch.float16, torch.float16)


def test_train_magicapture_trains_an_sdxl_single_file(prepared_data, tiny_sdxl_model, tmp_path):
    """The command line on one SGM-layout .safetensors (what A1111 / ComfyUI users have), offline: found to be
    SDXL from its keys, both phases, exit status 0; the LoRA and embeddings it writes load into a fresh SDXL
    pipeline through diffusers' own loaders, every module of the file becoming a LoRA layer there."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    import train_magicapture

    folder, single = tiny_sdxl_model
    source, reference = prepared_data
    out = tmp_path / "out"
    rc = train_magicapture.main([
        "--config", "configs/test_tiny.toml", "--output_dir", str(out), "--max_steps", "2",
        f'model.pretrained="{single}"', f'model.config_dir="{folder}"',  # the tiny model's own shapes
        f'data.source_dir="{source}"', f'data.reference_dir="{reference}"', "logging.tensorboard=false",
        "output.bundle_embeddings=true",
    ])
    assert rc == 0
    saved = load_file(out / "checkpoint-p2-000002" / "trainable.safetensors")
    assert saved["token_embedding.new_vectors"].shape == (2, 32) and saved["token_embedding_2.new_vectors"].shape == (2, 64)
    assert any(k.startswith("text_encoder_2.") and "lora_B" in k for k in saved)

    lora = load_file(out / "magicapture.safetensors")
    modules = {k.split(".", 1)[0] for k in lora}
    by_prefix = {p: {m for m in modules if m.startswith(p)} for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    assert all(by_prefix.values()) and set().union(*by_prefix.values()) == modules
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in modules  # SGM names, kohya's SDXL rule
    # SDXL conditions on CLIP-L's penultimate layer: its last layer gets no gradient and has no LoRA; every
    # module that is there trained (OpenCLIP-G's last layer stays: its output is the pooled embedding)
    last_l = json.loads((folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"] - 1
    last_g = json.loads((folder / "text_encoder_2" / "config.json").read_text())["num_hidden_layers"] - 1
    assert not [m for m in modules if m.startswith(f"lora_te1_text_model_encoder_layers_{last_l}_")]
    assert [m for m in modules if m.startswith(f"lora_te1_text_model_encoder_layers_{last_l - 1}_")]
    assert [m for m in modules if m.startswith(f"lora_te2_text_model_encoder_layers_{last_g}_")]
    assert [k for k in lora if k.endswith("lora_up.weight") and not lora[k].any()] == []
    bundle = load_file(out / "magicapture_a1111.safetensors")  # A1111's one file; the LoRA above holds no bundle
    assert sorted(k for k in bundle if k.startswith("bundle_emb.")) == [
        "bundle_emb.mcv1.clip_g", "bundle_emb.mcv1.clip_l", "bundle_emb.mcv2.clip_g", "bundle_emb.mcv2.clip_l"]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.load_lora_weights(str(out / "magicapture.safetensors"))
    pipe.load_lora_weights({k: v for k, v in bundle.items() if not k.startswith("bundle_emb.")}, adapter_name="bundle")
    for model, prefix in ((pipe.unet, "lora_unet_"), (pipe.text_encoder, "lora_te1_"), (pipe.text_encoder_2, "lora_te2_")):
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert len(layers) == len(by_prefix[prefix]), prefix
        assert all(set(m.lora_A) == {"default_0", "bundle"} for m in layers), prefix  # both files, module for module
    fp16 = lambda t: t.to(torch.float16).float()  # output.save_precision, the default
    for row, word in enumerate(("mcv1", "mcv2")):  # one vector each, in the order the tokens were added
        vecs = load_file(out / f"{word}.safetensors")
        assert sorted(vecs) == ["clip_g", "clip_l"]
        assert torch.equal(vecs["clip_l"][0].float(), fp16(saved["token_embedding.new_vectors"][row]))
        assert torch.equal(vecs["clip_g"][0].float(), fp16(saved["token_embedding_2.new_vectors"][row]))
        pipe.load_textual_inversion(vecs["clip_l"], token=word, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(vecs["clip_g"], token=word, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    token_id = pipe.tokenizer_2.convert_tokens_to_ids("mcv1")
    assert pipe.tokenizer_2("a photo of mcv1").input_ids[4] == token_id  # one token, not split into pieces
    row = pipe.text_encoder_2.get_input_embeddings().weight[token_id]
    assert torch.allclose(row, load_file(out / "mcv1.safetensors")["clip_g"][0].float())


def test_log_line_shows_both_encoders_norms():
    from library.training.attention_guard import format_figures

    logs = {"loss": 1.0, "norm/mcv1": 0.4, "norm_2/mcv1": 0.9, "norm/mcv2": 0.1}
    assert format_figures(logs, ("mcv1", "mcv2")) == "loss 1 | mcv1: norm 0.4, norm 2 0.9 | mcv2: norm 0.1"
