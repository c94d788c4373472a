"""`mimkit compare --gpu-minutes`: the budget in GPU-minutes (one CUDA GPU a run, its clock x 1), planned as one
GPU per run on the run's own clock, refused in one line where there is no GPU, and read out in GPU-minutes (tables,
summary, page). The planning and read-out run on any machine; the GPU run itself is benchmarks/gpu_check.sh's."""

from __future__ import annotations

import copy

import torch
from test_compare import TINY, labelled_npz
from test_compare_page import known_study

from mimkit.compare.command import main, parser
from mimkit.compare.page import readout_tables, runs_table
from mimkit.compare.readout import markdown, readouts, summary_sentences
from mimkit.compare.study import Study


def gpu_study() -> dict:
    """known_study (two runs, 26 core-minutes) as a GPU study: the same numbers in GPU-minutes, read out afresh."""
    study = copy.deepcopy(known_study())
    for run in study["runs"]:
        run["machines"], run["gpu_minutes_spent"] = ["NVIDIA H200"], 26.0
        for point in run["checkpoints"]:
            point["gpu_minutes"] = point.pop("core_minutes")
    study["baselines"][0]["gpu_minutes"] = study["baselines"][0].pop("core_minutes")
    study.update(compute="gpu_minutes", budget={"gpu_minutes": 26}, compute_note="wall-clock x GPUs", mean=[0.5] * 3,
                 std=[0.25] * 3, baselines=study["baselines"], finetune_epochs=None)  # fmt: skip
    study["data"]["image_size"] = 32
    study["readouts"] = readouts(study["runs"], [60.5], "gpu_minutes")
    study["summary"] = summary_sentences(study)
    return study


def test_a_gpu_study_reads_out_in_gpu_minutes(tmp_path):
    study = gpu_study()
    assert study["readouts"]["equal_gpu_minutes"]["target"] == 26.0 and "equal_core_minutes" not in study["readouts"]
    assert study["readouts"]["to_reach"]["rows"]["mae+crossmae"]["60.5"]["gpu_minutes"] == 26.0
    assert study["summary"][0].startswith("At 26 GPU-minutes, mae+crossmae leads mae by 1.7 ± 0.7 probe points")
    md = markdown(study)
    assert "## At equal pretraining GPU-minutes (26 GPU-minutes" in md and "| run | epoch | GPU-min |" in md
    assert "2 ep / 26 GPU-min" in md and "core-min" not in md.lower()
    tables = readout_tables(study)
    assert 'id="equal-gpu-minutes"' in tables and "<th>GPU-minutes</th>" in tables
    runs = runs_table(study, tmp_path)
    assert "<th>GPU-minutes measured</th><th>GPU</th>" in runs and "NVIDIA H200" in runs and "<td>26</td>" in runs


def test_gpu_minutes_without_a_gpu_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = labelled_npz(tmp_path / "tiny.npz")
    assert main(["--data", str(data), "--gpu-minutes", "2", "--out", str(tmp_path / "study"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("compare: error: --gpu-minutes: no CUDA GPU here")
    assert "--core-minutes" in err and not (tmp_path / "study" / "runs").exists()  # refused before any work


def test_a_gpu_budget_plans_one_gpu_a_run_on_its_own_clock(tmp_path, monkeypatch, one_thread):
    # one_thread: the torch thread count the plan sets (--threads 2) is put back after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the plan only; nothing runs
    data = labelled_npz(tmp_path / "tiny.npz")
    args = parser().parse_args(["--data", str(data), "--methods", "mae,mae+block", "--gpu-minutes", "2",
                                "--out", str(tmp_path / "study"), *TINY[:-2], "--threads", "2"])  # fmt: skip
    study = Study(args)
    assert study.compute_key == "gpu_minutes" and study.compute() == (2.0, 1)  # not divided by the CPU threads
    for run in study.runs:
        overrides = study.run_settings(run, {})["overrides"]
        assert "train.device=cuda" in overrides and "train.budget_minutes=2" in overrides, overrides
        calibrated = study.run_settings(run, {"calibration": {"s_per_step": 0.1, "s_per_step_fastest": 0.1}})
        assert "train.schedule_steps=1500" in calibrated["overrides"]  # the cap: 1.25 x 120 s / 0.1 s
