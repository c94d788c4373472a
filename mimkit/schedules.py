"""Schedules as plain functions of numbers: the learning rate (and the config keys that feed it), and the methods'
own per-epoch ramps (BootMAE's feature-loss weight and EMA momentum, mc-BEiT's tokenizer temperature)."""

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


def feature_weight_at(epoch: int, epochs: float, weight: float, ramp: float) -> float:
    """BootMAE's lambda(e) = min(weight * (e + 1) / (ramp * E), weight); ramp 0.25: min(4 weight (e+1) / E, weight)."""
    return weight if ramp <= 0 else min(weight * (epoch + 1) / (ramp * epochs), weight)


def momentum_at(epoch: int, start: float, mid: float, mid_epoch: float, final: float | None,
                final_epoch: float) -> float:  # fmt: skip
    """BootMAE's EMA decay for epoch e: linear start -> mid over [0, mid_epoch); then mid (ViT-L), or (`final` set,
    ViT-B's dynamic schedule) linear mid -> final over [mid_epoch, final_epoch] and final after."""
    if epoch < mid_epoch:
        return start + epoch / mid_epoch * (mid - start)
    if final is None:
        return mid
    span = final_epoch - mid_epoch
    return mid + min(span, epoch - mid_epoch) / span * (final - mid)


def temperature_at(epoch: int, final: float, warmup: float | None, warmup_epochs: int) -> float:
    """mc-BEiT's tokenizer temperature for an epoch: np.linspace(warmup, final, warmup_epochs)[epoch] during the
    warm-up, `final` after (and always, when warmup is None)."""
    if warmup is None or epoch >= warmup_epochs:
        return final
    if warmup_epochs == 1:
        return warmup
    return epoch * ((final - warmup) / (warmup_epochs - 1)) + warmup  # linspace's own arithmetic


def ema_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """data2vec 2.0's teacher EMA decay: linear from `start` at step 0 to `end` at `total_steps` (fairseq's annealed
    rate, end - (end - start) * (1 - step / total)), `end` after."""
    if total_steps <= 0 or step >= total_steps:
        return end
    return end - (end - start) * (1.0 - step / total_steps)
