"""`mimkit report RUN_DIR`: one self-contained HTML page (every image embedded as a base64 PNG) and a PNG
summary of a pretraining run.

What it shows, and where it comes from:

* a summary line (`run_summary`): method, model, steps and epochs done of planned, images seen (steps x the
  effective batch the newest checkpoint records), wall-clock training time (each start or resume from its first
  logged step to its last, plus that first window, so the time between a stop and its resume is not counted),
  final loss, resumes (stops, config changes), checkpoints kept;
* curves against the optimizer step, from `RUN_DIR/metrics.jsonl`: the loss and its terms, the lr, img/s, the
  gradient norm, the non-finite steps and skipped images (only when there were any: a panel is drawn only when it
  carries information, `curve_panels`); one point per step (a step logged twice, by a log written before resumes
  truncated it, keeps its last record); every resume (an `"event": "resume"` record) is a dashed line;
* reconstructions of fixed images (the run's own data, spread over it, or `--images`) by the initial model
  (rebuilt from `train.seed`, exactly the weights step 0 started from) and by every kept checkpoint (up to
  `--checkpoints`, default DEFAULT_CHECKPOINTS, spread evenly), side by side (mimkit.visualize.reconstruct: the
  same masks in every column), each panel at least MIN_PANEL_PX wide (small images upscaled, nearest);
* the k-NN trend: the monitor's whole history in metrics.jsonl (`train.knn_every_epochs`) and every `mimkit knn`
  run on the run's checkpoints, with a line on how the two differ (`knn_note`);
* evaluation runs: every `metrics.json` of `mimkit knn | linprobe | finetune` whose `encoder` (the
  `encoder.checkpoint` it was given) is a checkpoint of this run, found under RUN_DIR (any depth), in RUN_DIR's
  sibling folders and their sub-folders (e.g. `runs/knn_x/`, `runs/evals/linprobe_y/`), and under every `--evals`
  folder (any depth). A relative `encoder.checkpoint` is matched against RUN_DIR from the current folder, and
  else by its last two parts (`<run folder name>/checkpoint-N...`), so a report made from another folder still
  finds them;
* the random-init baseline: evaluation runs found in the same places with `encoder.checkpoint=none` and the
  run's architecture (their config.yaml's encoder section), a marked first row of each table; without one, the
  command that makes one (`baseline_command`);
* the config sections the run's method uses (`config_sections`), the whole resolved `config.yaml` folded below,
  and the machine making the report (CPU model from lscpu, GPUs, library versions; each evaluation's own machine
  is in its table row).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import math
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from mimkit.checkpoint import list_checkpoints
from mimkit.config import ConfigError, config_from_dict, sections_used, to_dict
from mimkit.data import open_source
from mimkit.errors import MimkitError
from mimkit.extras import require
from mimkit.interop import load_mimkit_checkpoint
from mimkit.machine import cpu_model
from mimkit.methods import build_model
from mimkit.models import encoder_of
from mimkit.presets import get_preset
from mimkit.registry import COMMON_SECTIONS, encoder_family, method_spec
from mimkit.schedules import schedule_length
from mimkit.version import __version__
from mimkit.visualize import (
    default_scale,
    expand_images,
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


class ReportError(MimkitError, ValueError):
    """A run folder the report cannot read, named in the message."""


@dataclass
class RunLog:
    steps: list[dict]  # one record per optimizer step that was logged, ascending
    resumes: list[int]  # the steps runs resumed from
    knn: list[dict]  # k-NN monitor records (step, knn_top1, ...)
    config_changes: list[tuple[int, dict]] = field(default_factory=list)  # (step, {key: [old, new]}) allowed on resume
    # one per start or resume, in file order: the step it started from and its timed records (step, time, img/s)
    segments: list[Segment] = field(default_factory=list)
    stops: list[int] = field(default_factory=list)  # steps of {"event": "stopped"} records (a signal stopped the run)
    init_from: dict | None = None  # the {"event": "init_from"} record: the weights the run started from


@dataclass
class Segment:
    start: int  # the step this start (0) or resume began from
    timed: list[tuple[int, float, float | None]] = field(default_factory=list)  # (step, time, img_per_s) in file order


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
    summary: dict[str, str] = field(default_factory=dict)  # the summary line's fields (run_summary)
    panels: list[str] = field(default_factory=list)  # the curve panels drawn (curve_panels)
    baselines: list[EvalRun] = field(default_factory=list)  # random-init evaluations of the run's architecture
    sections: list[str] = field(default_factory=list)  # the config sections shown (config_sections)


# =============================================================================================
# Reading the run


def read_metrics(path: Path) -> RunLog:
    """Training records (one per step, the last one kept), resume points and k-NN monitor records of a
    metrics.jsonl; a torn last line (a kill mid-write) is ignored."""
    by_step: dict[int, dict] = {}
    knn: dict[int, dict] = {}
    resumes: list[int] = []
    changes: dict[int, dict] = {}
    segments = [Segment(0)]
    stops: list[int] = []
    init_from = None
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
            segments.append(Segment(rec["resumed_step"]))
        elif rec.get("event") == "stopped" and isinstance(rec.get("step"), int):
            stops.append(rec["step"])
        elif rec.get("event") == "init_from":
            init_from = rec
        elif isinstance(rec.get("step"), int) and "knn_top1" in rec:
            knn[rec["step"]] = rec
        elif isinstance(rec.get("step"), int) and "loss" in rec and "event" not in rec:
            by_step[rec["step"]] = rec
            if _number(rec.get("time")):
                segments[-1].timed.append(
                    (
                        rec["step"],
                        float(rec["time"]),
                        float(rec["img_per_s"]) if _number(rec.get("img_per_s")) else None,
                    )
                )
    return RunLog(
        [by_step[s] for s in sorted(by_step)],
        sorted(set(resumes)),
        [knn[s] for s in sorted(knn)],
        sorted(changes.items()),
        segments,
        stops,
        init_from,
    )


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def training_seconds(runlog: RunLog, effective_batch: int | None) -> float | None:
    """Wall-clock training time: per segment (a start or a resume), from its first logged step to its last, plus
    that first step window (its steps x effective batch / its img/s, the time since the segment began); the gaps
    between a stop and the resume are not counted. None when no record has a time."""
    total, any_time = 0.0, False
    for seg in runlog.segments:
        if not seg.timed:
            continue
        any_time = True
        (first_step, first_time, first_rate), (_, last_time, _) = seg.timed[0], seg.timed[-1]
        total += max(0.0, last_time - first_time)
        if effective_batch and first_rate and first_step > seg.start:
            total += (first_step - seg.start) * effective_batch / first_rate
    return total if any_time else None


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


def _candidate_metrics(run_dir: Path, extra: Sequence[str | Path] = ()) -> set[Path]:
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
    return candidates


def _eval_metrics(path: Path) -> dict | None:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or metrics.get("command") not in EVAL_COMMANDS:
        return None
    return metrics


def _sorted_evals(found) -> list[EvalRun]:
    order = {c: i for i, c in enumerate(EVAL_COMMANDS)}
    return sorted(found, key=lambda e: (order[e.command], e.step or 0, str(e.folder)))


def find_evaluations(run_dir: Path, extra: Sequence[str | Path] = ()) -> list[EvalRun]:
    """Evaluation runs of this run's checkpoints (see the module docstring for where they are looked for)."""
    run_dir = Path(run_dir)
    found: dict[Path, EvalRun] = {}
    for path in _candidate_metrics(run_dir, extra):
        metrics = _eval_metrics(path)
        if metrics is None:
            continue
        ckpt = str(metrics.get("encoder") or "")
        if _belongs_to(ckpt, run_dir):
            found[path.resolve()] = EvalRun(metrics["command"], path.parent, ckpt, checkpoint_step(ckpt), metrics)
    return _sorted_evals(found.values())


