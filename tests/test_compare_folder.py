"""`mimkit compare` on an ImageFolder (the issue's acceptance): three specs, a checkpoint scored every half epoch,
killed mid-run and continued by `mimkit.compare(...)` in Python: nothing scored twice, no finished run pretrained
again, the page written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
from test_compare import ROOT, SETS, labelled_npz

import mimkit


def image_folder(root, npz) -> None:
    with np.load(npz) as z:
        for split, key in (("train", "train"), ("val", "test")):
            for i, (x, y) in enumerate(zip(z[f"x_{key}"], z[f"y_{key}"])):
                (root / split / f"c{y}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(x).save(root / split / f"c{y}" / f"{i}.png")


def test_compare_on_a_folder_killed_and_continued_scores_nothing_twice(tmp_path):
    image_folder(tmp_path / "data", labelled_npz(tmp_path / "tiny.npz"))
    argv = ["--data", str(tmp_path / "data"), "--methods", "mae,mae+crossmae,simmim", "--epochs", "1",
            "--eval-every", "0.5", "--out", str(tmp_path / "study"), "--threads", "1",
            *(a for s in SETS for a in ("--set", s))]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "mimkit.cli", "compare", *argv], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    scored = tmp_path / "study" / "evals" / "mae+crossmae"
    deadline = time.time() + 600
    while not list(scored.glob("step-*.json")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # mid-study: mae done and scored, mae+crossmae under way
    first.wait()
    before = {p: json.loads(p.read_text()) for p in (tmp_path / "study" / "evals").rglob("step-*.json")}
    assert before, "killed before any score was written"
    study = mimkit.compare(argv[1], "mae,mae+crossmae,simmim", **{k.lstrip("-").replace("-", "_"): v for k, v in
                           (("--epochs", 1.0), ("--eval-every", 0.5), ("--out", str(tmp_path / "study")),
                            ("--threads", 1), ("--set", SETS))})  # fmt: skip
    for path, record in before.items():  # a finished score is kept, not redone
        for command, result in record.items():
            assert json.loads(path.read_text())[command]["evaluated_at"] == result["evaluated_at"], path
    runs = {r["name"]: r for r in study["runs"]}
    assert set(runs) == {"mae", "mae+crossmae", "simmim"} and all(r["done"] for r in runs.values())
    assert runs["mae"]["train_invocations"] == 1  # finished before the kill: not pretrained again
    for run in runs.values():
        assert [c["step"] for c in run["checkpoints"]] == [3, 6]
    assert study["summary"] and (tmp_path / "study" / "report.html").is_file()
