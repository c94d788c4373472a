"""Reading a study out: each run at equal epochs and equal core- (or GPU-) minutes, time to accuracy, the Markdown tables and
the PNG plots (standard-error bands), and the plain-language summary computed from the numbers."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# a study's compute axis: core-minutes (wall-clock x CPU threads) or GPU-minutes (wall-clock x GPUs); its units
COMPUTE_UNITS = {"core_minutes": ("core-minutes", "core-min"), "gpu_minutes": ("GPU-minutes", "GPU-min")}


def compute_key(study: dict) -> str:
    """core_minutes (CPU studies, and every study written before --gpu-minutes) or gpu_minutes."""
    return study.get("compute") or "core_minutes"


def std_error(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n test images: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def nearest(points: list[dict], key: str, target: float) -> dict:
    return min(points, key=lambda c: (abs(c[key] - target), -c[key]))


def finished(run: dict) -> bool:
    """Pretraining done and its final checkpoint scored."""
    return bool(run.get("done")) and any(c["step"] == run.get("final_step") for c in run["checkpoints"])


def readouts(runs: list[dict], reach: Sequence[float] = (), compute: str = "core_minutes") -> dict:
    """Each run at the largest epoch / `compute` (core- or GPU-minute) count every run reached (its evaluated checkpoint nearest to it),
    and time to accuracy: the first evaluated checkpoint at which each run's probe reaches the best accuracy every run
    reached, and each of `reach` (percent). Runs with no scored checkpoint yet (a study under way) are left out, and
    so are runs still pretraining once some run has finished (else the slowest run's first checkpoint would set the
    budget of every row)."""
    out = {}
    runs = [r for r in runs if r["checkpoints"]]
    runs = [r for r in runs if finished(r)] or runs
    for key, label in (("epoch", "equal_epochs"), (compute, f"equal_{compute}")):
        curves = {r["name"]: [c for c in r["checkpoints"] if c.get(key) is not None] for r in runs}
        if curves and all(curves.values()):
            target = min(max(c[key] for c in points) for points in curves.values())
            out[label] = {"target": round(target, 6), "rows": {n: nearest(p, key, target) for n, p in curves.items()}}
    curves = {r["name"]: sorted(r["checkpoints"], key=lambda c: c["step"]) for r in runs}
    common = None
    if len(curves) > 1:  # every run's best, rounded down to 0.01 points so that every run reaches it
        common = math.floor(10000 * min(max(c["probe_top1"] for c in p) for p in curves.values()) + 1e-6) / 100
    targets = list(dict.fromkeys([*([common] if common is not None else []), *reach]))
    if targets:

        def first(points: list[dict], percent: float) -> dict | None:
            hit = next((c for c in points if 100 * c["probe_top1"] >= percent - 1e-9), None)
            return hit and {k: hit.get(k) for k in ("step", "epoch", compute)}

        rows = {name: {f"{t:g}": first(points, t) for t in targets} for name, points in curves.items()}
        out["to_reach"] = {"targets": [f"{t:g}" for t in targets], "common": None if common is None else f"{common:g}",
                           "rows": rows}  # fmt: skip
    return out


def _acc(row: dict, key: str) -> str:
    p, n = row.get(f"{key}_top1"), row.get("test_images")
    return "–" if p is None else f"{100 * p:.1f} ± {100 * std_error(p, n or 0):.1f}"


def checkpoint_table(study: dict) -> list[str]:
    """Every run's probe top-1 at each evaluated checkpoint, a column per epoch, its core- (GPU-) minutes beside it;
    the CPU of each run when the study ran on more than one."""
    epochs = sorted({round(c["epoch"], 2) for r in study["runs"] for c in r["checkpoints"]})
    if not epochs:
        return []
    base = [b for b in study["baselines"] if b.get("probe_top1") is not None]
    epochs = [0.0] * bool(base) + epochs  # random init: epoch 0
    several = len({cpu for r in study["runs"] for cpu in r.get("machines", [])}) > 1
    key = compute_key(study)
    lines = ["", f"## Probe top-1 (%) at every evaluated checkpoint (pretraining {COMPUTE_UNITS[key][0]})", "",
             "| run | " + ("CPU | " if several else "") + " | ".join(f"{e:g} ep" for e in epochs) + " |",
             "|---|" + ("---|" if several else "") + "---:|" * len(epochs)]  # fmt: skip
    for b in base:
        cells = [f"{100 * b['probe_top1']:.1f}"] + [""] * (len(epochs) - 1)
        lines.append("| " + " | ".join([b["name"], *(["–"] if several else []), *cells]) + " |")
    for r in study["runs"]:
        at = {round(c["epoch"], 2): c for c in r["checkpoints"]}
        cells = [
            ""
            if e not in at
            else f"{100 * at[e]['probe_top1']:.1f}" + ("" if at[e].get(key) is None else f" ({at[e][key]:.3g})")
            for e in epochs
        ]
        cpu = [", ".join(r.get("machines", [])) or "–"] if several else []
        lines.append("| " + " | ".join([r["name"], *cpu, *cells]) + " |")
    return lines


def pretraining_threads(study: dict) -> str:
    """The runs' usual thread count, naming the runs pretrained on another (their core-minutes count every thread,
    so a run on more threads pays for their lower efficiency per core)."""
    counts = {r["name"]: r["threads"] for r in study["runs"] if r.get("threads") and r["checkpoints"]}
    if not counts:
        return f"{study['threads']} thread(s)"
    usual = Counter(counts.values()).most_common(1)[0][0]
    others = [f"{name} on {n}" for name, n in counts.items() if n != usual]
    return f"{usual} thread(s)" + (f" ({'; '.join(others)}: its core-minutes count all of them)" if others else "")


def markdown(study: dict) -> str:
    d, m, lines = study["data"], study["machine"], []
    lines += [f"# Equal-compute study: {study['data_path']}", ""]
    lines.append(f"{d['num_train']} train / {d['num_test']} test images, {d['num_classes']} classes, "
                 f"{d['image_size']} px (model {study['img_size']} px, patch {study['patch_size']}); mean "
                 f"{study['mean']}, std {study['std']}.")  # fmt: skip
    lines += ["", (f"Machine: {m.get('cpu')} ({m.get('cpu_flags', '')}), torch {m['torch']}, timm {m['timm']}; "
                   f"pretraining on {pretraining_threads(study)}.")]  # fmt: skip
    if study.get("summary"):
        lines += ["", "## Summary", "", *(f"- {line}" for line in study["summary"])]
    key = compute_key(study)
    unit, short = COMPUTE_UNITS[key]
    header = [f"| run | epoch | {short} | k-NN top-1 (%) | probe top-1 (%) | probe, best block (%) |",
              "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    base_rows = [f"| {b['name']} | 0 | 0 | {_acc(b, 'knn')} | {_acc(b, 'probe')} | {_acc(b, 'probe_best')} |"
                 for b in study["baselines"] if b.get("knn_top1") is not None]  # fmt: skip
    titles = {"equal_epochs": ("At equal epochs", "epochs"), f"equal_{key}": (f"At equal pretraining {unit}", unit)}
    for label, (title, axis) in titles.items():
        r = study["readouts"].get(label)
        if r is None:
            continue
        lines += ["", f"## {title} ({r['target']:.3g} {axis}: each run's evaluated checkpoint nearest to it)", "",
                  *header, *base_rows]  # fmt: skip
        for name, c in r["rows"].items():
            cm = "–" if c.get(key) is None else f"{c[key]:.3g}"
            lines.append(f"| {name} | {c['epoch']:.3g} | {cm} | {_acc(c, 'knn')} | {_acc(c, 'probe')} | "
                         f"{_acc(c, 'probe_best')} (block {c.get('probe_best_block')}) |")  # fmt: skip
    lines += checkpoint_table(study)
    lines += _later_sections(study)
    return "\n".join(lines) + "\n"


def _later_sections(study: dict) -> list[str]:
    """compare.md after the tables: time to accuracy, the CPUs, runs under way, fine-tuning, tokenizer, sweep."""
    lines: list[str] = []
    key = compute_key(study)
    unit, short = COMPUTE_UNITS[key]
    reach = study["readouts"].get("to_reach")
    if reach and reach["targets"]:
        lines += ["", ("## Time to accuracy (the first evaluated checkpoint whose probe top-1 reaches it: epochs / "
                       f"{unit}; – not reached)"), "",
                  "| run | " + " | ".join(f"{t}%" + (" (every run's best)" if t == reach["common"] else "")
                                          for t in reach["targets"]) + " |",
                  "|---|" + "---:|" * len(reach["targets"])]  # fmt: skip
        for name, row in reach["rows"].items():
            cells = ["–" if row[t] is None else f"{row[t]['epoch']:.3g} ep / " + (
                "–" if row[t].get(key) is None else f"{row[t][key]:.3g} {short}")
                for t in reach["targets"]]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _cpu_note(study)
    pending = [r["name"] for r in study["runs"] if not r["checkpoints"]]
    if pending:
        lines += ["", "Not scored yet (left out of the readouts above): " + ", ".join(pending) + "."]
    if any(finished(r) for r in study["runs"]):
        under_way = [f"{r['name']} (scored to {max(c['epoch'] for c in r['checkpoints']):.3g} epochs)"
                     for r in study["runs"] if r["checkpoints"] and not finished(r)]  # fmt: skip
        if under_way:
            lines += ["", "Still pretraining (left out of the readouts above; its scores are in the per-checkpoint "
                      "table): " + ", ".join(under_way) + "."]  # fmt: skip
    finetuned = [r for r in [*study["baselines"], *study["runs"]] if r.get("finetune")]
    if finetuned:
        title = f"## Fine-tuning ({study['finetune_epochs']} epochs, configs/eval/finetune_vit_tiny_cifar10.yaml)"
        lines += ["", title, "", "| encoder | top-1 (%) |", "|---|---:|"]
        lines += [f"| {r['name']} | {_acc(r['finetune'], 'finetune')} |" for r in finetuned]
    tok = study.get("tokenizer")
    if tok:
        text = (f"Tokenizer ({tok['kind']}, {tok['vocab_size']} codes, {tok['view_px']} px view): on "
                f"{tok['test_images']} test images {tok['codes_per_batch']} distinct codes per batch of "
                f"{tok['batch_size']}, {tok['codes_used']} over the set, perplexity {tok['perplexity']}")  # fmt: skip
        if "reconstruction_mse" in tok:
            text += (f", reconstruction MSE {tok['reconstruction_mse']} ({tok['reconstruction_vs_variance']:.0%} of "
                     "the pixel variance)")  # fmt: skip
        if "train_steps" in tok:
            text += (f"; over the last tenth of its {tok['train_steps']} training steps {tok['train_codes_per_batch']} "
                     f"codes per batch, reconstruction {tok['train_reconstruction']}")  # fmt: skip
        lines += ["", text + "."]
    winners = study.get("sweep_winners")
    if winners:
        lines += ["", "## Sweep winners (best probe top-1 at the final checkpoint)", ""]
        lines += [f"- {base}: `{w['spec']}` ({100 * w['probe_top1']:.1f}%)" for base, w in winners.items()]
        lines += ["", f"The winners as a study: `--methods '{','.join(w['spec'] for w in winners.values())}'`"]
    per = "pretraining threads" if key == "core_minutes" else "GPUs (one per run)"
    lines += ["", ("± is the standard error of the test-set accuracy, sqrt(p(1-p)/n) over the n test images. "
                   f"{unit[0].upper() + unit[1:]}: training-loop wall-clock (each run's metrics.jsonl, one record per "
                   f"step) x {per}; process start-up and evaluation are not counted. Probe: the cached-feature "
                   "linear probe, last block; best block is chosen on the test split.")]  # fmt: skip
    return lines


def _cpu_note(study: dict) -> list[str]:
    """The CPUs of a study continued on other machines, and what --cpu-scale did to their core-minutes."""
    lines: list[str] = []
    cpus, scale = {cpu for r in study["runs"] for cpu in r.get("machines", [])}, study.get("cpu_scale") or {}
    if len(cpus) > 1 or scale:  # a study continued on other CPUs
        text = "Pretrained on: " + "; ".join(f"{r['name']}: {', '.join(r['machines'])}" for r in study["runs"]
                                             if r.get("machines")) + "."  # fmt: skip
        if scale:
            factors = ", ".join(f"{cpu} are multiplied by {f:g}" for cpu, f in scale.items())
            text += (f" Core-minutes of runs pretrained on {factors} (--cpu-scale; compare.json keeps the measured ones "
                     "as core_minutes_measured)")  # fmt: skip
            text += (", so every row counts in the core-minutes of one CPU." if len(cpus - set(scale)) <= 1 else
                     "; those of the other CPUs are not comparable with each other.")  # fmt: skip
            unknown = [r["name"] for r in study["runs"] if r["checkpoints"] and not r.get("machines")]
            if unknown:
                text += f" No CPU is recorded for {', '.join(unknown)}: counted as measured."
        else:
            text += " Core-minutes of runs on different CPUs are not comparable with each other."
        lines += ["", text]
    return lines


def panels(study: dict) -> tuple[tuple[str, str, str], ...]:
    """(key, axis label, file stem) of the two curves: against epochs and against the study's compute."""
    key = compute_key(study)
    return ("epoch", "pretraining epochs", "epochs"), (key, f"pretraining {COMPUTE_UNITS[key][0]}", key)


