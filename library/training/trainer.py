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
from accelerate.utils import broadcast
from tqdm.auto import tqdm

from library.training import checkpoint as ckpt
from library.training.capture import install_capture
from library.training.attention_guard import AttentionCollapseGuard, attention_figures, format_figures
from library.training.batching import sample_tensors, to_device
from library.config import Config, ConfigError, PhaseConfig, save_config
from library.files.atomic import OutputWriteError, append_text, ensure_folder
from library.training.data import CachedSet, PreparedImage, Sample, TaskSampler, cache_set, load_prepared_folder
from library.training.identity_term import IdentityTerm
from library.training.interrupt import StopAfterStep, TrainingInterrupted, TrainingStopped
from library.training.prompting import PromptEncoder
from library.training.trainables import Trainables
from library.training.trained import TrainedRecord
from library.training.speed import compile_enabled, compile_unet, use_channels_last
from library.training.step_log import FigureSums, StepEntry, StepLog, logs_due, non_finite_message, preview_tag
from library.training.timing import StageClock
from library.training.learning_checks import check_caption_tokens, nothing_learned_warnings
from library.training.losses import combine_losses, masked_reconstruction_loss, multi_token_refocus_loss
from library.models.base_model import load_base_model
from library.models.loading import DTYPES, StableDiffusionParts
from library.training.optim import build_lr_scheduler, build_optimizer, load_training_state
from library.training.precision import settle_precision
from library.training.processes import on_main, processes_line, rank_slice, reduce_sum
from library.training.resume import ResumePoint, prepare_resume, rewind_history
from library.training.tokens import add_tokens_to_encoders, get_token_embedding, norm_regulariser, pull_norms, token_vectors
from library.training.training_scores import PreviewScoring, report_progress

log = logging.getLogger(__name__)