def architecture(model: dict, family: str) -> tuple | None:
    """(family, patch, width, depth, heads) of a model.* / encoder.* section, the arch preset filling what is unset."""
    try:
        preset = get_preset(str(model.get("arch")))
    except ValueError:
        return None
    return (family, *(model.get(k) or getattr(preset, k) for k in ("patch_size", "embed_dim", "depth", "num_heads")))


def run_architecture(cfg) -> tuple | None:
    return architecture(dataclasses.asdict(cfg.model), encoder_family(cfg.method))


def _eval_config(folder: Path) -> dict:
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def find_baselines(run_dir: Path, cfg, extra: Sequence[str | Path] = ()) -> list[EvalRun]:
    """Evaluation runs of a random-init encoder (`encoder.checkpoint=none`) of the run's architecture (family,
    patch, width, depth, heads; read from the evaluation's config.yaml), looked for where evaluations are."""
    want = run_architecture(cfg)
    found: dict[Path, EvalRun] = {}
    for path in _candidate_metrics(Path(run_dir), extra):
        metrics = _eval_metrics(path)
        if metrics is None or str(metrics.get("encoder")) != "none":
            continue
        enc = _eval_config(path.parent).get("encoder")
        if not isinstance(enc, dict):
            continue
        family = "beit" if enc.get("family") == "beit" else "vit"
        if want is not None and architecture(enc, family) == want:
            found[path.resolve()] = EvalRun(metrics["command"], path.parent, "none", None, metrics)
    return _sorted_evals(found.values())


