"""A tiny FLUX.2 Klein model for tests: ``Flux2KleinPipeline``'s components at a few MB, from a fixed seed.

FLUX.2 Klein 4B is a Flux2Transformer2DModel with 5 double-stream and 20 single-stream blocks (24 heads
of 128), Klein 9B one with 8 and 24 (32 heads); both read the hidden states of layers 9, 18 and 27 of
their Qwen3 text encoder (Qwen3-4B, width 2560, or Qwen3-8B, width 4096) stacked side by side
(``joint_attention_dim`` = 3 x width), and decode with FLUX.2's 32-channel VAE (AutoencoderKLFlux2, 2x2
patches normalised by a BatchNorm). The tiny model keeps each variant's block counts, which is what
tells them apart (library/models/kind.py), and shrinks the widths: 2 heads of 16 (RoPE axes 4 x 4, the
real 4 x 32 scaled), a 28-layer Qwen3ForCausalLM of width 32 (so that layer 27 exists; testkit/
tiny_qwen3.py), and an AutoencoderKLFlux2 with four levels of 8-16 channels and 4 latent channels
(16 packed channels into the transformer).

``python -m testkit.tiny_klein DEST [--9b]`` writes the diffusers folder DEST/ and ComfyUI's split files
in DEST_comfy/ (testkit/tiny_dit.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from library.models.dit_keys import FLUX2
from testkit.tiny_dit import SplitFiles, save_dit_model
from testkit.tiny_qwen3 import build_text_encoder, build_tokenizer, qwen3_config

TEXT_WIDTH = 32
TEXT_LAYERS = 28  # the pipeline stacks hidden_states[9], [18] and [27]
BLOCKS = {"4b": (5, 20), "9b": (8, 24)}  # (double-stream, single-stream) blocks of the real models
LATENT_CHANNELS = 4


def tiny_transformer_config(variant: str) -> dict:
    """Flux2Transformer2DModel's config for the tiny `variant` ("4b" / "9b")."""
    double, single = BLOCKS[variant]
    return dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=double, num_single_layers=single,
                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH,
                timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=[4, 4, 4, 4], rope_theta=2000,
                eps=1e-6, guidance_embeds=False)


TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=[8, 8, 16, 16],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=4, sample_size=64, use_quant_conv=True,
                use_post_quant_conv=True, batch_norm_eps=1e-4, patch_size=[2, 2])
# FLUX.2 Klein's scheduler_config.json: resolution-dependent shift
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def split_names(variant: str) -> dict[str, str]:
    return {"transformer": f"flux-2-klein-{variant}-tiny.safetensors", "text_encoder": "qwen_3_tiny.safetensors",
            "vae": "flux2-vae-tiny.safetensors"}


def build_klein_components(variant: str = "4b", seed: int = 0) -> dict:
    """transformer, vae, text_encoder (Qwen3ForCausalLM), tokenizer, scheduler: ``Flux2KleinPipeline``'s
    arguments, for the tiny `variant` ("4b" or "9b")."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(qwen3_config(TEXT_WIDTH, TEXT_LAYERS, len(tokenizer)), causal_lm=True, seed=seed)
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(**tiny_transformer_config(variant)).eval()
    with torch.no_grad():  # zero-initialised weights get values, so that every weight matters
        for param in transformer.parameters():
            if not param.any():
                param.normal_(0, 0.02)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(**TINY_VAE).eval()
    with torch.no_grad():  # BatchNorm statistics away from (0, 1), so that the normalisation is exercised
        vae.bn.running_mean.normal_(0, 0.1)
        vae.bn.running_var.uniform_(0.5, 1.5)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))


def save_klein_model(dest: Path, variant: str = "4b", seed: int = 0) -> tuple[Path, SplitFiles]:
    """The tiny model as the diffusers folder `dest` and split files in ``dest_comfy``; returns both."""
    components = build_klein_components(variant, seed)
    # is_distilled: Klein (few steps, no CFG) rather than Klein Base; the pipeline's one config entry
    return save_dit_model(dest, components, "Flux2KleinPipeline", FLUX2, split_names(variant),
                          pipeline_kwargs={"is_distilled": True})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="output folder (split files go to DEST_comfy/)")
    parser.add_argument("--9b", dest="nine", action="store_true", help="Klein 9B's block counts instead of 4B's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder, split = save_klein_model(args.dest, "9b" if args.nine else "4b", seed=args.seed)
    print(f"wrote {folder}/ and {split.transformer.parent.parent}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
