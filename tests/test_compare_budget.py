"""A core-minute budget is what the run measured: two specs on one budget, one of them slowed in its first steps
(a noisy neighbour, tests/fixtures/slow_steps), both end within 10% of the budget on their own clock with their
learning-rate cosine run to its end, and every checkpoint the plan names is scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_compare import ROOT, TINY, labelled_npz

HOOK = Path(__file__).parent / "fixtures" / "slow_steps"
BUDGET = 0.15  # core-minutes per run, on 1 thread: 9 s of training each
EVERY = 20  # epochs between scored checkpoints: 120 steps of 6


@pytest.mark.exclusive  # its calibration steps must run as fast as the steps after them
def test_a_core_minute_budget_stops_each_run_on_its_own_clock(tmp_path):
    data = labelled_npz(tmp_path / "tiny.npz")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HOOK), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "MIMKIT_TEST_SLOW_STEPS": "mask.type=block:2:4:1.5"}  # mae+block: steps 2-4 take 1.5 s more  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "mimkit.cli", "compare", "--data", str(data), "--methods",
                           "mae,mae+block", "--core-minutes", str(BUDGET), "--eval-every", str(EVERY), "--out",
                           "study", "--no-page", "--isolate", *TINY], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    study = json.loads((tmp_path / "study" / "compare.json").read_text())
    steps = {}
    for run in study["runs"]:
        assert run["done"] and abs(run["core_minutes_spent"] - BUDGET) <= 0.1 * BUDGET, (run, done.stdout[-3000:])
        assert f"train.budget_minutes={BUDGET:.6g}" in run["overrides"]  # the run's own clock runs and stops it
        metrics = tmp_path / "study" / "runs" / run["name"] / "pretrain" / "metrics.jsonl"
        lrs = [json.loads(line)["lr"] for line in metrics.read_text().splitlines() if '"loss"' in line]
        assert lrs[-1] < 0.05 * max(lrs), run["name"]  # the schedule ended with the budget, not 1.25x after it
        every, final = EVERY * run["steps_per_epoch"], run["final_step"]
        planned = sorted({*range(every, final + 1, every), final})
        assert [c["step"] for c in run["checkpoints"]] == planned, run["name"]  # every checkpoint scored
        steps[run["name"]] = final
    assert steps["mae+block"] < steps["mae"]  # the slowed run got fewer steps for the same compute
    (calibrated,) = {r["calibration"]["s_per_step_fastest"] < 1.0 for r in study["runs"]}
    assert calibrated  # the slow steps did not set the schedule


def test_budgets_become_schedules_and_the_clock_counts_steps(tmp_path):
    from types import SimpleNamespace

    from mimkit.compare.budget import SCHEDULE_SLACK, measured_core_minutes, schedule

    cfg = SimpleNamespace(train=SimpleNamespace(epochs=10), optim=SimpleNamespace(warmup_epochs=1.0))
    assert schedule(cfg, 6, None, None, 1, None) == ["train.epochs=10", "train.schedule_steps=60",
                                                     "optim.warmup_epochs=1"]  # fmt: skip
    assert schedule(cfg, 6, 7 / 6, None, 1, None) == ["train.epochs=2", "train.schedule_steps=7",
                                                      "optim.warmup_epochs=0.1167"]  # --steps 7  # fmt: skip
    # 2 core-minutes on 2 threads: 1 minute of the run's clock, on which its schedules run; the fastest calibration
    # step 0.5 s: 120 steps at most, capped 1.25x above
    calibration = {"s_per_step": 2.0, "s_per_step_fastest": 0.5}
    steps = int(SCHEDULE_SLACK * 120)
    assert schedule(cfg, 6, None, 2.0, 2, calibration) == [f"train.epochs={steps // 6}", f"train.schedule_steps={steps}",
                                                           f"optim.warmup_epochs={0.1 * steps / 6:.4g}",
                                                           "train.budget_minutes=1"]  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    assert measured_core_minutes(metrics, 2) is None
    # 4 steps 10 s apart on 2 threads (the first counted at the median step): 1.33 core-minutes
    metrics.write_text("\n".join(json.dumps({"step": s, "epoch": s / 6, "loss": 1.0, "time": 10.0 * s})
                                 for s in range(1, 5)) + "\n")  # fmt: skip
    assert measured_core_minutes(metrics, 2) == round(40 / 60 * 2, 5)
