"""`mimkit report`: one self-contained HTML page and a PNG summary of a tiny resumed run (CPU, seconds).

* the page embeds every image (base64 PNG, no other file referenced), the curves have one point per step and
  mark the resume, the reconstruction columns are the initial model and the kept checkpoints;
* the "step 0" column is exactly the weights the run started from (lr is 0 at step 0, so checkpoint 1 holds them);
* evaluation runs of the run's checkpoints are found (inside RUN_DIR, in a sibling folder, under --evals), others
  are not;
* a missing matplotlib is one line naming `pip install 'mimkit[report]'`;
* headless Chromium renders the page's images (marked `chromium`; scripts/test.sh installs it).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.eval import evaluate
from mimkit.interop import load_mimkit_checkpoint
from mimkit.report import _initial_model, build_report, find_evaluations, read_metrics
from mimkit.train import pretrain

from conftest import TINY_MODEL, make_images

STEPS = 16  # 64 images / batch 8 = 8 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run stopped at step 5 and resumed to the end, a k-NN evaluation of its last checkpoint in a sibling
    folder, one inside RUN_DIR (absolute path), and one of another run's checkpoint (not this run's)."""
    root = tmp_path_factory.mktemp("report")
    data = root / "tiny.npz"
    np.savez(data, x_train=make_images(64), y_train=np.arange(64) % 4, x_test=make_images(32, seed=1),
             y_test=np.arange(32) % 4)  # fmt: skip
    torch.set_num_threads(1)
    base = TINY_MODEL + [f"data.path={data}", "data.num_workers=0", "train.batch_size=8", "train.epochs=2",
                         "train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
                         "optim.blr=1e-3", "optim.warmup_epochs=1", f"train.out_dir={root / 'runs' / 'tiny'}",
                         "train.knn_every_epochs=1", "train.vis_images=2"]  # fmt: skip
    pretrain(load_config(None, base + ["train.max_steps=5"]))
    pretrain(load_config(None, base))
    run_dir = root / "runs" / "tiny"
    knn = ["data.path=" + str(data), "run.progress=false", "run.tensorboard=false", "data.num_workers=0"]
    evaluate("knn", None, knn + [f"encoder.checkpoint={run_dir / 'checkpoint-00000016.pt'}",
                                 f"run.out_dir={root / 'runs' / 'knn_tiny'}"])  # fmt: skip
    evaluate("knn", None, knn + [f"encoder.checkpoint={run_dir / 'checkpoint-00000008.pt'}",
                                 f"run.out_dir={run_dir / 'eval' / 'knn8'}", "knn.k=5"])  # fmt: skip
    evaluate("knn", None, knn + ["encoder.checkpoint=none", "encoder.arch=vit_tiny_patch4_32", "encoder.img_size=16",
                                 "encoder.embed_dim=32", "encoder.depth=2", "encoder.num_heads=2",
                                 f"run.out_dir={root / 'runs' / 'knn_random'}"])  # fmt: skip
    return root, run_dir, base


def embedded_pngs(page: str) -> dict[str, Image.Image]:
    found = re.findall(r'<img id="([^"]+)" alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    return {ident: Image.open(io.BytesIO(base64.b64decode(data))) for ident, data in found}


def test_report_page_and_summary(run, tmp_path, capsys):
    root, run_dir, _ = run
    out = tmp_path / "r" / "page.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "2 evaluation runs" in printed
    assert "reconstructions by step 0 (init), step 5, step 8, step 16" in printed  # the kept checkpoints
    page = out.read_text()
    images = embedded_pngs(page)
    assert set(images) == {"curves", "reconstructions"}
    assert page.count("<img") == 2 and "src=\"http" not in page and "href=" not in page  # nothing outside the page
    # reconstructions: 2 images x (original, masked, init + 3 kept checkpoints), each panel 16 px x 6
    recon = images["reconstructions"]
    assert recon.width == 4 + 6 * (16 * 6 + 4) and recon.height > 2 * 16 * 6
    assert "resumed at step 5" in page and f"{STEPS} logged steps" in page
    assert "vit_tiny_patch4_32" in page and "norm_pix_loss: true" in page  # the resolved config
    assert f"torch {torch.__version__}" in page
    # the evaluation table: the two k-NN runs of this run's checkpoints, not the random-init one
    assert "knn_random" not in page and "knn_tiny" in page and "knn8" in page
    summary = Image.open(out.with_suffix(".png"))
    assert summary.width == max(images["curves"].width, recon.width)
    assert summary.height == images["curves"].height + recon.height


def test_one_point_per_step_and_resumes(run, tmp_path):
    _, run_dir, _ = run
    log = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in log.steps] == list(range(1, STEPS + 1))
    assert log.resumes == [5]
    assert [r["step"] for r in log.knn] == [8, 16]
    # a log written before resumes truncated it repeats steps: the last record of a step wins
    old = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"event": "resume", "resumed_step": 1},
             {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]  # fmt: skip
    old.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')  # torn last line
    log = read_metrics(old)
    assert [(r["step"], r["loss"]) for r in log.steps] == [(1, 3.0), (2, 1.5), (3, 1.0)]
    assert log.resumes == [1]


