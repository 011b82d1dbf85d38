"""Everything that differs between the model families the project trains: SD 1.x and SDXL.

The trainer, the exporter and the generator ask a :class:`ModelFamily`; none of them tests which family
it is. A family is found from the model itself (:mod:`library.models.kind` reads the file or folder),
never from a flag: :func:`family_for` maps a ``ModelKind.family`` string to one of :data:`FAMILIES`.

What a family says:
  * its files: the component configs and tokenizers shipped in ``configs/<dir>/`` that a single
    checkpoint file is loaded with, offline, and the diffusers pipeline class;
  * prompts: which text encoders (one, or CLIP-L and OpenCLIP-G), which hidden layer feeds the UNet,
    whether a pooled embedding and size / crop ids (SDXL's ``add_time_ids``) condition it;
  * training: the default resolution and the cross-attention layers attention refocusing captures;
  * export: kohya's LoRA prefixes for each text encoder, the embedding file's tensor names, the
    metadata values (``ss_base_model_version``, ``modelspec.architecture``, resolution).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from library.files.text import read_text_file
from library.models.conditioning import size_crop_ids
from library.models.lora_targets import unet_lora_target_modules
from library.models.objectives import EpsilonObjective

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def scaled_latents(vae, mean: "torch.Tensor") -> "torch.Tensor":
    """The denoiser's latents of a VAE posterior mean [B, C, h, w]: (mean - shift) * scale with the VAE
    config's ``scaling_factor`` and ``shift_factor`` (0 where absent or None, as in SD's VAEs; Z-Image's
    and FLUX.1's VAEs have one), the normalisation diffusers' pipelines undo before decoding."""
    return (mean - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor


def unscaled_latents(vae, latents: "torch.Tensor") -> "torch.Tensor":
    """The VAE decoder's input of denoiser latents: latents / scale + shift (:func:`scaled_latents` undone)."""
    return latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)


