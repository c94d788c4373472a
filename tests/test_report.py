"""`mimkit report`: one self-contained HTML page and a PNG summary of a tiny resumed run (CPU, seconds).

* the page embeds every image (base64 PNG, no other file referenced), the curves have one point per step and
  mark the resume, the reconstruction columns are the initial model and every kept checkpoint, each panel at
  least 128 px;
* the summary line: steps and epochs of planned, images seen, training time without the stop-to-resume gap;
* panels only with information (no "skipped" panel when nothing was skipped, no k-NN panel without k-NN data);
* the random-init baseline row when a random-init evaluation of the architecture exists, else the one-line
  command that makes one (and that command's run is then found);
* the config block holds only the method's sections, the whole config.yaml folded below;
* the "step 0" column is exactly the weights the run started from (lr is 0 at step 0, so checkpoint 1 holds them);
* evaluation runs of the run's checkpoints are found (inside RUN_DIR, in a sibling folder, under --evals), others
  are not;
* a missing matplotlib is one line naming `pip install 'mimkit[report]'`;
* headless Chromium renders the page's images, the summary line and the baseline row (marked `chromium`;
  scripts/test.sh installs it).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CHROMIUM_FLAGS, TINY_MODEL, chromium_dom, make_images
from PIL import Image

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.eval import evaluate
from mimkit.interop import load_mimkit_checkpoint
from mimkit.report import (
    RunLog,
    _initial_model,
    build_report,
    curve_panels,
    find_evaluations,
    pick_checkpoints,
    read_config,
    read_metrics,
    run_summary,
    training_seconds,
)
from mimkit.train import pretrain

STEPS = 16  # 64 images / batch 8 = 8 steps per epoch, 2 epochs
KEPT = [5, 8, 12, 16]  # saved every 4 steps, at the stop (5) and at the end; the last 4 kept
PANEL = 16 * 8  # 16-px images upscaled 8x: 128-px panels


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run stopped at step 5 and resumed to the end (4 checkpoints kept), a k-NN evaluation of its last
    checkpoint in a sibling folder, one inside RUN_DIR (absolute path), and one of a random-init encoder of the same
    architecture (the baseline, not a run of this run's checkpoints)."""
    root = tmp_path_factory.mktemp("report")
    data = root / "tiny.npz"
    np.savez(data, x_train=make_images(64), y_train=np.arange(64) % 4, x_test=make_images(32, seed=1),
             y_test=np.arange(32) % 4)  # fmt: skip
    torch.set_num_threads(1)
    base = TINY_MODEL + [f"data.path={data}", "data.num_workers=0", "train.batch_size=8", "train.epochs=2",
                         "train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
                         "optim.blr=1e-3", "optim.warmup_epochs=1", f"train.out_dir={root / 'runs' / 'tiny'}",
                         "train.knn_every_epochs=1", "train.vis_images=2", "train.save_every_steps=4",
                         "train.keep_last=4"]  # fmt: skip
    pretrain(load_config(None, base + ["train.max_steps=5"]))
    pretrain(load_config(None, base))
    run_dir = root / "runs" / "tiny"
    knn = ["data.path=" + str(data), "train.progress=false", "train.tensorboard=false", "data.num_workers=0"]
    evaluate("knn", None, knn + [f"encoder.checkpoint={run_dir / 'checkpoint-00000016.pt'}",
                                 f"train.out_dir={root / 'runs' / 'knn_tiny'}"])  # fmt: skip
    evaluate("knn", None, knn + [f"encoder.checkpoint={run_dir / 'checkpoint-00000008.pt'}",
                                 f"train.out_dir={run_dir / 'eval' / 'knn8'}", "knn.k=5"])  # fmt: skip
    evaluate("knn", None, knn + ["encoder.checkpoint=none", "encoder.arch=vit_tiny_patch4_32", "encoder.img_size=16",
                                 "encoder.embed_dim=32", "encoder.depth=2", "encoder.num_heads=2",
                                 f"train.out_dir={root / 'runs' / 'knn_random'}"])  # fmt: skip
    return root, run_dir, base


