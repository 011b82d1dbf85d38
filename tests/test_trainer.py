"""The two-phase loop on the tiny model: what trains in each phase, the loss of one step against an
independent recomputation, the attention-collapse guard, resume, export.

`test_compute_loss_matches_the_formulas_by_hand` is meant to fail under mutations of the trainer's loss
assembly: swapping the composed task's two refocusing masks, halving or summing the refocusing terms,
moving the first-half weight onto the whole loss, or applying the identity loss to the wrong tasks.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch.nn.functional as F

import pytest
import torch
from safetensors import safe_open

from library.config import load_config
from testkit.tiny import save_random_arcface
from library.training.trainer import MagiCaptureTrainer


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
    vectors0 = trainer.trainables.named(1)["token_embedding.new_vectors"].detach().clone()

    trainer.run_phase(1, 0, None, None)
    assert not trainer.trainables.lora_added
    vectors1 = trainer.trainables.named(1)["token_embedding.new_vectors"].detach().clone()
    assert not torch.equal(vectors0, vectors1), "phase 1 must move the token embeddings"
    for before, model in ((unet0, trainer.unet), (te0, trainer.text_encoder), (vae0, trainer.vae)):
        after = snapshot(model)
        assert all(torch.equal(before[n], after[n]) for n in before)

    trainer.run_phase(2, 0, None, None)
    lora = {n: p for n, p in trainer.trainables.named(2).items() if "lora_" in n}
    assert any(n.startswith("unet.") for n in lora) and any(n.startswith("text_encoder.") for n in lora)
    # peft zero-initialises lora_B; after phase 2 every UNet lora_B of the cross-attention has moved
    moved = [n for n, p in lora.items() if "lora_B" in n and n.startswith("unet.") and p.abs().sum() > 0]
    assert len(moved) == sum(1 for n in lora if "lora_B" in n and n.startswith("unet."))
    assert not torch.equal(vectors1, trainer.trainables.named(2)["token_embedding.new_vectors"])
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
    assert set(shares) == {f"{t}_{k}" for t in ("source_token", "reference_token") for k in ("peak", "contrast")} | {
        "source_token_outside_face", "source_token_outside_face_normalised",
        "reference_token_outside_region", "reference_token_outside_region_normalised"}
    # loss_history.jsonl holds every step as logged, with the per-token figures (phase 2) and norms
    history = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert [(h["phase"], h["step"]) for h in history] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    for h in history:
        assert {"norm/mcv1", "norm/mcv2"} <= set(h)
        assert ({"inside/mcv1", "outside/mcv1", "inside/mcv2", "outside/mcv2"} <= set(h)) == (h["phase"] == 2)

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
    from library.training.trainer import TrainingStopped

    cfg = make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0", "phase1.lr_embeddings=1e30",
                      "optimizer.max_grad_norm=0.0", "optimizer.name=\"SGD\"")
    trainer = MagiCaptureTrainer(cfg)
    with pytest.raises(TrainingStopped, match=r"loss became (nan|inf).* term\) at phase 1 step"):
        trainer.run()


def test_identity_term_on_several_composed_samples_reaches_lora(tiny_model, prepared_data, tmp_path):
    """The windowed VAE decode, the alignment and ArcFace pass gradient to the UNet LoRA, sample by sample."""
    from library.training.data import Sample
    from library.training.identity_term import face_window

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
        ident, valid = trainer.id_term(batch, noisy, pred)
        assert valid.all() and ident.shape == (3,)
        # by hand: x0 = (z_t - sqrt(1 - a) eps) / sqrt(a); decoded; aligned on the reference's landmarks;
        # 1 - cos against the embedding of the sample's source image
        with torch.no_grad():
            a = trainer.noise_scheduler.alphas_cumprod[100]
            x0 = (noisy - (1 - a).sqrt() * pred) / a.sqrt()
            lms = trainer.reference.landmarks[:3]
            if window:  # one window for the run: the largest face of both sets, whatever the batch holds
                faces = torch.cat([trainer.source.landmarks[trainer.source.has_face], trainer.reference.landmarks[trainer.reference.has_face]])
                spread = (faces.amax(1) - faces.amin(1)).amax(-1).max().item()
                side = min(x0.shape[-1], max(8, math.ceil(spread * 3.2 / 64) * 8))
                assert trainer.id_term.window == side
                corner, _ = face_window(lms, x0.shape[-1], side)
                x0 = torch.stack([x0[i, :, y : y + side, x : x + side] for i, (x, y) in enumerate(corner.tolist())])
                lms = lms - corner.float()[:, None, :] * 8
            emb = trainer.id_term.encoder(trainer.vae.decode(x0 / trainer.vae.config.scaling_factor).sample, lms)
            target = trainer.id_term.source_embeddings[torch.tensor([0, 1, 2])]
            want = 1 - (emb * target).sum(-1) / (emb.norm(dim=-1) * target.norm(dim=-1))
        torch.testing.assert_close(ident.detach(), want, rtol=1e-4, atol=1e-6)
        # a sample's term does not depend on the other samples of its micro-batch (grad_accum, processes)
        alone = [trainer.id_term({k: (v[i : i + 1] if torch.is_tensor(v) else v) for k, v in batch.items() if k != "id_plan"},
                                 noisy[i : i + 1], pred[i : i + 1])[0] for i in range(3)]
        torch.testing.assert_close(torch.cat(alone).detach(), ident.detach(), rtol=1e-5, atol=1e-6)
        trainer.unet.zero_grad()
        ident.sum().backward()
        grads = [p.grad for n, p in trainer.unet.named_parameters() if "lora_B" in n]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no LoRA gradient (window={window})"


def test_face_window_covers_the_landmarks():
    from library.training.identity_term import face_window

    landmarks = torch.tensor([[[100.0, 100], [140, 100], [120, 120], [105, 140], [135, 140]],
                              [[10.0, 10], [30, 10], [20, 20], [12, 28], [28, 28]]])
    corner, side = face_window(landmarks, latent_size=32)
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
    # the identity loss is on with no file given: dlib's network, said once
    assert (captured.out + captured.err).count("identity (ID) loss: dlib ResNet v1 (face_recognition_models)") == 1


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
    import os
    import signal

    out = tmp_path / "out"
    cfg = make_config(tiny_model, prepared_data, out, "sample.every=0", "output.save_every=0")
    trainer = MagiCaptureTrainer(cfg)
    real_step = trainer.optimizer_step

    def interrupted(samples, step, phase, *rest):
        if phase == 2 and step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of phase 2's second step
        return real_step(samples, step, phase, *rest)

    monkeypatch.setattr(trainer, "optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt, match=r"stopped in phase 2 at step 2/3: saved .*checkpoint-p2-000002; "
                                                r"continue with --resume latest"):
        trainer.run()
    saved = sorted(p.name for p in out.glob("checkpoint-*"))
    assert saved[-1] == "checkpoint-p2-000002"  # the step under way when Ctrl-C came finished, and was saved
    assert not list(out.glob("*.tmp")) and not (out / "magicapture.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the trainer's handler is gone
    resumed = MagiCaptureTrainer(make_config(tiny_model, prepared_data, out, "sample.every=0", "output.save_every=0"))
    resumed.run(resume="latest")
    assert [h["step"] for h in resumed.history] == [3] and (out / "magicapture.safetensors").is_file()


def test_adamw8bit_default_steps_and_checkpoints_safely(tmp_path):
    from library.config import OptimizerConfig
    from library.training.optim import build_optimizer

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

    import library.faces as faces
    from library.training.data import Sample

    cfg = make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0", 'loss.id_face="detector"')
    trainer = MagiCaptureTrainer(cfg)
    pcfg, *_ = trainer.setup_phase(2)
    samples = [Sample("composed", i, "a photo of a mcv1 person in the style of mcv2", i) for i in range(2)]
    batch = trainer.build_batch(samples, 0, pcfg)
    batch["timesteps"][:] = 100
    noisy = trainer.noise_scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"].cpu())
    pred = trainer.unet(noisy, batch["timesteps"], trainer.text_encoder(batch["input_ids"])[0]).sample

    ident, valid = trainer.id_term(batch, noisy, pred)  # the random model draws no face: mediapipe finds none
    assert not valid.any() and torch.equal(ident, torch.zeros(2))

    seen = []

    def one_face_on_first(rgb):
        seen.append(rgb.shape)
        return [np.array([[20, 25], [44, 25], [32, 36], [22, 46], [42, 46]], np.float32)] if len(seen) == 1 else []

    monkeypatch.setattr(faces, "detect_face_landmarks", one_face_on_first)
    ident, valid = trainer.id_term(batch, noisy, pred)
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
        image = trainer.id_term.decode(x0)
    assert image.shape == (1, 3, 64, 64) and image.dtype == torch.float32
    image.mean().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ one step, by hand
def _reconstruction_by_hand(pred, noise, mask):
    """Eq. 4-6 with the released area rescaling: sum(((pred - noise) m)^2) / (C sum(m))."""
    return (((pred - noise) * mask) ** 2).sum() / (pred.shape[0] * mask.sum())


def _refocus_by_hand(maps, target):
    """Eq. 8 for one token of one sample: maps [M, h, w] -> bilinear to the target's size, per-map
    (A - min + c max) / (max - min + c max), c = 1e-6, mean over maps, mean of ((S - M)(1 - M))^2."""
    up = F.interpolate(maps[None].double(), size=target.shape[-2:], mode="bilinear", align_corners=False)[0]
    mn, mx = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    s = ((up - mn + 1e-6 * mx) / (mx - mn + 1e-6 * mx)).mean(0)
    m = target[0].double()
    return (((s - m) * (1 - m)) ** 2).mean()


def _one_step(trainer, samples, phase_step, timesteps):
    """compute_loss on a batch of `samples`, recording the prediction, the maps and the identity term."""
    pcfg = trainer.cfg.phase2
    batch = trainer.build_batch(samples, phase_step, pcfg)
    batch["timesteps"] = torch.tensor(timesteps)
    seen = {}
    real_maps, real_unet, real_id = trainer.store.maps, trainer.unet_forward, trainer.id_term

    def maps():
        seen["maps"] = real_maps().detach()
        return real_maps()

    def unet(*args, **kwargs):
        out = real_unet(*args, **kwargs)
        seen["pred"] = out.sample.detach().float()
        return out

    def identity_term(*args):
        ident, valid = real_id(*args)
        seen["id"], seen["id_valid"] = ident.detach(), valid.clone()
        return ident, valid

    trainer.store.maps, trainer.unet_forward, trainer.id_term = maps, unet, identity_term
    try:
        losses = trainer.compute_loss(batch, phase=2)
    finally:
        del trainer.store.maps
        trainer.unet_forward, trainer.id_term = real_unet, real_id
    return batch, losses, seen


def test_compute_loss_matches_the_formulas_by_hand(tiny_model, prepared_data, tmp_path):
    from library.training.data import Sample

    trainer = MagiCaptureTrainer(make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0"))
    trainer.setup_phase(2)
    src, ref = trainer.source, trainer.reference
    samples = [Sample("source", 1, "a photo of a mcv1 person", 1),
               Sample("reference", 2, "a painting of a person in the style of mcv2", 0),
               Sample("composed", 0, "a photo of a mcv1 person in the style of mcv2", 2)]
    # each sample's own masks, taken from the cached sets (not from the batch)
    recon_masks = [src.recon_masks[1], ref.recon_masks[2], ref.recon_masks[0]]
    targets = [[(0, src.region_masks[1])],                               # source: [V1] on its face
               [(1, ref.region_masks[2])],                               # reference: [V2] off the face
               [(0, ref.face_masks[0]), (1, ref.region_masks[0])]]       # composed: both, averaged
    assert src.face_masks[1].sum() > 0 and ref.face_masks[0].sum() > 0 and (ref.face_masks[0] != ref.region_masks[0]).any()

    for phase_step, weights, id_tasks, id_valid in (
        (0, [1.0, 2.0, 2.0], ["source", "composed"], [True, False, True]),   # first half; released ID tasks
        (trainer.cfg.phase2.steps, [1.0, 1.0, 1.0], ["composed"], [False, False, True]),  # second half; paper's
    ):
        trainer.cfg.loss.id_tasks = id_tasks
        batch, losses, seen = _one_step(trainer, samples, phase_step, [100, 300, 500])
        pred, maps, noise = seen["pred"].double(), seen["maps"], batch["noise"].double()
        recon = torch.stack([_reconstruction_by_hand(pred[b], noise[b], recon_masks[b].double()) for b in range(3)])
        attn = torch.stack([torch.stack([_refocus_by_hand(maps[b, k], m) for k, m in targets[b]]).mean() for b in range(3)])
        assert seen["id_valid"].tolist() == id_valid  # ID only on loss.id_tasks (t < 800, faces found)
        ident = seen["id"].double()
        assert (ident[seen["id_valid"]] > 0).all() and (ident[~seen["id_valid"]] == 0).all()
        w = torch.tensor(weights, dtype=torch.float64)
        total = (w * recon + 2.5 * attn + 0.25 * ident).mean()  # the weight touches reconstruction only
        torch.testing.assert_close(losses["loss"].double(), total, rtol=1e-5, atol=0)
        torch.testing.assert_close(losses["mask"].double(), recon.mean(), rtol=1e-5, atol=0)
        torch.testing.assert_close(losses["attn"].double(), attn.mean(), rtol=1e-5, atol=0)
        torch.testing.assert_close(losses["id"].double(), ident[seen["id_valid"]].mean(), rtol=1e-5, atol=0)
        # the guard's figures: [V1] over the source and composed samples, [V2] over reference and composed
        for k, word, members in ((0, "mcv1", (0, 2)), (1, "mcv2", (1, 2))):
            inside, outside = [], []
            for b in members:
                m = dict(targets[b])[k][0].double()
                up = F.interpolate(maps[b, k].mean(0)[None, None].double(), size=m.shape, mode="bilinear")[0, 0]
                inside.append((up * m).sum() / m.sum())
                outside.append((up * (1 - m)).sum() / up.sum())
            torch.testing.assert_close(losses[f"inside/{word}"].double(), torch.stack(inside).mean(), rtol=1e-5, atol=0)
            torch.testing.assert_close(losses[f"outside/{word}"].double(), torch.stack(outside).mean(), rtol=1e-5, atol=0)
        vectors = trainer.trainables.named(2)["token_embedding.new_vectors"].detach()
        torch.testing.assert_close(losses["norm/mcv1"], vectors[0].norm())
        torch.testing.assert_close(losses["norm/mcv2"], vectors[1].norm())


def test_compute_loss_asks_the_family_objective(tiny_model, prepared_data, tmp_path):
    """The loop takes the noisy latents, the model's timestep and the loss target from the objective: with a
    flow-matching objective in place of DDPM, x_t = (1 - s) x0 + s noise, the UNet gets t = 1000 s and the
    reconstruction is taken against v = noise - x0 (a loss on epsilon fails here)."""
    from library.models.objectives import FlowMatchObjective
    from library.training.data import Sample

    trainer = MagiCaptureTrainer(make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0"))
    trainer.objective = trainer.id_term.objective = FlowMatchObjective(shift=3.0)
    trainer.setup_phase(2)
    samples = [Sample("source", 1, "a photo of a mcv1 person", 1), Sample("reference", 2, "a painting in the style of mcv2", 0)]
    calls = []
    real = trainer.unet_forward
    trainer.unet_forward = lambda noisy, t, *a, **k: calls.append((noisy.detach(), t)) or real(noisy, t, *a, **k)
    batch, losses, seen = _one_step(trainer, samples, trainer.cfg.phase2.steps, [0.25, 0.75])
    x0, noise = batch["latents"].double(), batch["noise"].double()
    s = torch.tensor([0.25, 0.75], dtype=torch.float64)[:, None, None, None]
    torch.testing.assert_close(calls[0][0].double(), (1 - s) * x0 + s * noise, rtol=1e-5, atol=1e-6)
    assert calls[0][1].tolist() == [250.0, 750.0]
    pred, v = seen["pred"].double(), noise - x0
    masks = [trainer.source.recon_masks[1], trainer.reference.recon_masks[2]]
    recon = torch.stack([_reconstruction_by_hand(pred[b], v[b], masks[b].double()) for b in range(2)])
    torch.testing.assert_close(losses["mask"].double(), recon.mean(), rtol=1e-5, atol=0)


def test_collapse_guard_on_the_tiny_model(tiny_model, prepared_data, tmp_path, monkeypatch, capsys):
    """60 refocusing-only steps: the released literal S drains the tokens' attention and the guard stops
    the run; eq. 8 as written keeps each token's inside probability within [0.5, 2]x of its start."""
    import library.training.trainer as trainer_module
    from library.training.trainer import TrainingStopped

    # refocusing alone moves the weights (no reconstruction, no identity)
    monkeypatch.setattr(trainer_module, "masked_reconstruction_loss",
                        lambda pred, target, mask, area=True: pred.float().sum((1, 2, 3)) * 0)
    common = ["sample.every=0", "output.save_every=20", 'loss.identity_weights=""', "phase2.steps=60",
              "phase2.lr_unet=2e-3", "phase2.lr_text_encoder=8e-4", "phase2.lr_embeddings=2e-4",
              'phase2.lr_scheduler="constant"', 'loss.attn_collapse_action="stop"', "logging.print_every=20"]
    detached = MagiCaptureTrainer(make_config(tiny_model, prepared_data, tmp_path / "d", *common, "loss.attn_detach_extremes=true"))
    with pytest.raises(TrainingStopped, match=r"attention to mcv[12] inside its region fell to .* stopped .*checkpoint-p2-000040"):
        detached.run_phase(2, 0, None, None)
    assert 40 < detached.history[-1]["step"] < 60
    assert (tmp_path / "d" / "checkpoint-p2-000040").is_dir()  # the last checkpoint is kept

    attached = MagiCaptureTrainer(make_config(tiny_model, prepared_data, tmp_path / "a", *common))
    assert attached.cfg.loss.attn_detach_extremes is False  # the default
    capsys.readouterr()
    attached.run_phase(2, 0, None, None)
    assert len(attached.history) == 60 and not attached.guard.tripped
    out = capsys.readouterr()
    assert "warning" not in out.out + out.err
    assert "mcv1: inside" in out.out + out.err and "outside share" in out.out + out.err  # the log line
    for word in ("mcv1", "mcv2"):
        inside = [h[f"inside/{word}"] for h in attached.history]
        start = sum(inside[:5]) / 5
        assert all(0.5 * start <= v <= 2 * start for v in inside), (word, start, min(inside), max(inside))


