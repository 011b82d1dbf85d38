"""Pictures during training: a grid of the composed prompt, and the two tokens' attention over the image.

The attention picture is the paper's Fig. 3 made measurable: next to each overlay it records the share of
each token's attention that falls outside the region it should describe.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from library import config
from library.files.atomic import write_text
from library.export.infotext import image_grid, save_png
from library.training.trained import TrainedRecord

ATTENTION_TIMESTEP = 500  # a mid-noise step: the layout is decided, the details are not


def composed_prompt(cfg) -> str:
    return cfg.sample.prompt or config.composed_prompt(cfg.tokens.source, cfg.tokens.reference)


@torch.no_grad()
def sample_images(trained: TrainedRecord, prompt: str, n: int, steps: int, cfg_scale: float, seed: int) -> list[Image.Image]:
    """`n` images of `prompt` from the family's pipeline built around the run's own modules (LoRA and new
    token rows included), with the family's preview sampler, at the training resolution. The caller turns
    the attention capture off first (the pipeline's UNet calls must not record maps)."""
    import diffusers

    family = trained.family
    scheduler = getattr(diffusers, family.preview_sampler).from_config(trained.scheduler_config)
    pipe = family.assemble_pipeline(trained.unet, trained.vae, scheduler, trained.text_encoders, trained.tokenizers)
    pipe.set_progress_bar_config(disable=True)
    res = trained.resolution
    generator = torch.Generator("cpu").manual_seed(seed)
    with trained.autocast():
        out = pipe(prompt=prompt, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=cfg_scale,
                   height=res, width=res, generator=generator)
    return out.images


def _heat(image: np.ndarray, heat: np.ndarray) -> Image.Image:
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-8)
    colour = np.stack([heat, np.zeros_like(heat), 1.0 - heat], -1) * 255
    return Image.fromarray((0.5 * image + 0.5 * colour).clip(0, 255).astype(np.uint8))


@torch.no_grad()
def attention_report(trainer, count: int = 4) -> tuple[Image.Image, dict[str, float]]:
    """Composed prompt on up to `count` reference images at t=500: overlays and outside-mask shares.

    Shares are the fraction of each token's attention (averaged over the capture layers' head maps) that
    falls outside its target: [V1] outside the reference's face, [V2] on the face. `_normalised` measures
    the same on the min-max normalised maps the AR loss uses; `_contrast` is (max - min) / mean of the raw
    maps, which falls toward 0 if the maps go flat; `_peak` is the largest probability the token gets.
    """
    ref = trainer.reference
    n = min(count, len(ref) // (2 if trainer.cfg.data.flip else 1))
    idx = torch.arange(n)
    prompt = composed_prompt(trainer.cfg)
    ids = trainer.prompts.batch([prompt] * n)
    gen = torch.Generator().manual_seed(0)
    latents = ref.latents[idx].to(trainer.device)
    noise = torch.randn(latents.shape, generator=gen).to(trainer.device)
    t = trainer.objective.levels_at(n, ATTENTION_TIMESTEP)
    noisy = trainer.objective.add_noise(latents, noise, t.to(trainer.device)).to(trainer.weight_dtype)
    trainer.store.set_token_positions(trainer.prompts.positions(ids["input_ids"]), trainer.family.token_grid(latents.shape[-2:]))
    with trainer.acc.autocast():
        size_ids = ref.size_ids[idx.to(ref.size_ids.device)] if ref.size_ids is not None else None
        trainer.predict(noisy, t.to(trainer.device), {k: v.to(trainer.device) for k, v in ids.items()}, size_ids)
    raw = trainer.store.maps().float()  # [n, 2, M, h, w]
    trainer.store.clear()
    size = latents.shape[-1]
    n_maps = raw.shape[2]
    up = F.interpolate(raw.flatten(1, 2), size=(size, size), mode="bilinear", align_corners=False)
    up = up.view(n, 2, n_maps, size, size)
    targets = torch.cat([ref.face_masks[idx], ref.region_masks[idx]], 1).to(up.device)[:, :, None]  # [n, 2, 1, h, w]
    faces = ref.has_face[idx].to(up.device)
    maps = up.mean(2)  # [n, 2, h, w]: what the picture shows

    def outside(m: torch.Tensor) -> torch.Tensor:  # [n, 2, M, h, w] -> [n, 2]: attention mass outside the target
        return ((m * (1 - targets)).sum((3, 4)) / m.sum((3, 4)).clamp_min(1e-12)).mean(2)

    # S of eq. 8 (per-map min-max): what the loss sees; with it, a map that goes flat also scores 0
    lo, hi = up.amin((3, 4), keepdim=True), up.amax((3, 4), keepdim=True)
    normalised = (up - lo) / (hi - lo).clamp_min(1e-8)
    contrast = ((hi - lo) / up.mean((3, 4), keepdim=True).clamp_min(1e-12)).mean((2, 3, 4))  # [n, 2]
    raw_outside, normalised_outside = outside(up), outside(normalised)
    shares = {}
    for k, (key, valid) in enumerate((("source_token_outside_face", faces), ("reference_token_outside_region", None))):
        sel = valid if valid is not None else torch.ones_like(faces)
        if not sel.any():
            continue
        shares[key] = float(raw_outside[sel, k].mean())
        shares[key + "_normalised"] = float(normalised_outside[sel, k].mean())
        shares[key.split("_outside")[0] + "_contrast"] = float(contrast[sel, k].mean())
        shares[key.split("_outside")[0] + "_peak"] = float(raw[:, k].amax((2, 3)).mean(1)[sel].mean())
    res = ref.images.shape[-1]
    tiles = []
    for i in range(n):
        image = ((ref.images[i].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255)
        up = F.interpolate(maps[i : i + 1].cpu(), size=(res, res), mode="bilinear", align_corners=False)[0].numpy()
        tiles += [Image.fromarray(image.astype(np.uint8)), _heat(image, up[0]), _heat(image, up[1])]
    cfg = trainer.cfg
    return _with_header(image_grid(tiles, cols=3), ["reference image", cfg.tokens.source, cfg.tokens.reference]), shares


def _with_header(grid: Image.Image, labels: list[str]) -> Image.Image:
    """A strip above the columns saying what each shows (red = where the token attends)."""
    from PIL import ImageDraw

    strip = 18
    out = Image.new("RGB", (grid.width, grid.height + strip), "white")
    out.paste(grid, (0, strip))
    draw = ImageDraw.Draw(out)
    col = grid.width // len(labels)
    for i, label in enumerate(labels):
        draw.text((i * col + 4, 3), label, fill=(0, 0, 0))
    return out


def write_previews(trainer, tag: str) -> list[Image.Image]:
    """samples/<tag>.png (composed prompt) and attention/<tag>.png + .json, atomically; returns the
    samples (sample.n images, in the grid's order) for scoring."""
    cfg = trainer.cfg
    out = Path(cfg.output.dir)
    trainer.store.clear()
    images = sample_images(trainer.trained(), composed_prompt(cfg), cfg.sample.n, cfg.sample.steps, cfg.sample.cfg, cfg.sample.seed)
    save_png(image_grid(images, cols=len(images)), out / "samples" / f"{tag}.png", None)
    picture, shares = attention_report(trainer)
    save_png(picture, out / "attention" / f"{tag}.png", None)
    write_text(out / "attention" / f"{tag}.json", json.dumps(shares, indent=2))
    if cfg.logging.tensorboard:
        trainer.acc.log({f"attention/{k}": v for k, v in shares.items()})
    return images
