"""The study page: `mimkit report STUDY_DIR` (a folder with compare.json) writes one self-contained HTML page with
the run report's machinery (mimkit.report): the probe curves against epochs and against core-minutes with their
standard-error bands, the plain-language summary computed from the numbers, the equal-compute and equal-epoch
tables, the random-init baselines, each run's budget as measured and a link to its own run report, the machine(s)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from mimkit.compare.readout import COMPUTE_UNITS, compute_key, panels, probe_panel, summary_sentences
from mimkit.report import BASE_STYLE, FOLDER_PAGES, Report, ReportError, img_tag, png_bytes, pyplot
from mimkit.version import __version__

STUDY_PAGE = (
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
"""
    + BASE_STYLE
    + """#summary li {{ line-height: 1.6; }}
</style></head><body>
<h1>{title}</h1>
<p id="data">{data}</p>
<h2>Summary</h2>
<ul id="summary">{summary}</ul>
<h2>Probe accuracy against epochs and compute</h2>
{curves}
{tables}
<h2>Runs</h2>
{runs}
<h2>Machine</h2>
<ul id="machine">{machine}</ul>
<p><small>{note}</small></p>
<p><small>made by mimkit {version} (<code>mimkit report</code> of a <code>mimkit compare</code> study)</small></p>
</body></html>
"""
)


def is_study(folder: Path) -> bool:
    return (Path(folder) / "compare.json").is_file()


def read_study(folder: Path) -> dict:
    """compare.json of a study folder (any version of it that `mimkit compare` or benchmarks/compare.py wrote)."""
    try:
        study = json.loads((Path(folder) / "compare.json").read_text())
    except ValueError as e:
        raise ReportError(f"{folder}/compare.json: not JSON ({e})") from None
    study.setdefault("summary", summary_sentences(study))  # a study folder of before the summary
    return study


def curves_png(study: dict) -> bytes:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (key, label, _) in zip(axes, panels(study)):
        probe_panel(ax, study, key, label)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    data = png_bytes(fig)
    plt.close(fig)
    return data


def _pct(row: dict, key: str = "probe") -> str:
    p, se = row.get(f"{key}_top1"), row.get(f"{key}_se")
    if p is None:
        return "–"
    return f"{100 * p:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def readout_tables(study: dict) -> str:
    """The equal-compute and the equal-epoch tables, the random inits first."""
    out = []
    base = [b for b in study.get("baselines", []) if b.get("probe_top1") is not None]
    key = compute_key(study)
    compute = COMPUTE_UNITS[key][0]
    for label, title, unit in ((f"equal_{key}", "At equal pretraining compute", compute),
                               ("equal_epochs", "At equal epochs", "epochs")):  # fmt: skip
        r = (study.get("readouts") or {}).get(label)
        if not r:
            continue
        head = (f"<tr><th>run</th><th>epoch</th><th>{compute}</th><th>k-NN top-1 (%)</th><th>probe top-1 (%)</th>"
                "</tr>")  # fmt: skip
        rows = "".join(f'<tr class="baseline"><td>{html.escape(b["name"])}</td><td>0</td><td>0</td>'
                       f"<td>{_pct(b, 'knn')}</td><td>{_pct(b)}</td></tr>" for b in base)  # fmt: skip
        for name, c in r["rows"].items():
            cm = "–" if c.get(key) is None else f"{c[key]:.3g}"
            rows += (f"<tr><td>{html.escape(name)}</td><td>{c['epoch']:.3g}</td><td>{cm}</td>"
                     f"<td>{_pct(c, 'knn')}</td><td>{_pct(c)}</td></tr>")  # fmt: skip
        ident = label.replace("_", "-")
        out.append(f'<h2>{title} ({r["target"]:.3g} {unit})</h2><table id="{ident}">{head}{rows}</table>')
    return "\n".join(out)


