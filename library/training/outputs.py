"""The end of a run: the kohya LoRA, one A1111 embedding per token, and a note of what to load where.

The family of the trained model (``trained.family``, of the run's :class:`TrainedRecord`) decides the
names: kohya's LoRA names per family (text-encoder prefixes, diffusers or SGM UNet paths) and the
embedding's tensors (one per text encoder in ``trained.text_encoders``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from library.config import composed_prompt
from library.export.kohya import build_metadata, file_sha256, lora_state_dict, save_embedding, save_lora
from library.files.atomic import remove_tree, stale_temporaries
from library.models.loading import DTYPES
from library.files.weights import non_finite_summary
from library.training.checkpoint import NonFiniteCheckpoint
from library.training.tokens import token_vectors
from library.training.trained import TrainedRecord


PROGRESS_PLOT = "progress.png"  # the losses and the preview scores over steps (library/training/progress_plot.py)
STEP_SUFFIX = "-step{:08d}"  # kohya sd-scripts' STEP_FILE_NAME ("{}-step{:08d}")
BUNDLE_SUFFIX = "_a1111"  # NAME_a1111.safetensors: the LoRA with both embeddings inside (A1111 only)


def output_paths(cfg, step: int | None = None) -> dict[str, Path]:
    """What a run writes at its end, by role: "lora", "bundle" (with ``output.bundle_embeddings``: the LoRA
    with the embeddings inside, ``NAME_a1111.safetensors``), and per token word its .safetensors (and .pt).

    With `step` (a phase-2 step, output.save_lora_every), the intermediate files of that step, named as
    kohya names them: ``NAME-step00000500.safetensors``, ``mcv1-step00000500.safetensors``.
    """
    out = Path(cfg.output.dir)
    suffix = "" if step is None else STEP_SUFFIX.format(step)
    paths = {"lora": out / f"{cfg.output.name}{suffix}.safetensors"}
    if cfg.output.bundle_embeddings:  # A1111's one-file form; the plain LoRA stays what every other frontend loads
        paths["bundle"] = out / f"{cfg.output.name}{BUNDLE_SUFFIX}{suffix}.safetensors"
    for word in (cfg.tokens.source, cfg.tokens.reference):
        paths[word] = out / f"{word}{suffix}.safetensors"
        if cfg.output.embeddings_pt:
            paths[f"{word}.pt"] = out / f"{word}{suffix}.pt"
    return paths


def remove_stale_temporaries(cfg) -> list[Path]:
    """Delete the temporaries a killed run left beside its outputs (every write goes through the atomic
    writer, so only these can be partial); returns what was removed."""
    out = Path(cfg.output.dir)
    names = [*output_paths(cfg).values(), out / "effective_config.toml", out / "loss_history.jsonl",
             out / PROGRESS_PLOT]
    patterns = [re.escape(p.name) for p in names]
    # the step-named intermediate files: the same names with kohya's step suffix before the extension
    patterns += [re.escape(p.stem) + r"-step\d{8}" + re.escape(p.suffix) for p in output_paths(cfg).values()]
    stale = stale_temporaries(out, "|".join(patterns))
    for path in stale:
        remove_tree(path)
    return stale


def export_outputs(trained: TrainedRecord, step: int | None = None) -> Path:
    """Write out/<name>.safetensors (LoRA) and out/<token>.safetensors (embeddings) in the family's format
    (``family.export_format``: :data:`EXPORTERS`); returns the LoRA path.

    With `step`: the intermediate files of that phase-2 step (:func:`output_paths`), the same tensors the
    run holds at that step, and no note on how to load them.
    """
    return EXPORTERS[trained.family.export_format](trained, step)


def _export_kohya(trained: TrainedRecord, step: int | None) -> Path:
    """"kohya": kohya's LoRA and A1111 embeddings (library/export/kohya.py)."""
    cfg = trained.cfg
    dtype = DTYPES[cfg.output.save_precision]
    tokens = {"source": cfg.tokens.source, "reference": cfg.tokens.reference}
    prompt = composed_prompt(cfg.tokens.source, cfg.tokens.reference)
    paths = output_paths(cfg, step)
    family, encoders = trained.family, trained.text_encoders
    vectors = {
        word: {key: token_vectors(encoder, trained.token_ids[word]) for key, encoder in zip(family.embedding_keys, encoders)}
        for word in tokens.values()
    }
    # A1111's legacy .pt holds one text encoder's vectors: only one-encoder families have it
    write_pt = cfg.output.embeddings_pt and len(family.embedding_keys) == 1
    if cfg.output.embeddings_pt and not write_pt:
        trained.print(f"note: output.embeddings_pt is ignored: {family.label} embeddings exist as .safetensors only")
    lora_path = paths["lora"]
    state = None
    if trained.lora_added:
        state = lora_state_dict(trained.unet, encoders if cfg.lora.text_encoder else None, family, dtype=dtype)
    broken = non_finite_summary({"embeddings": vectors, "LoRA": state or {}})
    if broken:  # a file of NaNs must not replace a good one
        raise NonFiniteCheckpoint(f"the trained tensors are no longer finite ({broken}); {lora_path.name} and the "
                                  f"embeddings not written")
    for word, vecs in vectors.items():
        with warnings.catch_warnings():
            if step is not None:  # named by step on purpose; the best-step message says to rename it
                warnings.filterwarnings("ignore", message="A1111 will call this embedding")
            save_embedding(paths[word], word, {k: v.to(dtype) for k, v in vecs.items()})
            if write_pt:
                done = cfg.phase1.steps + (cfg.phase2.steps if step is None else step)
                save_embedding(paths[f"{word}.pt"], word, vecs, legacy_pt=True, step=done)
    if state is not None:
        pretrained, vae = Path(cfg.model.pretrained), Path(cfg.model.vae) if cfg.model.vae else None
        metadata = build_metadata(
            output_name=cfg.output.name,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            unet_targets_preset=cfg.lora.targets,
            train_text_encoder=cfg.lora.text_encoder,
            tokens=tokens,
            base_model_name=trained.model_name,
            base_model_hash=file_sha256(pretrained) if pretrained.is_file() else None,
            base_model_version=family.base_model_version,
            v_parameterization=trained.v_parameterization,
            vae_name=trained.vae_name,
            vae_hash=file_sha256(vae) if vae is not None and vae.is_file() else None,
            training={
                "phase1_steps": cfg.phase1.steps,
                "phase2_steps": cfg.phase2.steps if step is None else step,
                "learning_rate": cfg.phase2.lr_unet,
                "unet_lr": cfg.phase2.lr_unet,
                "text_encoder_lr": cfg.phase2.lr_text_encoder,
                "embedding_lr": cfg.phase2.lr_embeddings,
                "seed": cfg.train.seed,
                "resolution": trained.resolution,  # data.resolution, or the family's side when it is 0
                "mixed_precision": cfg.train.mixed_precision,
                "optimizer": cfg.optimizer.name,
                # kohya's names; a phase-2 step holds batch_size samples per process (library/training/processes.py)
                "num_processes": trained.num_processes,
                "batch_size_per_device": cfg.phase2.batch_size,
                "total_batch_size": cfg.phase2.batch_size * trained.num_processes,
                "gradient_accumulation_steps": cfg.phase2.grad_accum,
                "composed_prompt": prompt,
            },
            state_dict=state,
        )
        # the LoRA itself never holds bundle_emb.* tensors: diffusers' loader refuses a file with them, ComfyUI
        # warns and uses none, Forge and InvokeAI drop them (docs/formats.md); A1111 gets its own file
        save_lora(lora_path, state, metadata, family=family)
        if "bundle" in paths:
            bundle = {w: {k: v.to(dtype) for k, v in vecs.items()} for w, vecs in vectors.items()}
            save_lora(paths["bundle"], state, metadata, bundle_embeddings=bundle, family=family)
    if step is not None:
        return lora_path
    trained.print(
        f"wrote {lora_path} and {', '.join(str(paths[w]) for w in vectors)}\n"
        f"A1111: copy the LoRA to models/Lora and the embeddings to embeddings/, then prompt: "
        f"\"{prompt} <lora:{cfg.output.name}:0.6>\""
        + (f"\nA1111 only: {paths['bundle'].name} is the LoRA with both embeddings inside, one file for models/Lora "
           f"(prompt <lora:{paths['bundle'].stem}:0.6>); other frontends take the separate files"
           if "bundle" in paths and trained.lora_added else "")
    )
    return lora_path