def baseline_command(run_dir: Path, cfg, evals: list[EvalRun], monitored: bool = False) -> str:
    """The `mimkit knn` command line that evaluates a random-init encoder of the run's architecture, into a sibling
    folder the report finds, on labelled data: the data the run's evaluations used, else train.knn_data, else
    data.path when the k-NN monitor ran on it (`monitored`), else a placeholder to fill in."""
    m = dataclasses.asdict(cfg.model)
    preset = get_preset(cfg.model.arch)
    sizes = [f"encoder.{k}={m[k]}" for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
             if m.get(k) is not None and m[k] != getattr(preset, k)]  # fmt: skip
    data = next((d for e in evals if (d := (_eval_config(e.folder).get("data") or {}).get("path"))), None)
    split = []
    if data is None and (cfg.train.knn_data or monitored):
        data = cfg.train.knn_data or cfg.data.path
        split = [f"data.val_split={cfg.train.knn_val_split}"] if cfg.train.knn_val_split != "test" else []
    base = run_dir.parent if run_dir.name else run_dir.resolve().parent  # as given (runs/x -> runs/), else absolute
    out = base / f"knn_random_init_{run_dir.resolve().name}"
    return " ".join(["mimkit knn encoder.checkpoint=none", f"encoder.arch={cfg.model.arch}", *sizes,
                     *(["encoder.family=beit"] if encoder_family(cfg.method) == "beit" else []),
                     f"data.path={data or 'LABELLED_DATA'}", *split, f"train.out_dir={out}"])  # fmt: skip


def machine_lines() -> list[str]:
    """The machine making the report: CPU model (mimkit.machine), GPUs, library versions."""
    import os

    import timm

    lines = [f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"GPUs: {', '.join(names)}")
    else:
        lines.append("GPUs: none visible")
    lines.append(f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
                 f"mimkit {__version__}, {platform.system()} {platform.release()}")  # fmt: skip
    return lines


# =============================================================================================
# Figures


def pyplot():
    matplotlib = require("matplotlib", "report", "mimkit report")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def curve_panels(runlog: RunLog, evals: list[EvalRun]) -> list[str]:
    """The panels that carry information: loss, lr, img/s always; the gradient norm when logged; skipped only
    when a step was non-finite or an image skipped; k-NN only with monitor records or `mimkit knn` runs."""
    recs = runlog.steps
    panels = ["loss", "lr", "img/s"]
    if any(_number(r.get("grad_norm")) for r in recs):
        panels.append("grad norm")
    if any((_number(r.get(k)) and r[k] > 0) for r in recs for k in ("nonfinite_steps", "skipped_images")):
        panels.append("skipped")
    if runlog.knn or any(e.command == "knn" and e.step is not None for e in evals):
        panels.append("k-NN")
    return panels