def runs_table(study: dict, folder: Path) -> str:
    """Each run: its budget as measured, its checkpoints scored, its machine(s) and a link to its own run report."""
    key = compute_key(study)
    where = "GPU" if key == "gpu_minutes" else "CPU"
    head = ("<tr><th>run</th><th>done</th><th>final step</th><th>checkpoints scored</th>"
            f"<th>{COMPUTE_UNITS[key][0]} measured</th><th>{where}</th><th>run report</th></tr>")  # fmt: skip
    rows = ""
    for r in study.get("runs", []):
        name = r["name"]
        run_dir = folder / "runs" / re.sub(r"[^\w.+=-]", "_", name) / "pretrain"  # RunSpec.name
        rel = run_dir.relative_to(folder).as_posix()
        link = (f'<a href="{html.escape(rel)}/report.html">report</a>' if (run_dir / "report.html").is_file()
                else f"<code>mimkit report {html.escape(str(run_dir))}</code> writes it")  # fmt: skip
        spent = r.get(f"{key}_spent")
        if spent is None and r.get("checkpoints"):
            spent = max((c.get(f"{key}_measured") or c.get(key) or 0) for c in r["checkpoints"])
        rows += (f'<tr class="run"><td>{html.escape(name)}</td><td>{"yes" if r.get("done") else "no"}</td>'
                 f"<td>{r.get('final_step')}</td><td>{len(r.get('checkpoints', []))}</td>"
                 f"<td>{'–' if spent is None else f'{spent:.3g}'}</td>"
                 f"<td>{html.escape(', '.join(r.get('machines', [])) or '–')}</td><td>{link}</td></tr>")  # fmt: skip
    return f'<table id="runs">{head}{rows}</table>'


def machine_items(study: dict) -> str:
    m = study.get("machine") or {}
    items = [f"study: {m.get('cpu')} ({m.get('cpu_flags', '')}), torch {m.get('torch')}, timm {m.get('timm')}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; {study.get('threads')} thread(s)"]  # fmt: skip
    cpus = sorted({cpu for r in study.get("runs", []) for cpu in r.get("machines", [])})
    items += [f"pretrained on: {cpu}" for cpu in cpus]
    return "".join(f"<li>{html.escape(x)}</li>" for x in items)


def build_study_page(folder: str | Path, out: str | Path | None = None) -> Report:
    """Write OUT (default STUDY_DIR/report.html) and the curves PNG beside it."""
    folder = Path(folder)
    if not is_study(folder):
        raise ReportError(f"{folder}: no compare.json (give a `mimkit compare` study folder)")
    study = read_study(folder)
    png = curves_png(study)
    d = study.get("data") or {}
    data = (f"{html.escape(str(study.get('data_path')))}: {d.get('num_train')} train / {d.get('num_test')} test "
            f"images, {d.get('num_classes')} classes; model {study.get('img_size')} px, patch "
            f"{study.get('patch_size')}; budget {html.escape(json.dumps(study.get('budget')))}")  # fmt: skip
    summary = "".join(f"<li>{html.escape(s)}</li>" for s in study["summary"]) or "<li>nothing scored yet</li>"
    note = (
        "± is one standard error of the test-set accuracy, sqrt(p(1-p)/n) over the n test images; a lead's is "
        f"the two in quadrature. {COMPUTE_UNITS[compute_key(study)][0]}: "
        + (study.get("compute_note") or study.get("core_minutes_note", "wall-clock x threads"))
    )
    page = STUDY_PAGE.format(title=html.escape(f"mimkit study {folder.resolve().name}"), data=data, summary=summary,
                             curves=img_tag(png, f"probe top-1 against epochs and {COMPUTE_UNITS[compute_key(study)][0]}",
                                            "curves"),
                             tables=readout_tables(study), runs=runs_table(study, folder),
                             machine=machine_items(study), note=html.escape(note), version=__version__)  # fmt: skip
    out = Path(out) if out else folder / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    out.with_suffix(".png").write_bytes(png)
    return Report(out, out.with_suffix(".png"), 0, [], [], summary={str(i): s for i, s in enumerate(study["summary"])})


FOLDER_PAGES.append((is_study, build_study_page))  # `mimkit report STUDY_DIR`