def _export_comfy_dit(trained: TrainedRecord, step: int | None) -> Path:
    """"comfy_dit": a transformer's LoRA with ComfyUI-native keys (library/export/dit_lora.py, which
    diffusers' loaders read too) and one ``<word>.safetensors`` per token holding the family's embedding
    key, rows [n, text-encoder width] (library/export/dit_embeddings.py)."""
    from datetime import datetime, timezone

    from library.export.dit_embeddings import dit_embedding_tensors
    from library.export.dit_lora import dit_lora_metadata, dit_lora_state_dict, peft_pieces
    from library.files.atomic import write_safetensors

    cfg, family = trained.cfg, trained.family
    dtype = DTYPES[cfg.output.save_precision]
    paths = output_paths(cfg, step)
    encoder = trained.text_encoders[0]
    width = encoder.get_input_embeddings().embedding_dim
    words = (cfg.tokens.source, cfg.tokens.reference)
    embeddings = {w: dit_embedding_tensors(token_vectors(encoder, trained.token_ids[w]), family.spec, width) for w in words}
    state = dit_lora_state_dict(peft_pieces(trained.unet), family.spec, dtype) if trained.lora_added else None
    lora_path = paths["lora"]
    broken = non_finite_summary({"embeddings": embeddings, "LoRA": state or {}})
    if broken:  # a file of NaNs must not replace a good one
        raise NonFiniteCheckpoint(f"the trained tensors are no longer finite ({broken}); {lora_path.name} and the "
                                  f"embeddings not written")
    for word, tensors in embeddings.items():
        write_safetensors(paths[word], tensors, metadata={"magicapture.token": word, "modelspec.architecture":
                                                          f"{family.spec.architecture}/textual-inversion"})
    if state is not None:
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        metadata = dit_lora_metadata(family.spec, cfg.output.name, date, cfg.lora.rank, cfg.lora.alpha)
        metadata |= {"ss_output_name": cfg.output.name, "magicapture.tokens": " ".join(words),
                     "magicapture.composed_prompt": composed_prompt(*words),
                     "ss_steps": str(cfg.phase1.steps + (cfg.phase2.steps if step is None else step))}
        write_safetensors(lora_path, state, metadata=metadata)
    if step is not None:
        return lora_path
    if cfg.lora.text_encoder:
        trained.print(f"note: lora.text_encoder is ignored for {family.label}: its Qwen3 encoder takes no LoRA here; "
                      f"the embeddings carry {words[0]} and {words[1]}")
    prompt = composed_prompt(*(f"embedding:{w}" for w in words))
    trained.print(f"wrote {lora_path} and {', '.join(str(paths[w]) for w in words)}\n"
                  f"ComfyUI: copy the LoRA to models/loras and the embeddings to models/embeddings, load the LoRA with a "
                  f"LoraLoaderModelOnly node, then prompt: \"{prompt}\" (docs/dit.md for Forge Neo and InvokeAI)")
    return lora_path


# family.export_format -> the writer of a run's files
EXPORTERS = {"kohya": _export_kohya, "comfy_dit": _export_comfy_dit}
