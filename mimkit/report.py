"""`mimkit report RUN_DIR`: one self-contained HTML page (every image embedded as a base64 PNG) and a PNG
summary of a pretraining run.

What it shows, and where it comes from:

* curves against the optimizer step, from `RUN_DIR/metrics.jsonl`: the loss and its terms, the lr, img/s, the
  non-finite steps and skipped images; one point per step (a step logged twice, by a log written before
  resumes truncated it, keeps its last record); every resume (an `"event": "resume"` record) is a dashed line;
* reconstructions of fixed images (the run's own data, spread over it, or `--images`) by the initial model
  (rebuilt from `train.seed`, exactly the weights step 0 started from) and by up to `--checkpoints` checkpoints
  of the run, side by side (mimkit.visualize.reconstruct: the same masks in every column);
* the k-NN trend: the monitor's records in metrics.jsonl (`train.knn_every_epochs`) and every `mimkit knn` run
  on the run's checkpoints;
* evaluation runs: every `metrics.json` of `mimkit knn | linprobe | finetune` whose `encoder` (the
  `encoder.checkpoint` it was given) is a checkpoint of this run, found under RUN_DIR (any depth), in RUN_DIR's
  sibling folders and their sub-folders (e.g. `runs/knn_x/`, `runs/evals/linprobe_y/`), and under every `--evals`
  folder (any depth). A relative `encoder.checkpoint` is matched against RUN_DIR from the current folder, and
  else by its last two parts (`<run folder name>/checkpoint-N...`), so a report made from another folder still
  finds them;
* the resolved `config.yaml` and the machine making the report (CPU model from lscpu, GPUs, library versions;
  each evaluation's own machine is in its table row).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from mimkit.checkpoint import list_checkpoints
from mimkit.config import BEIT_METHODS, ConfigError, config_from_dict
from mimkit.data import open_source
from mimkit.errors import MimkitError
from mimkit.extras import require
from mimkit.interop import load_mimkit_checkpoint
from mimkit.methods import build_model
from mimkit.visualize import (
    _expand_images,
    default_scale,
    prepare_image,
    preview_images,
    reconstruct,
    render_panels,
    to_uint8,
)

log = logging.getLogger("mimkit")

EVAL_COMMANDS = ("knn", "linprobe", "finetune")
CKPT_NAME = re.compile(r"^checkpoint-(\d+)(\.pt)?$")
# per-step fields that are not curves of their own
NOT_CURVES = {"step", "epoch", "time", "event"}
LOSS_TERMS = ("reconstruction", "consistency", "feature", "mlm_acc", "feature_weight", "momentum")


class ReportError(MimkitError, ValueError):
    """A run folder the report cannot read, named in the message."""


@dataclass
class RunLog:
    steps: list[dict]  # one record per optimizer step that was logged, ascending
    resumes: list[int]  # the steps runs resumed from
    knn: list[dict]  # k-NN monitor records (step, knn_top1, ...)
    config_changes: list[tuple[int, dict]] = field(default_factory=list)  # (step, {key: [old, new]}) allowed on resume


@dataclass
class EvalRun:
    command: str
    folder: Path
    checkpoint: str  # encoder.checkpoint as the run was given it
    step: int | None
    metrics: dict


@dataclass
class Report:
    html: Path
    png: Path
    steps_plotted: int
    resumes: list[int]
    checkpoints_drawn: list[str]
    evals: list[EvalRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# =============================================================================================
# Reading the run


def read_metrics(path: Path) -> RunLog:
    """Training records (one per step, the last one kept), resume points and k-NN monitor records of a
    metrics.jsonl; a torn last line (a kill mid-write) is ignored."""
    by_step: dict[int, dict] = {}
    knn: dict[int, dict] = {}
    resumes: list[int] = []
    changes: dict[int, dict] = {}
    if not path.is_file():
        raise ReportError(f"{path} does not exist: RUN_DIR must be a pretraining run's train.out_dir")
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            log.warning("report: %s line %d is not JSON (a torn write?); skipped", path, n)
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("event") == "resume" and isinstance(rec.get("resumed_step"), int):
            resumes.append(rec["resumed_step"])
            if isinstance(rec.get("config_changes"), dict) and rec["config_changes"]:
                changes[rec["resumed_step"]] = rec["config_changes"]
        elif isinstance(rec.get("step"), int) and "knn_top1" in rec:
            knn[rec["step"]] = rec
        elif isinstance(rec.get("step"), int) and "loss" in rec and "event" not in rec:
            by_step[rec["step"]] = rec
    return RunLog([by_step[s] for s in sorted(by_step)], sorted(set(resumes)), [knn[s] for s in sorted(knn)],
                  sorted(changes.items()))


def read_config(run_dir: Path):
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ReportError(f"{path} does not exist: RUN_DIR must be a pretraining run's train.out_dir")
    text = path.read_text()
    try:
        return config_from_dict(yaml.safe_load(text) or {}), text
    except (ConfigError, yaml.YAMLError) as e:
        raise ReportError(f"{path}: not a mimkit pretraining config: {e}") from None


def checkpoint_step(path: str | Path) -> int | None:
    m = CKPT_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def _belongs_to(checkpoint: str, run_dir: Path) -> bool:
    if not checkpoint or checkpoint == "none" or checkpoint_step(checkpoint) is None:
        return False
    p = Path(checkpoint)
    if p.parent.resolve() == run_dir.resolve():
        return True
    return not p.is_absolute() and len(p.parts) >= 2 and p.parts[-2] == run_dir.resolve().name


def find_evaluations(run_dir: Path, extra: list[str | Path] = ()) -> list[EvalRun]:
    """Evaluation runs of this run's checkpoints (see the module docstring for where they are looked for)."""
    run_dir = Path(run_dir)
    candidates: set[Path] = set(run_dir.rglob("metrics.json"))
    parent = run_dir.resolve().parent
    for sibling in parent.iterdir() if parent.is_dir() else []:
        if sibling.is_dir() and sibling.resolve() != run_dir.resolve():
            candidates.update(sibling.glob("metrics.json"))
            candidates.update(sibling.glob("*/metrics.json"))
    for folder in extra:
        if not Path(folder).is_dir():
            raise ReportError(f"--evals: {folder} is not a folder")
        candidates.update(Path(folder).rglob("metrics.json"))
    found: dict[Path, EvalRun] = {}
    for path in candidates:
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(metrics, dict) or metrics.get("command") not in EVAL_COMMANDS:
            continue
        ckpt = str(metrics.get("encoder") or "")
        if _belongs_to(ckpt, run_dir):
            found[path.resolve()] = EvalRun(metrics["command"], path.parent, ckpt, checkpoint_step(ckpt), metrics)
    order = {c: i for i, c in enumerate(EVAL_COMMANDS)}
    return sorted(found.values(), key=lambda e: (order[e.command], e.step or 0, str(e.folder)))


