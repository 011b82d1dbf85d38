"""Optimisers by name and LR schedulers, kohya-style."""

from __future__ import annotations

import torch

from library.config import ConfigError, OptimizerConfig, PhaseConfig

_TORCH_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}  # lower-case aliases


def build_optimizer(cfg: OptimizerConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """`AdamW8bit` (bitsandbytes, the default), or any torch.optim class by name (AdamW, Adam, SGD...); torch's
    Adam and AdamW run fused on CUDA and multi-tensor elsewhere (:func:`adam_kernel`). Raises ConfigError
    (one line) for an unknown name."""
    name = cfg.name
    if name.lower() in ("adamw8bit", "adamw_8bit", "adamw8"):
        try:
            import bitsandbytes as bnb
        except ImportError as err:  # pragma: no cover - requirements pin it
            raise ConfigError(f"optimizer.name = {name}: bitsandbytes is not importable ({err}); use AdamW") from err
        return bnb.optim.AdamW8bit(groups, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    cls = getattr(torch.optim, _TORCH_OPTIMIZERS.get(name.lower()) or name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise ConfigError(f"optimizer.name = {name!r}: not AdamW8bit nor a torch.optim optimiser (e.g. AdamW, SGD)")
    if cls in (torch.optim.AdamW, torch.optim.Adam):
        kernel = adam_kernel([p for g in groups for p in g["params"]])
        return cls(groups, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **kernel)
    return cls(groups, weight_decay=cfg.weight_decay)


def adam_kernel(params: list[torch.Tensor]) -> dict[str, bool]:
    """torch's fastest Adam(W) implementation for `params`: ``{"fused": True}`` when every one is a floating
    CUDA tensor (one kernel launch for all the parameters instead of several per tensor), else
    ``{"foreach": True}`` (multi-tensor ops; what torch picks on its own for CUDA, made explicit for the
    CPU and mixed devices). Both compute the same update as the per-tensor loop, to rounding."""
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


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


def load_training_state(optimizer: torch.optim.Optimizer, scheduler, optimizer_state: dict, scheduler_state: dict) -> None:
    """Restore an optimiser and its LR scheduler (built from the current config) from a checkpoint.

    torch's `load_state_dict` brings back each parameter group's lr, betas, eps and weight decay as they
    were saved; here the current config's values win, so that a run resumed with, say, a lower
    phase2.lr_unet uses it from the next step on (at the schedule's saved position). With unchanged
    values the rates are computed by the same expression as the scheduler's own, so they are identical.
    """
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    for group, values in zip(optimizer.param_groups, fresh):
        group.update(values)
    scheduler.load_state_dict(scheduler_state)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    lambdas = getattr(scheduler, "lr_lambdas", None)  # diffusers' schedules are all LambdaLR
    if lambdas is not None:
        for group, base, lmbda in zip(optimizer.param_groups, scheduler.base_lrs, lambdas):
            group["lr"] = base * lmbda(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
