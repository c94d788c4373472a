"""The study page (`mimkit report STUDY_DIR`, mimkit/compare/page.py): a study folder written before the move into
the package still reads (tests/fixtures/study_small), the summary sentences come from the numbers with their
standard errors, and headless Chromium shows the page."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import CHROMIUM_FLAGS, chromium_dom
from PIL import Image

from mimkit.cli import main as cli_main
from mimkit.compare import build_study_page, is_study, read_study
from mimkit.compare.readout import summary_sentences
from mimkit.report import build_report

FIXTURE = Path(__file__).parent / "fixtures" / "study_small"


def point(epoch: float, core_minutes: float, probe: float, n: int) -> dict:
    se = math.sqrt(probe * (1 - probe) / n)
    return {"step": int(epoch * 10), "epoch": epoch, "core_minutes": core_minutes, "probe_top1": probe,
            "probe_se": se, "knn_top1": probe, "knn_se": se, "test_images": n}  # fmt: skip


def known_study() -> dict:
    """Two runs at 26 core-minutes on 10,000 test images: 61.7% and 60.0%, random init 40%."""
    runs = [{"name": "mae+crossmae", "family": "vit", "done": True, "final_step": 20, "machines": ["CPU"],
             "checkpoints": [point(1.0, 13.0, 0.55, 10000), point(2.0, 26.0, 0.617, 10000)]},
            {"name": "mae", "family": "vit", "done": True, "final_step": 20, "machines": ["CPU"],
             "checkpoints": [point(1.0, 13.0, 0.52, 10000), point(2.0, 26.0, 0.600, 10000)]}]  # fmt: skip
    base = {"name": "random-init ViT", "family": "vit", **point(0, 0, 0.40, 10000)}
    readouts = {"equal_core_minutes": {"target": 26.0, "rows": {r["name"]: r["checkpoints"][1] for r in runs}}}
    return {"data_path": "d.npz", "data": {"num_train": 50000, "num_test": 10000, "num_classes": 10},
            "img_size": 32, "patch_size": 4, "threads": 1, "budget": {"core_minutes": 26},
            "machine": {"cpu": "CPU", "torch": "2", "timm": "1"}, "runs": runs, "baselines": [base],
            "readouts": readouts}  # fmt: skip


def test_summary_sentences_come_from_the_numbers_with_their_standard_errors():
    lines = summary_sentences(known_study())
    se = 100 * math.hypot(math.sqrt(0.617 * 0.383 / 1e4), math.sqrt(0.6 * 0.4 / 1e4))  # 0.69 points
    assert f"{se:.1f}" == "0.7"
    assert lines[0] == ("At 26 core-minutes, mae+crossmae leads mae by 1.7 ± 0.7 probe points "
                        f"({1.7 / se:.1f} standard errors).")  # fmt: skip
    assert lines[1].startswith("At 26 core-minutes, mae+crossmae leads random-init ViT by 21.7 ± 0.7 probe points")
    close = known_study()
    close["readouts"]["equal_core_minutes"]["rows"]["mae"] = point(2.0, 26.0, 0.612, 10000)
    assert "within two standard errors" in summary_sentences(close)[0]
    below = known_study()
    below["baselines"][0].update(point(0, 0, 0.65, 10000))
    assert summary_sentences(below)[1].startswith(
        "At 26 core-minutes, mae+crossmae trails random-init ViT by 3.3 ± 0.7"
    )


def test_a_study_folder_from_before_the_move_still_reads(tmp_path):
    folder = tmp_path / "study_small"
    shutil.copytree(FIXTURE, folder)
    assert is_study(folder) and not is_study(folder / "runs")
    study = read_study(folder)
    assert [r["name"] for r in study["runs"]] == ["mae", "mae+block"] and study["summary"]
    assert study["summary"][0].startswith("At ") and " ± " in study["summary"][0]
    report = build_report(folder)  # `mimkit report DIR` finds a study folder and writes its page
    page = report.html.read_text()
    assert report.html == folder / "report.html" and report.png.is_file()
    for text in ('id="summary"', 'id="equal-core-minutes"', 'id="equal-epochs"', "random-init ViT", 'id="runs"',
                 "mimkit report", html.escape(study["summary"][0]), study["machine"]["cpu"]):  # fmt: skip
        assert text in page, text
    assert 'src="http' not in page and "data:image/png;base64," in page  # self-contained
    (folder / "runs" / "mae" / "pretrain" / "report.html").write_text("<html></html>")
    assert 'href="runs/mae/pretrain/report.html"' in build_study_page(folder).html.read_text()
    assert cli_main(["report", str(folder), "--out", str(tmp_path / "page.html")]) == 0
    assert (tmp_path / "page.html").is_file()


PROBE = ('<script>window.addEventListener("load", () => {'
         'const b = document.body;'
         'b.setAttribute("data-rendered", [...document.images].filter(i => i.complete && i.naturalWidth > 0)'
         '.map(i => i.id).join(","));'
         'const s = document.getElementById("summary");'
         'b.setAttribute("data-summary", s && s.offsetHeight > 0 ? s.innerText.replace(/\\s+/g, " ") : "");'
         'b.setAttribute("data-runs", document.querySelectorAll("#runs tr.run").length);'
         '});</script>')  # fmt: skip


@pytest.mark.chromium
def test_chromium_shows_the_study_page(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "compare.json").write_text(json.dumps(known_study()))
    page = build_study_page(folder).html
    dom = chromium_dom(page, PROBE, folder / "probe.html", tmp_path / "profile")
    assert re.search(r'data-rendered="curves"', dom), dom[-500:]
    summary = html.unescape(re.search(r'data-summary="([^"]*)"', dom).group(1))
    assert "mae+crossmae leads mae by 1.7 ± 0.7 probe points" in summary
    assert 'data-runs="2"' in dom
    shot = tmp_path / "shot.png"  # a screenshot: the curves' first line (matplotlib's C0, #1f77b4) is on screen
    subprocess.run([shutil.which("chromium") or shutil.which("chromium-browser"), *CHROMIUM_FLAGS,
                    f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1300,1400", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, timeout=120, check=False)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - [31, 119, 180]).sum(axis=1) < 30).sum() > 100
