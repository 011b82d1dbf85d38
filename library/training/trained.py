"""What a run trained, as one frozen record: what the exporter and the preview sampler read instead of the
whole trainer (:meth:`MagiCaptureTrainer.trained`).

The modules in it are the live ones (LoRA and the new token rows included): the record fixes which
objects and settings an export or a preview uses, not their weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from library.config import Config
from library.models.family import ModelFamily


@dataclass(frozen=True)
class TrainedRecord:
    """cfg: the run's config (output names, LoRA settings, steps and rates for the metadata).
    family: the model family (names, pipeline, metadata values). model_name / vae_name: the base model's
    and the VAE's names; v_parameterization: the base model's, for kohya's metadata.
    resolution: the training side, pixels. num_processes: processes that trained (batch sizes in the
    metadata). unet / vae / text_encoders / tokenizers: the trained modules, family order.
    scheduler_config: the training scheduler's config (the preview sampler is built from it).
    token_ids: word -> the ids of its vectors. words: ([V1], [V2]). lora_added: whether LoRA trained.
    autocast: the run's mixed-precision context. print: where notes go (the main process's log)."""

    cfg: Config
    family: ModelFamily
    model_name: str
    vae_name: str | None
    v_parameterization: bool
    resolution: int
    num_processes: int
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple[torch.nn.Module, ...]
    tokenizers: tuple
    scheduler_config: dict
    token_ids: dict[str, list[int]]
    words: tuple[str, str]
    lora_added: bool
    autocast: Callable[[], ContextManager]
    print: Callable[[str], None]
