"""What the training loop, the previews and the exporter ask of a flow-matching DiT base (Z-Image, FLUX.2
Klein 4B / 9B): the same questions :class:`~library.models.family.ModelFamily` answers for SD 1.x and SDXL,
answered from each family's diffusers pipeline (diffusers 0.42.1):

* prompts: Qwen3 behind a one-turn chat template (``apply_chat_template(add_generation_prompt=True)``,
  ``enable_thinking`` True for Z-Image, False for Klein), padded to 512 tokens; Z-Image conditions on the
  second-to-last hidden state of the prompt's real tokens (``ZImagePipeline._encode_prompt``), Klein on
  hidden states 9, 18 and 27 side by side, padding included (``Flux2KleinPipeline._get_qwen3_prompt_embeds``);
* the call: Z-Image takes a list of [C, 1, H, W] latents, the timestep ``1 - sigma`` and a list of
  caption features, and predicts ``x0 - noise`` (its pipeline negates the output before the Euler step);
  Klein takes packed 2x2-patch tokens, ``sigma`` and 4-axis position ids and predicts ``noise - x0``;
* latents: Z-Image's VAE is FLUX.1's, ``(mean - shift) * scale``; Klein's latents are the VAE mean cut
  into 2 x 2 patches (4 x the channels, half the side) and normalised by the VAE's BatchNorm statistics;
* noise levels: the rectified-flow objective with the scheduler's shift (Z-Image: static shift 3;
  Klein: FLUX.2's empirical mu), :mod:`library.models.objectives`;
* attention refocusing: the joint attention of the middle blocks (library/training/joint_attention.py);
* export: ComfyUI-native LoRA keys and ``qwen3_4b`` / ``qwen3_8b`` embeddings (``export_format``).

The Qwen3 encoder is causal: a token's hidden state depends on the words before it (the chat template's
prefix and the prompt's own words), so the embeddings are trained under the prompt templates' prefixes.
The text encoder gets no LoRA (:meth:`DitModelFamily.text_layers_trained` is 0): the exporter writes the
transformer's LoRA only, which every frontend reads; [V1] / [V2] live in the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.models.dit_family import DIT_FAMILIES, DitFamily
from library.models.family import scaled_latents, unscaled_latents
from library.models.lora_targets import LORA_TARGET_PRESETS
from library.models.objectives import FlowMatchObjective, Flux2FlowMatchObjective

__all__ = ["DitModelFamily", "ZImageModelFamily", "KleinModelFamily", "DIT_MODEL_FAMILIES"]


@dataclass(frozen=True)
class DitModelFamily:
    """The trainer-facing behaviour of one DiT base; `spec` holds its names, classes and metadata values
    (:class:`~library.models.dit_family.DitFamily`). Subclasses: :class:`ZImageModelFamily`,
    :class:`KleinModelFamily`.

    preset: the training config in ``configs/``; latent_pixels: image pixels per cell of the training
    latents (8 for Z-Image, 16 for Klein's packed latents); patch: latent cells per image token side
    (2, 1); max_sequence_length: the prompt's padded token count (both pipelines' default, 512).
    """

    spec: DitFamily
    preset: str
    latent_pixels: int
    patch: int
    enable_thinking: bool
    objective: type = FlowMatchObjective
    max_sequence_length: int = 512
    text_encoders: tuple[str, ...] = ("text_encoder",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    pooled: bool = False
    upcast_vae: bool = False  # neither pipeline upcasts its VAE
    preview_sampler: str = "FlowMatchEulerDiscreteScheduler"
    denoiser: str = "transformer"
    image_token_pixels: int = 16
    export_format: str = "comfy_dit"  # library/training/outputs.py EXPORTERS
    attention_kind: str = "joint"  # library/training/capture.py: joint text + image attention
    denoiser_label: str = "transformer"
    # tokens.norm_target (0.4) and reference_init_std (0.017) are in CLIP-L's units: CLIP-L's table has a mean
    # row norm of about 0.39 and an element std of about 0.014 (library/training/tokens.py); Qwen3's rows are
    # held to the same place in its own table's scale
    token_scale_reference: tuple[float, float] | None = (0.39, 0.014)

    # ------------------------------------------------------------ names
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def resolution(self) -> int:
        return self.spec.resolution

    @property
    def base_model_version(self) -> str:
        return self.spec.base_model_version

    @property
    def embedding_keys(self) -> tuple[str, ...]:
        return (self.spec.embedding_key,)

    # ------------------------------------------------------------ pipeline and objective
    def pipeline_kwargs(self) -> dict:
        """What the pipeline's constructor takes besides the five components."""
        return {}

    def assemble_pipeline(self, denoiser, vae, scheduler, text_encoders, tokenizers):
        """The family's diffusers pipeline (``ZImagePipeline`` / ``Flux2KleinPipeline``) around loaded modules."""
        import diffusers

        return getattr(diffusers, self.spec.pipeline_class)(
            transformer=denoiser, vae=vae, scheduler=scheduler, text_encoder=text_encoders[0],
            tokenizer=tokenizers[0], **self.pipeline_kwargs())

    def make_objective(self, scheduler, resolution: int):
        """The flow-matching objective of `scheduler` at (resolution / 16)^2 image tokens."""
        return self.objective.from_scheduler(scheduler, (resolution // self.image_token_pixels) ** 2)

    # ------------------------------------------------------------ prompts
    def prompt_ids(self, tokenizer, text: str, truncate: bool = True) -> torch.Tensor:
        """[L] int64 ids of `text` inside the pipeline's chat template; with `truncate` padded and cut to
        :attr:`max_sequence_length` (what the text encoder is fed), else every id (to see what is cut)."""
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=self.enable_thinking)
        if not truncate:
            return tokenizer(chat, return_tensors="pt").input_ids[0]
        return tokenizer(chat, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                         return_tensors="pt").input_ids[0]

    def prompt_length(self, tokenizer) -> int:
        """How many ids a prompt keeps (:attr:`max_sequence_length`)."""
        return self.max_sequence_length

    def _hidden_states(self, encoder, ids: torch.Tensor, mask: torch.Tensor):
        """Every hidden state of Qwen3 on `ids` with the padding `mask`; Klein's Qwen3ForCausalLM runs without
        its language-model head (``.model``): the logits over 151k words are never used."""
        body = getattr(encoder, "model", encoder)
        return body(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True, use_cache=False).hidden_states

    def text_layers_trained(self, index: int, num_layers: int) -> int:
        """0: the Qwen3 encoder gets no LoRA (module docstring)."""
        return 0

    # ------------------------------------------------------------ latents
    def latents_from_vae(self, vae, mean: torch.Tensor) -> torch.Tensor:
        """(mean - shift) * scale (FLUX.1's VAE, Z-Image's): :func:`~library.models.family.scaled_latents`."""
        return scaled_latents(vae, mean)

    def latents_to_vae(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """:func:`~library.models.family.unscaled_latents`."""
        return unscaled_latents(vae, latents)

    def size_ids(self, original_hw, crop_box, resolution: int, flipped: bool = False) -> None:
        """None: no size conditioning."""
        return None

    # ------------------------------------------------------------ attention refocusing
    def token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Image tokens (rows, columns) of latents of `latent_hw` cells."""
        return latent_hw[0] // self.patch, latent_hw[1] // self.patch

    def default_capture_layers(self, model) -> tuple[str, ...]:
        """The joint blocks attention refocusing reads when the config names none (overridden)."""
        raise NotImplementedError

    def lora_target_modules(self, model, preset: str) -> list[str]:
        """Full module names of `model` the LoRA preset covers (overridden)."""
        raise NotImplementedError


def _middle(blocks: list[str], count: int) -> tuple[str, ...]:
    """`count` consecutive block names around the middle of `blocks` (all when there are fewer)."""
    if len(blocks) <= count:
        return tuple(blocks)
    start = (len(blocks) - count) // 2
    return tuple(blocks[start:start + count])


def _numbered(model, prefix: str) -> list[str]:
    """``prefix.N`` for each child of ``model.<prefix>`` (a ModuleList), in order."""
    return [f"{prefix}.{i}" for i in range(len(getattr(model, prefix)))]


def _check_preset(preset: str) -> None:
    if preset not in LORA_TARGET_PRESETS:
        raise ValueError(f"unknown LoRA target preset {preset!r}; valid presets: {', '.join(sorted(LORA_TARGET_PRESETS))}")


@dataclass(frozen=True)
class ZImageModelFamily(DitModelFamily):
    """Z-Image (``ZImagePipeline``, a single-stream NextDiT)."""

    def encode_prompt(self, text_encoders, input_ids, tokenizers=()) -> dict[str, torch.Tensor]:
        """ids [B, 512] -> ``{"hidden": [B, 512, D], "mask": [B, 512] bool}``: hidden_states[-2] of Qwen3 and
        which positions are real tokens (not padding); :meth:`predict` keeps the real ones, as the pipeline."""
        ids = input_ids[0]
        mask = ids != tokenizers[0].pad_token_id
        hidden = self._hidden_states(text_encoders[0], ids, mask)[-2]
        return {"hidden": hidden, "mask": mask}

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The velocity (noise - x0) [B, C, h, w] of latents `noisy` at scheduler timesteps (sigma x 1000):
        the transformer is called as ``ZImagePipeline`` calls it (``t = 1 - sigma``, per-sample lists) and
        its output negated, as the pipeline negates it before the Euler step."""
        captions = [h[m] for h, m in zip(cond["hidden"], cond["mask"])]
        t = (1000 - timesteps.float()) / 1000
        out = model(list(noisy.unsqueeze(2).unbind(0)), t.to(noisy.dtype), captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def default_capture_layers(self, model) -> tuple[str, ...]:
        """The two middle ``layers.N`` of the main stack."""
        return _middle(_numbered(model, "layers"), 2)

    def lora_target_modules(self, model, preset: str) -> list[str]:
        """``layers.N.attention.to_q/to_k/to_v/to_out.0`` of the main stack (every preset), plus
        ``feed_forward.w1/w2/w3`` with "attn_geglu" / "kohya_all"."""
        _check_preset(preset)
        parts = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
        if preset != "cross_attn":
            parts += ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
        return [f"{block}.{part}" for block in _numbered(model, "layers") for part in parts]


@dataclass(frozen=True)
class KleinModelFamily(DitModelFamily):
    """FLUX.2 Klein (``Flux2KleinPipeline``: double-stream then single-stream blocks)."""

    objective: type = Flux2FlowMatchObjective
    hidden_layers: tuple[int, ...] = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers

    def pipeline_kwargs(self) -> dict:
        """``is_distilled`` False: a trained LoRA is sampled as Klein Base is, with CFG."""
        return {"is_distilled": False}

    def encode_prompt(self, text_encoders, input_ids, tokenizers=()) -> dict[str, torch.Tensor]:
        """ids [B, 512] -> ``{"hidden": [B, 512, 3 D]}``: hidden states 9, 18 and 27 side by side for every
        position, padding included, as the pipeline hands them to the transformer."""
        ids = input_ids[0]
        states = self._hidden_states(text_encoders[0], ids, ids != tokenizers[0].pad_token_id)
        return {"hidden": torch.cat([states[k] for k in self.hidden_layers], dim=-1)}

    def latents_from_vae(self, vae, mean: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] VAE mean -> [B, 4 C, H / 2, W / 2]: 2 x 2 patches (channel order c, dy, dx), then
        (x - BatchNorm mean) / sqrt(var + eps) (``Flux2KleinPipeline._encode_vae_image``)."""
        b, c, h, w = mean.shape
        x = mean.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        bn_mean, bn_std = self._bn(vae, x)
        return (x - bn_mean) / bn_std

    def latents_to_vae(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`latents_from_vae` undone (the pipeline's decode path)."""
        bn_mean, bn_std = self._bn(vae, latents)
        x = latents * bn_std + bn_mean
        b, c4, h, w = x.shape
        return x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)

    @staticmethod
    def _bn(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The velocity [B, C, h, w] of packed latents `noisy`: tokens in row-major order with position ids
        (t, h, w, l) = (0, row, column, 0), text ids (0, 0, 0, position), timestep sigma, no guidance input
        (``Flux2KleinPipeline.__call__``)."""
        b, c, h, w = noisy.shape
        tokens = noisy.reshape(b, c, h * w).permute(0, 2, 1)
        text = cond["hidden"]
        img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text.shape[1]))
        out = model(hidden_states=tokens, timestep=(timesteps.float() / 1000).to(noisy.dtype), guidance=None,
                    encoder_hidden_states=text, txt_ids=txt_ids.expand(b, -1, -1).to(noisy.device),
                    img_ids=img_ids.expand(b, -1, -1).to(noisy.device), return_dict=False)[0]
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w)

    def default_capture_layers(self, model) -> tuple[str, ...]:
        """The last double-stream block and the two middle single-stream blocks."""
        double = _numbered(model, "transformer_blocks")
        return tuple(double[-1:]) + _middle(_numbered(model, "single_transformer_blocks"), 2)

    def lora_target_modules(self, model, preset: str) -> list[str]:
        """Double-stream blocks: ``attn.to_q/to_k/to_v/to_out.0`` and the text stream's
        ``add_q_proj/add_k_proj/add_v_proj/to_add_out``; single-stream blocks: ``attn.to_qkv_mlp_proj``
        (q, k, v and the MLP's input in one matrix) and ``attn.to_out``; "attn_geglu" / "kohya_all" add the
        double blocks' ``ff`` / ``ff_context`` ``linear_in/linear_out``."""
        _check_preset(preset)
        double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out"]
        if preset != "cross_attn":
            double += ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
        names = [f"{b}.{p}" for b in _numbered(model, "transformer_blocks") for p in double]
        return names + [f"{b}.attn.{p}" for b in _numbered(model, "single_transformer_blocks")
                        for p in ("to_qkv_mlp_proj", "to_out")]


DIT_MODEL_FAMILIES: dict[str, DitModelFamily] = {
    "zimage": ZImageModelFamily(spec=DIT_FAMILIES["zimage"], preset="magicapture_zimage.toml", latent_pixels=8,
                                patch=2, enable_thinking=True),
    "klein4b": KleinModelFamily(spec=DIT_FAMILIES["klein4b"], preset="magicapture_klein.toml", latent_pixels=16,
                                patch=1, enable_thinking=False),
    "klein9b": KleinModelFamily(spec=DIT_FAMILIES["klein9b"], preset="magicapture_klein.toml", latent_pixels=16,
                                patch=1, enable_thinking=False),
}