class MagiCaptureTrainer:
    """Both phases on one model of any :class:`~library.models.family.ModelFamily`; the family answers
    every difference (objective, text encoders, prompt encoding and conditioning, resolution, capture
    layers). The exporter and the preview sampler get :meth:`trained`, not the trainer."""

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None, parts: StableDiffusionParts | None = None):
        self.cfg = cfg
        if accelerator is None:  # before anything is loaded: a precision that cannot run fails or falls back here
            settle_precision(cfg.train)
        self.acc = accelerator or Accelerator(
            cpu=not torch.cuda.is_available(),  # see library/training/processes.py
            mixed_precision=cfg.train.mixed_precision,
            log_with="tensorboard" if cfg.logging.tensorboard else None,
            project_dir=str(Path(cfg.output.dir) / "logs"),
        )
        self.out_dir = Path(cfg.output.dir)
        self.device = self.acc.device
        self.weight_dtype = DTYPES.get(cfg.train.mixed_precision, torch.float32)  # "no": fp32
        self.print(processes_line(cfg, self.acc.num_processes))
        # one stream on every process: each draws the whole step and trains its slice (processes.py)
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        self.clock = StageClock()  # seconds per stage, written to timings.json at the end of run()
        load = self.clock.stage("load")
        load.__enter__()  # the load stage ends once the models sit on the device (below)

        if parts is None:  # benchmarks hand over models built in memory
            parts = load_base_model(cfg.model)
        self.model_name, self.model_kind, self.vae_name = parts.name, parts.kind, parts.vae_name
        self.family = parts.family
        self.unet, self.vae, self.noise_scheduler = parts.unet, parts.vae, parts.noise_scheduler
        self.text_encoders, self.tokenizers = parts.text_encoders, parts.tokenizers
        self.text_encoder, self.tokenizer = self.text_encoders[0], self.tokenizers[0]
        self.resolution = cfg.data.resolution or self.family.resolution  # 0: the family's (512 / 1024)
        for model in (self.unet, self.vae, *self.text_encoders):
            model.requires_grad_(False)
            model.to(self.device, self.weight_dtype)
        # kohya's no_half_vae; or the family's VAE overflows in fp16 (ModelFamily.upcast_vae)
        upcast = self.family.upcast_vae and getattr(self.vae.config, "force_upcast", False)
        if cfg.train.vae_fp32 or (upcast and self.weight_dtype == torch.float16):
            self.vae.to(torch.float32)
        if cfg.train.channels_last:
            use_channels_last(self.unet), use_channels_last(self.vae)
        # the loss target, the noisy latents, x0 and the noise levels: the family's objective
        self.objective = self.family.make_objective(self.noise_scheduler, self.resolution).to(self.device)

        tok = cfg.tokens
        self.token_ids, self.norm_targets = add_tokens_to_encoders(
            self.tokenizers, self.text_encoders, [tok.source, tok.reference], [tok.source_init, tok.reference_init],
            tok.vectors, tok.reference_init_std, tok.norm_target, self.gen, self.family.token_scale_reference)
        for encoder in self.text_encoders:
            rows = get_token_embedding(encoder).to(self.device).new_vectors
            if self.acc.num_processes > 1:  # the same seed draws the same rows; rank 0's are the ones kept anyway
                with torch.no_grad():
                    rows.copy_(broadcast(rows.detach().clone(), from_process=0))
        # to tell at the end whether a token learned anything (a resumed run rebuilds the same ones)
        self.initial_vectors = {w: token_vectors(self.text_encoder, ids) for w, ids in self.token_ids.items()}
        # the trainer's parts: prompt ids and their encoding; what trains (new rows, then LoRA)
        self.prompts = PromptEncoder(self.family, self.tokenizers, self.text_encoders, self.token_ids,
                                     (tok.source, tok.reference), tok.vectors)
        self.trainables = Trainables(self.family, self.unet, self.text_encoders)
        load.__exit__(None, None, None)

        with self.clock.stage("cache"), self.acc.main_process_first():
            # both folders are read and checked before the VAE encodes anything
            source_items = self._load("source", cfg.data.source_dir, tok.source)
            reference_items = self._load("reference", cfg.data.reference_dir, tok.reference)
            self.source = self._cache(source_items).to(self.device)
            self.reference = self._cache(reference_items).to(self.device)
        # the previews' likeness against the source faces, embedded once from the prepared folder's PNGs
        with self.clock.stage("cache"):
            self.scoring = PreviewScoring(cfg.loss.identity_weights, cfg.data.source_dir,
                                          [it.name for it in source_items], self.print, cfg.evaluation.clip,
                                          cfg.data.reference_dir)
        if self.acc.is_main_process:  # only now: a model or data refused above leaves no output folder behind
            ensure_folder(self.out_dir)

        try:
            layers = tuple(cfg.attention.layers) or self.family.default_capture_layers(self.unet)  # empty: the family's
            self.store = install_capture(self.family.attention_kind, self.unet, layers, cfg.attention.backend,
                                         cfg.attention.normalisation)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"[attention] {err}") from err
        if cfg.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers only checkpoints in training mode; there is no dropout to worry about

        self.id_term: IdentityTerm | None = None
        if cfg.loss.id_weight > 0 and not bool(self.source.has_face.any()):
            # nothing to compare a sample's face with; the masked reconstruction still trains the subject
            self.print(f"identity (ID) loss off: no face was found in any source photo ({cfg.data.source_dir})")
        elif cfg.loss.id_weight > 0:
            from library.models.identity import load_identity_encoder

            with self.clock.stage("cache"):  # the source faces' embeddings
                try:  # empty identity_weights: dlib's ResNet v1 from face_recognition_models, in PyTorch
                    encoder = load_identity_encoder(cfg.loss.identity_weights, self.device)
                except (ValueError, FileNotFoundError) as err:
                    raise ConfigError(f"loss.identity_weights: {err}") from err
                self.id_term = IdentityTerm(encoder, self.source, self.vae, self.objective, cfg.loss, self.device,
                                            self.reference, family=self.family)
            self.print(f"identity (ID) loss: {cfg.loss.identity_weights or 'dlib ResNet v1 (face_recognition_models)'}")
        self.unet_forward = self.unet
        self.history: list[dict] = []  # one entry per optimiser step: phase, step and each loss term
        self.guard: AttentionCollapseGuard | None = None  # phase 2's attention-collapse watch

    # ---------------------------------------------------------------- setup
    def trained(self) -> TrainedRecord:
        """What this run trained, for the exporter and the preview sampler (:class:`TrainedRecord`)."""
        return TrainedRecord(
            self.cfg, self.family, self.model_name, self.vae_name, self.model_kind.v_parameterization, self.resolution,
            self.acc.num_processes, self.unet, self.vae, tuple(self.text_encoders), tuple(self.tokenizers),
            dict(self.noise_scheduler.config), self.token_ids, self.prompts.words, self.trainables.lora_added,
            self.acc.autocast, self.print)

    def print(self, message: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(message)

    def _load(self, kind: str, folder: str, token: str) -> list[PreparedImage]:
        """One prepared folder, with its warnings; with sidecar captions, checks they can train `token`."""
        sidecar = self.cfg.data.captions == "sidecar"
        items = load_prepared_folder(folder, kind, self.resolution, captions=sidecar)
        if len(items) < self.cfg.data.min_images:
            self.print(f"warning: {folder} has {len(items)} {kind} images; the paper uses 4 to 6")
        if sidecar:
            warning = check_caption_tokens(
                folder, token, self.token_ids[token], [(f"{it.name}.txt", it.caption) for it in items],
                lambda caption, truncate: self.prompts.ids(caption, truncate),
                self.family.prompt_length(self.tokenizer),
            )
            if warning:
                self.print(warning)
        return items

    def _cache(self, items: list[PreparedImage]) -> CachedSet:
        cached = cache_set(items, self.vae, self.family, self.cfg.data.flip, self.cfg.loss.mask_eps)
        if self.cfg.data.captions != "sidecar":
            cached.captions = []
        return cached

    # ---------------------------------------------------------------- one step
    def predict(self, noisy: torch.Tensor, levels: torch.Tensor, prompts: dict, size_ids: torch.Tensor | None) -> torch.Tensor:
        """The denoiser's prediction [B, C, h, w] of `noisy` at the objective's noise `levels` [B], conditioned on
        :meth:`PromptEncoder.batch`'s ids in `prompts` (on the device) and the images' size ids (None where the
        family has none): the family encodes the prompts and builds the call."""
        cond = self.prompts.encode(prompts["unique_input_ids"], prompts["prompt_index"])
        if size_ids is not None:
            cond["size_ids"] = size_ids
        return self.family.predict(self.unet_forward, noisy, self.objective.model_timesteps(levels), cond)

    def build_batch(self, samples: list[Sample], phase_step: int, pcfg: PhaseConfig, noise: torch.Tensor | None = None,
                    timesteps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one micro-batch on the device: :func:`library.training.batching.sample_tensors` (the
        first-half weight while ``phase_step < steps / 2``), the prompts' ``input_ids`` and the tokens'
        ``positions``, then ``noise`` and ``timesteps`` (the objective's noise levels): as given (the step's, drawn by
        :meth:`optimizer_step`), else drawn here from the trainer's generator."""
        late = phase_step >= pcfg.steps / 2
        batch = sample_tensors(samples, self.source, self.reference, self.cfg.loss.id_tasks,
                               1.0 if late else pcfg.first_half_weight)
        batch |= self.prompts.batch([s.prompt for s in samples])
        batch["positions"] = self.prompts.positions(batch["input_ids"])
        if noise is None:
            noise, timesteps = self._draw_noise(len(samples), batch["latents"].shape[1:], pcfg)
        batch["noise"], batch["timesteps"] = noise, timesteps
        plan = self.id_term.plan(batch) if self.id_term is not None else None  # from host tensors: no sync
        moved = {k: to_device(v, self.device) for k, v in batch.items() if k != "positions"}
        return moved | {"positions": batch["positions"], "id_plan": plan}

    def compute_loss(self, batch: dict, phase: int) -> dict[str, torch.Tensor]:
        """Eq. 4-8 on one micro-batch -> {"loss": the total to backpropagate, then detached figures}.

        ``L = mean_b (w_b L_mask,b + attn_weight L_attn,b + id_weight L_id,b)`` (:func:`combine_losses`),
        L_attn the mean over the tokens of the sample (:func:`multi_token_refocus_loss`), phase 2 only.
        Figures for the log: each term's mean; per token, the raw attention inside its target
        (``inside/<token>``) and the share outside it (``outside/<token>``) where the token is in the
        batch (:func:`attention_figures`); each token's mean embedding norm (``norm/<token>``).
        """
        noisy = self.objective.add_noise(batch["latents"], batch["noise"], batch["timesteps"]).to(self.weight_dtype)
        use_attn = phase == 2 and self.cfg.loss.attn_weight > 0
        if use_attn:
            self.store.set_token_positions(batch["positions"], self.family.token_grid(batch["latents"].shape[-2:]))
        else:
            self.store.clear()
        with self.acc.autocast():
            pred = self.predict(noisy, batch["timesteps"], batch, batch.get("size_ids"))
        target = self.objective.target(batch["latents"].float(), batch["noise"].float())
        recon = masked_reconstruction_loss(pred.float(), target, batch["recon_masks"], self.cfg.loss.area_normalize)
        attn = attn_mask = None
        figures: dict[str, torch.Tensor] = {}
        if use_attn:
            maps = self.store.maps()  # [B, 2, M, h, w]
            valid = batch["ar_valid"]
            attn = multi_token_refocus_loss(maps, batch["ar_masks"], valid, self.cfg.loss.attn_detach_extremes)
            attn_mask = valid.any(1)
            inside, outside, count = attention_figures(maps.detach(), batch["ar_masks"], valid)
            for k, word in enumerate(self.prompts.words):
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
            for k, word in enumerate(self.prompts.words):  # norm/<word>, then norm<suffix>/<word> per further encoder
                losses[f"norm{self.trainables.encoder_suffix(i)}/{word}"] = norms[k]
        if use_penalty:
            losses["loss"] = losses["loss"] + self.cfg.tokens.norm_weight * penalty
            losses["norm_penalty"] = penalty.detach()
        self.store.clear()
        return losses | figures

    # ---------------------------------------------------------------- the loop
    def run(self, resume: str | ResumePoint | None = None) -> Path | None:
        """Both phases (or what is left of them after `resume`), then the export; returns the LoRA's path.

        `resume`: ``--resume``'s value, or a ResumePoint the caller prepared (checked before the models
        load). The checkpoint and the config are checked before anything is written to the output folder.
        A write that fails (no space, read-only) or tensors that are no longer finite stop the run with a
        TrainingStopped naming the last good checkpoint; nothing half-written is left.
        """
        try:
            return self._run(resume)
        except (OutputWriteError, ckpt.NonFiniteCheckpoint) as err:
            then = ("lower the learning rate (or use bf16 instead of fp16), then continue with --resume latest"
                    if isinstance(err, ckpt.NonFiniteCheckpoint) else "continue with --resume latest once it can write")
            raise TrainingStopped(f"{err}; last good checkpoint: {ckpt.last_good_checkpoint(self.out_dir)}; {then}") from err

    def _run(self, resume: str | ResumePoint | None) -> Path | None:
        from library.training.outputs import remove_stale_temporaries

        point = None
        if resume:
            point = resume if isinstance(resume, ResumePoint) else prepare_resume(self.cfg, str(resume), self.acc.num_processes)
            if not isinstance(resume, ResumePoint):
                for note in point.notes:
                    self.print(note)
        if self.acc.is_main_process:
            ensure_folder(self.out_dir)
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

            with self.clock.stage("export"):
                result = export_outputs(self.trained())
            self.clock.write(self.out_dir / "timings.json")
            lora = {self.family.denoiser_label: self.unet} if self.trainables.lora_added else {}
            for i, encoder in enumerate(self.text_encoders if self.trainables.lora_added else ()):
                lora["text encoder" + (f" {i + 1}" if i else "")] = encoder
            for line in nothing_learned_warnings(self.initial_vectors, self.text_encoder, self.token_ids, lora):
                self.print(line)
            report_progress(self.cfg, self.print)  # last: the run's last line names the best step
        self.acc.end_training()
        return result

    def setup_phase(self, phase: int, state: dict | None = None, trainable: dict | None = None):
        """LoRA (phase 2), trainable flags, optimiser, LR scheduler and sampler; restored from a checkpoint if given."""
        pcfg = self.cfg.phase1 if phase == 1 else self.cfg.phase2
        if phase == 2:
            self.trainables.add_lora(self.cfg.lora, self.cfg.train.seed)
        named = self.trainables.named(phase)
        for p in named.values():
            p.requires_grad_(True)
        if trainable is not None:
            self.trainables.load(named, trainable)
        optimizer = build_optimizer(self.cfg.optimizer, self.trainables.param_groups(phase, pcfg))
        scheduler = build_lr_scheduler(pcfg, optimizer)
        sampler = TaskSampler(
            pcfg.tasks, len(self.source), len(self.reference), self.cfg.tokens.source, self.cfg.tokens.reference,
            seed=self.cfg.train.seed * 10 + phase,  # the same on every process (processes.py)
            source_captions=self.source.captions or None, reference_captions=self.reference.captions or None,
        )
        if state is not None:
            load_training_state(optimizer, scheduler, state["optimizer"], state["scheduler"])
            sampler.load_state(state["sampler"])
            self.gen.set_state(state["generator"])
            if state.get("grad_scaler") and self.acc.scaler is not None:  # fp16: the loss scale it had reached
                self.acc.scaler.load_state_dict(state["grad_scaler"])
        # not the scheduler: accelerate steps a prepared one once per process per step
        optimizer = self.acc.prepare(optimizer)
        compiled = compile_enabled(self.cfg.train.compile, self.device, pcfg.steps)
        self.unet_forward = compile_unet(self.unet) if compiled else self.unet
        return pcfg, optimizer, scheduler, sampler, list(named.values())

    def _draw_noise(self, n: int, shape: torch.Size, pcfg: PhaseConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise [n, *shape] and noise levels [n] (the objective's, up to max_timestep) from the trainer's generator."""
        noise = torch.randn((n, *shape), generator=self.gen)
        return noise, self.objective.sample_levels(n, pcfg.max_timestep, self.gen)

    def optimizer_step(self, samples: list[Sample], step: int, phase: int, pcfg: PhaseConfig, optimizer, scheduler, params) -> FigureSums:
        """One optimiser step; `samples` is the step of every process (num_processes x batch_size, drawn alike on
        each), whose noise and timesteps are drawn here alike too; this process trains its slice
        (:mod:`library.training.processes`) in pcfg.grad_accum micro-batches. Returns the figures to log, still
        on the device (:class:`FigureSums`: loss terms averaged over micro-batches, per-token attention figures
        averaged over the samples that hold the token). Nothing here waits for the device: a non-finite loss
        is caught when the figures are read (:meth:`record_steps`), before any checkpoint is written."""
        shape = (self.source.latents if len(self.source) else self.reference.latents).shape[1:]
        noise, timesteps = self._draw_noise(len(samples), shape, pcfg)
        mine = rank_slice(self.acc.process_index, len(samples) // self.acc.num_processes)
        samples, noise, timesteps = samples[mine], noise[mine], timesteps[mine]
        micro = len(samples) // pcfg.grad_accum
        figures = FigureSums()
        for m in range(pcfg.grad_accum):
            part = slice(m * micro, (m + 1) * micro)
            batch = self.build_batch(samples[part], step, pcfg, noise[part], timesteps[part])
            losses = self.compute_loss(batch, phase)
            self.acc.backward(losses["loss"] / pcfg.grad_accum)
            figures.add(losses)
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
        return figures

    def check_finite(self, entry: StepEntry) -> None:
        """Stop (one line naming the term and the last good checkpoint) if a step's loss was not finite."""
        if not math.isfinite(entry.figures["loss"]):
            raise TrainingStopped(non_finite_message(entry, ckpt.last_good_checkpoint(self.out_dir)))

    def record_steps(self, entries: list[StepEntry], pcfg: PhaseConfig, scores: dict[str, float]) -> None:
        """History, loss_history.jsonl, the log line, TensorBoard and the collapse guard for steps read back
        from the device, in order; `scores` (the previews' likeness) go into the last step's entry."""
        if entries:
            entries[-1].figures |= scores
        for entry in entries:
            phase, done, logs = entry.phase, entry.step, entry.figures
            offset = self.cfg.phase1.steps if phase == 2 else 0
            self.history.append({"phase": phase, "step": done, "lr": entry.lr, **logs})
            if self.acc.is_main_process:
                append_text(self.out_dir / "loss_history.jsonl", json.dumps(self.history[-1]) + "\n")
            every = self.cfg.logging.print_every
            if every and (done % every == 0 or done == pcfg.steps):
                self.print(f"phase {phase} step {done}/{pcfg.steps}: {format_figures(logs, self.prompts.words)}")
            if self.cfg.logging.tensorboard and done % self.cfg.logging.every == 0:
                self.acc.log({(k if "/" in k else f"loss/{k}"): v for k, v in logs.items() if not k.startswith("eval/")}
                             | {"lr": entry.lr}, step=offset + done)
            if self.guard is not None:
                self.check_attention(logs, phase, done)

    def run_phase(self, phase: int, start_step: int, state: dict | None, trainable: dict | None) -> None:
        from library.training.previews import write_previews

        with self.clock.stage("setup"):  # LoRA, optimiser, compile wrapper
            pcfg, optimizer, scheduler, sampler, params = self.setup_phase(phase, state, trainable)
        self.guard = None
        if phase == 2 and self.cfg.loss.attn_weight > 0:
            self.guard = AttentionCollapseGuard(list(self.prompts.words), self.cfg.loss.attn_collapse_ratio)
            if state is not None and state.get("guard"):
                self.guard.load_state(state["guard"])
        offset = self.cfg.phase1.steps if phase == 2 else 0
        bar = tqdm(range(start_step, pcfg.steps), initial=start_step, total=pcfg.steps, desc=f"phase {phase}",
                   disable=not self.acc.is_main_process, dynamic_ncols=True)
        done = start_step
        steps = StepLog()
        with self.clock.stage(f"phase{phase}"), StopAfterStep() as stop:
            try:
                for step in bar:
                    figures = self.optimizer_step(sampler.draw(pcfg.batch_size * self.acc.num_processes), step, phase,
                                                  pcfg, optimizer, scheduler, params)
                    steps.add(phase, step + 1, scheduler.get_last_lr()[0], figures)  # the LR TensorBoard has always shown
                    done = step + 1
                    if done == start_step + 1:
                        self.clock.mark_first_step(f"phase{phase}")
                    self.clock.steps[f"phase{phase}"] = self.clock.steps.get(f"phase{phase}", 0) + 1
                    # one decision per step that every process shares (an all-reduce with several): whether to stop
                    stopping = self.stop_requested(stop)
                    if not logs_due(self.cfg, phase, done, pcfg.steps, stopping or preview_tag(self.cfg, phase, done, pcfg.steps) is not None):
                        continue
                    entries = steps.take(lambda v: reduce_sum(self.acc, v))  # every process's figures, so all take one decision
                    for entry in entries:
                        self.check_finite(entry)  # before a preview or a checkpoint is made of broken weights
                    bar.set_postfix({k: f"{v:.4g}" for k, v in entries[-1].figures.items() if "/" not in k})
                    tag = preview_tag(self.cfg, phase, done, pcfg.steps)
                    scores = {}
                    if tag and not stop.requested:
                        with self.clock.stage("previews"):
                            scores = on_main(self.acc, lambda: self.scoring(write_previews(self, tag))) or {}
                        if scores:
                            self.print(f"phase {phase} step {done}/{pcfg.steps}: samples {self.scoring.describe(scores)}")
                            if self.cfg.logging.tensorboard:
                                self.acc.log(scores, step=offset + done)
                    self.record_steps(entries, pcfg, scores)
                    if stopping:
                        break
                    if self.cfg.output.save_every and done % self.cfg.output.save_every == 0 and done < pcfg.steps:
                        with self.clock.stage("checkpoints"):
                            self.save(phase, done, optimizer, scheduler, sampler)
                    every = self.cfg.output.save_lora_every
                    if phase == 2 and every and done % every == 0 and done < pcfg.steps:
                        from library.training.outputs import export_outputs

                        with self.clock.stage("export"):  # the last step's are the final files
                            on_main(self.acc, lambda: export_outputs(self.trained(), step=done))
            except KeyboardInterrupt as cause:  # a second signal, or one the handlers could not catch: mid-step
                last = ckpt.list_checkpoints(self.out_dir)
                then = (f"last checkpoint: {last[-1].path.name}; continue with --resume latest" if last
                        else "no checkpoint yet: start again without --resume")
                raise TrainingInterrupted(
                    f"stopped at once in phase {phase} after step {done}; not saved (the step in progress was "
                    f"incomplete), {then}", stop.requested or signal.SIGINT
                ) from cause
            finally:
                bar.close()
            with self.clock.stage("checkpoints"):
                path = self.save(phase, done, optimizer, scheduler, sampler)
            if stop.requested:
                saved = f"saved {path}" if self.acc.is_main_process else "saved a checkpoint"
                raise TrainingInterrupted(
                    f"stopped in phase {phase} at step {done}/{pcfg.steps}: {saved}; continue with --resume latest",
                    stop.requested,
                )

    def stop_requested(self, stop: StopAfterStep) -> bool:
        """Whether a signal asked to stop; with several processes, whether any got one (all stop together)."""
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(torch.tensor([float(stop.requested)], device=self.device), reduction="max")
            if flag.item() and not stop.requested:
                stop.requested = int(flag.item())
        return bool(stop.requested)

    def check_attention(self, logs: dict[str, float], phase: int, done: int) -> None:
        """Feed the collapse guard; warn once per collapsed token, or stop (loss.attn_collapse_action)."""
        words = self.prompts.words
        # `logs` hold every process's figures (StepLog.take), so every process takes the same decision
        tripped = self.guard.update({w: logs[f"inside/{w}"] for w in words if f"inside/{w}" in logs})
        for word in tripped:
            kept = ckpt.last_good_checkpoint(self.out_dir)
            what = f"at phase {phase} step {done}, {self.guard.describe(word)}"
            if self.cfg.loss.attn_collapse_action == "stop":
                raise TrainingStopped(f"{what}; stopped (loss.attn_collapse_action = stop), last checkpoint: {kept}")
            self.print(f"warning: {what}; last checkpoint: {kept}")

    def save(self, phase: int, step: int, optimizer, scheduler, sampler: TaskSampler) -> Path | None:
        """A checkpoint of this step, written by the main process (called on every process: :func:`on_main`)."""
        def write() -> Path:  # the state is gathered where it is written, on the main process only
            inner = getattr(optimizer, "optimizer", optimizer)
            state = {
                "optimizer": inner.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state(),
                "generator": self.gen.get_state(),
                "guard": self.guard.state() if self.guard is not None and phase == 2 else None,
                "grad_scaler": self.acc.scaler.state_dict() if self.acc.scaler is not None else None,  # fp16 only
                "processes": self.acc.num_processes,  # every process's state follows from this one (processes.py)
            }
            return ckpt.save_checkpoint(self.out_dir, phase, step, self.trainables.named(phase), state,
                                        self.cfg.output.keep_checkpoints, config=self.cfg.to_dict())

        return on_main(self.acc, write)
