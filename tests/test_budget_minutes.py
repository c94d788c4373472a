"""train.budget_minutes: a compute budget the schedules run on. The lr's warmup and cosine follow the share of the
budget spent (not the step), the run ends and saves when it is spent, a resumed run continues the clock saved in its
checkpoint, and a spent run started again trains nothing."""

from __future__ import annotations

import json

import pytest

from mimkit.checkpoint import load_checkpoint
from mimkit.config import ConfigError
from mimkit.schedules import lr_at
from mimkit.train import pretrain

BUDGET_MINUTES = 0.05  # 3 s of training: ~100+ tiny steps on one core
CAP = ["train.epochs=400", "optim.warmup_epochs=40"]  # 3,200 steps: a cap the budget ends well before; warmup 10%


def lrs(out_dir) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["lr"]) for r in records if "loss" in r]


def test_the_schedule_runs_on_the_budget_and_the_run_stops_when_it_is_spent(tiny_cfg, one_thread):
    cfg = tiny_cfg(*CAP, f"train.budget_minutes={BUDGET_MINUTES}")
    result = pretrain(cfg)
    state = load_checkpoint(result.checkpoint)
    cap = 400 * 8  # 64 images / batch 8 = 8 steps per epoch
    assert 20 < result.step < cap and state["step"] == result.step  # ended by the clock, a checkpoint at the stop
    assert 60 * BUDGET_MINUTES <= state["clock_s"] < 60 * BUDGET_MINUTES + 1.0
    peak = cfg.optim.blr * 8 / 256
    curve = [lr for _, lr in lrs(result.out_dir)]
    top = max(range(len(curve)), key=curve.__getitem__)
    assert 0 < top < len(curve) - 1 and curve[top] > 0.9 * peak  # warmed up to the peak, then down
    assert curve[-1] < 0.02 * peak  # the cosine ran to its end within the budget (a step schedule would stop early)
    assert all(b <= a + 1e-12 for a, b in zip(curve[top:], curve[top + 1 :]))  # never up again after the peak

    again = pretrain(tiny_cfg(*CAP, f"train.budget_minutes={BUDGET_MINUTES}"))  # spent: nothing to do
    assert again.already_finished and again.step == result.step


def test_a_resumed_budget_run_continues_its_clock(tiny_cfg, one_thread):
    budget = f"train.budget_minutes={BUDGET_MINUTES}"
    first = pretrain(tiny_cfg(*CAP, budget, "train.max_minutes=0.015"))  # a job's time limit: 0.9 s of the 3 s
    saved = load_checkpoint(first.checkpoint)
    assert 0.9 <= saved["clock_s"] < 60 * BUDGET_MINUTES
    cfg = tiny_cfg(*CAP, budget)
    second = pretrain(cfg)
    assert second.step > first.step and not second.already_finished
    total = 400 * 8
    resumed_at = next(lr for step, lr in lrs(second.out_dir) if step == first.step + 1)
    position = int(saved["clock_s"] / (60 * BUDGET_MINUTES) * total)  # where the saved clock puts the schedule
    assert resumed_at == pytest.approx(lr_at(position, 8, cfg, cfg.optim.blr * 8 / 256), rel=1e-6)
    assert 60 * BUDGET_MINUTES <= load_checkpoint(second.checkpoint)["clock_s"] < 60 * BUDGET_MINUTES + 1.0


def test_a_budget_must_be_positive(tiny_cfg):
    with pytest.raises(ConfigError, match="train.budget_minutes must be positive"):
        tiny_cfg("train.budget_minutes=0")