def machine_lines() -> list[str]:
    """The machine making the report: CPU model (lscpu), GPUs, library versions."""
    import timm

    import mimkit

    cpu = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), None)
    except (OSError, subprocess.SubprocessError):
        pass
    if cpu is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        except OSError:
            pass
    import os

    lines = [f"CPU: {cpu or platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"GPUs: {', '.join(names)}")
    else:
        lines.append("GPUs: none visible")
    lines.append(f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
                 f"mimkit {mimkit.__version__}, {platform.system()} {platform.release()}")  # fmt: skip
    return lines


# =============================================================================================
# Figures


def _pyplot():
    matplotlib = require("matplotlib", "report", "mimkit report")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def curves_figure(runlog: RunLog, evals: list[EvalRun]) -> bytes:
    """Loss (and its terms), lr, img/s, skipped counts and the k-NN trend against the step, one PNG."""
    plt = _pyplot()
    recs = runlog.steps
    steps = [r["step"] for r in recs]
    knn_evals = [e for e in evals if e.command == "knn" and e.step is not None]
    panels = ["loss", "lr", "img/s", "skipped"] + (["k-NN"] if runlog.knn or knn_evals else [])
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    flat = axes.ravel()

    def series(key):
        pts = [(r["step"], r[key]) for r in recs
               if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]  # fmt: skip
        return [p[0] for p in pts], [p[1] for p in pts]

    changed_at = {s for s, _ in runlog.config_changes}

    def mark_resumes(ax):
        for i, s in enumerate(r for r in runlog.resumes if r not in changed_at):
            ax.axvline(s, color="0.4", linestyle="--", linewidth=1, label="resume" if i == 0 else None)
        for i, (s, _) in enumerate(runlog.config_changes):  # resumed with train.resume_allow: the config changed here
            ax.axvline(s, color="tab:red", linestyle="-.", linewidth=1.2, label="config change" if i == 0 else None)

    ax = flat[0]
    ax.plot(*series("loss"), marker=".", markersize=3, linewidth=1, label="loss")
    for term in LOSS_TERMS:
        if term in ("feature_weight", "momentum", "mlm_acc"):  # not loss terms: weights / accuracy
            continue
        xs, ys = series(term)
        if xs:
            ax.plot(xs, ys, marker=".", markersize=2, linewidth=1, label=term)
    ax.set_title("loss")
    losses = [v for v in series("loss")[1] if math.isfinite(v)]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:  # e.g. a diverging run
        ax.set_yscale("log")
    for ax, key, title in ((flat[1], "lr", "learning rate"), (flat[2], "img_per_s", "images / s")):
        ax.plot(*series(key), marker=".", markersize=3, linewidth=1, label=key)
        ax.set_title(title)
    ax = flat[3]
    for key, label in (("nonfinite_steps", "non-finite steps (total)"), ("skipped_images", "skipped images (total)")):
        ax.step(*series(key), where="post", label=label)
    ax.set_title("skipped")
    if "k-NN" in panels:
        ax = flat[4]
        if runlog.knn:
            ax.plot([r["step"] for r in runlog.knn], [r["knn_top1"] for r in runlog.knn], marker="o",
                    label="monitor top-1")  # fmt: skip
        if knn_evals:
            ax.plot([e.step for e in knn_evals], [e.metrics.get("top1") for e in knn_evals], "s",
                    label="mimkit knn top-1")  # fmt: skip
        ax.set_title("k-NN top-1 (%), a trend")
    for ax in flat[: len(panels)]:
        mark_resumes(ax)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{len(steps)} logged steps" + (f", resumed at step {', '.join(map(str, runlog.resumes))}"
                                                   if runlog.resumes else ""), fontsize=10)  # fmt: skip
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _initial_model(cfg):
    """The weights the run started from: train.py seeds with train.seed, then builds the model."""
    import random


    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed % 2**32)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
    random.setstate(py)
    np.random.set_state(npy)
    return model.eval()


