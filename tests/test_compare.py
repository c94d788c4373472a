"""`mimkit compare` (mimkit/compare/, formerly benchmarks/compare.py, which still calls it), the equal-compute study: end to end on a tiny generated dataset (two specs, a composition,
checkpoints every half epoch, the random-init row, the report, a restart that redoes nothing, a bad spec refused
before any compute), BEiT with its own tokenizer and random-init Beit, and its pieces (specs, the clock)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mimkit.compare import budget, dataset, readout, spec

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "compare.py"  # the old path: a thin call of `mimkit compare`
helpers = SimpleNamespace(**{name: getattr(module, name) for module in (spec, dataset, budget, readout)
                             for name in dir(module) if not name.startswith("__")})  # fmt: skip

SETS = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "mae.decoder_dim=32", "mae.decoder_depth=1",
        "mae.decoder_heads=2", "train.batch_size=10", "linprobe:train.epochs=3", "linprobe:optim.warmup_epochs=1",
        "linprobe:train.eval_every_epochs=3"]  # fmt: skip
TINY = [*(a for s in SETS for a in ("--set", s)), "--threads", "1"]


def labelled_npz(path: Path) -> Path:
    """16 px images of 3 classes, each a colour under strong noise: learnable, not trivially."""
    g = np.random.default_rng(0)
    colours = np.array([[180, 60, 60], [60, 180, 60], [60, 60, 180]], float)
    arrays = {}
    for split, n in (("train", 60), ("test", 30)):
        y = g.permutation(np.arange(n) % 3)
        x = colours[y][:, None, None, :] + g.normal(0, 90, (n, 16, 16, 3))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = np.clip(x, 0, 255).astype(np.uint8), y
    np.savez(path, **arrays)
    return path


def compare(*args: str, cwd: Path, script: bool = False) -> subprocess.CompletedProcess:
    """`mimkit compare ARGS` (script: `python benchmarks/compare.py ARGS`, the old path) in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [str(SCRIPT)] if script else ["-m", "mimkit.cli", "compare"]
    return subprocess.run([sys.executable, *command, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


def check_accuracies(row: dict) -> None:
    for key in ("knn_top1", "probe_top1", "probe_best_top1"):
        assert 0.0 <= row[key] <= 1.0, (key, row)
    p, n = row["probe_top1"], row["test_images"]
    assert n == 30 and row["probe_se"] == pytest.approx(math.sqrt(p * (1 - p) / n), abs=1e-5)


def test_study_runs_resumes_and_refuses_bad_specs(tmp_path):
    data = labelled_npz(tmp_path / "tiny.npz")
    command = ["--data", str(data), "--methods", "mae,mae+block", "--epochs", "1", "--eval-every", "0.5",
               "--reach", "0", "101", "--out", "study", *TINY]  # fmt: skip
    first = compare(*command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "study"
    study = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in study["runs"]] == ["mae", "mae+block"]
    assert study["img_size"] == 16 and study["patch_size"] == 4 and study["data"]["num_classes"] == 3
    assert study["mean"] == pytest.approx(np.load(data)["x_train"].reshape(-1, 3).mean(0) / 255, abs=1e-3)
    for run in study["runs"]:  # 60 images / batch 10 = 6 steps an epoch: checkpoints at 3 and 6
        assert run["done"] and run["train_invocations"] == 1
        assert [(c["step"], c["epoch"]) for c in run["checkpoints"]] == [(3, 0.5), (6, 1.0)]
        assert 0 < run["checkpoints"][0]["core_minutes"] < run["checkpoints"][1]["core_minutes"]
        for point in run["checkpoints"]:
            check_accuracies(point)
    assert "mask.type=block" in study["runs"][1]["overrides"] and "mask.type=block" not in study["runs"][0]["overrides"]
    (baseline,) = study["baselines"]
    assert baseline["name"] == "random-init ViT" and "encoder.embed_dim=32" in baseline["encoder"]
    check_accuracies(baseline)
    equal = study["readouts"]["equal_epochs"]
    assert equal["target"] == 1.0 and {r["step"] for r in equal["rows"].values()} == {6}
    assert set(study["readouts"]["equal_core_minutes"]["rows"]) == {"mae", "mae+block"}
    assert study["machine"]["torch"] and study["threads"] == 1
    assert all(r["machines"] == [study["machine"]["cpu"]] for r in study["runs"])
    reach = study["readouts"]["to_reach"]  # every run's best, then --reach 0 (the first checkpoint) and 101 (never)
    common = min(max(c["probe_top1"] for c in r["checkpoints"]) for r in study["runs"])
    assert reach["targets"] == [f"{math.floor(10000 * common + 1e-6) / 100:g}", "0", "101"]
    for run in study["runs"]:
        row = reach["rows"][run["name"]]
        assert row["0"]["step"] == 3 and row["101"] is None
        reached = next(c for c in run["checkpoints"] if 100 * c["probe_top1"] >= float(reach["common"]) - 1e-9)
        assert row[reach["common"]]["core_minutes"] == reached["core_minutes"]
    table = (out / "compare.md").read_text()
    for text in (
        "At equal epochs",
        "At equal pretraining core-minutes",
        "Time to accuracy",
        "| mae+block |",
        "| random-init ViT |",
        "±",
    ):
        assert text in table and text in first.stdout
    for name in ("probe_vs_epochs.png", "probe_vs_core_minutes.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
            image.verify()

    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    again = compare(*command, cwd=tmp_path)  # a restart: nothing is trained or evaluated again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained 0 run(s), evaluated 0" in again.stdout and "pretrained (step 6), kept" in again.stdout
    restudy = json.loads((out / "compare.json").read_text())
    assert [r["train_invocations"] for r in restudy["runs"]] == [1, 1]
    assert [r["checkpoints"] for r in restudy["runs"]] == [r["checkpoints"] for r in study["runs"]]
    assert restudy["baselines"][0]["evaluated_at"] == baseline["evaluated_at"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no checkpoint, log or record rewritten
    cpu = study["machine"]["cpu"]  # rows from another CPU, in this one's units: nothing trained or scored again
    scaled = compare(*command, "--cpu-scale", f"{cpu}=2", cwd=tmp_path)
    assert scaled.returncode == 0, scaled.stderr[-3000:]
    assert (
        "trained 0 run(s), evaluated 0" in scaled.stdout and f"{cpu} are multiplied by 2 (--cpu-scale" in scaled.stdout
    )
    rescaled = json.loads((out / "compare.json").read_text())
    assert rescaled["cpu_scale"] == {cpu: 2.0} and [r["core_minute_scale"] for r in rescaled["runs"]] == [2.0, 2.0]
    for before, after in zip(study["runs"], rescaled["runs"]):
        assert [c["core_minutes_measured"] for c in after["checkpoints"]] == [
            c["core_minutes"] for c in before["checkpoints"]
        ]
        assert [c["core_minutes"] for c in after["checkpoints"]] == pytest.approx(
            [2 * c["core_minutes"] for c in before["checkpoints"]], abs=2e-5
        )  # both rounded to 1e-5
    assert rescaled["readouts"]["equal_core_minutes"]["target"] == \
        pytest.approx(2 * study["readouts"]["equal_core_minutes"]["target"], abs=2e-5)  # fmt: skip
    bad_scale = compare(*command, "--cpu-scale", f"{cpu}=fast", cwd=tmp_path)
    assert bad_scale.returncode == 2 and len(bad_scale.stderr.strip().splitlines()) == 1
    assert f"--cpu-scale '{cpu}=fast': expected CPU=FACTOR" in bad_scale.stderr
    shutil.move(out, tmp_path / "moved")  # a study folder moved elsewhere keeps its runs and evaluations
    moved = compare(*command[:command.index("--out")], "--out", "moved", *command[command.index("--out") + 2:],
                    cwd=tmp_path)  # fmt: skip
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "trained 0 run(s), evaluated 0" in moved.stdout
    shutil.move(tmp_path / "moved", out)
    for ckpt in (out / "runs").rglob("checkpoint-*"):  # a study folder committed without its checkpoints
        ckpt.unlink()
    committed = compare(*command, cwd=tmp_path)
    assert committed.returncode == 0, committed.stderr[-3000:]
    assert "trained 0 run(s), evaluated 0" in committed.stdout
    assert [r["checkpoints"] for r in json.loads((out / "compare.json").read_text())["runs"]] == \
        [r["checkpoints"] for r in study["runs"]]  # fmt: skip
    record_path = out / "runs" / "mae" / "compare-run.json"  # cut off mid-run, then cloned without checkpoints
    record = json.loads(record_path.read_text())
    record.update(done=False, segments=[*record["segments"], {**record["segments"][0], "cpu": "Other CPU"}])
    record_path.write_text(json.dumps(record))
    redone = compare(*command, cwd=tmp_path)
    assert redone.returncode == 0, redone.stderr[-3000:]
    assert "mae: no checkpoint of its earlier attempt (2 segment(s)) is left: pretraining again" in redone.stdout
    assert "trained 1 run(s), evaluated 0" in redone.stdout  # the same steps and scores: nothing scored again
    (rerun, _) = json.loads((out / "compare.json").read_text())["runs"]
    assert rerun["train_invocations"] == 1 and rerun["abandoned_segments"] == 2
    assert rerun["machines"] == [study["machine"]["cpu"]]
    scores = lambda run: [(c["step"], c["probe_top1"], c["knn_top1"]) for c in run["checkpoints"]]  # noqa: E731
    assert scores(rerun) == scores(study["runs"][0])

    bad = compare("--data", str(data), "--methods", "mae,mae+blok", "--out", "bad", *TINY, cwd=tmp_path)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert "unknown part 'blok'" in bad.stderr and "parts: random, block, hybrid, parallel" in bad.stderr
    assert not (tmp_path / "bad").exists()
    knn = compare("--data", str(data), "--methods", "mae", "--set", "knn:knn.k=5", "--out", "bad", *TINY, cwd=tmp_path)
    assert knn.returncode != 0 and "--set knn:... needs --knn command" in knn.stderr
    assert len(knn.stderr.strip().splitlines()) == 1
    other = compare(*command[: -len(TINY)], "--epochs", "2", *TINY, cwd=tmp_path)  # the same folder, another budget
    assert other.returncode != 0 and "was started with other settings" in other.stderr
    assert "train.epochs=1 vs train.epochs=2" in other.stderr and len(other.stderr.strip().splitlines()) == 1


def test_beit_rows_train_a_tokenizer_and_get_a_random_init_beit(tmp_path):
    data = labelled_npz(tmp_path / "tiny.npz")
    tokenizer = [a for s in ("vocab_size=32", "hidden=8", "code_dim=8", "batch_size=16")
                 for a in ("--set", f"tokenizer:tokenizer.{s}")]  # fmt: skip
    done = compare("--data", str(data), "--methods", "beit", "--epochs", "1", "--eval-every", "0", "--out", "study",
                   "--finetune-epochs", "1", "--set", "finetune:train.batch_size=10", "--tokenizer-steps", "2",
                   *tokenizer, *TINY, cwd=tmp_path, script=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    study = json.loads((tmp_path / "study" / "compare.json").read_text())
    (baseline,) = study["baselines"]
    assert baseline["name"] == "random-init Beit" and "encoder.family=beit" in baseline["encoder"]
    check_accuracies(baseline)
    (run,) = study["runs"]
    assert run["family"] == "beit" and [c["step"] for c in run["checkpoints"]] == [6]  # the final one only
    for row in (run, baseline):
        assert 0.0 <= row["finetune"]["finetune_top1"] <= 1.0 and row["finetune"]["epochs"] == 1
    tok = study["tokenizer"]
    assert tok["vocab_size"] == 32 and tok["train_steps"] == 2 and tok["test_images"] == 30
    assert 1 <= tok["codes_used"] <= 32 and 1.0 <= tok["perplexity"] <= tok["codes_used"]
    assert tok["reconstruction_mse"] > 0
    assert "Tokenizer (mimkit, 32 codes" in (tmp_path / "study" / "compare.md").read_text()
    # the codebook is measured once per tokenizer content: a new mtime (a fresh clone) does not measure it again
    (pt,) = (tmp_path / "study").rglob("tokenizer.pt")
    stats = pt.parent / "stats.json"
    saved = stats.read_text()
    assert "tokenizer: {" in done.stdout  # measured the first time
    os.utime(pt, ns=(pt.stat().st_atime_ns, pt.stat().st_mtime_ns + 10**9))
    again = compare("--data", str(data), "--methods", "beit", "--epochs", "1", "--eval-every", "0", "--out", "study",
                    "--finetune-epochs", "1", "--set", "finetune:train.batch_size=10", "--tokenizer-steps", "2",
                    *tokenizer, *TINY, cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert stats.read_text() == saved and "tokenizer: {" not in again.stdout


def test_run_specs_compose_and_fail_with_what_is_allowed():
    specs = helpers.parse_specs(
        "mae,bootmae+parallel:optim.blr=3e-4,train.batch_size=64,mae+block:data.mean=[0.5,0.5,0.5]"
    )
    assert [(s.method, s.parts, s.overrides) for s in specs] == [
        ("mae", [], []), ("bootmae", ["parallel"], ["optim.blr=3e-4", "train.batch_size=64"]),
        ("mae", ["block"], ["data.mean=[0.5,0.5,0.5]"])]  # fmt: skip
    assert specs[1].part_overrides() == ["mask.type=parallel"] and specs[2].family == "vit"
    assert helpers.parse_spec("mcbeit").family == "beit"
    grid = helpers.sweep_specs(specs[:2], "optim.blr=1e-4,2e-4;train.batch_size=32")
    b = "bootmae+parallel:optim.blr=3e-4,train.batch_size=64"
    assert [s.text for s in grid] == [
        "mae:optim.blr=1e-4,train.batch_size=32", "mae:optim.blr=2e-4,train.batch_size=32",
        f"{b},optim.blr=1e-4,train.batch_size=32", f"{b},optim.blr=2e-4,train.batch_size=32"]  # fmt: skip
    for bad, message in (("maee", "unknown method 'maee'"), ("mae+crossattention", "unknown part 'crossattention'"),
                         ("mae:blr", "is not section.key=value"), ("mae,mae", "given twice")):  # fmt: skip
        with pytest.raises(helpers.SpecError, match=message):
            helpers.parse_specs(bad)
    with pytest.raises(helpers.SpecError, match="--sweep"):
        helpers.sweep_specs(specs, "optim.blr")
    assert [helpers.choose_patch(s) for s in (12, 16, 28, 30, 32, 96, 224)] == [
        (2, 12), (4, 16), (4, 28), (4, 28), (4, 32), (8, 96), (16, 224)]  # fmt: skip


def scored_point(step: int, epoch: float, probe: float, core_minutes: float) -> dict:
    """One scored checkpoint of a run, as compare.json holds it."""
    return {"step": step, "epoch": epoch, "probe_top1": probe, "core_minutes": core_minutes}


def small_study(runs: list[dict], readouts: dict) -> dict:
    """A compare.json around `runs`, for helpers.markdown."""
    return {"data_path": "d.npz", "data": {"num_train": 60, "num_test": 30, "num_classes": 3, "image_size": 16},
            "img_size": 16, "patch_size": 4, "mean": [0.5] * 3, "std": [0.2] * 3, "threads": 1,
            "machine": {"cpu": "CPU", "torch": "2", "timm": "1"}, "baselines": [], "runs": runs,
            "readouts": readouts, "finetune_epochs": None}  # fmt: skip


def test_readouts_leave_out_runs_still_pretraining_once_one_has_finished():
    point, done = scored_point, {"done": True, "final_step": 6}  # bootmae: pretrained, its final step not scored yet
    runs = [{"name": "mae", **done, "checkpoints": [point(3, 0.5, 0.44, 5.0), point(6, 1.0, 0.49, 10.0)]},
            {"name": "beit", **done, "checkpoints": [point(3, 0.5, 0.40, 8.0), point(6, 1.0, 0.46, 16.0)]},
            {"name": "bootmae", **done, "checkpoints": [point(3, 0.5, 0.38, 20.0)]}]  # fmt: skip
    out = helpers.readouts(runs, [45])
    assert out["equal_epochs"]["target"] == 1.0 and set(out["equal_epochs"]["rows"]) == {"mae", "beit"}
    assert out["equal_core_minutes"]["target"] == 10.0
    assert out["to_reach"]["common"] == "46" and set(out["to_reach"]["rows"]) == {"mae", "beit"}
    text = helpers.markdown(small_study(runs, out))
    assert "## At equal epochs (1 epochs" in text and "| bootmae | 0.5 |" not in text
    assert "Still pretraining (left out of the readouts above" in text and "bootmae (scored to 0.5 epochs)" in text
    assert "| bootmae | 38.0 (20) |" in text  # still in the per-checkpoint table
    assert "pretraining on 1 thread(s)." in text  # no run records its threads: the study's
    for run, threads in zip(runs, (1, 1, 2)):
        run["threads"] = threads
    text = helpers.markdown(small_study(runs, out))
    assert "pretraining on 1 thread(s) (bootmae on 2: its core-minutes count all of them)." in text


def test_every_checkpoint_the_plan_names_is_scored_and_the_final_one():
    # 3 epochs of 781 steps scored every 390: 390 ... 2340 and 2343 (a checkpoint written is scored, however near)
    steps = [s for s in range(1, 2344) if helpers.is_scored_step(s, 390, 2343)]
    assert steps == [390, 780, 1170, 1560, 1950, 2340, 2343]
    assert [s for s in range(1, 2344) if helpers.is_scored_step(s, 390, None)][-1] == 2340  # not done yet: scored
    assert [s for s in range(1, 13) if helpers.is_scored_step(s, 3, 12)] == [3, 6, 9, 12]  # aligned: nothing dropped
    assert [s for s in range(1, 13) if helpers.is_scored_step(s, None, 12)] == [12]  # a sweep: the final one only
    assert [s for s in range(1, 8) if helpers.is_scored_step(s, 4, 7)] == [4, 7]
    assert [s for s in range(1, 10) if helpers.is_scored_step(s, 4, 9)] == [4, 8, 9]  # 1 before the final: scored too


def test_step_clock_counts_training_time_across_resumes_and_restarts(tmp_path):
    """The first step of each process counts as its median step; steps redone after a kill replace the lost ones."""
    records = [{"step": 1, "time": 100.0}, {"step": 2, "time": 101.0}, {"step": 3, "time": 103.0},  # killed after 3
               {"step": 1, "time": 200.0}, {"step": 2, "time": 202.0}, {"step": 3, "time": 204.0},  # restarted from 0
               {"event": "resume", "from": "checkpoint-3", "resumed_step": 3},
               {"step": 4, "time": 300.0}, {"step": 5, "time": 304.0}, {"step": 6, "time": 305.0}]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({**r, "loss": 1.0, "epoch": r["step"] / 2} if "time" in r else r) for r in records]
    path.write_text("\n".join(lines) + '\n{"step": 7, "ti')  # a torn last line
    clock = helpers.step_clock(path)
    assert sorted(clock) == [1, 2, 3, 4, 5, 6]
    # stretch 2: first step = median(2, 2) = 2, then 2, 2; stretch 3: median(4, 1) = 2.5, then 4, 1
    assert [clock[s][1] for s in range(1, 7)] == [2.0, 4.0, 6.0, 8.5, 12.5, 13.5] and clock[6][0] == 3.0


def test_checkpoint_table_has_a_column_per_epoch_and_names_the_cpus_when_they_differ():
    point = lambda epoch, p, cm: {"epoch": epoch, "probe_top1": p, "core_minutes": cm}  # noqa: E731
    study = {"baselines": [{"name": "random-init ViT", "probe_top1": 0.398}],
             "runs": [{"name": "mae", "machines": ["AMD EPYC"], "checkpoints": [point(0.5, 0.44, 5.85), point(1.0, 0.493, 11.7)]},
                      {"name": "emae", "machines": ["Xeon"], "checkpoints": [point(0.5, 0.41, 20.1)]}]}  # fmt: skip
    lines = helpers.checkpoint_table(study)
    assert lines[3] == "| run | CPU | 0 ep | 0.5 ep | 1 ep |"
    assert lines[5] == "| random-init ViT | – | 39.8 |  |  |"
    assert lines[6] == "| mae | AMD EPYC |  | 44.0 (5.85) | 49.3 (11.7) |"
    assert lines[7] == "| emae | Xeon |  | 41.0 (20.1) |  |"
    study["runs"][1]["machines"] = ["AMD EPYC"]  # one CPU: no CPU column
    assert helpers.checkpoint_table(study)[3] == "| run | 0 ep | 0.5 ep | 1 ep |"


def test_cpu_scale_puts_rows_from_other_cpus_in_one_cpus_units_and_refuses_what_it_cannot_convert():
    assert helpers.parse_cpu_scale(["Intel(R) Xeon(R) Processor=1.289", "AMD EPYC=1"]) == {
        "Intel(R) Xeon(R) Processor": 1.289, "AMD EPYC": 1.0}  # fmt: skip
    for bad in ("1.289", "Xeon=0", "Xeon=-1", "Xeon=inf", "=2"):
        with pytest.raises(helpers.SpecError, match="expected CPU=FACTOR"):
            helpers.parse_cpu_scale([bad])
    scale = {"Xeon": 1.289}
    assert helpers.run_cpu_scale("emae", ["Xeon"], scale) == 1.289
    assert helpers.run_cpu_scale("mae", ["EPYC"], scale) == helpers.run_cpu_scale("mae", [], scale) == 1.0
    with pytest.raises(helpers.SpecError, match="run bootmae was pretrained on several CPUs"):
        helpers.run_cpu_scale("bootmae", ["EPYC", "Xeon"], scale)
    point = scored_point
    runs = [{"name": "mae", "machines": ["EPYC"], "checkpoints": [point(6, 1.0, 0.49, 10.0)]},
            {"name": "emae", "machines": ["Xeon"], "checkpoints": [point(6, 1.0, 0.5, 25.8)]},
            {"name": "old", "machines": [], "checkpoints": [point(6, 1.0, 0.5, 9.0)]}]  # fmt: skip
    text = helpers.markdown({**small_study(runs, helpers.readouts(runs)), "cpu_scale": scale})
    assert "Core-minutes of runs pretrained on Xeon are multiplied by 1.289 (--cpu-scale" in text
    assert (
        "so every row counts in the core-minutes of one CPU. No CPU is recorded for old: counted as measured." in text
    )
    assert "not comparable" not in text
    text = helpers.markdown({**small_study(runs, {}), "cpu_scale": {}})  # two CPUs and no scale: said plainly
    assert "Core-minutes of runs on different CPUs are not comparable with each other." in text


def test_readouts_leave_out_runs_not_scored_yet():
    point = scored_point
    runs = [{"name": "mae", "checkpoints": [point(3, 0.5, 0.44, 5.0), point(6, 1.0, 0.49, 10.0)]},
            {"name": "emae", "checkpoints": [point(3, 0.5, 0.41, 20.0)]},
            {"name": "beit", "checkpoints": []}]  # fmt: skip
    out = helpers.readouts(runs, [45])
    assert out["equal_epochs"]["target"] == 0.5 and set(out["equal_epochs"]["rows"]) == {"mae", "emae"}
    assert out["equal_core_minutes"]["target"] == 10.0  # the fewest that every scored run reached (mae's 10)
    assert [c["core_minutes"] for c in out["equal_core_minutes"]["rows"].values()] == [10.0, 20.0]
    assert set(out["to_reach"]["rows"]) == {"mae", "emae"} and out["to_reach"]["rows"]["mae"]["45"]["step"] == 6
    text = helpers.markdown(small_study(runs, out))
    assert "## At equal epochs (0.5 epochs" in text and "| emae | 0.5 |" in text
    assert "Not scored yet (left out of the readouts above): beit." in text
    assert "| beit |" in text  # its (empty) row of the per-checkpoint table


def test_runs_without_a_cls_token_are_probed_on_the_mean_of_their_patch_tokens(tmp_path, one_thread):
    """The CIFAR recipes probe [cls ‖ mean]; an I-JEPA encoder has no cls token, so its checkpoints get the mean of
    the patch tokens (its method's pooling), beside a random init of I-JEPA's own encoder pooled the same way; the
    other runs and MAE's random init keep the recipes' feature."""
    from mimkit.compare.command import parser
    from mimkit.compare.plan import pretrained
    from mimkit.compare.study import Study

    data = labelled_npz(tmp_path / "tiny.npz")
    args = parser().parse_args(["--data", str(data), "--methods", "ijepa,mae", "--epochs", "1", "--finetune-epochs", "1", "--out",
                                str(tmp_path / "study"), *TINY])  # fmt: skip
    study = Study(args)
    ijepa, mae = study.runs
    own, vit = study.baselines
    assert own.name == "random-init ViT (ijepa's, no cls token)" and "encoder.method=ijepa" in own.encoder
    assert vit.name == "random-init ViT" and not any(e.startswith("encoder.method") for e in vit.encoder)
    for command, key in (("linprobe", "probe.pool=mean"), ("knn", "features.pool=mean")):
        assert key in study.eval_overrides(command, pretrained(ijepa, 6), tmp_path)
        assert key in study.eval_overrides(command, own.encoder, tmp_path)
        assert key not in study.eval_overrides(command, pretrained(mae, 6), tmp_path)
        assert key not in study.eval_overrides(command, vit.encoder, tmp_path)
    assert not any("pool" in o for o in study.eval_overrides("finetune", pretrained(ijepa, 6), tmp_path))
