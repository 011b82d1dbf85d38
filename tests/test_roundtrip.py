"""After a real training run, the exported files reproduce the trained model in a fresh diffusers pipeline.

diffusers' own kohya and A1111 converters load them (`load_lora_weights`, `load_textual_inversion`); the
UNet and text-encoder outputs on the composed prompt must equal the trained model's, and every module of
the file must have become a LoRA layer (a LoRA with one wrong key loads silently with no effect).
"""

from __future__ import annotations

import logging

import torch

from library.config import load_config
from library.export import kohya_module_name, load_lora, lora_module_names
from library.trainer import MagiCaptureTrainer


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _lora_layers(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0)


def test_trained_files_reproduce_the_trained_model(tiny_model, prepared_data, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder, _ = tiny_model
    source, reference = prepared_data
    out = tmp_path / "out"
    cfg = load_config("configs/test_tiny.toml", [
        f'model.pretrained="{folder}"', f'data.source_dir="{source}"', f'data.reference_dir="{reference}"',
        f'output.dir="{out}"', 'output.save_precision="fp32"', "sample.every=0",
        "phase2.lr_unet=1e-2", "phase2.lr_text_encoder=1e-2",  # a few steps must move the LoRA visibly
    ])
    trainer = MagiCaptureTrainer(cfg)
    trainer.run()
    prompt = "a photo of a mcv1 person in the style of mcv2"
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    with torch.no_grad():
        ids = trainer.prompt_ids(prompt)[None]
        trained_text = trainer.text_encoder(ids)[0]
        trained_unet = trainer.unet(latents, t, trained_text).sample

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        base_unet = pipe.unet(latents, t, trained_text).sample
    records = _Records()
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).addHandler(records)
    try:
        pipe.load_lora_weights(str(out / "magicapture.safetensors"))
        pipe.load_textual_inversion(str(out / "mcv1.safetensors"), token="mcv1")
        pipe.load_textual_inversion(str(out / "mcv2.safetensors"), token="mcv2")
    finally:
        for name in ("diffusers", "transformers", "peft"):
            logging.getLogger(name).removeHandler(records)
    assert not [m for m in records.messages if "unexpected" in m.lower() or "missing" in m.lower()], records.messages

    tensors, _ = load_lora(out / "magicapture.safetensors")
    names = lora_module_names(tensors)
    assert sorted(kohya_module_name("lora_unet", n) for n in _lora_layers(pipe.unet)) == [n for n in names if n.startswith("lora_unet_")]
    assert sorted(kohya_module_name("lora_te", n) for n in _lora_layers(pipe.text_encoder)) == [n for n in names if n.startswith("lora_te_")]

    with torch.no_grad():
        pipe_ids = pipe.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
        assert torch.equal(pipe_ids, ids)  # the tokens got the same ids: mcv1 -> 49408, mcv2 -> 49409
        text = pipe.text_encoder(pipe_ids)[0]
        out_unet = pipe.unet(latents, t, text).sample
    torch.testing.assert_close(text, trained_text, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_unet, trained_unet, rtol=0, atol=1e-5)
    # and the LoRA is not a no-op: the UNet without it answers differently to the same conditioning
    assert (base_unet - trained_unet).abs().max() > 1e-4
