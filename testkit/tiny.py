"""A tiny Stable Diffusion 1.x-shaped model for tests, the demo and benchmarks.

It has SD 1.x's block layout (4 down / 4 up blocks, two resnets per down block, cross-attention in
down_blocks 0-2 and up_blocks 1-3, the same module names) and the real 49408-token CLIP vocabulary, so
every code path that depends on names or shapes (LoRA targets, 16x16 attention capture, kohya key names,
single-file conversion) runs on it exactly as on SD 1.5, but at a few MB.

`python -m testkit.tiny DEST [--sd15 | --full-size] [--sdxl]` writes the model as a diffusers folder
(DEST/) and as one original-layout checkpoint (DEST.safetensors); `--sd15` / `--full-size` give full-size
SD 1.5 shapes with random weights (what the benchmarks time); `--sdxl` writes the tiny SDXL model of
testkit/tiny_sdxl.py instead (with `--full-size`, SDXL 1.0's shapes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from library.files.atomic import atomic_folder, write_atomic
from library.models.family import SD1
from library.models.sgm_keys import clip_to_sgm, unet_to_sgm, vae_to_original

CONFIG_DIR = SD1.config_dir

TINY_UNET = dict(
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=2,
    attention_head_dim=2,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=32,
)
TINY_VAE = dict(block_out_channels=[16, 16, 32, 32], layers_per_block=2, norm_num_groups=8, sample_size=256)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
)


def build_components(sd15_size: bool = False, seed: int = 0) -> dict:
    """UNet, VAE, text encoder, tokenizer and DDPM scheduler with random weights from a fixed seed."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_cfg, vae_cfg, text_cfg = (SD1.component_config(c) for c in ("unet", "vae", "text_encoder"))
    if not sd15_size:
        unet_cfg.update(TINY_UNET)
        vae_cfg.update(TINY_VAE)
        text_cfg.update(TINY_TEXT)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    tokenizer = CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer")
    sched_cfg = SD1.component_config("scheduler")
    scheduler = DDPMScheduler(
        num_train_timesteps=sched_cfg["num_train_timesteps"],
        beta_start=sched_cfg["beta_start"],
        beta_end=sched_cfg["beta_end"],
        beta_schedule=sched_cfg["beta_schedule"],
        clip_sample=False,
        steps_offset=1,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


# --- diffusers -> original (CompVis / A1111) key layout -------------------------------------------
# The inverse of what diffusers' single-file loader does; the tests prove it by loading the file back.


def unet_to_original(state: dict[str, torch.Tensor], unet_config: dict | None = None) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict under ``model.diffusion_model.`` in the original block numbering;
    `unet_config` gives the block layout (default: SD 1.5's, which the tiny SD 1.x model shares)."""
    return unet_to_sgm(state, unet_config or SD1.component_config("unet"))


def text_encoder_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict under SD 1.x's ``cond_stage_model.transformer.``."""
    return clip_to_sgm(state, "cond_stage_model.transformer.")


def save_single_file(components: dict, path: Path) -> None:
    state = {}
    state.update(unet_to_original(components["unet"].state_dict()))
    state.update(vae_to_original(components["vae"].state_dict()))
    state.update(text_encoder_to_original(components["text_encoder"].state_dict()))
    state = {k: v.contiguous() for k, v in state.items()}
    write_atomic(path, lambda tmp: save_file(state, str(tmp)))


def save_model(dest: Path, sd15_size: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """Write the model as a diffusers folder `dest` and as `dest.safetensors`; returns both paths."""
    from diffusers import StableDiffusionPipeline

    dest = Path(dest)
    components = build_components(sd15_size=sd15_size, seed=seed)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(dest) as tmp_dir:
        pipe.save_pretrained(tmp_dir, safe_serialization=True)
    single = dest.with_suffix(".safetensors")
    save_single_file(components, single)
    return dest, single


def save_random_arcface(path: Path, seed: int = 0) -> Path:
    """A small arcface_torch-layout iresnet with random weights (for the demo and tests; it knows no faces)."""
    from library.models.iresnet import IBasicBlock, IResNet

    torch.manual_seed(seed)
    net = IResNet(IBasicBlock, layers=[1, 1, 1, 1], width=16, num_features=64)
    for m in net.modules():  # non-trivial BatchNorm statistics, so the embedding depends on the face
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            m.running_var.uniform_(0.5, 1.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: torch.save(net.state_dict(), tmp))


def write_prepared(folder: Path, kind: str, token: str, n: int = 3, size: int = 96, seed: int = 0) -> Path:
    """Files as dataset_tools.prepare writes them, with a drawn face at a known place."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 255, 3)
        img = Image.new("RGB", (size, size), tuple(int(c) for c in base))
        draw = ImageDraw.Draw(img)
        cx, cy, r = size * (0.45 + 0.1 * i / n), size * 0.5, size * 0.22
        box = [cx - r, cy - r * 1.2, cx + r, cy + r * 1.2]
        draw.ellipse(box, fill=(224, 172, 140))
        lms = [[cx - r * 0.4, cy - r * 0.3], [cx + r * 0.4, cy - r * 0.3], [cx, cy + r * 0.1],
               [cx - r * 0.35, cy + r * 0.55], [cx + r * 0.35, cy + r * 0.55]]
        for x, y in lms:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(40, 30, 30))
        face = Image.new("L", (size, size), 0)
        ImageDraw.Draw(face).ellipse(box, fill=255)
        mask = face if kind == "source" else Image.eval(face, lambda v: 255 - v)
        img.save(folder / f"img{i}.png")
        mask.save(folder / f"img{i}.mask.png")
        caption = f"a photo of a {token} person" if kind == "source" else f"a photo of a person in the style of {token}"
        (folder / f"img{i}.txt").write_text(caption)
        meta = {"image": f"img{i}.png", "kind": kind, "token": token, "width": size, "height": size,
                "face_box": box, "score": 0.9, "landmarks": lms, "mask_coverage": float(np.mean(np.asarray(mask) > 127)),
                "num_faces": 1, "detector": "short_range", "warnings": []}
        (folder / f"img{i}.json").write_text(json.dumps(meta))
    return folder



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="output folder (the single file is DEST.safetensors)")
    parser.add_argument("--sdxl", action="store_true", help="an SDXL model (single file in the SGM layout)")
    parser.add_argument("--full-size", action="store_true",
                        help="real shapes with random weights: SD 1.5's, or SDXL 1.0's with --sdxl (for benchmarks)")
    parser.add_argument("--sd15", action="store_true", help="the same as --full-size without --sdxl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arcface", type=Path, help="also write a random-weight ArcFace .pth here")
    args = parser.parse_args(argv)
    if args.sdxl:
        from testkit.tiny_sdxl import save_sdxl_model

        folder, single = save_sdxl_model(args.dest, full_size=args.full_size, seed=args.seed)
    else:
        folder, single = save_model(args.dest, sd15_size=args.sd15 or args.full_size, seed=args.seed)
    print(f"wrote {folder}/ and {single}")
    if args.arcface:
        print(f"wrote {save_random_arcface(args.arcface)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
