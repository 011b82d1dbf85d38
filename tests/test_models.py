"""Model loading offline: a diffusers folder and an original-layout single file give the same model."""

from __future__ import annotations

import pytest
import torch

from library.models.loading import ModelLoadError, load_stable_diffusion
from testkit.tiny import CONFIG_DIR


def test_tokenizer_is_the_real_clip_vocabulary():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of sks person").input_ids == [49406, 320, 1125, 539, 48136, 2533, 49407]


def test_folder_and_single_file_give_identical_outputs(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, single = tiny_model
    a = load_stable_diffusion(str(folder))
    b = load_stable_diffusion(str(single), config_dir=folder)
    assert b.name == single.name
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.unet(x, 10, ctx).sample, b.unet(x, 10, ctx).sample, rtol=0, atol=1e-5)
        ids = a.tokenizer("a photo of a person", padding="max_length", return_tensors="pt").input_ids
        assert torch.equal(a.text_encoder(ids)[0], b.text_encoder(ids)[0])
        img = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(a.vae.encode(img).latent_dist.mean, b.vae.encode(img).latent_dist.mean)
    assert torch.equal(a.noise_scheduler.alphas_cumprod, b.noise_scheduler.alphas_cumprod)


def test_ckpt_loads_only_weights(tiny_model, tmp_path):
    from safetensors.torch import load_file

    folder, single = tiny_model
    state = load_file(str(single))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, ckpt)
    parts = load_stable_diffusion(str(ckpt), config_dir=folder)
    assert parts.unet is not None

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "x": Evil()}, bad)
    with pytest.raises(ModelLoadError, match=r"evil\.ckpt: refused: unpickling it would call print"):
        load_stable_diffusion(str(bad), config_dir=folder)


def test_refusals(tmp_path):
    txt = tmp_path / "model.txt"
    txt.write_text("hello")
    with pytest.raises(ModelLoadError, match="not found or not a model"):
        load_stable_diffusion(str(txt))
    with pytest.raises(ModelLoadError, match="not found"):
        load_stable_diffusion(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="hub id"):
        load_stable_diffusion("runwayml/stable-diffusion-v1-5", offline=True)
    from safetensors.torch import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1), "conditioner.embedders.1.model.x": torch.zeros(1)}, str(sdxl))
    with pytest.raises(ModelLoadError, match="SDXL"):
        load_stable_diffusion(str(sdxl))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"junk.safetensors: a text file \('not a safetensors file'\.\.\.\), not weights"):
        load_stable_diffusion(str(junk))