def _knn_panel(ax, runlog: RunLog, knn_evals: list[EvalRun], baselines: Sequence[EvalRun]) -> None:
    """The monitor's k-NN trend, `mimkit knn` on the checkpoints, and the random-init baseline."""
    if runlog.knn:
        ax.plot([r["step"] for r in runlog.knn], [r["knn_top1"] for r in runlog.knn], marker="o",
                label="monitor top-1")  # fmt: skip
    if knn_evals:
        ax.plot([e.step for e in knn_evals], [e.metrics.get("top1") for e in knn_evals], "s",
                label="mimkit knn top-1")  # fmt: skip
    for i, b in enumerate(x for x in baselines if x.command == "knn" and _number(x.metrics.get("top1"))):
        ax.axhline(b.metrics["top1"], color="tab:gray", linestyle=":", linewidth=1.2,
                   label="random init (mimkit knn)" if i == 0 else None)  # fmt: skip
    ax.set_title("k-NN top-1 (%), a trend")


def _figure_title(summary: dict[str, str] | None, runlog: RunLog) -> str:
    """The summary line (the PNG on its own says what run it is), or the logged steps and resumes."""
    if summary:
        first = ("method", "model", "steps", "epochs")
        return "\n".join(" · ".join(f"{k}: {v}" for k, v in summary.items() if (k in first) == top)
                         for top in (True, False))  # fmt: skip
    return f"{len(runlog.steps)} logged steps" + (f", resumed at step {', '.join(map(str, runlog.resumes))}"
                                                  if runlog.resumes else "")  # fmt: skip


def curves_figure(runlog: RunLog, evals: list[EvalRun], baselines: Sequence[EvalRun] = (),
                  summary: dict[str, str] | None = None, loss_terms: tuple[str, ...] = ()) -> tuple[bytes, list[str]]:  # fmt: skip
    """Loss (and its terms), lr, img/s, gradient norm, skipped counts and the k-NN trend against the step, one PNG
    (only the panels that carry information: `curve_panels`) titled with the summary line; with the panel names."""
    plt = pyplot()
    recs = runlog.steps
    panels = curve_panels(runlog, evals)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    flat = axes.ravel()
    ax_of = dict(zip(panels, flat, strict=False))

    def series(key):
        pts = [(r["step"], r[key]) for r in recs if _number(r.get(key))]
        return [p[0] for p in pts], [p[1] for p in pts]

    changed_at = {s for s, _ in runlog.config_changes}

    def mark_resumes(ax):
        for i, s in enumerate(r for r in runlog.resumes if r not in changed_at):
            ax.axvline(s, color="0.4", linestyle="--", linewidth=1, label="resume" if i == 0 else None)
        for i, (s, _) in enumerate(runlog.config_changes):  # resumed with train.resume_allow: the config changed here
            ax.axvline(s, color="tab:red", linestyle="-.", linewidth=1.2, label="config change" if i == 0 else None)

    ax = ax_of["loss"]
    ax.plot(*series("loss"), marker=".", markersize=3, linewidth=1, label="loss")
    for term in loss_terms:  # the method's (its spec's loss_terms; values it logs besides are not plotted here)
        xs, ys = series(term)
        if xs:
            ax.plot(xs, ys, marker=".", markersize=2, linewidth=1, label=term)
    ax.set_title("loss")

    def log_if_wide(ax, key):  # e.g. a diverging loss, the first steps' gradient norm
        values = [v for v in series(key)[1] if math.isfinite(v)]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")

    log_if_wide(ax, "loss")
    for name, key, title in (("lr", "lr", "learning rate"), ("img/s", "img_per_s", "images / s"),
                             ("grad norm", "grad_norm", "gradient norm (before clipping)")):  # fmt: skip
        if name in ax_of:
            ax_of[name].plot(*series(key), marker=".", markersize=3, linewidth=1, label=key)
            ax_of[name].set_title(title)
    if "grad norm" in ax_of:
        log_if_wide(ax_of["grad norm"], "grad_norm")
    if "skipped" in ax_of:
        ax = ax_of["skipped"]
        for key, label in (
            ("nonfinite_steps", "non-finite steps (total)"),
            ("skipped_images", "skipped images (total)"),
        ):
            ax.step(*series(key), where="post", label=label)
        ax.set_title("skipped")
    if "k-NN" in ax_of:
        _knn_panel(ax_of["k-NN"], runlog, [e for e in evals if e.command == "knn" and e.step is not None], baselines)
    for ax in flat[: len(panels)]:
        mark_resumes(ax)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle(_figure_title(summary, runlog), fontsize=9)
    fig.tight_layout()
    data = png_bytes(fig)
    plt.close(fig)
    return data, panels