def test_the_init_column_is_the_weights_the_run_started_from(run, tmp_path):
    _, _, base = run
    out = tmp_path / "one"
    cfg = load_config(None, base + [f"train.out_dir={out}", "train.max_steps=1", "train.knn_every_epochs=0"])
    pretrain(cfg)
    after_one_step, _, _ = load_mimkit_checkpoint(out / "checkpoint-00000001.pt")  # lr 0 at step 0: unchanged
    init = _initial_model(cfg).state_dict()
    for key, value in after_one_step.state_dict().items():
        torch.testing.assert_close(init[key], value, rtol=0, atol=0, msg=key)


def test_which_evaluations_belong_to_the_run(run, tmp_path, monkeypatch):
    root, run_dir, _ = run
    found = find_evaluations(run_dir)
    assert sorted((e.command, e.step) for e in found) == [("knn", 8), ("knn", 16)]
    # a relative encoder.checkpoint written from another folder, under --evals elsewhere
    elsewhere = tmp_path / "elsewhere" / "probe"
    elsewhere.mkdir(parents=True)
    (elsewhere / "metrics.json").write_text(json.dumps({"command": "linprobe", "top1": 40.0,
                                                        "encoder": "runs/tiny/checkpoint-00000016.pt"}))  # fmt: skip
    (tmp_path / "elsewhere" / "metrics.json").write_text(json.dumps({"command": "linprobe", "top1": 1.0,
                                                                      "encoder": "runs/other/checkpoint-00000016.pt"}))  # fmt: skip
    monkeypatch.chdir(tmp_path)  # runs/tiny does not exist from here: matched by its last two parts
    found = find_evaluations(run_dir, [tmp_path / "elsewhere"])
    assert sorted((e.command, e.step) for e in found) == [("knn", 8), ("knn", 16), ("linprobe", 16)]


def test_missing_matplotlib_is_one_line_with_the_pip_command(run, monkeypatch, capsys):
    _, run_dir, _ = run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["report", str(run_dir), "--out", str(run_dir / "nope.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'mimkit[report]'" in err
    assert not (run_dir / "nope.html").exists()


def test_a_beit_run_has_curves_and_says_why_no_reconstructions(tmp_path, npz_data, one_thread):
    from conftest import TINY_TOKENIZER

    cfg = load_config(None, TINY_MODEL + TINY_TOKENIZER + [
        "method=beit", f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=8", "train.max_steps=2",
        "train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
        f"train.out_dir={tmp_path / 'beit'}"])  # fmt: skip
    pretrain(cfg)
    report = build_report(tmp_path / "beit")
    assert report.steps_plotted == 2 and report.checkpoints_drawn == []
    assert any("visual-token ids" in n for n in report.notes)
    assert set(embedded_pngs(report.html.read_text())) == {"curves"}


def test_pretrain_prints_the_report_command_and_it_runs(tmp_path, npz_data, capsys, one_thread):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY_MODEL, f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=8",
                 "train.max_steps=2", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                 f"train.out_dir={out}"]) == 0  # fmt: skip
    command = re.search(r"report: +mimkit (report \S+)", capsys.readouterr().out).group(1).split()
    assert command == ["report", str(out)] and main(command) == 0
    assert (out / "report.html").is_file() and (out / "report.png").is_file()


def test_not_a_run_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
PROBE = ('<script>window.addEventListener("load", () => document.body.setAttribute("data-rendered", '
         '[...document.images].filter(i => i.complete && i.naturalWidth > 0)'
         '.map(i => i.id + ":" + i.naturalWidth + "x" + i.naturalHeight).join(",")));</script>')  # fmt: skip


@pytest.mark.chromium
def test_chromium_renders_the_images(run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian's chromium (scripts/test.sh installs it)")
    _, run_dir, _ = run
    report = build_report(run_dir, tmp_path / "report.html")
    pngs = embedded_pngs(report.html.read_text())
    probe = tmp_path / "probe.html"  # the page plus a script reporting each decoded image's size
    probe.write_text(report.html.read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile1'}",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    rendered = re.search(r'data-rendered="([^"]*)"', dom)
    assert rendered is not None, dom[-500:]
    expected = {f"{k}:{v.width}x{v.height}" for k, v in pngs.items()}
    assert set(rendered.group(1).split(",")) == expected
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1300,1400",
                    f"--screenshot={shot}", report.html.as_uri()], capture_output=True, timeout=120)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    # the curves' blue line (matplotlib's C0, #1f77b4) is on screen
    assert (np.abs(pixels.astype(int) - [31, 119, 180]).sum(axis=1) < 30).sum() > 100