def embedded_pngs(page: str) -> dict[str, Image.Image]:
    found = re.findall(r'<img id="([^"]+)" alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    return {ident: Image.open(io.BytesIO(base64.b64decode(data))) for ident, data in found}


def test_report_page_and_summary(run, tmp_path, capsys):
    _, run_dir, _ = run
    out = tmp_path / "r" / "page.html"
    assert main(["report", str(run_dir), "--out", str(out), "--checkpoints", "8"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "2 evaluation runs" in printed
    assert "reconstructions by step 0 (init), step 5, step 8, step 12, step 16" in printed  # every kept checkpoint
    page = out.read_text()
    images = embedded_pngs(page)
    assert set(images) == {"curves", "reconstructions"}
    assert page.count("<img") == 2 and 'src="http' not in page and "href=" not in page  # nothing outside the page
    # reconstructions: 2 images x (original, masked, init + 4 kept checkpoints), each panel 16 px x 8 = 128 px
    recon = images["reconstructions"]
    assert recon.width == 4 + 7 * (PANEL + 4) and recon.height > 2 * PANEL
    assert "1 (at step 5)" in page and f"{STEPS} of {STEPS}" in page
    assert "vit_tiny_patch4_32" in page and "norm_pix_loss: true" in page  # the resolved config
    assert f"torch {torch.__version__}" in page
    # the evaluation table: the two k-NN runs of this run's checkpoints, and the random-init one as the baseline
    assert "knn_tiny" in page and "knn8" in page
    assert re.search(r'<tr class="baseline"><td><b>random init \(baseline\)</b></td>.*?knn_random', page)
    summary = Image.open(out.with_suffix(".png"))
    assert summary.width == max(images["curves"].width, recon.width)
    assert summary.height == images["curves"].height + recon.height


def test_summary_checkpoints_baseline_panels_and_config(run, tmp_path):
    _, run_dir, _ = run
    report = build_report(run_dir, tmp_path / "report.html")  # the defaults: every kept checkpoint (up to 8)
    assert report.summary["method"] == "mae" and report.summary["model"].startswith("vit_tiny_patch4_32 (32 wide")
    assert report.summary["steps"] == f"{STEPS} of {STEPS}"
    assert report.summary["epochs"] == "2 of 2 (8 steps each)"
    assert report.summary["images seen"] == f"{STEPS * 8} ({STEPS} steps x 8)"
    assert report.summary["resumes"] == "1 (at step 5)"
    assert report.summary["checkpoints kept"] == "4 (steps 5, 8, 12, 16)"
    assert report.summary["final loss"] == f"{read_metrics(run_dir / 'metrics.jsonl').steps[-1]['loss']:.4f}"
    assert report.checkpoints_drawn == ["step 0 (init)"] + [f"step {s}" for s in KEPT]
    assert embedded_pngs(report.html.read_text())["reconstructions"].width == 4 + 7 * (PANEL + 4)
    # nothing was skipped and no step was non-finite: no "skipped" panel; the k-NN history is there
    assert report.panels == ["loss", "lr", "img/s", "grad norm", "k-NN"]
    page = report.html.read_text()
    assert 'id="knn-note"' in page and "[cls] token of the last block" in page and "features.pool=cls" in page
    # the baseline: the random-init k-NN run of the same architecture, not a run of this run's checkpoints
    assert [(b.command, b.folder.name) for b in report.baselines] == [("knn", "knn_random")]
    assert page.count('<tr class="baseline">') == 1 and 'id="baseline-hint"' not in page
    # only MAE's config sections in the config block; the whole config.yaml folded below it
    assert report.sections == ["model", "mask", "mae", "data", "optim", "train", "distributed"]
    block = re.search(r'<pre id="config">(.*?)</pre>', page, re.DOTALL).group(1)
    full = re.search(r'<details><summary>.*?</summary>\s*<pre id="config-full">(.*?)</pre>', page, re.DOTALL).group(1)

    def tops(text: str) -> list[str]:
        return re.findall(r"^(\w+):", text, re.MULTILINE)

    assert tops(block) == ["method", *report.sections]
    # config.yaml itself holds only the sections the run read (issue 33): no other method's
    assert "mae" in tops(full) and not {"bootmae", "beit", "emae", "simmim", "tokenizer"} & set(tops(full))


def test_training_time_leaves_out_the_gap_between_a_stop_and_the_resume(run, tmp_path):
    _, run_dir, _ = run
    cfg, _ = read_config(run_dir)
    # 8 images per 10 s; steps 1-4, a stop, a day later the resume from step 4 and steps 5-8
    recs = [{"step": k, "epoch": k / 8, "loss": 1.0, "img_per_s": 0.8, "time": 1000.0 + 10 * k} for k in range(1, 5)]
    recs += [{"event": "stopped", "step": 4, "signal": "SIGTERM"}, {"event": "resume", "resumed_step": 4}]
    recs += [{"step": k, "epoch": k / 8, "loss": 0.5, "img_per_s": 0.8, "time": 87400.0 + 10 * k} for k in range(5, 9)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    log = read_metrics(path)
    # each segment: its first step (10 s, from its img/s) + 3 x 10 s between its records
    assert training_seconds(log, 8) == pytest.approx(80.0)
    summary = run_summary(cfg, log, [])
    assert summary["training time"].startswith("1m20s")
    assert summary["steps"] == "8 of 16" and summary["epochs"] == "1 of 2 (8 steps each)"
    assert summary["images seen"].startswith("64 (8 steps x 8")  # no checkpoint: the config's batch, one process
    assert summary["resumes"] == "1 (at step 4); stopped by a signal at step 4"
    assert summary["final loss"] == "0.5000" and summary["checkpoints kept"] == "0"


def test_without_a_baseline_one_line_says_the_command_and_its_run_is_found(run, tmp_path, capsys):
    _, run_dir, _ = run
    alone = tmp_path / "runs" / "tiny"  # the run's folder without the evaluations beside it
    alone.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "checkpoint-00000016.pt"):
        shutil.copy(run_dir / name, alone / name)
    report = build_report(alone, checkpoints=1)
    page = report.html.read_text()
    assert report.baselines == [] and '<tr class="baseline">' not in page
    hint = re.search(r'<p id="baseline-hint">(.*?)</p>', page).group(1)
    command = html.unescape(re.search(r"<code>(.*?)</code>", hint).group(1))
    assert command.startswith("mimkit knn encoder.checkpoint=none encoder.arch=vit_tiny_patch4_32 encoder.img_size=16")
    assert main([*shlex.split(command)[1:], "train.progress=false", "data.num_workers=0"]) == 0  # it runs...
    report = build_report(alone, checkpoints=1)
    assert [b.command for b in report.baselines] == ["knn"]  # ...and the report finds its run as the baseline
    assert '<tr class="baseline">' in report.html.read_text()


def test_panels_only_with_information():
    plain = [{"step": 1, "loss": 1.0, "lr": 0.1, "img_per_s": 5.0, "nonfinite_steps": 0, "skipped_images": 0}]
    assert curve_panels(RunLog(plain, [], []), []) == ["loss", "lr", "img/s"]
    skipped = [*plain, {"step": 2, "loss": 1.0, "lr": 0.1, "img_per_s": 5.0, "nonfinite_steps": 0, "skipped_images": 3,
                        "grad_norm": 1.5}]  # fmt: skip
    assert curve_panels(RunLog(skipped, [], [{"step": 2, "knn_top1": 30.0}]), []) == [
        "loss", "lr", "img/s", "grad norm", "skipped", "k-NN"]  # fmt: skip


def test_every_kept_checkpoint_up_to_eight():
    paths = [f"checkpoint-{i:08d}.pt" for i in range(1, 13)]
    assert pick_checkpoints(paths[:8]) == paths[:8]
    picked = pick_checkpoints(paths)
    assert len(picked) == 8 and picked[0] == paths[0] and picked[-1] == paths[-1]
    assert pick_checkpoints(paths, 2) == [paths[0], paths[-1]]


def test_one_point_per_step_and_resumes(run, tmp_path):
    _, run_dir, _ = run
    log = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in log.steps] == list(range(1, STEPS + 1))
    assert log.resumes == [5]
    assert [r["step"] for r in log.knn] == [8, 16]
    assert [seg.start for seg in log.segments] == [0, 5]
    assert [[t[0] for t in seg.timed] for seg in log.segments] == [[1, 2, 3, 4, 5], list(range(6, STEPS + 1))]
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
    _, run_dir, _ = run
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
    from conftest import tiny_model

    cfg = load_config(None, tiny_model("beit") + [
        f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=8", "train.max_steps=2",
        "train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
        f"train.out_dir={tmp_path / 'beit'}"])  # fmt: skip
    pretrain(cfg)
    report = build_report(tmp_path / "beit")
    assert report.steps_plotted == 2 and report.checkpoints_drawn == []
    assert any("visual-token ids" in n for n in report.notes)
    assert set(embedded_pngs(report.html.read_text())) == {"curves"}
    assert report.panels == ["loss", "lr", "img/s", "grad norm"]  # nothing skipped, no k-NN data
    assert report.sections == ["model", "mask", "beit", "tokenizer", "data", "optim", "train", "distributed"]
    page = report.html.read_text()
    assert 'id="knn-note"' not in page and "encoder.family=beit" in page  # the baseline hint names the family
    assert "data.path=LABELLED_DATA" in page  # no evaluation, no k-NN monitor: no labelled data known


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


PROBE = ('<script>window.addEventListener("load", () => {'
         'const b = document.body;'
         'b.setAttribute("data-rendered", [...document.images].filter(i => i.complete && i.naturalWidth > 0)'
         '.map(i => i.id + ":" + i.naturalWidth + "x" + i.naturalHeight).join(","));'
         'b.setAttribute("data-shown", [...document.images].map(i => i.id + ":" + i.clientWidth).join(","));'
         'const s = document.getElementById("summary");'
         'b.setAttribute("data-summary", s && s.offsetHeight > 0 ? s.innerText.replace(/\\s+/g, " ") : "");'
         'b.setAttribute("data-baseline", [...document.querySelectorAll("tr.baseline")]'
         '.filter(r => r.offsetHeight > 0).map(r => r.innerText.replace(/\\s+/g, " ")).join("|"));'
         '});</script>')  # fmt: skip


@pytest.mark.chromium
def test_chromium_renders_the_images(run, tmp_path):
    _, run_dir, _ = run
    report = build_report(run_dir, tmp_path / "report.html")
    pngs = embedded_pngs(report.html.read_text())
    # the page plus a script reporting each decoded image's size
    dom = chromium_dom(report.html, PROBE, tmp_path / "probe.html", tmp_path / "profile1")
    rendered = re.search(r'data-rendered="([^"]*)"', dom)
    assert rendered is not None, dom[-500:]
    expected = {f"{k}:{v.width}x{v.height}" for k, v in pngs.items()}
    assert set(rendered.group(1).split(",")) == expected
    # the reconstructions are shown at their own size (128-px panels), not shrunk to the window
    shown = dict(x.split(":") for x in re.search(r'data-shown="([^"]*)"', dom).group(1).split(","))
    assert int(shown["reconstructions"]) == pngs["reconstructions"].width == 4 + 7 * (PANEL + 4)
    # the summary line and the baseline row are on screen
    summary = html.unescape(re.search(r'data-summary="([^"]*)"', dom).group(1))
    for field in ("method: mae", f"steps: {STEPS} of {STEPS}", "epochs: 2 of 2", f"images seen: {STEPS * 8}",
                  "training time:", "final loss:", "resumes: 1 (at step 5)", "checkpoints kept: 4"):  # fmt: skip
        assert field in summary, summary
    baseline = html.unescape(re.search(r'data-baseline="([^"]*)"', dom).group(1))
    assert baseline.startswith("random init (baseline)") and "knn_random" in baseline, baseline
    shot = tmp_path / "shot.png"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")  # chromium_dom skipped without it
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1300,1400",
                    f"--screenshot={shot}", report.html.as_uri()],
                   capture_output=True, timeout=120, check=False)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    # the curves' blue line (matplotlib's C0, #1f77b4) is on screen
    assert (np.abs(pixels.astype(int) - [31, 119, 180]).sum(axis=1) < 30).sum() > 100