def knn_note(runlog: RunLog, evals: list[EvalRun], cfg) -> str:
    """What the two k-NN series measure (mimkit.eval.knn: knn_monitor as train.py calls it, and run_knn)."""
    last = runlog.knn[-1] if runlog.knn else {}
    parts = []
    if runlog.knn:
        parts.append(f"the monitor (train.knn_every_epochs) takes the [cls] token of the last block after the final "
                     f"LayerNorm (no pooling setting), k={last.get('knn_k', 20)}, T=0.07, on fixed seeded subsets of "
                     f"{last.get('knn_train_images', '?')} train / {last.get('knn_val_images', '?')} val images "
                     f"(train.knn_samples) of {cfg.train.knn_data or cfg.data.path}")  # fmt: skip
    runs = [e for e in evals if e.command == "knn"]
    if runs:
        setups = sorted({f"features.pool={e.metrics.get('pool', '?')}, block {e.metrics.get('block', '?')}, "
                         f"k={e.metrics.get('k', '?')}" for e in runs})  # fmt: skip
        parts.append(f"`mimkit knn` pools as its own features.pool says ({'; '.join(setups)}) over every image of its "
                     "own data splits")  # fmt: skip
    elif runlog.knn:
        parts.append("`mimkit knn` (features.pool cls | mean | cls_mean, features.block, knn.k) over whole splits "
                     "gives the numbers to quote")  # fmt: skip
    return "k-NN: " + "; ".join(parts) + ". Compare each series with itself: both are trends, not quality measures."


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


DEFAULT_CHECKPOINTS = 8  # checkpoints drawn besides the initial model: every kept one, up to this many


def pick_checkpoints(paths: list[Path], count: int | None = None) -> list[Path]:
    """`count` (default DEFAULT_CHECKPOINTS) checkpoints spread evenly from the oldest to the newest: every one
    when there are no more than that."""
    count = DEFAULT_CHECKPOINTS if count is None else count
    if count <= 0:
        return []
    if len(paths) <= count:
        return list(paths)
    picks = np.linspace(0, len(paths) - 1, num=count).round().astype(int)
    return [paths[i] for i in sorted(set(picks.tolist()))]


def fixed_images(cfg, size: int, images: list[str | Path] | None, count: int) -> torch.Tensor:
    if images:
        return torch.stack([prepare_image(p, size) for p in expand_images(images)[:count]])

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
    size = encoder_of(models[0][1]).patch_embed.img_size[0]
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
    title = "reconstructions (masked patches predicted, visible ones pasted back; same masks in every column)" + (
        ", norm_pix un-normalised with each patch's ground-truth mean/std" if columns[0][1][0].norm_pix else ""
    )
    laid_out, cols = _wrapped(panels, len(imgs), size)
    grid = render_panels(laid_out, title=title, scale=panel_scale(size), max_cols=cols)
    return grid.image, [label for label, _ in models]


MIN_PANEL_PX = 128  # reconstruction panels are at least this wide on the page (small images upscaled, nearest)
MAX_GRID_PX = 1480  # the page's content width: wider grids wrap each image's row


def panel_scale(size: int) -> int:
    return default_scale(size, MIN_PANEL_PX)


