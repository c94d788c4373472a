"""Learning-rate schedules as plain functions of numbers (and the config keys that feed them)."""

from __future__ import annotations

import math


def warmup_cosine(epoch: float, peak: float, min_value: float, warmup_epochs: float, total_epochs: float) -> float:
    """Linear warmup from 0 to `peak` over `warmup_epochs`, then half-cosine to `min_value` at `total_epochs`;
    `epoch` is fractional (MAE's per-iteration rule)."""
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_value + (peak - min_value) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_length(t, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole schedule: train.schedule_steps when set (pretraining), else epochs' worth."""
    return getattr(t, "schedule_steps", None) or t.epochs * steps_per_epoch


def lr_at(step: int, steps_per_epoch: int, cfg, peak_lr: float) -> float:
    """The lr of optimizer step `step` from a config's optim (warmup_epochs, min_lr) and train sections."""
    total_epochs = schedule_length(cfg.train, steps_per_epoch) / steps_per_epoch
    return warmup_cosine(step / steps_per_epoch, peak_lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, total_epochs)
