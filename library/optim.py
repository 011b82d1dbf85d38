"""Optimisers by name and LR schedulers, kohya-style."""

from __future__ import annotations

import torch

from .config import ConfigError, OptimizerConfig, PhaseConfig

_TORCH_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}  # lower-case aliases


def build_optimizer(cfg: OptimizerConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """`AdamW8bit` (bitsandbytes, the default), or any torch.optim class by name (AdamW, Adam, SGD...)."""
    name = cfg.name
    if name.lower() in ("adamw8bit", "adamw_8bit", "adamw8"):
        try:
            import bitsandbytes as bnb
        except ImportError as err:  # pragma: no cover - requirements pin it
            raise ConfigError(f"optimizer.name = {name}: bitsandbytes is not importable ({err}); use AdamW") from None
        return bnb.optim.AdamW8bit(groups, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    cls = getattr(torch.optim, _TORCH_OPTIMIZERS.get(name.lower()) or name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise ConfigError(f"optimizer.name = {name!r}: not AdamW8bit nor a torch.optim optimiser (e.g. AdamW, SGD)")
    if cls in (torch.optim.AdamW, torch.optim.Adam):
        return cls(groups, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return cls(groups, weight_decay=cfg.weight_decay)


def build_lr_scheduler(cfg: PhaseConfig, optimizer: torch.optim.Optimizer):
    from diffusers.optimization import SchedulerType, get_scheduler

    valid = [s.value for s in SchedulerType]
    if cfg.lr_scheduler not in valid:
        raise ConfigError(f"lr_scheduler = {cfg.lr_scheduler!r}: use one of {', '.join(valid)}")
    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=max(cfg.steps, 1),
    )