def _wrapped(panels: list[tuple[str, str, np.ndarray]], images: int, size: int):
    """(panels, max_cols): each image's panels start a row and fill whole rows (blank panels pad the last)."""
    per_image = len(panels) // images
    cols = max(3, min(per_image, (MAX_GRID_PX - 4) // (size * panel_scale(size) + 4)))
    rows = math.ceil(per_image / cols)
    blank = np.full_like(panels[0][2], 255)
    out = []
    for i in range(images):
        out += panels[i * per_image : (i + 1) * per_image]
        out += [(f"{i}/blank{j}", "", blank) for j in range(rows * cols - per_image)]
    return out, cols


# =============================================================================================
# The page


def img_tag(png: bytes, alt: str, ident: str) -> str:
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


def checkpoint_meta(path: Path) -> dict:
    """A checkpoint's bookkeeping (step, steps_per_epoch, effective_batch, ...) without its tensors: a file is
    memory-mapped (nothing read but what is asked for), a sharded folder's meta.pt read; {} when unreadable."""
    path = Path(path)
    try:
        if path.is_dir():
            state = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint just leaves the summary without its numbers
        log.debug("report: cannot read %s's metadata: %s", path, e)
        return {}
    if not isinstance(state, dict):
        return {}
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _clock(seconds: float) -> str:
    """'1h02m03s', '2m03s', '3.4s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _epochs(steps: float, per_epoch: int) -> str:
    e = steps / per_epoch
    return f"{e:.0f}" if abs(e - round(e)) < 5e-3 else f"{e:.2f}"


def run_summary(cfg, runlog: RunLog, kept: list[Path]) -> dict[str, str]:
    """The summary line's fields, in order: method, model, steps and epochs (done of planned), images seen (steps x
    effective batch), training time (segments only: stop-to-resume gaps excluded), final loss, resumes (config
    changes, stops), checkpoints kept. Steps per epoch and the effective batch come from the newest checkpoint (else
    the metrics' epoch field and train.batch_size x accum_steps of one process)."""
    meta = checkpoint_meta(kept[-1]) if kept else {}
    last = runlog.steps[-1] if runlog.steps else {}
    done = last.get("step", meta.get("step", 0)) if last else meta.get("step", 0)
    per_epoch = meta.get("steps_per_epoch")
    if not per_epoch:
        dated = [r for r in runlog.steps if _number(r.get("epoch")) and r["epoch"] > 0]
        per_epoch = round(dated[-1]["step"] / dated[-1]["epoch"]) if dated else None
    batch = meta.get("effective_batch")
    batch_note = ""
    if not batch:
        batch, batch_note = cfg.train.batch_size * cfg.train.accum_steps, " per process (no checkpoint says how many)"
    m = cfg.model
    out = {"method": cfg.method,
           "model": f"{m.arch} ({m.embed_dim} wide, {m.depth} blocks, {m.num_heads} heads, patch {m.patch_size}, "
                    f"{m.img_size} px)"}  # fmt: skip
    if per_epoch:
        total = schedule_length(cfg.train, per_epoch)
        planned = min(total, cfg.train.max_steps or total)
        out["steps"] = f"{done} of {planned}"
        out["epochs"] = f"{_epochs(done, per_epoch)} of {_epochs(planned, per_epoch)} ({per_epoch} steps each)"
    else:
        out["steps"] = str(done)
    if runlog.init_from is not None:  # train.init_from: continued from other weights (OUT_DIR/init_from.json)
        i = runlog.init_from
        out["started from"] = (f"{i.get('source')} ({i.get('kind')}: {i.get('taken')} tensors taken, "
                               f"{i.get('initialised')} initialised)")  # fmt: skip
    out["images seen"] = f"{done * batch:,} ({done} steps x {batch}{batch_note})"
    seconds = training_seconds(runlog, batch)
    out["training time"] = (_clock(seconds) + (" (stop-to-resume gaps excluded)" if runlog.resumes else "")
                            if seconds is not None else "unknown (no timed records)")  # fmt: skip
    out["final loss"] = f"{last['loss']:.4f}" if last and _number(last.get("loss")) else "–"
    resumes = f"{len(runlog.resumes)}" + (f" (at step {', '.join(map(str, runlog.resumes))})" if runlog.resumes else "")
    if runlog.stops:
        resumes += f"; stopped by a signal at step {', '.join(map(str, runlog.stops))}"
    if runlog.config_changes:
        resumes += "; config changed at step " + ", ".join(str(s) for s, _ in runlog.config_changes)
    out["resumes"] = resumes
    out["checkpoints kept"] = (f"{len(kept)}" + (f" (steps {', '.join(str(checkpoint_step(k)) for k in kept)})"
                                                 if kept else ""))  # fmt: skip
    return out


# the config sections each method reads besides model, mask, data, optim, train, distributed
def config_sections(cfg) -> list[str]:
    """The top-level config sections the run's method uses, in config order: the common ones and the method
    sections its registered spec reads with this config (bootmae with mask.type parallel also reads emae.*)."""
    used = sections_used(cfg)
    return [name for name in to_dict(cfg) if name in COMMON_SECTIONS or name in used]


def own_config_text(cfg, config_text: str) -> str:
    """config.yaml cut to `method` and the method's own sections (as the run wrote them)."""
    data = yaml.safe_load(config_text) or {}
    keep = {"method": data.get("method", cfg.method), **{k: data[k] for k in config_sections(cfg) if k in data}}
    return yaml.safe_dump(keep, sort_keys=False)


def eval_tables(evals: list[EvalRun], baselines: Sequence[EvalRun] = (), hint: str | None = None) -> str:
    """One table per command: the random-init baseline rows first (marked), then the runs of the checkpoints; a
    one-line hint with the command that makes a baseline when none was found."""
    out = []
    if not evals and not baselines:
        out.append("<p>No evaluation run of this run's checkpoints was found (see <code>mimkit report --help</code>)."
                   "</p>")  # fmt: skip
    for command in EVAL_COMMANDS:
        base = [e for e in baselines if e.command == command]
        rows = [e for e in evals if e.command == command]
        if not rows and not base:
            continue
        cols = [c for c in EVAL_COLUMNS[command] if any(c in e.metrics for e in base + rows)]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["checkpoint step", *cols, "folder"])

        def row(e: EvalRun, cls: str, first: str, cols: list[str] = cols) -> str:
            return (f'<tr class="{cls}"><td>{first}</td>' + "".join(f"<td>{_fmt(e.metrics.get(c))}</td>" for c in cols)
                    + f"<td><code>{html.escape(str(e.folder))}</code></td></tr>")  # fmt: skip

        body = "".join(row(e, "baseline", "<b>random init (baseline)</b>") for e in base)
        body += "".join(row(e, "checkpoint", _fmt(e.step)) for e in rows)
        out.append(f"<h3>{command}</h3><table><tr>{head}</tr>{body}</table>")
    if hint:
        out.append(f'<p id="baseline-hint">{hint}</p>')
    return "\n".join(out)


# pages of other folders: (is_it(folder), build(folder, out) -> Report), tried first (a study folder: mimkit.compare.page)
FOLDER_PAGES: list = []

# the pages' shared style (the run report's and the study page's), braces doubled for str.format
BASE_STYLE = """body {{ font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1500px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
tr.baseline td {{ background: #f1f1f1; font-style: italic; }}
img {{ max-width: 100%; }}
"""

PAGE = (
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
"""
    + BASE_STYLE
    + """pre {{ background: #f6f6f6; padding: 0.8em; font-size: 0.85em; overflow-x: auto; }}
#summary {{ font-size: 1.05em; line-height: 1.6; }}
#summary span {{ white-space: nowrap; margin-right: 1.2em; }}
.wide {{ overflow-x: auto; }}
.wide img {{ max-width: none; }}
</style></head><body>
<h1>{title}</h1>
<p id="summary">{summary}</p>
{notes}
<h2>Training curves</h2>
{curves}
{knn_note}
<h2>Reconstructions</h2>
{recon}
<h2>Evaluations</h2>
{evals}
<h2>Config</h2>
<p>The sections method {method} uses (config.yaml as the run wrote it, resolved):</p>
<pre id="config">{config}</pre>
<details><summary>the whole config.yaml (every section, also other methods')</summary>
<pre id="config-full">{config_full}</pre></details>
<h2>Machine</h2>
<ul>{machine}</ul>
<p><small>made by mimkit {version} (<code>mimkit report</code>)</small></p>
</body></html>
"""
)


def build_report(run_dir: str | Path, out: str | Path | None = None, *, images: list[str | Path] | None = None,
                 checkpoints: int | None = None, num_images: int | None = None,
                 evals: Sequence[str | Path] = ()) -> Report:  # fmt: skip
    """Write OUT (default RUN_DIR/report.html) and the PNG summary beside it (same name, .png). `checkpoints`:
    how many kept checkpoints to draw (default: all, up to DEFAULT_CHECKPOINTS, spread evenly)."""
    run_dir = Path(run_dir)
    for is_it, build in FOLDER_PAGES:  # e.g. a study folder (compare.json): its own page
        if run_dir.is_dir() and is_it(run_dir):
            return build(run_dir, out)
    if not run_dir.is_dir():
        raise ReportError(f"run folder {run_dir} does not exist (give a pretraining run's train.out_dir)")
    pyplot()  # a missing matplotlib is said before any work
    cfg, config_text = read_config(run_dir)
    runlog = read_metrics(run_dir / "metrics.jsonl")
    found = find_evaluations(run_dir, list(evals))
    baselines = find_baselines(run_dir, cfg, list(evals))
    notes: list[str] = []
    kept = list_checkpoints(run_dir)
    summary = run_summary(cfg, runlog, kept)
    curves_png, panels = curves_figure(runlog, found, baselines, summary, method_spec(cfg.method).loss_terms)

    ckpts = pick_checkpoints(kept, checkpoints)
    recon_png = None
    drawn: list[str] = []
    spec = method_spec(cfg.method)
    if not spec.pixels(cfg):
        notes.append(f"this {cfg.method} run does not predict pixels ({spec.summary}): no reconstructions to draw")
    else:
        try:
            recon, drawn = reconstructions_figure(run_dir, cfg, ckpts, images, num_images or cfg.train.vis_images)
            recon_png = _array_png(recon)
        except MimkitError as e:
            notes.append(f"no reconstructions: {e}")
        except FileNotFoundError as e:
            raise ReportError(f"--images: {e}") from None
    if not kept:
        notes.append("no checkpoint in the run folder")
    elif len(ckpts) < len(kept):
        notes.append(f"reconstructions by {len(ckpts)} of the {len(kept)} kept checkpoints, spread evenly "
                     "(--checkpoints N draws more)")  # fmt: skip

    out = Path(out) if out else run_dir / "report.html"
    png_path = out.with_suffix(".png")
    for step, changed in runlog.config_changes:
        notes.append(f"config changed at step {step} (train.resume_allow): "
                     + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))  # fmt: skip
    hint = None
    if not baselines:
        command = html.escape(baseline_command(run_dir, cfg, found, bool(runlog.knn)))
        hint = ("No random-init baseline of this architecture was found; this command makes one (where the report "
                f"finds it): <code>{command}</code> (on the data the checkpoints are evaluated on; linprobe and "
                "finetune take encoder.checkpoint=none the same way).")  # fmt: skip
    page = PAGE.format(
        title=html.escape(f"mimkit run {run_dir.resolve().name}"),
        summary=" ".join(
            f'<span data-field="{html.escape(k)}"><b>{html.escape(k)}</b>: {html.escape(v)}</span>'
            for k, v in summary.items()
        ),
        notes="".join(f'<p class="note">note: {html.escape(n)}</p>' for n in notes),
        curves=img_tag(curves_png, "training curves", "curves"),
        knn_note=f'<p id="knn-note"><small>{html.escape(knn_note(runlog, found, cfg))}</small></p>'
        if "k-NN" in panels
        else "",
        recon=f'<div class="wide">{img_tag(recon_png, "reconstructions", "reconstructions")}</div>'
        if recon_png
        else "<p>none</p>",
        evals=eval_tables(found, baselines, hint),
        method=html.escape(cfg.method),
        config=html.escape(own_config_text(cfg, config_text)),
        config_full=html.escape(config_text),
        machine="".join(f"<li>{html.escape(x)}</li>" for x in machine_lines()),
        version=__version__,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    _summary_png(curves_png, recon_png, png_path)
    return Report(out, png_path, len(runlog.steps), runlog.resumes, drawn, found, notes, summary=summary,
                  panels=panels, baselines=baselines, sections=config_sections(cfg))  # fmt: skip


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
