"""The learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch

from sparsedist.config.schema import ScheduleConfig


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then cosine or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
