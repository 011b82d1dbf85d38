"""The two-phase loop on the tiny model: what trains in each phase, finite logged losses, resume, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.config import load_config
from library.testing import save_random_arcface
from library.trainer import MagiCaptureTrainer


def make_config(tiny_model, prepared_data, out: Path, *extra: str):
    folder, _ = tiny_model
    source, reference = prepared_data
    arcface = save_random_arcface(out.parent / "arcface.pth")
    overrides = [
        f'model.pretrained="{folder}"',
        f'data.source_dir="{source}"',
        f'data.reference_dir="{reference}"',
        f'output.dir="{out}"',
        f'loss.identity_weights="{arcface}"',
        *extra,
    ]
    return load_config("configs/test_tiny.toml", overrides)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" not in n and "new_vectors" not in n}


def test_each_phase_trains_only_its_parameters(tiny_model, prepared_data, tmp_path):
    cfg = make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0")
    trainer = MagiCaptureTrainer(cfg)
    unet0, te0, vae0 = snapshot(trainer.unet), snapshot(trainer.text_encoder), snapshot(trainer.vae)
    vectors0 = trainer.named_trainables(1)["token_embedding.new_vectors"].detach().clone()

    trainer.run_phase(1, 0, None, None)
    assert not trainer.lora_added
    vectors1 = trainer.named_trainables(1)["token_embedding.new_vectors"].detach().clone()
    assert not torch.equal(vectors0, vectors1), "phase 1 must move the token embeddings"
    for before, model in ((unet0, trainer.unet), (te0, trainer.text_encoder), (vae0, trainer.vae)):
        after = snapshot(model)
        assert all(torch.equal(before[n], after[n]) for n in before)

    trainer.run_phase(2, 0, None, None)
    lora = {n: p for n, p in trainer.named_trainables(2).items() if "lora_" in n}
    assert any(n.startswith("unet.") for n in lora) and any(n.startswith("text_encoder.") for n in lora)
    # peft zero-initialises lora_B; after phase 2 every UNet lora_B of the cross-attention has moved
    moved = [n for n, p in lora.items() if "lora_B" in n and n.startswith("unet.") and p.abs().sum() > 0]
    assert len(moved) == sum(1 for n in lora if "lora_B" in n and n.startswith("unet."))
    assert not torch.equal(vectors1, trainer.named_trainables(2)["token_embedding.new_vectors"])
    for before, model in ((unet0, trainer.unet), (te0, trainer.text_encoder), (vae0, trainer.vae)):
        after = {n.replace(".base_layer", ""): v for n, v in snapshot(model).items()}
        assert set(before) == set(after)
        assert all(torch.equal(before[n], after[n]) for n in before), "frozen weights changed"

    phases = [h["phase"] for h in trainer.history]
    assert phases == [1] * cfg.phase1.steps + [2] * cfg.phase2.steps
    for entry in trainer.history:
        terms = {"loss", "mask"} | ({"attn", "id"} if entry["phase"] == 2 else set())
        assert terms <= set(entry), entry
        assert all(torch.isfinite(torch.tensor(entry[k])) for k in terms)
    assert any(h.get("id", 0) > 0 for h in trainer.history), "the composed task's identity term never ran"


def test_full_run_exports_and_resume_matches(tiny_model, prepared_data, tmp_path):
    out = tmp_path / "out"
    cfg = make_config(tiny_model, prepared_data, out, "sample.every=3", "output.keep_checkpoints=5")
    MagiCaptureTrainer(cfg).run()
    for name in ("magicapture.safetensors", "mcv1.safetensors", "mcv2.safetensors", "effective_config.toml",
                 "loss_history.jsonl", "samples/p2-000003.png", "attention/p2-000003.png", "attention/p2-000003.json"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents*")), "no TensorBoard log"
    with safe_open(str(out / "mcv1.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (1, 32)
    with safe_open(str(out / "magicapture.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_network_dim"] == "4"
    assert "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    shares = json.loads((out / "attention/p2-000003.json").read_text())
    assert 0.0 <= shares["reference_token_outside_region"] <= 1.0
    assert 0.0 <= shares["source_token_outside_face_normalised"] <= 1.0
    assert 0.0 < shares["source_token_peak"] <= 1.0 and shares["reference_token_contrast"] > 0

    # resume from the mid-phase-2 checkpoint in a fresh process-like trainer: same final state
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-p2-000002", resumed / "checkpoint-p2-000002")
    cfg2 = make_config(tiny_model, prepared_data, resumed, "sample.every=0")
    MagiCaptureTrainer(cfg2).run(resume="latest")
    a = safe_open(str(out / "checkpoint-p2-000003" / "trainable.safetensors"), "pt")
    b = safe_open(str(resumed / "checkpoint-p2-000003" / "trainable.safetensors"), "pt")
    assert set(a.keys()) == set(b.keys())
    for key in a.keys():
        torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=0, atol=1e-6, msg=key)


def test_nan_loss_stops_and_keeps_checkpoint(tiny_model, prepared_data, tmp_path):
    from library.trainer import TrainingStopped

    cfg = make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0", "phase1.lr_embeddings=1e30",
                      "optimizer.max_grad_norm=0.0", "optimizer.name=\"SGD\"")
    trainer = MagiCaptureTrainer(cfg)
    with pytest.raises(TrainingStopped, match=r"loss became (nan|inf).* term\) at phase 1 step"):
        trainer.run()


def test_identity_term_on_several_composed_samples_reaches_lora(tiny_model, prepared_data, tmp_path):
    """The windowed VAE decode, the alignment and ArcFace pass gradient to the UNet LoRA, sample by sample."""
    from library.data import Sample

    cfg = make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0", "loss.attn_weight=0")
    trainer = MagiCaptureTrainer(cfg)
    pcfg, *_ = trainer.setup_phase(2)
    samples = [Sample("composed", i, "a photo of a mcv1 person in the style of mcv2", i) for i in range(3)]
    for window in (True, False):
        cfg.loss.id_decode_window = window
        batch = trainer.build_batch(samples, 0, pcfg)
        batch["timesteps"][:] = 100  # below T' = 800: the term applies to every sample
        noisy = trainer.noise_scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"].cpu())
        hidden = trainer.text_encoder(batch["input_ids"])[0]
        pred = trainer.unet(noisy, batch["timesteps"], hidden).sample
        ident, valid = trainer.identity_term(batch, noisy, pred)
        assert valid.all() and ident.shape == (3,)
        assert torch.isfinite(ident).all() and (ident > 0).all() and (ident <= 2).all()
        trainer.unet.zero_grad()
        ident.sum().backward()
        grads = [p.grad for n, p in trainer.unet.named_parameters() if "lora_B" in n]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no LoRA gradient (window={window})"


def test_face_window_covers_the_landmarks():
    from library.trainer import _face_window

    landmarks = torch.tensor([[[100.0, 100], [140, 100], [120, 120], [105, 140], [135, 140]],
                              [[10.0, 10], [30, 10], [20, 20], [12, 28], [28, 28]]])
    corner, side = _face_window(landmarks, latent_size=32)
    assert side % 8 == 0 and 8 <= side <= 32
    for lm, (x, y) in zip(landmarks, corner.tolist()):
        assert (lm[:, 0] / 8 >= x).all() and (lm[:, 0] / 8 <= x + side).all()
        assert (lm[:, 1] / 8 >= y).all() and (lm[:, 1] / 8 <= y + side).all()
        assert 0 <= x <= 32 - side and 0 <= y <= 32 - side


def test_demo_config_through_the_cli(tiny_model, prepared_data, tmp_path, capsys):
    import train_magicapture

    folder, _ = tiny_model
    source, reference = prepared_data
    out = tmp_path / "demo"
    rc = train_magicapture.main([
        "--config", "configs/demo.toml", "--output_dir", str(out), "--max_steps", "2",
        f'model.pretrained="{folder}"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
        "data.resolution=64", "sample.every=2", "sample.steps=2", "loss.identity_weights=\"\"",
    ])
    assert rc == 0
    assert (out / "demo.safetensors").is_file() and (out / "mcv1.pt").is_file()
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("identity (ID) loss off") == 1  # said once


def test_bad_identity_weights_is_a_one_line_error(tiny_model, prepared_data, tmp_path, capsys):
    import train_magicapture

    folder, _ = tiny_model
    source, reference = prepared_data
    bad = tmp_path / "arcface.onnx"
    bad.write_text("not a network")
    rc = train_magicapture.main([
        "--config", "configs/test_tiny.toml", "--output_dir", str(tmp_path / "o"),
        f'model.pretrained="{folder}"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
        f'loss.identity_weights="{bad}"',
    ])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: loss.identity_weights") and "arcface.onnx" in err[-1]


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tiny_model, prepared_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = make_config(tiny_model, prepared_data, out, "sample.every=0", "output.save_every=0")
    trainer = MagiCaptureTrainer(cfg)
    real_step = trainer.optimizer_step
    calls = {"n": 0}

    def interrupted(samples, step, phase, *rest):
        if phase == 2 and step == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_step(samples, step, phase, *rest)

    monkeypatch.setattr(trainer, "optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    saved = sorted(p.name for p in out.glob("checkpoint-*"))
    assert saved[-1] == "checkpoint-p2-000001"  # phase 2, one step done when Ctrl-C came
    assert not list(out.glob("*.tmp")) and not (out / "magicapture.safetensors").exists()
    resumed = MagiCaptureTrainer(make_config(tiny_model, prepared_data, out, "sample.every=0", "output.save_every=0"))
    resumed.run(resume="latest")
    assert [h["step"] for h in resumed.history] == [2, 3] and (out / "magicapture.safetensors").is_file()


def test_adamw8bit_default_steps_and_checkpoints_safely(tmp_path):
    from library.config import OptimizerConfig
    from library.optim import build_optimizer

    p = torch.nn.Parameter(torch.randn(8, 300))
    opt = build_optimizer(OptimizerConfig(), [{"params": [p], "lr": 1e-2}])
    assert type(opt).__name__ == "AdamW8bit"
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(before, p.detach())
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))  # no pickled objects needed


def test_identity_by_detector_skips_faceless_and_uses_found_faces(tiny_model, prepared_data, tmp_path, monkeypatch):
    """loss.id_face = detector (the released code): no face on x0_hat -> sample skipped; a face -> its landmarks."""
    import numpy as np

    import library.face_restore as face_restore
    from library.data import Sample

    cfg = make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0", 'loss.id_face="detector"')
    trainer = MagiCaptureTrainer(cfg)
    pcfg, *_ = trainer.setup_phase(2)
    samples = [Sample("composed", i, "a photo of a mcv1 person in the style of mcv2", i) for i in range(2)]
    batch = trainer.build_batch(samples, 0, pcfg)
    batch["timesteps"][:] = 100
    noisy = trainer.noise_scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"].cpu())
    pred = trainer.unet(noisy, batch["timesteps"], trainer.text_encoder(batch["input_ids"])[0]).sample

    ident, valid = trainer.identity_term(batch, noisy, pred)  # the random model draws no face: mediapipe finds none
    assert not valid.any() and torch.equal(ident, torch.zeros(2))

    seen = []

    def one_face_on_first(rgb):
        seen.append(rgb.shape)
        return [np.array([[20, 25], [44, 25], [32, 36], [22, 46], [42, 46]], np.float32)] if len(seen) == 1 else []

    monkeypatch.setattr(face_restore, "detect_face_landmarks", one_face_on_first)
    ident, valid = trainer.identity_term(batch, noisy, pred)
    assert valid.tolist() == [True, False] and seen == [(64, 64, 3), (64, 64, 3)]
    assert ident[0] > 0 and ident[1] == 0
    ident.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainer.unet.named_parameters() if "lora_B" in n)


def test_vae_fp32_keeps_the_vae_in_float32_and_decodes_with_gradient(tiny_model, prepared_data, tmp_path):
    """Under bf16 mixed precision the VAE follows the weights' dtype, unless train.vae_fp32 keeps it in fp32."""
    half = MagiCaptureTrainer(make_config(tiny_model, prepared_data, tmp_path / "a", "sample.every=0",
                                          'train.mixed_precision="bf16"'))
    assert all(p.dtype == torch.bfloat16 for p in half.vae.parameters())
    trainer = MagiCaptureTrainer(make_config(tiny_model, prepared_data, tmp_path / "b", "sample.every=0",
                                             'train.mixed_precision="bf16"', "train.vae_fp32=true"))
    assert all(p.dtype == torch.float32 for p in trainer.vae.parameters())
    assert all(p.dtype == torch.bfloat16 for p in trainer.unet.parameters())
    x0 = torch.randn(1, 4, 8, 8, requires_grad=True)
    with trainer.acc.autocast():  # the fp32 VAE must not be pulled back to bf16 by autocast
        image = trainer.decode(x0)
    assert image.shape == (1, 3, 64, 64) and image.dtype == torch.float32
    image.mean().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