def pick_checkpoints(paths: list[Path], count: int) -> list[Path]:
    """`count` checkpoints spread evenly from the oldest to the newest."""
    if len(paths) <= count:
        return list(paths)
    picks = np.linspace(0, len(paths) - 1, num=count).round().astype(int)
    return [paths[i] for i in sorted(set(picks.tolist()))]


def fixed_images(cfg, size: int, images: list[str | Path] | None, count: int) -> torch.Tensor:
    if images:
        return torch.stack([prepare_image(p, size) for p in _expand_images(images)[:count]])

    source = open_source(cfg.data.path, cfg.data.format, cfg.data.root)
    if source is None:
        raise ReportError(f"data.path {cfg.data.path} is streamed (WebDataset): give images with --images")
    return preview_images(source, size, count)


def reconstructions_figure(run_dir: Path, cfg, checkpoints: list[Path], images: list[str | Path] | None,
                           count: int) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Rows: images; columns: original, masked input, then the reconstruction (visible patches pasted back)
    by the initial model and by each checkpoint, all with the same masks."""
    models = [("step 0 (init)", _initial_model(cfg))]
    for path in checkpoints:
        model, _, state = load_mimkit_checkpoint(path)
        models.append((f"step {state.get('step', checkpoint_step(path))}", model))
    size = models[0][1].encoder.patch_embed.img_size[0]
    imgs = fixed_images(cfg, size, images, count)
    columns = [(label, reconstruct(model, imgs, cfg.data.mean, cfg.data.std, seed=cfg.train.seed))
               for label, model in models]  # fmt: skip
    panels = []
    for i in range(len(imgs)):
        first = columns[0][1][i]
        panels.append((f"{i}/original", "original" if i == 0 else "", to_uint8(first.original)))
        panels.append((f"{i}/masked", "masked input" if i == 0 else "", to_uint8(first.masked)))
        for label, recs in columns:
            panels.append((f"{i}/{label}", f"{label}: loss {recs[i].loss:.3f}", to_uint8(recs[i].pasted)))
    title = ("reconstructions (masked patches predicted, visible ones pasted back; same masks in every column)"
             + (", norm_pix un-normalised with each patch's ground-truth mean/std" if columns[0][1][0].norm_pix else ""))
    grid = render_panels(panels, title=title, scale=default_scale(size, 96), max_cols=2 + len(columns))
    return grid.image, [label for label, _ in models]


# =============================================================================================
# The page


def _img_tag(png: bytes, alt: str, ident: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{ident}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _array_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"
    return html.escape(str(v)) if v is not None else "–"


EVAL_COLUMNS = {
    "knn": ["top1", "top5", "k", "pool", "block", "train_images", "val_images", "wall_clock_s", "machine"],
    "linprobe": ["top1", "top5", "best_block", "best_top1", "mode", "optimizer", "epochs", "train_images",
                 "val_images", "wall_clock_s", "machine"],
    "finetune": ["top1", "top5", "best_top1", "ema_top1", "epochs", "layer_decay", "train_images", "val_images",
                 "wall_clock_s", "machine"],
}  # fmt: skip


def eval_tables(evals: list[EvalRun]) -> str:
    if not evals:
        return "<p>No evaluation run of this run's checkpoints was found (see <code>mimkit report --help</code>).</p>"
    out = []
    for command in EVAL_COMMANDS:
        rows = [e for e in evals if e.command == command]
        if not rows:
            continue
        cols = [c for c in EVAL_COLUMNS[command] if any(c in e.metrics for e in rows)]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["checkpoint step", *cols, "folder"])
        body = "".join(
            "<tr>" + f"<td>{_fmt(e.step)}</td>" + "".join(f"<td>{_fmt(e.metrics.get(c))}</td>" for c in cols)
            + f"<td><code>{html.escape(str(e.folder))}</code></td></tr>" for e in rows
        )  # fmt: skip
        out.append(f"<h3>{command}</h3><table><tr>{head}</tr>{body}</table>")
    return "\n".join(out)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
pre {{ background: #f6f6f6; padding: 0.8em; font-size: 0.85em; overflow-x: auto; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
<h2>Training curves</h2>
{curves}
<h2>Reconstructions</h2>
{recon}
<h2>Evaluations</h2>
{evals}
<h2>Resolved config</h2>
<pre>{config}</pre>
<h2>Machine</h2>
<ul>{machine}</ul>
<p><small>made by mimkit {version} (<code>mimkit report</code>)</small></p>
</body></html>
"""