def test_attention_report_shares_by_hand(tiny_model, prepared_data, tmp_path, monkeypatch):
    """Uniform maps (a constant token column): the raw share outside a region is the region's complement
    fraction, whatever the upsampling; contrast 0; peak the constant."""
    from library.training.previews import attention_report

    trainer = MagiCaptureTrainer(make_config(tiny_model, prepared_data, tmp_path / "out", "sample.every=0"))
    ref = trainer.reference
    n = len(ref) // 2  # the report uses the unflipped images
    real_maps = trainer.store.maps

    def uniform():
        maps = real_maps()
        return torch.full_like(maps, 0.01)

    monkeypatch.setattr(trainer.store, "maps", uniform)
    _, shares = attention_report(trainer)
    face = ref.face_masks[:n].float().mean((1, 2, 3))  # per image: the face's share of the pixels
    assert shares["source_token_outside_face"] == pytest.approx(float((1 - face).mean()), rel=1e-5)
    assert shares["reference_token_outside_region"] == pytest.approx(float(face.mean()), rel=1e-5)
    assert shares["source_token_contrast"] == pytest.approx(0.0, abs=1e-6)
    assert shares["reference_token_peak"] == pytest.approx(0.01, rel=1e-6)


def test_default_config_trains_with_dlibs_identity_loss(tiny_model, prepared_data, tmp_path):
    """No identity_weights: eq. 7 is on, with dlib's ResNet v1 in PyTorch; the term is finite and its
    gradient reaches the LoRA through the chip (it would not if the chip were detached)."""
    from library.models.identity import DlibEncoder
    from library.training.data import Sample

    folder, _ = tiny_model
    source, reference = prepared_data
    cfg = load_config("configs/test_tiny.toml", [f'model.pretrained="{folder}"', f'data.source_dir="{source}"',
                                                 f'data.reference_dir="{reference}"', f'output.dir="{tmp_path / "out"}"',
                                                 "sample.every=0", "loss.attn_weight=0"])
    assert cfg.loss.identity_weights == "" and cfg.loss.id_weight > 0
    trainer = MagiCaptureTrainer(cfg)
    assert isinstance(trainer.id_term.encoder, DlibEncoder)
    assert trainer.id_term.source_embeddings.shape[-1] == 128
    pcfg, *_ = trainer.setup_phase(2)
    batch = trainer.build_batch([Sample("composed", i, "a photo of a mcv1 person in the style of mcv2", i)
                                 for i in range(2)], 0, pcfg)
    batch["timesteps"][:] = 100
    noisy = trainer.noise_scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"].cpu())
    pred = trainer.unet(noisy, batch["timesteps"], trainer.text_encoder(batch["input_ids"])[0]).sample
    ident, valid = trainer.id_term(batch, noisy, pred)
    assert valid.all() and torch.isfinite(ident).all() and (ident > 0).all()
    trainer.unet.zero_grad()
    ident.sum().backward()
    grads = [p.grad for n, p in trainer.unet.named_parameters() if "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no LoRA gradient through dlib's chip"


def test_a_source_set_without_faces_trains_with_the_identity_loss_off(tiny_model, tmp_path, capsys):
    """Photos in which prepare found no face (here the toy world's subject, which has none) leave the
    identity loss nothing to compare with: the default config says so in one line and trains on."""
    from testkit.toyworld.sets import write_sets

    folder, _ = tiny_model
    sets = write_sets(tmp_path / "world", n=2)
    cfg = load_config("configs/test_tiny.toml", [f'model.pretrained="{folder}"', f'data.source_dir="{sets["source"]}"',
                                                 f'data.reference_dir="{sets["reference"]}"', f'output.dir="{tmp_path / "out"}"',
                                                 "data.resolution=64", "sample.every=0"])
    assert cfg.loss.id_weight > 0
    trainer = MagiCaptureTrainer(cfg)
    assert trainer.id_term is None
    said = [line for line in capsys.readouterr().out.splitlines() if "identity (ID) loss" in line]
    assert said == [f"identity (ID) loss off: no face was found in any source photo ({sets['source']})"]
