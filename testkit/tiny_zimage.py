"""A tiny Z-Image model for tests: ``ZImagePipeline``'s components at a few MB, from a fixed seed.

The real Z-Image (Turbo and Base have one architecture: a 6B single-stream NextDiT, ``dim`` 3840, 30
layers + 2 noise and 2 context refiner layers, 30 heads of 128, Qwen3-4B's second-to-last hidden state
[.., 2560] as caption features, FLUX.1's 16-channel VAE, flow matching with shift 3) with every size
shrunk: ``dim`` 32 in 2 heads of 16 (RoPE axes 4 + 6 + 6 = 16, the real 32 + 48 + 48 scaled), 2 layers
and 1 refiner layer of each kind, a 2-layer Qwen3Model of width 32 (testkit/tiny_qwen3.py) and an
AutoencoderKL with the real four levels at 8-16 channels and 16 latent channels.

``python -m testkit.tiny_zimage DEST`` writes the diffusers folder DEST/ and ComfyUI's split files in
DEST_comfy/ (testkit/tiny_dit.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from library.models.dit_keys import ZIMAGE
from testkit.tiny_dit import SplitFiles, save_dit_model
from testkit.tiny_qwen3 import build_text_encoder, build_tokenizer, qwen3_config

TEXT_WIDTH = 32
TINY_TRANSFORMER = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=32, n_layers=2,
                        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                        cap_feat_dim=TEXT_WIDTH, rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 6, 6],
                        axes_lens=[1536, 512, 512])
# FLUX.1's VAE (Z-Image's): 16 latent channels, no quant convs, its scaling and shift factors
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 8, 16, 16],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=4, sample_size=64, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
# Z-Image Turbo's scheduler_config.json
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
SPLIT_NAMES = {"transformer": "z_image_tiny.safetensors", "text_encoder": "qwen_3_tiny.safetensors",
               "vae": "ae_tiny.safetensors"}


def build_zimage_components(seed: int = 0) -> dict:
    """transformer, vae, text_encoder (Qwen3Model), tokenizer, scheduler: ``ZImagePipeline``'s arguments."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(qwen3_config(TEXT_WIDTH, 2, len(tokenizer)), causal_lm=False, seed=seed)
    torch.manual_seed(seed + 1)
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER).eval()
    # diffusers starts the pad tokens and the final layer at zero; random values make every weight matter
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if not param.any():
                param.normal_(0, 0.02)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**TINY_VAE).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))


def save_zimage_model(dest: Path, seed: int = 0) -> tuple[Path, SplitFiles]:
    """The tiny model as the diffusers folder `dest` and split files in ``dest_comfy``; returns both."""
    return save_dit_model(dest, build_zimage_components(seed), "ZImagePipeline", ZIMAGE, SPLIT_NAMES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="output folder (split files go to DEST_comfy/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder, split = save_zimage_model(args.dest, seed=args.seed)
    print(f"wrote {folder}/ and {split.transformer.parent.parent}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
