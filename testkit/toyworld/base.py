"""The toy base: an SD 1.x-shaped model small enough to pretrain on the toy world on a CPU.

AutoencoderKL (3 blocks: 64 px -> 16 x 16 x 4 latents), UNet2DConditionModel with cross-attention at two
resolutions (16 x 16 in down_blocks.0 / up_blocks.2, 8 x 8 in down_blocks.1 / up_blocks.1), CLIPTextModel
with the shipped 49408-token CLIP tokenizer, DDPM scheduler of SD 1.5. Saved as a diffusers
``StableDiffusionPipeline`` folder, it is an SD 1.x model to every reader of the project (family detection,
the trainer, the exporter, ``generate.py``); the toy configs point ``[attention] layers`` at
:data:`CAPTURE_LAYERS`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from library.files.atomic import atomic_folder
from library.models.family import SD1

RESOLUTION = 64
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64,
            max_position_embeddings=77)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=RESOLUTION,
    block_out_channels=[32, 64, 64],
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
)
UNET = dict(
    sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
    block_out_channels=[64, 128, 128], attention_head_dim=4, cross_attention_dim=TEXT["hidden_size"],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
# the 16 x 16 cross-attention layers (the toy's counterpart of SD 1.5's 16 x 16 layers at 512 px)
CAPTURE_LAYERS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
)


def build_components(seed: int = 0) -> dict:
    """The toy base's UNet, VAE, text encoder, tokenizer and scheduler, random from `seed`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE)
    unet = UNet2DConditionModel(**UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    tokenizer = CLIPTokenizer.from_pretrained(SD1.config_dir / "tokenizer")
    sched = SD1.component_config("scheduler")
    scheduler = DDPMScheduler(num_train_timesteps=sched["num_train_timesteps"], beta_start=sched["beta_start"],
                              beta_end=sched["beta_end"], beta_schedule=sched["beta_schedule"], clip_sample=False,
                              steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_base(components: dict, dest: str | Path) -> Path:
    """Write `components` as a diffusers StableDiffusionPipeline folder at `dest` (replaced atomically)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return dest
