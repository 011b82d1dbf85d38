"""The two-phase MagiCapture loop on accelerate.

Phase 1 learns the [V1]/[V2] embeddings alone (source and reference tasks); phase 2 adds LoRA to the UNet
and the text encoder and the composed task, with attention refocusing and the identity loss. All the
tasks of one optimiser step go through the UNet in one batched pass with per-sample masks and weights
(an SD step at batch 1 is bound by kernel launches, see docs/design.md).

Only the small trainable tensors are synchronised across processes (an all-reduce of their gradients),
so the frozen networks never need a DDP wrapper and LoRA can be added between the phases.
"""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from library.training import checkpoint as ckpt
from library.training.attention import AttentionMapStore, install_attention_capture
from library.training.attention_guard import AttentionCollapseGuard, attention_figures, format_figures
from library.training.batching import prompt_rows, sample_tensors, token_positions
from library.config import Config, ConfigError, PhaseConfig, save_config
from library.training.data import CachedSet, PreparedImage, Sample, TaskSampler, cache_set, load_prepared_folder
from library.training.identity_term import IdentityTerm
from library.training.interrupt import StopAfterStep, TrainingInterrupted
from library.training.learning_checks import check_caption_tokens, nothing_learned_warnings
from library.training.lora import add_text_encoder_lora, add_unet_lora
from library.training.losses import combine_losses, masked_reconstruction_loss, multi_token_refocus_loss
from library.models.loading import DTYPES, StableDiffusionParts, load_stable_diffusion
from library.training.optim import build_lr_scheduler, build_optimizer, load_training_state
from library.training.precision import settle_precision
from library.training.resume import ResumePoint, prepare_resume, rewind_history
from library.models.prompts import prompt_input_ids
from library.training.tokens import add_tokens_to_encoders, get_token_embedding, norm_regulariser, pull_norms, token_vectors
from library.training.training_scores import PreviewScoring, report_progress

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training ended early (NaN loss); the message says what happened and what was kept."""


class MagiCaptureTrainer:
    """Both phases on one model of any :class:`~library.models.family.ModelFamily`; the family answers
    every difference (text encoders, prompt encoding, added conditioning, resolution, capture layers).

    What the exporter reads: ``family``, ``text_encoders`` / ``tokenizers`` (family order; ``text_encoder``
    / ``tokenizer`` are the first), ``token_ids`` (word -> ids, the same in every tokenizer), ``unet``,
    ``lora_added``, ``resolution`` (``data.resolution``, or the family's when that is 0).
    """

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None, parts: StableDiffusionParts | None = None):
        self.cfg = cfg
        if accelerator is None:  # before anything is loaded: a precision that cannot run fails or falls back here
            settle_precision(cfg.train)
        self.acc = accelerator or Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            log_with="tensorboard" if cfg.logging.tensorboard else None,
            project_dir=str(Path(cfg.output.dir) / "logs"),
        )
        self.out_dir = Path(cfg.output.dir)
        self.device = self.acc.device
        self.weight_dtype = DTYPES.get(cfg.train.mixed_precision, torch.float32)  # "no": fp32
        rank_seed = cfg.train.seed + 1000 * self.acc.process_index
        self.gen = torch.Generator().manual_seed(rank_seed)

        if parts is None:  # benchmarks hand over models built in memory
            parts = load_stable_diffusion(cfg.model.pretrained, cfg.model.config_dir or None, cfg.model.offline,
                                          vae=cfg.model.vae)
        self.model_name, self.model_kind, self.vae_name = parts.name, parts.kind, parts.vae_name
        self.family = parts.family
        self.unet, self.vae, self.noise_scheduler = parts.unet, parts.vae, parts.noise_scheduler
        self.text_encoders, self.tokenizers = parts.text_encoders, parts.tokenizers
        self.text_encoder, self.tokenizer = self.text_encoders[0], self.tokenizers[0]
        self.resolution = cfg.data.resolution or self.family.resolution  # 0: the family's (512 / 1024)
        for model in (self.unet, self.vae, *self.text_encoders):
            model.requires_grad_(False)
            model.to(self.device, self.weight_dtype)
        # kohya's no_half_vae; SDXL's VAE overflows in fp16 and says so (config.force_upcast, which
        # StableDiffusionXLPipeline honours and SD 1.x's pipeline ignores: the family says which)
        upcast = self.family.upcast_vae and getattr(self.vae.config, "force_upcast", False)
        if cfg.train.vae_fp32 or (upcast and self.weight_dtype == torch.float16):
            self.vae.to(torch.float32)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)

        tok = cfg.tokens
        self.token_ids, self.norm_targets = add_tokens_to_encoders(
            self.tokenizers, self.text_encoders, [tok.source, tok.reference], [tok.source_init, tok.reference_init],
            tok.vectors, tok.reference_init_std, tok.norm_target, self.gen)
        for encoder in self.text_encoders:
            get_token_embedding(encoder).to(self.device)
        # to tell at the end whether a token learned anything (a resumed run rebuilds the same ones)
        self.initial_vectors = {w: token_vectors(self.text_encoder, ids) for w, ids in self.token_ids.items()}
        self._prompt_cache: dict[str, torch.Tensor] = {}

        with self.acc.main_process_first():
            # both folders are read and checked before the VAE encodes anything
            source_items = self._load("source", cfg.data.source_dir, tok.source)
            reference_items = self._load("reference", cfg.data.reference_dir, tok.reference)
            self.source = self._cache(source_items).to(self.device)
            self.reference = self._cache(reference_items).to(self.device)
        # the previews' likeness against the source faces, embedded once from the prepared folder's PNGs
        self.scoring = PreviewScoring(cfg.loss.identity_weights, cfg.data.source_dir,
                                      [it.name for it in source_items], self.print, cfg.evaluation.clip,
                                      cfg.data.reference_dir)
        if self.acc.is_main_process:  # only now: a model or data refused above leaves no output folder behind
            self.out_dir.mkdir(parents=True, exist_ok=True)

        self.store = AttentionMapStore()
        try:
            install_attention_capture(self.unet, self.store, self.capture_layers, cfg.attention.backend)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"[attention] {err}") from None
        if cfg.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers only checkpoints in training mode; there is no dropout to worry about

        self.id_term: IdentityTerm | None = None
        if cfg.loss.identity_weights and cfg.loss.id_weight > 0:
            from library.models.identity import IdentityEncoder

            try:
                encoder = IdentityEncoder.from_file(cfg.loss.identity_weights, self.device)
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"loss.identity_weights: {err}") from None
            self.id_term = IdentityTerm(encoder, self.source, self.vae, self.alphas_cumprod, cfg.loss, self.device)
        elif cfg.loss.id_weight > 0:
            self.print("loss.identity_weights is empty: training with the identity (ID) loss off")
        self.lora_added = False
        self.unet_forward = self.unet
        self.history: list[dict] = []  # one entry per optimiser step: phase, step and each loss term
        self.guard: AttentionCollapseGuard | None = None  # phase 2's attention-collapse watch

    # ---------------------------------------------------------------- setup
    @property
    def capture_layers(self) -> tuple[str, ...]:
        """attention.layers, or the family's capture layers when that list is empty."""
        return tuple(self.cfg.attention.layers) or self.family.capture_layers

    def encoder_suffix(self, index: int) -> str:
        """"" for the first text encoder, "_2" for text_encoder_2: what its checkpoint and log names carry."""
        return self.family.text_encoders[index][len("text_encoder"):]

    def embedding_key(self, index: int) -> str:
        """The checkpoint name of encoder `index`'s new rows: token_embedding.new_vectors (the first, as
        SD 1.x checkpoints always had it), token_embedding_2.new_vectors (text_encoder_2's)."""
        return f"token_embedding{self.encoder_suffix(index)}.new_vectors"

    def print(self, message: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(message)

    def _load(self, kind: str, folder: str, token: str) -> list[PreparedImage]:
        """One prepared folder, with its warnings; with sidecar captions, checks they can train `token`."""
        sidecar = self.cfg.data.captions == "sidecar"
        items = load_prepared_folder(folder, kind, self.resolution, captions=sidecar)
        if len(items) < self.cfg.data.min_images:
            self.print(f"warning: {folder} has {len(items)} {kind} images; the paper uses 4 to 6")
        if kind == "source" and not any(it.landmarks is not None for it in items):
            self.print(f"warning: no face landmarks in {folder}: the identity loss cannot run")
        if sidecar:
            warning = check_caption_tokens(
                folder, token, self.token_ids[token], [(f"{it.name}.txt", it.caption) for it in items],
                lambda caption, truncate: prompt_input_ids(self.tokenizer, caption, self.vector_counts(), truncate),
                self.tokenizer.model_max_length,
            )
            if warning:
                self.print(warning)
        return items

    def _cache(self, items: list[PreparedImage]) -> CachedSet:
        cached = cache_set(items, self.vae, self.cfg.data.flip, self.cfg.loss.mask_eps)
        if self.cfg.data.captions != "sidecar":
            cached.captions = []
        return cached

    def add_lora(self) -> None:
        if self.lora_added:
            return
        lcfg = self.cfg.lora
        torch.manual_seed(self.cfg.train.seed)  # peft draws the LoRA init from the global RNG
        add_unet_lora(self.unet, lcfg.rank, lcfg.alpha, lcfg.targets)
        if lcfg.text_encoder:
            for encoder in self.text_encoders:
                add_text_encoder_lora(encoder, lcfg.rank, lcfg.alpha)
        for name, p in self.named_trainables(phase=2).items():
            if "lora_" in name:
                p.data = p.data.float()  # LoRA weights train in fp32 over fp16/bf16 frozen weights
        self.lora_added = True

    def named_trainables(self, phase: int) -> dict[str, torch.nn.Parameter]:
        """What trains in `phase`, by checkpoint name: each encoder's new rows (:meth:`embedding_key`),
        then in phase 2 the LoRA weights as ``unet.<name>``, ``text_encoder.<name>``, ``text_encoder_2.<name>``."""
        params = {self.embedding_key(i): get_token_embedding(te).new_vectors for i, te in enumerate(self.text_encoders)}
        if phase == 2:
            models = [("unet.", self.unet)] + [(f"{n}.", te) for n, te in zip(self.family.text_encoders, self.text_encoders)]
            for prefix, model in models:
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        params[prefix + name] = p
        return params

    def param_groups(self, phase: int, pcfg: PhaseConfig) -> list[dict]:
        named = self.named_trainables(phase)
        groups = [{"params": [named.pop(self.embedding_key(i)) for i in range(len(self.text_encoders))],
                   "lr": pcfg.lr_embeddings}]
        unet = [p for n, p in named.items() if n.startswith("unet.")]
        te = [p for n, p in named.items() if not n.startswith("unet.")]
        if unet:
            groups.append({"params": unet, "lr": pcfg.lr_unet})
        if te:
            groups.append({"params": te, "lr": pcfg.lr_text_encoder})
        return groups

    # ---------------------------------------------------------------- one step
    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """[77] the first tokenizer's ids of `prompt` (where the tokens' positions are read)."""
        return self.encoder_ids(prompt)[0]

    def encoder_ids(self, prompt: str) -> torch.Tensor:
        """[E, 77] the ids of `prompt` in each tokenizer, family order (cached per prompt)."""
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = torch.stack(
                [prompt_input_ids(tk, prompt, self.vector_counts()) for tk in self.tokenizers])
        return self._prompt_cache[prompt]

    def prompt_batch(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """:func:`library.training.batching.prompt_rows` of `prompts` with this trainer's ids."""
        return prompt_rows(prompts, self.encoder_ids)

    def encode_prompts(self, unique_input_ids: torch.Tensor, prompt_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden [B, 77, D], pooled [B, Dg] or None) of :meth:`prompt_batch`'s ids: the family's
        encoding (:meth:`~library.models.family.ModelFamily.encode_prompt`) of the distinct prompts (each once), indexed
        back to the samples (gradients of repeated rows add up in the shared encoding)."""
        hidden, pooled = self.family.encode_prompt(self.text_encoders, list(unique_input_ids))
        return hidden[prompt_index], (pooled[prompt_index] if pooled is not None else None)

    def unet_call(self, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
                  time_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction [B, 4, h, w], with the family's added conditioning (SDXL: pooled text
        embedding and the size / crop ids)."""
        return self.unet_forward(noisy, timesteps, hidden,
                                 added_cond_kwargs=self.family.added_cond_kwargs(pooled, time_ids)).sample

    def vector_counts(self) -> dict[str, int]:
        """Token word -> its number of vectors (tokens.vectors), as expand_prompt takes it."""
        return {self.cfg.tokens.source: self.cfg.tokens.vectors, self.cfg.tokens.reference: self.cfg.tokens.vectors}

    def token_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, 2] position of the first vector of [V1] and [V2] in each prompt (-1 where absent)."""
        return token_positions(ids, [self.token_ids[w][0] for w in self.token_words()])

    def build_batch(self, samples: list[Sample], phase_step: int, pcfg: PhaseConfig) -> dict[str, torch.Tensor]:
        """The tensors of one micro-batch on the device: :func:`library.training.batching.sample_tensors` (the
        first-half weight while ``phase_step < steps / 2``), the prompts' ``input_ids`` and the tokens'
        ``positions``, then ``noise`` and ``timesteps`` ~ U(0, max_timestep) from the trainer's generator."""
        late = phase_step >= pcfg.steps / 2
        batch = sample_tensors(samples, self.source, self.reference, self.cfg.loss.id_tasks,
                               1.0 if late else pcfg.first_half_weight)
        batch |= self.prompt_batch([s.prompt for s in samples])
        batch["positions"] = self.token_positions(batch["input_ids"])
        batch["noise"] = torch.randn(batch["latents"].shape, generator=self.gen)
        batch["timesteps"] = torch.randint(0, pcfg.max_timestep, (len(samples),), generator=self.gen)
        return {k: v.to(self.device) for k, v in batch.items()}

    def compute_loss(self, batch: dict, phase: int) -> dict[str, torch.Tensor]:
        """Eq. 4-8 on one micro-batch -> {"loss": the total to backpropagate, then detached figures}.

        ``L = mean_b (w_b L_mask,b + attn_weight L_attn,b + id_weight L_id,b)`` (:func:`combine_losses`),
        L_attn the mean over the tokens of the sample (:func:`multi_token_refocus_loss`), phase 2 only.
        Figures for the log: each term's mean; per token, the raw attention inside its target
        (``inside/<token>``) and the share outside it (``outside/<token>``) where the token is in the
        batch (:func:`attention_figures`); each token's mean embedding norm (``norm/<token>``).
        """
        noisy = self.noise_scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"]).to(self.weight_dtype)
        use_attn = phase == 2 and self.cfg.loss.attn_weight > 0
        if use_attn:
            self.store.set_token_positions(batch["positions"])
        else:
            self.store.clear()
        with self.acc.autocast():
            hidden, pooled = self.encode_prompts(batch["unique_input_ids"], batch["prompt_index"])
            pred = self.unet_call(noisy, batch["timesteps"], hidden, pooled, batch["time_ids"])
        recon = masked_reconstruction_loss(pred.float(), batch["noise"].float(), batch["recon_masks"], self.cfg.loss.area_normalize)
        attn = attn_mask = None
        figures: dict[str, torch.Tensor] = {}
        if use_attn:
            maps = self.store.maps()  # [B, 2, M, h, w]
            valid = batch["ar_valid"]
            attn = multi_token_refocus_loss(maps, batch["ar_masks"], valid, self.cfg.loss.attn_detach_extremes)
            attn_mask = valid.any(1)
            inside, outside, count = attention_figures(maps.detach(), batch["ar_masks"], valid)
            for k, word in enumerate(self.token_words()):
                figures[f"inside/{word}"], figures[f"outside/{word}"], figures[f"_count/{word}"] = inside[k], outside[k], count[k]
        ident = id_mask = None
        if phase == 2 and self.id_term is not None:
            with self.acc.autocast():
                ident, id_mask = self.id_term(batch, noisy, pred)
        losses = combine_losses(
            recon, attn, ident, batch["recon_weights"], self.cfg.loss.attn_weight, self.cfg.loss.id_weight,
            attn_mask=attn_mask, id_mask=id_mask,
        )
        use_penalty = self.cfg.tokens.norm_pull == "penalty" and self.cfg.tokens.norm_weight > 0
        penalty = 0.0
        for i, encoder in enumerate(self.text_encoders):
            vectors = get_token_embedding(encoder).new_vectors
            if use_penalty:  # each encoder's rows toward its own target (add_tokens_to_encoders)
                penalty = penalty + norm_regulariser(vectors, self.norm_targets[i])
            with torch.no_grad():
                norms = vectors.float().norm(dim=-1).view(2, -1).mean(1)  # rows: [V1] vectors, then [V2]'s
            for k, word in enumerate(self.token_words()):  # norm/<word>, then norm_2/<word> for text_encoder_2
                losses[f"norm{self.encoder_suffix(i)}/{word}"] = norms[k]
        if use_penalty:
            losses["loss"] = losses["loss"] + self.cfg.tokens.norm_weight * penalty
            losses["norm_penalty"] = penalty.detach()
        self.store.clear()
        return losses | figures

    def token_words(self) -> tuple[str, str]:
        return self.cfg.tokens.source, self.cfg.tokens.reference

    # ---------------------------------------------------------------- the loop
    def run(self, resume: str | ResumePoint | None = None) -> Path | None:
        """Both phases (or what is left of them after `resume`), then the export; returns the LoRA's path.

        `resume`: ``--resume``'s value, or a ResumePoint the caller prepared (checked before the models
        load). The checkpoint and the config are checked before anything is written to the output folder.
        """
        from library.training.outputs import remove_stale_temporaries

        point = None
        if resume:
            point = resume if isinstance(resume, ResumePoint) else prepare_resume(self.cfg, str(resume))
            if not isinstance(resume, ResumePoint):
                for note in point.notes:
                    self.print(note)
        if self.acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.out_dir)
            remove_stale_temporaries(self.cfg)
            earlier = ckpt.list_checkpoints(self.out_dir)
            if point is None and earlier:
                self.print(f"warning: {self.out_dir} holds checkpoints of an earlier run (newest: {earlier[-1].path.name}); "
                           f"this new run replaces them as it saves; to continue that run instead, use --resume latest")
            # a resumed run does again the steps after its checkpoint; a new run starts the history afresh
            rewind_history(self.out_dir / "loss_history.jsonl", *(point.info.order if point else (0, 0)))
            save_config(self.cfg, self.out_dir / "effective_config.toml")
        if self.cfg.logging.tensorboard:
            self.acc.init_trackers("tensorboard")
        start_phase, start_step, state, trainable = 1, 0, None, None
        if point is not None:
            info, trainable, state = point.info, point.trainable, point.state
            start_phase, start_step = info.phase, info.step
            self.print(f"resuming from {info.path.name}: phase {info.phase}, step {info.step}")
        for phase in (1, 2):
            if phase < start_phase:
                continue
            self.run_phase(phase, start_step if phase == start_phase else 0, state if phase == start_phase else None, trainable if phase == start_phase else None)
        self.acc.wait_for_everyone()
        result = None
        if self.acc.is_main_process:
            from library.training.outputs import export_outputs

            result = export_outputs(self)
            report_progress(self.cfg, self.print)
            lora = {"UNet": self.unet} if self.lora_added else {}
            for i, encoder in enumerate(self.text_encoders if self.lora_added else ()):
                lora["text encoder" + (f" {i + 1}" if i else "")] = encoder
            for line in nothing_learned_warnings(self.initial_vectors, self.text_encoder, self.token_ids, lora):
                self.print(line)
        self.acc.end_training()
        return result

    def setup_phase(self, phase: int, state: dict | None = None, trainable: dict | None = None):
        """LoRA (phase 2), trainable flags, optimiser, LR scheduler and sampler; restored from a checkpoint if given."""
        pcfg = self.cfg.phase1 if phase == 1 else self.cfg.phase2
        if phase == 2:
            self.add_lora()
        named = self.named_trainables(phase)
        for p in named.values():
            p.requires_grad_(True)
        if trainable is not None:
            # a checkpoint without config.toml (older versions) is only checked here
            missing, extra = set(named) - set(trainable), set(trainable) - set(named)
            if missing or extra:
                raise TrainingStopped(f"checkpoint does not match this config: {len(missing)} tensors missing, "
                                      f"{len(extra)} unexpected, e.g. {sorted(missing or extra)[0]}")
            wrong = [n for n, p in named.items() if tuple(p.shape) != tuple(trainable[n].shape)]
            if wrong:
                n = wrong[0]
                raise TrainingStopped(f"checkpoint does not match this config: {n} is {tuple(trainable[n].shape)} "
                                      f"there and {tuple(named[n].shape)} here (tokens.vectors or lora.rank changed?)")
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(trainable[name].to(p.device, p.dtype))
        optimizer = build_optimizer(self.cfg.optimizer, self.param_groups(phase, pcfg))
        scheduler = build_lr_scheduler(pcfg, optimizer)
        sampler = TaskSampler(
            pcfg.tasks, len(self.source), len(self.reference), self.cfg.tokens.source, self.cfg.tokens.reference,
            seed=self.cfg.train.seed * 10 + phase + 1000 * self.acc.process_index,
            source_captions=self.source.captions or None, reference_captions=self.reference.captions or None,
        )
        if state is not None:
            load_training_state(optimizer, scheduler, state["optimizer"], state["scheduler"])
            sampler.load_state(state["sampler"])
            self.gen.set_state(state["generator"])
            if state.get("grad_scaler") and self.acc.scaler is not None:  # fp16: the loss scale it had reached
                self.acc.scaler.load_state_dict(state["grad_scaler"])
        optimizer, scheduler = self.acc.prepare(optimizer, scheduler)
        self.unet_forward = torch.compile(self.unet) if self.cfg.train.compile else self.unet
        return pcfg, optimizer, scheduler, sampler, list(named.values())

    def optimizer_step(self, samples: list[Sample], step: int, phase: int, pcfg: PhaseConfig, optimizer, scheduler, params) -> dict[str, float]:
        """One optimiser step over `samples` (in pcfg.grad_accum micro-batches); returns the logged figures:
        loss terms averaged over micro-batches, per-token attention figures averaged over the samples
        that hold the token."""
        micro = len(samples) // pcfg.grad_accum
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for m in range(pcfg.grad_accum):
            batch = self.build_batch(samples[m * micro : (m + 1) * micro], step, pcfg)
            losses = self.compute_loss(batch, phase)
            # one host sync per micro-batch: every figure comes back in one transfer
            values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
            if not math.isfinite(values["loss"]):
                last = ckpt.list_checkpoints(self.out_dir)
                kept = last[-1].path.name if last else "none yet"
                bad = ", ".join(k for k, v in values.items() if k != "loss" and not math.isfinite(v)) or "total"
                raise TrainingStopped(
                    f"loss became {values['loss']} ({bad} term) at phase {phase} step {step}; last good "
                    f"checkpoint: {kept}. Lower the learning rate, or use bf16 instead of fp16."
                )
            self.acc.backward(losses["loss"] / pcfg.grad_accum)
            for k, v in values.items():
                if k.startswith("_count/"):
                    continue
                n = values.get("_count/" + k.split("/", 1)[1], 0.0) if k.startswith(("inside/", "outside/")) else 1.0
                if n > 0:
                    sums[k] = sums.get(k, 0.0) + v * n
                    weights[k] = weights.get(k, 0.0) + n
        if self.acc.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = self.acc.reduce(p.grad, reduction="mean")
        if self.cfg.optimizer.max_grad_norm > 0:
            self.acc.clip_grad_norm_(params, self.cfg.optimizer.max_grad_norm)
        lr_embeddings = optimizer.param_groups[0]["lr"]  # the rate this step used (group 0: the embeddings)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tok = self.cfg.tokens
        if phase == 1 and tok.norm_pull == "renormalize":
            for encoder, target in zip(self.text_encoders, self.norm_targets):
                vectors = get_token_embedding(encoder).new_vectors
                with torch.no_grad():
                    vectors.copy_(pull_norms(vectors, target, min(1.0, tok.norm_rate * lr_embeddings)))
        return {k: sums[k] / weights[k] for k in sums}

    def run_phase(self, phase: int, start_step: int, state: dict | None, trainable: dict | None) -> None:
        from library.training.previews import write_previews

        pcfg, optimizer, scheduler, sampler, params = self.setup_phase(phase, state, trainable)
        self.guard = None
        if phase == 2 and self.cfg.loss.attn_weight > 0:
            self.guard = AttentionCollapseGuard(list(self.token_words()), self.cfg.loss.attn_collapse_ratio)
            if state is not None and state.get("guard"):
                self.guard.load_state(state["guard"])
        offset = self.cfg.phase1.steps if phase == 2 else 0
        bar = tqdm(range(start_step, pcfg.steps), initial=start_step, total=pcfg.steps, desc=f"phase {phase}",
                   disable=not self.acc.is_main_process, dynamic_ncols=True)
        done = start_step
        with StopAfterStep() as stop:
            try:
                for step in bar:
                    logs = self.optimizer_step(sampler.draw(pcfg.batch_size), step, phase, pcfg, optimizer, scheduler, params)
                    done = step + 1
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if "/" not in k})
                    tag = self.preview_tag(phase, done, pcfg)
                    if tag and self.acc.is_main_process and not stop.requested:
                        # before the history line: the scores go into the entry of this step
                        scores = self.scoring(write_previews(self, tag))
                        logs |= scores
                        if scores:
                            self.print(f"phase {phase} step {done}/{pcfg.steps}: samples {self.scoring.describe(scores)}")
                            if self.cfg.logging.tensorboard:
                                self.acc.log(scores, step=offset + done)
                    self.history.append({"phase": phase, "step": done, **logs})
                    if self.acc.is_main_process:
                        with open(self.out_dir / "loss_history.jsonl", "a", encoding="utf-8") as f:
                            f.write(json.dumps(self.history[-1]) + "\n")
                    every = self.cfg.logging.print_every
                    if every and (done % every == 0 or done == pcfg.steps):
                        self.print(f"phase {phase} step {done}/{pcfg.steps}: {format_figures(logs, self.token_words())}")
                    if self.cfg.logging.tensorboard and done % self.cfg.logging.every == 0:
                        self.acc.log({(k if "/" in k else f"loss/{k}"): v for k, v in logs.items() if not k.startswith("eval/")}
                                     | {"lr": scheduler.get_last_lr()[0]}, step=offset + done)
                    if self.guard is not None:
                        self.check_attention(logs, phase, done)
                    if self.stop_requested(stop):
                        break
                    if self.acc.is_main_process:
                        if self.cfg.output.save_every and done % self.cfg.output.save_every == 0 and done < pcfg.steps:
                            self.save(phase, done, optimizer, scheduler, sampler)
                        every = self.cfg.output.save_lora_every
                        if phase == 2 and every and done % every == 0 and done < pcfg.steps:
                            from library.training.outputs import export_outputs

                            export_outputs(self, step=done)  # the last step's are the final files
            except KeyboardInterrupt:  # a second signal, or one the handlers could not catch: mid-step
                last = ckpt.list_checkpoints(self.out_dir)
                then = (f"last checkpoint: {last[-1].path.name}; continue with --resume latest" if last
                        else "no checkpoint yet: start again without --resume")
                raise TrainingInterrupted(
                    f"stopped at once in phase {phase} after step {done}; not saved (the step in progress was "
                    f"incomplete), {then}", stop.requested or signal.SIGINT
                ) from None
            finally:
                bar.close()
            if self.acc.is_main_process:
                path = self.save(phase, done, optimizer, scheduler, sampler)
            if stop.requested:
                saved = f"saved {path}" if self.acc.is_main_process else "saved a checkpoint"
                raise TrainingInterrupted(
                    f"stopped in phase {phase} at step {done}/{pcfg.steps}: {saved}; continue with --resume latest",
                    stop.requested,
                )

    def preview_tag(self, phase: int, done: int, pcfg: PhaseConfig) -> str | None:
        """The samples' name at this step, or None: every sample.every steps, and at the end of phase 1."""
        every = self.cfg.sample.every
        if not every:
            return None
        if done % every == 0:
            return f"p{phase}-{done:06d}"
        return "p1-end" if phase == 1 and done == pcfg.steps else None

    def stop_requested(self, stop: StopAfterStep) -> bool:
        """Whether a signal asked to stop; with several processes, whether any got one (all stop together)."""
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(torch.tensor([float(stop.requested)], device=self.device), reduction="max")
            if flag.item() and not stop.requested:
                stop.requested = int(flag.item())
        return bool(stop.requested)

    def check_attention(self, logs: dict[str, float], phase: int, done: int) -> None:
        """Feed the collapse guard; warn once per collapsed token, or stop (loss.attn_collapse_action)."""
        words = self.token_words()
        present = torch.tensor([float(f"inside/{w}" in logs) for w in words])
        inside = torch.tensor([logs.get(f"inside/{w}", 0.0) for w in words])
        if self.acc.num_processes > 1:  # every process must take the same decision
            both = self.acc.reduce(torch.stack([inside * present, present]).to(self.device), reduction="sum").cpu()
            inside, present = both[0] / both[1].clamp_min(1), both[1]
        tripped = self.guard.update({w: float(inside[k]) for k, w in enumerate(words) if present[k] > 0})
        for word in tripped:
            last = ckpt.list_checkpoints(self.out_dir)
            kept = last[-1].path.name if last else "none yet"
            what = f"at phase {phase} step {done}, {self.guard.describe(word)}"
            if self.cfg.loss.attn_collapse_action == "stop":
                raise TrainingStopped(f"{what}; stopped (loss.attn_collapse_action = stop), last checkpoint: {kept}")
            self.print(f"warning: {what}; last checkpoint: {kept}")

    def save(self, phase: int, step: int, optimizer, scheduler, sampler: TaskSampler) -> Path:
        inner = getattr(optimizer, "optimizer", optimizer)
        state = {
            "optimizer": inner.state_dict(),
            "scheduler": scheduler.state_dict(),
            "sampler": sampler.state(),
            "generator": self.gen.get_state(),
            "guard": self.guard.state() if self.guard is not None and phase == 2 else None,
            "grad_scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,  # fp16 only
        }
        return ckpt.save_checkpoint(self.out_dir, phase, step, self.named_trainables(phase), state,
                                    self.cfg.output.keep_checkpoints, config=self.cfg.to_dict())
