"""A run's budget and its clock. Epochs (or optimizer steps) are counted; a core-minute budget is measured: the
run's own clock (train.budget_minutes = the budget / its threads, counted over resumes) drives its learning-rate and
method schedules and stops it when spent (a checkpoint written at the stop), so a slow start or a noisy neighbour
changes how many steps it gets, not how much compute, and its cosine still ends at the budget. A short timed
calibration sizes the cap (train.schedule_steps: its fastest step, the most steps the budget can buy, x
SCHEDULE_SLACK), which the clock ends the run before. Core-minutes = training-loop wall-clock (summed from the run's
metrics.jsonl, one record per step) x the threads the run pretrains on."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

CALIBRATION_STEPS = 10  # timed steps of a core-minute budget's calibration run (its fastest sets the schedule)
EVERY = 10**6  # keep_last / save_every_epochs: every checkpoint is kept, none at epoch ends
SCHEDULE_SLACK = 1.25  # the cap is this much above the steps the budget buys: the clock ends the run
CORE_MINUTES = ("training-loop wall-clock summed from each run's metrics.jsonl (one record per step; a process's first "
                "step counted at its median step) x pretraining threads; start-up and evaluation excluded; a "
                "core-minute budget runs the schedules on the run's own clock and stops it there (train.budget_minutes); "
                "the calibration sets only a cap on its steps")  # fmt: skip
GPU_MINUTES = CORE_MINUTES.replace("x pretraining threads", "x GPUs (one per run)").replace("core-minute", "GPU-minute")


def schedule(cfg, steps_per_epoch: int, epochs: float | None, compute_minutes: float | None, per_minute: int,
             calibration: dict | None) -> list[str]:  # fmt: skip
    """Schedule overrides: `epochs` (default the recipe's), or a core- (GPU-) minute budget on the run's clock
    (train.budget_minutes = compute_minutes / per_minute, its threads (GPUs); warmup 10% of it) whose cap on steps
    comes from `calibration` (seconds per step)."""
    if compute_minutes is None:
        epochs = epochs or cfg.train.epochs
        warmup = min(cfg.optim.warmup_epochs, 0.1 * epochs)  # the recipes' 1 of 10 epochs, kept for longer runs
        steps = max(1, round(epochs * steps_per_epoch))
        return [f"train.epochs={max(1, math.ceil(epochs))}", f"train.schedule_steps={steps}",
                f"optim.warmup_epochs={warmup:.4g}"]  # fmt: skip
    budget = f"train.budget_minutes={compute_minutes / per_minute:.6g}"
    if calibration is None:  # before the calibration (plan checks): values of the right type
        return ["train.schedule_steps=1", "optim.warmup_epochs=0", budget]
    # the fastest calibration step: a neighbour only slows steps, so this is the most steps the budget can buy, and
    # the run's own clock (train.budget_minutes) ends it at the budget, before this cap
    fastest = calibration.get("s_per_step_fastest") or calibration["s_per_step"]
    steps = max(1, int(SCHEDULE_SLACK * compute_minutes * 60 / per_minute / fastest))
    return [f"train.epochs={max(1, math.ceil(steps / steps_per_epoch))}", f"train.schedule_steps={steps}",
            f"optim.warmup_epochs={0.1 * steps / steps_per_epoch:.4g}", budget]  # fmt: skip


def measured_core_minutes(metrics: Path, threads: int) -> float | None:
    clock = step_clock(metrics)
    return round(clock[max(clock)][1] / 60 * threads, 5) if clock else None


def step_clock(metrics: Path) -> dict[int, tuple[float, float]]:
    """step -> (epoch, seconds of training up to and including it), from a run's metrics.jsonl written with
    train.log_every=1. Inside one process's stretch of records (a resume, or a step number that goes back, starts
    the next) a step takes the time since the record before it, a checkpoint written in between included; the
    first step of a stretch, whose time since the process started also holds imports, data loading and model
    building, counts as the stretch's median step. A step run again after a kill replaces the lost one."""
    stretches: list[list[dict]] = [[]]
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "event" in record or ("loss" in record and stretches[-1] and record["step"] <= stretches[-1][-1]["step"]):
            stretches.append([])
        if "loss" in record and "time" in record:
            stretches[-1].append(record)
    gaps = [[b["time"] - a["time"] for a, b in itertools.pairwise(s)] for s in stretches]
    fallback = statistics.median([d for g in gaps for d in g] or [0.0])
    steps: dict[int, tuple[float, float]] = {}
    for stretch, gap in zip(stretches, gaps):
        for record, seconds in zip(stretch, [statistics.median(gap) if gap else fallback, *gap]):
            steps[record["step"]] = (record["epoch"], seconds)
    clock, total = {}, 0.0
    for step in sorted(steps):
        total += steps[step][1]
        clock[step] = (steps[step][0], total)
    return clock


def is_scored_step(step: int, every: int | None, final: int | None) -> bool:
    """Whether a checkpoint is scored: every one the plan names (each `every` steps) and the final one. (A
    checkpoint written near the final one is scored too: a clock-stopped run's final step is not known beforehand,
    and a written checkpoint the plan names is never left unscored.)"""
    return step == final or (every is not None and every > 0 and step % every == 0)