def probe_panel(ax, study: dict, key: str, label: str) -> None:
    """The probe top-1 of every run against `key` (epoch / core_minutes / gpu_minutes), each with its one-standard-error band,
    the random inits as horizontal lines with theirs."""
    for run in study["runs"]:
        points = sorted((c[key], 100 * c["probe_top1"], 100 * point_se(c)) for c in run["checkpoints"]
                        if c.get(key) is not None)  # fmt: skip
        if points:
            xs, ys, se = (list(v) for v in zip(*points))
            (line,) = ax.plot(xs, ys, marker="o", label=run["name"])
            ax.fill_between(
                xs,
                [y - e for y, e in zip(ys, se)],
                [y + e for y, e in zip(ys, se)],
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )  # one standard error
    for i, b in enumerate(b for b in study["baselines"] if b.get("probe_top1") is not None):
        ax.axhline(100 * b["probe_top1"], color="0.4", linestyle=("--", ":", "-.")[i % 3], label=b["name"])
        ax.axhspan(
            100 * (b["probe_top1"] - point_se(b)),
            100 * (b["probe_top1"] + point_se(b)),
            color="0.4",
            alpha=0.08,
            linewidth=0,
        )
    ax.set_xlabel(label + (" (--cpu-scale: one CPU's)" if key == "core_minutes" and study.get("cpu_scale") else ""))
    ax.set_ylabel("linear probe top-1 (%), ± 1 s.e.")
    ax.grid(alpha=0.3)


