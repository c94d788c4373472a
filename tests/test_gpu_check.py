"""benchmarks/gpu_check.sh: its CPU dry run (every step of the GPU check at tiny sizes) passes, and mimkit imports
and trains on npz / ImageFolder data on a machine without webdataset and braceexpand (the GPU machine has neither)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import TINY_MODEL, make_images
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def test_cpu_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    status = {row["check"]: row["status"] for row in summary["rows"]}
    assert status["tests on cpu (dry run subset)"] == "ok" and status["throughput ViT-T/4@32"] == "ok"
    assert status["dist DDP"] == status["dist FSDP2"] == status["study (mimkit compare)"] == "ok"
    decodes = [c for c in status if c.startswith("data:") and status[c] == "ok"]
    assert any("folder, decode device" in c for c in decodes) and any("folder, decode cpu" in c for c in decodes)
    # the table is printed last, and what comes back from the GPU machine fits its limits (<= 8 plain files)
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| study (mimkit compare) | ok | core_minutes: mae ")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["data.json", "env.txt", "log.txt", "summary.json", "summary.md", "tests.xml", "throughput.json"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    rows = json.loads((out / "throughput.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"mimkit", "hf-sdpa"} and all(r["precision"] == "bf16" for r in rows)


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('webdataset', 'braceexpand'):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, Block())
"""


def test_mimkit_trains_without_webdataset_and_braceexpand(tmp_path):
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=make_images(16))
    folder = tmp_path / "jpegs"
    for i, arr in enumerate(make_images(16)):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"c{i % 2}" / f"{i}.jpg")
    common = TINY_MODEL + ["train.batch_size=8", "train.max_steps=1", "data.num_workers=0", "train.progress=false",
                           "train.tensorboard=false", "train.precision=fp32"]  # fmt: skip
    runs = [(str(npz), "auto"), (str(folder), "cpu"), (str(folder), "device")]
    script = (
        BLOCKER
        + f"""
try:
    import webdataset
    raise SystemExit('webdataset was importable')
except ModuleNotFoundError:
    pass
import mimkit, mimkit.cli, mimkit.data, mimkit.train, mimkit.device_decode
from mimkit.cli import main
for i, (path, decode) in enumerate({runs!r}):
    rc = main(['pretrain', *{common!r}, f'data.path={{path}}', f'data.decode={{decode}}', 'train.device=cpu',
               f'train.out_dir={tmp_path}/run{{i}}'])
    assert rc == 0, (path, decode)
rc = main(['pretrain', *{common!r}, 'data.path={tmp_path}/shards-{{000..001}}.tar', 'data.num_samples=16'])
assert rc == 2, rc
print('OK', sorted(m for m in sys.modules if m.split('.')[0] in ('webdataset', 'braceexpand')))
"""
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK []")
    assert "WebDataset shards, which need the webdataset and braceexpand package(s)" in proc.stderr


def load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_row(model: str, impl: str, img_s: float, mfu_peak: float | None) -> dict:
    return {"model": model, "impl": impl, "precision": "bf16", "images_per_second": img_s, "mfu": 0.8,
            "mfu_vs_peak": mfu_peak, "peak_memory_mib": 2048.0}  # fmt: skip


def test_gpu_mode_reports_targets_and_keeps_the_rows_of_a_timed_out_model(tmp_path, monkeypatch):
    """The GPU-only branches of gpu_check.py (the dry run takes the CPU ones): the issue's targets from the fastest
    mimkit and HF rows, and a model whose run hit its time limit keeps the rows it wrote."""
    gc = load_gpu_check()
    r = gc.Runner(tmp_path, tmp_path, dry=False)
    rows = [
        step_row("ViT-B/16@224", "mimkit", 3000, 0.45),
        step_row("ViT-B/16@224", "mimkit-compiled", 3900, 0.58),
        step_row("ViT-B/16@224", "hf-sdpa", 2800, 0.42),
        step_row("ViT-B/16@224", "hf-sdpa-compiled", 2900, 0.43),
    ]
    gc.targets(r, rows)
    assert r.rows[-1]["status"] == "met" and "mimkit-compiled: 58.0%" in r.rows[-1]["detail"]
    assert "1.34x the fastest HF row (hf-sdpa-compiled)" in r.rows[-1]["detail"]
    gc.targets(r, rows[:1] + rows[2:])  # without the compiled row: 45% of peak, 1.03x
    assert r.rows[-1]["status"] == "missed"

    def timed_out(name, cmd, timeout, env=None):  # wrote two rows, then its limit stopped it
        out = Path(cmd[cmd.index("--json") + 1])
        out.write_text(
            json.dumps(
                {
                    "machine": "# H200",
                    "rows": [
                        step_row("ViT-L/16@224", "mimkit", 900, 0.5),
                        step_row("ViT-L/16@224", "hf-sdpa", 700, 0.4),
                    ],
                }
            )
        )
        assert "--device" in cmd and cmd[cmd.index("--device") + 1] == "cuda"
        return None, "partial output", timeout

    monkeypatch.setattr(r, "run", timed_out)
    kept = gc.step_throughput(r, ["large"], {"large": 100}, {"large": 0}, [])
    assert len(kept) == 2 and r.rows[-1]["status"] == "TIMEOUT" and "partial: stopped after" in r.rows[-1]["detail"]
    assert "best mimkit / best HF 1.29×" in r.rows[-1]["detail"]
    assert len(json.loads((tmp_path / "throughput.json").read_text())["rows"]) == 2
    assert gc.summary(r) == 1  # a timeout fails the run