def build_report(run_dir: str | Path, out: str | Path | None = None, *, images: list[str | Path] | None = None,
                 checkpoints: int = 3, num_images: int | None = None, evals: list[str | Path] = ()) -> Report:  # fmt: skip
    """Write OUT (default RUN_DIR/report.html) and the PNG summary beside it (same name, .png)."""
    import mimkit

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder {run_dir} does not exist (give a pretraining run's train.out_dir)")
    _pyplot()  # a missing matplotlib is said before any work
    cfg, config_text = read_config(run_dir)
    runlog = read_metrics(run_dir / "metrics.jsonl")
    found = find_evaluations(run_dir, list(evals))
    notes: list[str] = []
    curves_png = curves_figure(runlog, found)

    ckpts = pick_checkpoints(list_checkpoints(run_dir), checkpoints)
    recon_png, drawn = None, []
    if cfg.method in BEIT_METHODS:
        notes.append(f"{cfg.method} predicts visual-token ids, not pixels: no reconstructions to draw")
    else:
        try:
            recon, drawn = reconstructions_figure(run_dir, cfg, ckpts, images, num_images or cfg.train.vis_images)
            recon_png = _array_png(recon)
        except MimkitError as e:
            notes.append(f"no reconstructions: {e}")
        except FileNotFoundError as e:
            raise ReportError(f"--images: {e}") from None
    if not ckpts:
        notes.append("no checkpoint in the run folder")

    out = Path(out) if out else run_dir / "report.html"
    png_path = out.with_suffix(".png")
    last = runlog.steps[-1] if runlog.steps else {}
    for step, changed in runlog.config_changes:
        notes.append(f"config changed at step {step} (train.resume_allow): "
                     + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))  # fmt: skip
    summary = (f"{cfg.method} · {cfg.model.arch} · {len(runlog.steps)} logged steps"
               + (f", last step {last['step']}, loss {last['loss']:.4f}" if last else "")
               + (f" · resumed at step {', '.join(map(str, runlog.resumes))}" if runlog.resumes else "")
               + f" · {len(list_checkpoints(run_dir))} checkpoint(s) kept · {len(found)} evaluation run(s)")  # fmt: skip
    page = PAGE.format(
        title=html.escape(f"mimkit run {run_dir.resolve().name}"),
        summary=html.escape(summary) + "".join(f"<br>note: {html.escape(n)}" for n in notes),
        curves=_img_tag(curves_png, "training curves", "curves"),
        recon=_img_tag(recon_png, "reconstructions", "reconstructions") if recon_png else "<p>none</p>",
        evals=eval_tables(found),
        config=html.escape(config_text),
        machine="".join(f"<li>{html.escape(x)}</li>" for x in machine_lines()),
        version=mimkit.__version__,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    _summary_png(curves_png, recon_png, png_path)
    return Report(out, png_path, len(runlog.steps), runlog.resumes, drawn, found, notes)


def _summary_png(curves_png: bytes, recon_png: bytes | None, path: Path) -> None:
    """The curves above the reconstructions, one PNG on white."""
    parts = [Image.open(io.BytesIO(curves_png)).convert("RGB")]
    if recon_png is not None:
        parts.append(Image.open(io.BytesIO(recon_png)).convert("RGB"))
    width = max(p.width for p in parts)
    canvas = Image.new("RGB", (width, sum(p.height for p in parts)), (255, 255, 255))
    top = 0
    for p in parts:
        canvas.paste(p, (0, top))
        top += p.height
    canvas.save(path, optimize=True)