def plots(study: dict, out: Path) -> list[Path]:
    """probe_vs_epochs.png and probe_vs_core_minutes.png (probe_vs_gpu_minutes.png): a line per run with its standard-error band, random init
    as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, label, stem in panels(study):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        probe_panel(ax, study, key, label)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
        path = out / f"probe_vs_{stem}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def sweep_winners(runs: list[dict]) -> dict:
    """Per swept spec, the grid point whose final checkpoint probes best."""
    best: dict[str, dict] = {}
    for run in runs:
        if run["checkpoints"]:
            final = max(run["checkpoints"], key=lambda c: c["step"])
            held = best.get(run["sweep_base"])
            if held is None or (final["probe_top1"], final["knn_top1"]) > (held["probe_top1"], held["knn_top1"]):
                best[run["sweep_base"]] = {"spec": run["name"], "probe_top1": final["probe_top1"],
                                           "knn_top1": final["knn_top1"]}  # k-NN breaks a tie  # fmt: skip
    return best


def point_se(row: dict, key: str = "probe") -> float:
    """The standard error of a row's accuracy (its test images), 0 when unknown."""
    se = std_error(row[f"{key}_top1"], row.get("test_images") or 0)
    return 0.0 if math.isnan(se) else se


def gap(a: dict, b: dict, key: str = "probe") -> tuple[float, float]:
    """a's lead over b in points, and its standard error: the two test-set errors in quadrature."""
    diff = 100 * (a[f"{key}_top1"] - b[f"{key}_top1"])
    return diff, 100 * math.hypot(point_se(a, key), point_se(b, key))


