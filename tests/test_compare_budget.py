"""A core-minute budget is what the run measured: two specs on one budget, one of them slowed in its first steps
(a noisy neighbour, tests/fixtures/slow_steps), both end within 10% of the budget on their own clock, and every
checkpoint the plan names is scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_compare import ROOT, TINY, labelled_npz

HOOK = Path(__file__).parent / "fixtures" / "slow_steps"
BUDGET = 0.4  # core-minutes per run, on 1 thread: 24 s of training each
EVERY = 20  # epochs between scored checkpoints: 120 steps of 6


def test_a_core_minute_budget_stops_each_run_on_its_own_clock(tmp_path):
    data = labelled_npz(tmp_path / "tiny.npz")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HOOK), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "MIMKIT_TEST_SLOW_STEPS": "mask.type=block:2:4:2.0"}  # mae+block: steps 2-4 take 2 s more  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "mimkit.cli", "compare", "--data", str(data), "--methods",
                           "mae,mae+block", "--core-minutes", str(BUDGET), "--eval-every", str(EVERY), "--out",
                           "study", "--no-page", *TINY], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    study = json.loads((tmp_path / "study" / "compare.json").read_text())
    steps = {}
    for run in study["runs"]:
        assert run["done"] and abs(run["core_minutes_spent"] - BUDGET) <= 0.1 * BUDGET, run
        (segment,) = run["segments"]
        assert segment["stop"] == [f"train.max_minutes={BUDGET:.6g}"]  # the run's own clock stopped it
        every, final = EVERY * run["steps_per_epoch"], run["final_step"]
        planned = sorted({*range(every, final + 1, every), final})
        assert [c["step"] for c in run["checkpoints"]] == planned, run["name"]  # every checkpoint scored
        steps[run["name"]] = final
    assert steps["mae+block"] < steps["mae"]  # the slowed run got fewer steps for the same compute
    (calibrated,) = {r["calibration"]["s_per_step_fastest"] < 1.0 for r in study["runs"]}
    assert calibrated  # the slow steps did not set the schedule
