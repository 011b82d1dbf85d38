"""A tiny SDXL-shaped model for tests, the demo and benchmarks.

SDXL's real layout at a few MB: three UNet levels (no cross-attention in the first, then 1 and 2
transformer blocks per attention, as SDXL's [1, 2, 10] starts), a mid block with cross-attention,
``addition_embed_type = "text_time"`` size conditioning (pooled text embedding + 6 time ids), two text
encoders (CLIP-L ``CLIPTextModel`` and OpenCLIP-G ``CLIPTextModelWithProjection``) whose hidden states
are concatenated for cross-attention, both with the real 49408-token vocabulary, and the second
tokenizer padding with "!" as SDXL's does. Everything else comes from the real SDXL 1.0 configs in
``configs/sdxl/``; ``full_size=True`` keeps them whole (2.57 B UNet parameters, what benchmarks time).

:func:`save_sdxl_model` writes it as a diffusers folder and as one file in the original SGM layout (what
``sd_xl_base_1.0.safetensors`` and A1111 / ComfyUI checkpoints hold); ``python -m testkit.tiny
DEST --sdxl [--full-size]`` does so from the command line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from safetensors.torch import save_file

from library.files.atomic import atomic_folder, write_atomic
from library.models.family import SDXL
from library.models.sgm_keys import CLIP_L_PREFIX, OPEN_CLIP_PREFIX, clip_to_sgm, open_clip_to_sgm, unet_to_sgm, vae_to_original

CONFIG_DIR = SDXL.config_dir

TINY_TEXT_L = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
TINY_TEXT_G = dict(hidden_size=64, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, projection_dim=48)
TINY_TIME_EMBED = 8
TINY_UNET = dict(
    block_out_channels=[32, 64, 64],
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 4, 4],
    # cross-attention sees CLIP-L and OpenCLIP-G hidden states side by side: 32 + 64
    cross_attention_dim=TINY_TEXT_L["hidden_size"] + TINY_TEXT_G["hidden_size"],
    addition_time_embed_dim=TINY_TIME_EMBED,
    # the pooled OpenCLIP-G embedding and six Fourier-embedded size / crop numbers
    projection_class_embeddings_input_dim=TINY_TEXT_G["projection_dim"] + 6 * TINY_TIME_EMBED,
    norm_num_groups=8,
    sample_size=32,
)
TINY_VAE = dict(block_out_channels=[16, 16, 32, 32], layers_per_block=2, norm_num_groups=8, sample_size=256)


def build_sdxl_components(full_size: bool = False, seed: int = 0) -> dict:
    """unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler with random weights
    from a fixed seed: the keyword arguments of ``StableDiffusionXLPipeline``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet_cfg, vae_cfg, text_l, text_g = (SDXL.component_config(c) for c in ("unet", "vae", "text_encoder", "text_encoder_2"))
    if not full_size:
        unet_cfg.update(TINY_UNET)
        vae_cfg.update(TINY_VAE)
        text_l.update(TINY_TEXT_L)
        text_g.update(TINY_TEXT_G)
    torch.manual_seed(seed)
    return dict(
        unet=UNet2DConditionModel(**unet_cfg),
        vae=AutoencoderKL(**vae_cfg),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_l)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_g)),
        tokenizer=CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_config(SDXL.component_config("scheduler")),
    )


def sdxl_to_sgm(components: dict) -> dict[str, torch.Tensor]:
    """The components' weights as one state dict in the original SGM layout of ``sd_xl_base_1.0.safetensors``:
    ``model.diffusion_model.*`` (UNet), ``conditioner.embedders.0.transformer.*`` (CLIP-L),
    ``conditioner.embedders.1.model.*`` (OpenCLIP-G) and ``first_stage_model.*`` (VAE); contiguous tensors."""
    unet = components["unet"]
    state = unet_to_sgm(unet.state_dict(), unet.config)
    state.update(clip_to_sgm(components["text_encoder"].state_dict(), CLIP_L_PREFIX))
    state.update(open_clip_to_sgm(components["text_encoder_2"].state_dict(), OPEN_CLIP_PREFIX))
    state.update(vae_to_original(components["vae"].state_dict()))
    return {k: v.contiguous() for k, v in state.items()}


def save_sdxl_single_file(components: dict, path: Path) -> None:
    """Write the components as one SGM-layout ``.safetensors`` (:func:`sdxl_to_sgm`), atomically."""
    state = sdxl_to_sgm(components)
    write_atomic(path, lambda tmp: save_file(state, str(tmp)))


def save_sdxl_model(dest: Path, full_size: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """Write the model as a diffusers ``StableDiffusionXLPipeline`` folder `dest` and as one SGM-layout file
    `dest.safetensors` (both atomically); returns both paths."""
    from diffusers import StableDiffusionXLPipeline

    dest = Path(dest)
    components = build_sdxl_components(full_size=full_size, seed=seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(dest) as tmp_dir:
        StableDiffusionXLPipeline(**components).save_pretrained(tmp_dir, safe_serialization=True)
    single = dest.with_suffix(".safetensors")
    save_sdxl_single_file(components, single)
    return dest, single


def build_sdxl_parts(full_size: bool = False, seed: int = 0):
    """The model as :class:`~library.models.loading.StableDiffusionParts` (what the trainer takes as
    ``parts=``), built in memory: no file, no model-kind check. The training noise scheduler is a DDPM
    with SDXL's betas, as the loader makes it."""
    from library.models.kind import ModelKind
    from library.models.loading import StableDiffusionParts, _ddpm_from

    c = build_sdxl_components(full_size=full_size, seed=seed)
    return StableDiffusionParts(
        unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
        noise_scheduler=_ddpm_from(dict(c["scheduler"].config)), name="tiny_sdxl" if not full_size else "sdxl",
        kind=ModelKind(family="sdxl"), family=SDXL, text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"],
    )