def _lead(where: str, lead: str, other: str, diff: float, se: float) -> str:
    """'At 26 core-minutes, mae+crossmae leads mae by 1.7 ± 0.7 probe points (2.4 standard errors).'"""
    ratio = abs(diff) / se if se > 0 else math.inf
    verdict = (f"{ratio:.1f} standard errors" if math.isfinite(ratio) else "no standard error known") + (
        "" if ratio >= 2 else ": within two standard errors, not a difference these test images can show"
    )
    ahead = "leads" if diff >= 0 else "trails"  # a best run below a random init trails it
    return f"At {where}, {lead} {ahead} {other} by {abs(diff):.1f} ± {se:.1f} probe points ({verdict})."


def summary_sentences(study: dict) -> list[str]:
    """What the numbers support, from the equal-compute and equal-epoch readouts: the best run's lead over every
    other run and over the random init of its family, each with its standard error."""
    out = []
    key = compute_key(study)
    units = ((f"equal_{key}", COMPUTE_UNITS[key][0]), ("equal_epochs", "epochs"))
    for label, unit in units:
        r = (study.get("readouts") or {}).get(label)
        rows = [(n, c) for n, c in (r or {}).get("rows", {}).items() if c.get("probe_top1") is not None]
        if r is None or not rows:
            continue
        rows.sort(key=lambda nc: -nc[1]["probe_top1"])
        (lead, best), where = rows[0], f"{r['target']:.3g} {unit}"
        out += [_lead(where, lead, name, *gap(best, row)) for name, row in rows[1:]]
        family = next((x.get("family") for x in study.get("runs", []) if x["name"] == lead), None)
        base = [b for b in study.get("baselines", []) if b.get("probe_top1") is not None
                and b.get("family", family) == family]  # fmt: skip
        out += [_lead(where, lead, b["name"], *gap(best, b)) for b in base[:1]]
    return out