@dataclass(frozen=True)
class ModelFamily:
    """One model family (see the module docstring). Instances: :data:`SD1`, :data:`SDXL`.

    name: ``ModelKind.family`` ("sd1" / "sdxl"); label: what messages call it ("SD 1.x" / "SDXL").
    config_dir: component configs and tokenizers for single-file checkpoints.
    pipeline_class: the diffusers pipeline (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``);
        pipeline_kwargs: what its constructor needs besides the components (no safety checker for SD 1.x).
    resolution: default training and sampling side, pixels.
    text_encoders / tokenizers: pipeline attribute names, in the order their hidden states are
        concatenated for cross-attention.
    hidden_layer: which hidden state feeds the UNet (-1 last layer, -2 penultimate, as SDXL was trained).
    pooled: whether the last text encoder's projected pooled output and the 6 size / crop ids condition
        the UNet (``added_cond_kwargs = {"text_embeds", "time_ids"}``).
    kohya_te_prefixes: kohya's LoRA prefix per text encoder ("lora_te" / "lora_te1", "lora_te2").
    embedding_keys: the tensor names of one A1111 embedding file, per text encoder ("emb_params" for SD
        1.x: A1111 writes ``string_to_param["*"]`` in .pt and ``emb_params`` in .safetensors; "clip_l",
        "clip_g" for SDXL, what A1111, Forge, ComfyUI and InvokeAI read).
    bundle_embedding_keys: the tensor-name ends of an embedding bundled in a LoRA
        (``bundle_emb.<token>.<key>``), per text encoder, names both A1111 and ComfyUI read:
        "string_to_param.*" for SD 1.x (kohya's), "clip_l", "clip_g" for SDXL.
    capture_layers: default cross-attention modules attention refocusing records (full module paths).
    upcast_vae: whether the VAE config's ``force_upcast`` is obeyed (the VAE runs in fp32 under fp16):
        ``StableDiffusionXLPipeline`` obeys it (SDXL's VAE overflows in fp16), SD 1.x's pipeline does not
        (diffusers' AutoencoderKL defaults it to true, so SD 1.x configs say it without meaning it).
    unet_key_style: how the LoRA exporter names UNet modules: "diffusers" (kohya keeps diffusers' paths
        for SD 1.x) or "sgm" (kohya uses the original ``input_blocks`` / ``middle_block`` /
        ``output_blocks`` paths for SDXL).
    base_model_version: kohya's ``ss_base_model_version``; architecture: ``modelspec.architecture``
        before "/lora".
    checkpoint_text_prefixes: the key prefix of each text encoder in a single-file checkpoint, in
        ``text_encoders`` order (what makes such a file complete).
    example_checkpoint / example_vae: the file names refusals suggest (the family's reference checkpoint
        and a VAE file for it); complete_parts: what a complete checkpoint holds, for the refusal of an
        incomplete one.
    preset: the training config in ``configs/`` a new run of this family starts from (the web page's
        default preset once the base model is identified).
    objective: the prediction objective's class (:mod:`library.models.objectives`): the loss target, x0
        from a prediction, the noisy latents and the noise levels a training step draws;
        ``objective.from_scheduler(scheduler, image_seq_len)`` builds it from the family's scheduler.
    image_token_pixels: the side in pixels of one image token (8x VAE and 2x2 patches: 16), whose count
        sets a flow model's resolution-dependent shift (:meth:`make_objective`).
    preview_sampler: the diffusers scheduler class the training previews sample with.
    denoiser: the pipeline's attribute for the denoising network ("unet"; a DiT pipeline's "transformer").
    assembly_kwargs: what :meth:`assemble_pipeline` passes besides the components and
        :attr:`pipeline_kwargs` (the SD pipelines' optional ``feature_extractor``, left out).
    """

    name: str
    label: str
    config_dir: Path
    pipeline_class: str
    pipeline_kwargs: tuple[tuple[str, object], ...]
    resolution: int
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    hidden_layer: int
    pooled: bool
    kohya_te_prefixes: tuple[str, ...]
    embedding_keys: tuple[str, ...]
    capture_layers: tuple[str, ...]
    upcast_vae: bool
    unet_key_style: str
    base_model_version: str
    architecture: str
    checkpoint_text_prefixes: tuple[str, ...]
    example_checkpoint: str
    example_vae: str
    complete_parts: str
    bundle_embedding_keys: tuple[str, ...]
    preset: str
    objective: type = EpsilonObjective
    image_token_pixels: int = 16
    preview_sampler: str = "EulerAncestralDiscreteScheduler"
    denoiser: str = "unet"
    assembly_kwargs: tuple[tuple[str, object], ...] = (("feature_extractor", None),)
    latent_pixels: int = 8  # image pixels per latent cell (the face windows of the identity term)
    denoiser_label: str = "UNet"  # what messages call the denoising network
    token_scale_reference: tuple[float, float] | None = None  # None: the first text encoder (CLIP-L) sets the units
    export_format: str = "kohya"  # library/training/outputs.py EXPORTERS
    attention_kind: str = "cross"  # library/training/capture.py: the UNet's cross-attention

    def prompt_ids(self, tokenizer, text: str, truncate: bool = True) -> "torch.Tensor":
        """[77] CLIP ids of `text` (multi-vector tokens already expanded), padded and cut to the tokenizer's
        ``model_max_length``; without `truncate` every id between BOS and EOS (to see what is cut)."""
        if truncate:
            return tokenizer(text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                             return_tensors="pt").input_ids[0]
        return tokenizer(text, verbose=False, return_tensors="pt").input_ids[0]  # verbose: no too-long warning

    def prompt_length(self, tokenizer) -> int:
        """How many ids a prompt keeps: CLIP's 77."""
        return tokenizer.model_max_length

    def token_grid(self, latent_hw: tuple[int, int]) -> None:
        """None: a cross-attention map's side follows from its query count."""
        return None

    def default_capture_layers(self, model) -> tuple[str, ...]:
        """:attr:`capture_layers` (fixed module paths of the family's UNet)."""
        return self.capture_layers

    def lora_target_modules(self, model, preset: str) -> list[str]:
        """The UNet modules LoRA preset `preset` covers (:func:`library.models.lora_targets.unet_lora_target_modules`)."""
        return unet_lora_target_modules(model, preset)

    def assemble_pipeline(self, denoiser, vae, scheduler, text_encoders, tokenizers):
        """The family's diffusers pipeline (:attr:`pipeline_class`) around modules already loaded:
        `text_encoders` / `tokenizers` in :attr:`text_encoders` / :attr:`tokenizers` order, `denoiser` as
        :attr:`denoiser`, plus :attr:`assembly_kwargs` and :attr:`pipeline_kwargs`."""
        import diffusers

        modules = dict(zip(self.text_encoders, text_encoders)) | dict(zip(self.tokenizers, tokenizers))
        return getattr(diffusers, self.pipeline_class)(
            **{self.denoiser: denoiser}, vae=vae, scheduler=scheduler, **modules,
            **dict(self.assembly_kwargs), **dict(self.pipeline_kwargs))

    def make_objective(self, scheduler, resolution: int):
        """The :attr:`objective` of `scheduler` for square images of `resolution` pixels
        ((resolution / image_token_pixels)^2 image tokens)."""
        return self.objective.from_scheduler(scheduler, (resolution // self.image_token_pixels) ** 2)

    def component_config(self, component: str) -> dict:
        """One component's shipped config (``config_dir/<component>/config.json``, or the scheduler's
        ``scheduler_config.json``) as constructor keyword arguments: diffusers' ``_*`` bookkeeping keys and
        transformers' ``architectures`` / ``torch_dtype`` dropped. TextFileError for an unreadable file."""
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        raw = json.loads(read_text_file(self.config_dir / component / name))
        return {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}

    def encode_prompt(self, text_encoders, input_ids, tokenizers=()) -> dict[str, "torch.Tensor"]:
        """Prompt ids -> what conditions the UNet: ``{"hidden": [B, 77, sum of the encoders' widths]}``, and
        with :attr:`pooled` ``"pooled"``: [B, projection_dim] (every entry is per prompt, so a caller may
        index them all alike).

        `text_encoders` and `input_ids` ([B, 77] int64 per encoder) are in :attr:`text_encoders` order.
        Each encoder gives hidden state :attr:`hidden_layer` (-1: ``last_hidden_state``, after CLIP's final
        layer norm, as SD 1.x; -2: ``hidden_states[-2]``, the penultimate layer without it, as SDXL and
        diffusers' ``StableDiffusionXLPipeline.encode_prompt``); they are concatenated along the width.
        With :attr:`pooled`, the pooled embedding is the last encoder's projected ``text_embeds``
        (OpenCLIP-G's, as ``StableDiffusionXLPipeline`` takes it). ValueError if the counts differ.
        """
        import torch

        if len(text_encoders) != len(self.text_encoders) or len(input_ids) != len(self.text_encoders):
            raise ValueError(f"{self.label} encodes with {len(self.text_encoders)} text encoders; got "
                             f"{len(text_encoders)} encoders and {len(input_ids)} id tensors")
        hidden = []
        for encoder, ids in zip(text_encoders, input_ids):
            out = encoder(ids, output_hidden_states=self.hidden_layer != -1)
            hidden.append(out[0] if self.hidden_layer == -1 else out.hidden_states[self.hidden_layer])
        cond = {"hidden": torch.cat(hidden, dim=-1)}
        if self.pooled:  # `out` is the last encoder's (CLIPTextModelWithProjection)
            cond["pooled"] = out.text_embeds
        return cond

    def text_layers_trained(self, index: int, num_layers: int) -> int:
        """How many of text encoder `index`'s `num_layers` layers reach the UNet, so get a gradient and a LoRA:
        all for SD 1.x (the last hidden state) and for SDXL's OpenCLIP-G (its last layer makes the pooled
        embedding); all but the last for SDXL's CLIP-L (the penultimate hidden state, :meth:`encode_prompt`).
        kohya trains CLIP-L's last layer too; its LoRA stays zero there, so it is left out (docs/formats.md)."""
        if self.pooled and index == len(self.text_encoders) - 1:
            return num_layers
        return num_layers + 1 + self.hidden_layer

    def latents_from_vae(self, vae, mean: "torch.Tensor") -> "torch.Tensor":
        """:func:`scaled_latents`."""
        return scaled_latents(vae, mean)

    def latents_to_vae(self, vae, latents: "torch.Tensor") -> "torch.Tensor":
        """:func:`unscaled_latents`."""
        return unscaled_latents(vae, latents)

    def size_ids(self, original_hw: tuple[int, int], crop_box: tuple[int, int, int], resolution: int,
                 flipped: bool = False) -> "torch.Tensor | None":
        """One training image's extra conditioning: with :attr:`pooled`, the 6 size / crop ids
        (:func:`library.models.conditioning.size_crop_ids`), else None (the family takes none)."""
        return size_crop_ids(original_hw, crop_box, resolution, flipped) if self.pooled else None

    def predict(self, model, noisy, timesteps, cond: dict) -> "torch.Tensor":
        """The denoiser's prediction [B, C, h, w] of `noisy` at `timesteps` (the objective's model
        timesteps) under `cond`: :meth:`encode_prompt`'s entries per sample, plus ``"size_ids"`` [B, 6]
        where :meth:`size_ids` gives them. The family builds the call: the UNet's
        ``encoder_hidden_states`` and, with :attr:`pooled`, ``added_cond_kwargs = {"text_embeds": pooled,
        "time_ids": size ids}`` (SDXL's ``addition_embed_type = "text_time"``); ids in pixels, as
        (original height, original width, crop top, crop left, target height, target width)."""
        added = None
        if self.pooled:
            added = {"text_embeds": cond["pooled"], "time_ids": cond["size_ids"].to(cond["pooled"].dtype)}
        return model(noisy, timesteps, cond["hidden"], added_cond_kwargs=added).sample


SD1 = ModelFamily(
    name="sd1",
    label="SD 1.x",
    config_dir=CONFIGS / "sd15",
    pipeline_class="StableDiffusionPipeline",
    pipeline_kwargs=(("safety_checker", None), ("requires_safety_checker", False)),
    resolution=512,
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    hidden_layer=-1,
    pooled=False,
    kohya_te_prefixes=("lora_te",),
    embedding_keys=("emb_params",),
    # the 16x16 layers at 512 px (the paper's choice): 5 layers x 8 heads
    capture_layers=tuple(
        f"{block}.transformer_blocks.0.attn2"
        for block in (
            "down_blocks.2.attentions.0",
            "down_blocks.2.attentions.1",
            "up_blocks.1.attentions.0",
            "up_blocks.1.attentions.1",
            "up_blocks.1.attentions.2",
        )
    ),
    upcast_vae=False,
    unet_key_style="diffusers",
    base_model_version="sd_v1",
    architecture="stable-diffusion-v1",
    checkpoint_text_prefixes=("cond_stage_model.transformer.",),
    example_checkpoint="v1-5-pruned-emaonly.safetensors",
    example_vae="vae-ft-mse-840000-ema-pruned.safetensors",
    complete_parts="UNet, VAE and text encoder",
    bundle_embedding_keys=("string_to_param.*",),
    preset="magicapture_sd15.toml",
)

SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    config_dir=CONFIGS / "sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    pipeline_kwargs=(),
    resolution=1024,
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    hidden_layer=-2,
    pooled=True,
    kohya_te_prefixes=("lora_te1", "lora_te2"),
    embedding_keys=("clip_l", "clip_g"),
    # the lowest-resolution cross-attention (32x32 at 1024 px), first transformer block of each
    # attention, as for SD 1.x; the measurement behind this choice is in docs/sdxl.md ("Training SDXL")
    capture_layers=tuple(
        f"{block}.transformer_blocks.0.attn2"
        for block in (
            "down_blocks.2.attentions.0",
            "down_blocks.2.attentions.1",
            "up_blocks.0.attentions.0",
            "up_blocks.0.attentions.1",
            "up_blocks.0.attentions.2",
        )
    ),
    upcast_vae=True,
    unet_key_style="sgm",
    base_model_version="sdxl_base_v1-0",
    architecture="stable-diffusion-xl-v1-base",
    # CLIP-L in transformers' naming, OpenCLIP-G in open_clip's (library/models/sgm_keys.py)
    checkpoint_text_prefixes=("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
    example_checkpoint="sd_xl_base_1.0.safetensors",
    example_vae="sdxl_vae.safetensors",
    complete_parts="UNet, VAE and both text encoders",
    bundle_embedding_keys=("clip_l", "clip_g"),
    preset="magicapture_sdxl.toml",
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SDXL)}



def family_for(name: str) -> ModelFamily:
    """The family of a ``ModelKind.family`` string; ValueError naming the trainable ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError as err:
        raise ValueError(f"no trainable model family {name!r}; trainable: {', '.join(f.label for f in FAMILIES.values())}") from err
