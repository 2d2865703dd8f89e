"""Optimizers and learning-rate schedules built from the recipe's `optim` section."""

from __future__ import annotations

import math

import torch
from torch import nn

from fusion.config import OptimConfig
from fusion.errors import FusionError


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup from 0 over `warmup_steps`, then `cosine`, `linear` or `constant` decay that
    reaches `min_ratio` at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def build_optimizer(model: nn.Module, config: OptimConfig, total_steps: int):
    """AdamW (torch or bitsandbytes 8-bit) with decay on matrices only, and its step-wise schedule.

    Biases and norm weights (1-D tensors) are not decayed, as in HF Trainer and the FuseLLM runs.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"lr": config.lr, "betas": config.betas, "eps": config.eps}
    if config.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise FusionError("optim.name 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
    else:
        optimizer = torch.optim.AdamW(groups, **kwargs)
    warmup = round(total_steps * config.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.schedule, config.min_lr_ratio))
    return optimizer, scheduler
