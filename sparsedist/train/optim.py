"""AdamW on fp32 master weights, and the learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsedist.config.schema import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig, no_decay: set[int]) -> list[dict]:
    """Trainable parameters in two groups: matrices decay; biases, norm scales and `no_decay` ids do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in trainable if p.dim() >= 2 and id(p) not in no_decay]
    plain = [p for p in trainable if p.dim() < 2 or id(p) in no_decay]
    return [{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]


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
