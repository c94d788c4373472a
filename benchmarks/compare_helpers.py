"""Helpers of benchmarks/compare.py: run specs, the data's shape and statistics, pretraining time from a run's
metrics.jsonl, the tokenizer's codebook statistics, the machine, and the report (Markdown table, PNG plots)."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from mimkit.checkpoint import atomic_write_text
from mimkit.files import load_weights_file
from mimkit.machine import machine_info
from mimkit.methods import method_names  # importing mimkit.methods registers the built-in methods
from mimkit.registry import encoder_family
from mimkit.sources import FolderImages
from mimkit.tokenizers import DVAE, DVAESpec, load_tokenizer

METHODS = method_names()  # the registered methods (mimkit.registry)
# What a spec's `+part` adds to its method's recipe: pretraining overrides. A new part is one more entry.
PARTS: dict[str, list[str]] = {
    "random": ["mask.type=random"],
    "block": ["mask.type=block"],  # BEiT-style blocks
    "hybrid": ["mask.type=hybrid"],  # BootMAE's blocks topped up at random
    "parallel": ["mask.type=parallel"],  # EMAE's K disjoint parts and consistency loss
    # CrossMAE's decoder as configs/mae_crossmae_vit_tiny_cifar10.yaml sets it; another ratio: ':mae.reconstruct_ratio=R'
    "crossmae": ["mae.decoder=crossmae", "mae.reconstruct_ratio=0.25", "mae.decoder_context_blocks=all"],
}
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")
SPEC_HELP = (f"a run spec is METHOD[+PART...][:section.key=value,...]; methods: {', '.join(METHODS)}; parts: "
             f"{', '.join(PARTS)}; e.g. 'mae', 'bootmae+parallel', "
             "'mae+block:optim.blr=3e-4,train.batch_size=64'")  # fmt: skip


class SpecError(ValueError):
    """An option or run spec that cannot be used; the message is one line saying what is allowed."""


def split_top(text: str) -> list[str]:
    """'a=1,b=[1,2]' -> ['a=1', 'b=[1,2]']: commas inside brackets belong to a value."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[({") - (ch in "])}")
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in [*out, current] if p.strip()]


@dataclass
class RunSpec:
    text: str
    method: str
    parts: list[str]
    overrides: list[str]

    @property
    def name(self) -> str:  # its folder under runs/ and evals/
        return re.sub(r"[^\w.+=-]", "_", self.text)

    @property
    def family(self) -> str:
        return encoder_family(self.method)  # timm Beit (BEiT, mc-BEiT) or VisionTransformer

    def part_overrides(self) -> list[str]:
        return [o for p in self.parts for o in PARTS[p]]


def parse_spec(text: str) -> RunSpec:
    head, _, tail = text.partition(":")
    method, *parts = head.strip().split("+")
    if method not in METHODS:
        raise SpecError(f"run spec {text!r}: unknown method {method!r}; {SPEC_HELP}")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SpecError(f"run spec {text!r}: unknown part {unknown[0]!r}; {SPEC_HELP}")
    overrides = split_top(tail)
    bad = [o for o in overrides if not OVERRIDE.match(o)]
    if bad or (tail and not overrides):
        raise SpecError(f"run spec {text!r}: {bad[0] if bad else tail!r} is not section.key=value; {SPEC_HELP}")
    return RunSpec(text.strip(), method, parts, overrides)


def parse_specs(text: str) -> list[RunSpec]:
    """'mae,mae:optim.blr=3e-4,train.batch_size=64,emae' -> three specs (a key=value item joins the spec before it)."""
    items: list[str] = []
    for piece in split_top(text):
        if items and OVERRIDE.match(piece):
            items[-1] += "," + piece
        else:
            items.append(piece)
    if not items:
        raise SpecError(f"--methods: no run spec given; {SPEC_HELP}")
    specs = [parse_spec(i) for i in items]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SpecError(f"--methods: {next(n for n in names if names.count(n) > 1)!r} is given twice")
    return specs


def sweep_specs(specs: list[RunSpec], text: str) -> list[RunSpec]:
    """Every spec at every point of the grid 'optim.blr=1e-4,3e-4;train.batch_size=64,128'."""
    axes = []
    for axis in filter(None, (a.strip() for a in text.split(";"))):
        key, _, values = axis.partition("=")
        if not OVERRIDE.match(axis) or not split_top(values):
            raise SpecError(f"--sweep: {axis!r} is not section.key=v1,v2,...; e.g. "
                            "'optim.blr=1.5e-4,3e-4;train.batch_size=64,128'")  # fmt: skip
        axes.append([f"{key}={v}" for v in split_top(values)])
    if not axes:
        raise SpecError("--sweep: no axis given; e.g. 'optim.blr=1.5e-4,3e-4;train.batch_size=64,128'")
    return [parse_spec(s.text + (":" if not s.overrides else ",") + ",".join(point))
            for s in specs for point in itertools.product(*axes)]  # fmt: skip


# ---------------------------------------------------------------- the data


@dataclass
class DataInfo:
    kind: str  # npz | folder
    pretrain_path: str  # data.path of pretraining and of the tokenizer
    eval_path: str  # data.path of the evaluations, with train_split / val_split
    train_split: str
    val_split: str
    image_size: int  # side of the training images (the median short side for a folder)
    num_train: int
    num_test: int
    num_classes: int
    mean: list[float]
    std: list[float]


def choose_patch(image_size: int) -> tuple[int, int]:
    """(patch, model img_size): the smallest patch of 4, 8, 16, 32 whose grid has at most 14 tokens a side (CIFAR
    32 px -> 4, 8 x 8 tokens; 96 px -> 8; 224 px -> 16, 14 x 14), 2 below 16 px; img_size a multiple of it."""
    patch = 2 if image_size < 16 else next((p for p in (4, 8, 16) if image_size // p <= 14), 32)
    return patch, image_size // patch * patch


def _channel_stats(chunks) -> tuple[list[float], list[float]]:
    """Per-channel mean / std in [0, 1] over uint8 (..., C) arrays (grey replicated to RGB, alpha dropped)."""
    total, squares, n = np.zeros(3), np.zeros(3), 0
    for chunk in chunks:
        c = (chunk[..., [0, 0, 0]] if chunk.shape[-1] == 1 else chunk[..., :3]).reshape(-1, 3).astype(np.float64) / 255
        total, squares, n = total + c.sum(0), squares + (c * c).sum(0), n + len(c)
    mean = total / n
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in np.sqrt(squares / n - mean * mean)]


def _write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)  # atomic: two processes of a study may write the same file


def inspect_data(paths: list[str], work: Path, train_samples: int | None, test_samples: int | None) -> DataInfo:
    """Shape, class count and channel statistics of the labelled data; seeded subsets are written under `work`."""
    g = np.random.default_rng(0)
    if len(paths) == 1 and paths[0].endswith(".npz"):
        path = paths[0]
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise SpecError(f"--data {path}: no {', '.join(missing)} (a labelled .npz holds x_train, y_train, "
                                f"x_test, y_test; found {', '.join(z.files)})")  # fmt: skip
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        for split, count in (("train", train_samples), ("test", test_samples)):
            if count is not None and count < len(arrays[f"x_{split}"]):
                keep = np.sort(g.permutation(len(arrays[f"x_{split}"]))[:count])
                arrays[f"x_{split}"], arrays[f"y_{split}"] = arrays[f"x_{split}"][keep], arrays[f"y_{split}"][keep]
        if train_samples is not None or test_samples is not None:
            path = str(work / "data" / f"subset-{train_samples}-{test_samples}.npz")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _write_npz(Path(path), **arrays)
        x = arrays["x_train"]
        sample = x[np.sort(g.permutation(len(x))[:10000])]
        mean, std = _channel_stats(np.array_split(sample, max(1, len(sample) // 1000)))
        classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
        return DataInfo("npz", path, path, "train", "test", min(x.shape[1:3]), len(x), len(arrays["x_test"]), classes,
                        mean, std)  # fmt: skip
    if train_samples is not None or test_samples is not None:
        raise SpecError("--train-samples / --test-samples: subsets are made of .npz data only")
    if len(paths) == 1:
        root = Path(paths[0])
        val = next((s for s in ("val", "test") if (root / s).is_dir()), None)
        if not (root / "train").is_dir() or val is None:
            raise SpecError(f"--data {root}: expected a labelled .npz, a folder with train/ and val/ (or test/) "
                            "ImageFolder trees, or two folders TRAIN VAL")  # fmt: skip
    elif len(paths) == 2:  # the evaluations read <root>/<split>: a folder of two links
        root, val = work / "data" / "folders", "val"
        root.mkdir(parents=True, exist_ok=True)
        for name, target in (("train", paths[0]), ("val", paths[1])):
            link = root / name
            if link.is_symlink() and link.resolve() != Path(target).resolve():
                link.unlink()
            if not link.is_symlink():
                link.symlink_to(Path(target).resolve(), target_is_directory=True)
    else:
        raise SpecError("--data: one .npz, one folder, or two folders (TRAIN VAL)")
    train, test = FolderImages(root / "train"), FolderImages(root / val)
    picked = [train.load(int(i)) for i in g.permutation(len(train))[:500]]
    sizes = sorted(min(img.size) for img in picked)
    mean, std = _channel_stats(np.asarray(img.convert("RGB")) for img in picked)
    return DataInfo("folder", str(root / "train"), str(root), "train", val, sizes[len(sizes) // 2], len(train),
                    len(test), len(train.classes), mean, std)  # fmt: skip


def data_info(paths, work: Path, train_samples, test_samples) -> DataInfo:
    """inspect_data, kept in work/data.json for as long as the data files and subset sizes are the same."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise SpecError(f"--data {missing[0]}: no such file or folder")
    stamp = [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths] + [train_samples, test_samples]
    cache = work / "data.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["stamp"] == stamp and Path(saved["info"]["pretrain_path"]).exists():
            return DataInfo(**saved["info"])
    info = inspect_data(paths, work, train_samples, test_samples)
    atomic_write_text(cache, json.dumps({"stamp": stamp, "info": asdict(info)}, indent=1) + "\n")
    return info


# ---------------------------------------------------------------- pretraining time


def step_clock(metrics: Path) -> dict[int, tuple[float, float]]:
    """step -> (epoch, seconds of training up to and including it), from a run's metrics.jsonl written with
    train.log_every=1. Inside one process's stretch of records (a resume, or a step number that goes back, starts
    the next) a step takes the time since the record before it, a checkpoint written in between included; the
    first step of a stretch, whose time since the process started also holds imports, data loading and model
    building, counts as the stretch's median step. A step run again after a kill replaces the lost one."""
    stretches: list[list[dict]] = [[]]
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "event" in record or ("loss" in record and stretches[-1] and record["step"] <= stretches[-1][-1]["step"]):
            stretches.append([])
        if "loss" in record and "time" in record:
            stretches[-1].append(record)
    gaps = [[b["time"] - a["time"] for a, b in itertools.pairwise(s)] for s in stretches]
    fallback = statistics.median([d for g in gaps for d in g] or [0.0])
    steps: dict[int, tuple[float, float]] = {}
    for stretch, gap in zip(stretches, gaps):
        for record, seconds in zip(stretch, [statistics.median(gap) if gap else fallback, *gap]):
            steps[record["step"]] = (record["epoch"], seconds)
    clock, total = {}, 0.0
    for step in sorted(steps):
        total += steps[step][1]
        clock[step] = (steps[step][0], total)
    return clock


def is_scored_step(step: int, every: int | None, final: int | None) -> bool:
    """Whether a checkpoint is scored: the final one, and every `every` steps except one within half an interval of
    the final (2340 of 2343: the same encoder scored twice)."""
    if step == final:
        return True
    return bool(every) and step % every == 0 and not (final is not None and 0 < final - step < every / 2)


# ---------------------------------------------------------------- the tokenizer


@torch.no_grad()
def tokenizer_stats(path: str, kind: str, grid: int, test_source, history: Path | None, batch_size: int = 128) -> dict:
    """Codebook usage and reconstruction error of a BEiT tokenizer on the test images: distinct codes per batch and
    over the set, the perplexity exp(entropy) of the code histogram, and (mimkit dVAE) the pixel MSE, in [-1, 1], of
    decoding each image's argmax codes, also as a fraction of the pixel variance. Its view: the ViT grid x its
    downsampling (a mimkit file's own size). `history`: its training log."""
    tok = load_tokenizer(kind, path)
    dvae, view = None, grid * tok.downsample
    if kind == "mimkit":
        saved = load_weights_file(path)
        dvae = DVAE(DVAESpec(**saved["spec"])).eval()
        dvae.load_state_dict(saved["state_dict"])
        view = int(saved.get("image_size") or view)
    transform = v2.Compose([v2.ToImage(), v2.Resize(view, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(view), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(list(tok.mean), list(tok.std))])  # fmt: skip
    counts, per_batch, squared, total, variance = torch.zeros(tok.vocab_size), [], 0.0, 0, []
    for lo in range(0, len(test_source), batch_size):
        x = torch.stack([transform(test_source.load(i)) for i in range(lo, min(lo + batch_size, len(test_source)))])
        codes = tok.logits(x).argmax(1)
        per_batch.append(int(codes.unique().numel()))
        counts += torch.bincount(codes.flatten(), minlength=tok.vocab_size).float()
        if dvae is not None:
            rec = dvae.decode(F.one_hot(codes, tok.vocab_size).permute(0, 3, 1, 2).float())
            squared, total = squared + float(((rec - x) ** 2).sum()), total + x.numel()
            variance.append(float(x.var()))
    p = counts[counts > 0] / counts.sum()
    stats = {"path": str(path), "kind": kind, "vocab_size": tok.vocab_size, "view_px": view,
             "test_images": len(test_source), "batch_size": batch_size,
             "codes_per_batch": round(statistics.mean(per_batch), 1), "codes_used": int((counts > 0).sum()),
             "perplexity": round(float(torch.exp(-(p * p.log()).sum())), 1)}  # fmt: skip
    if dvae is not None:
        stats["reconstruction_mse"] = round(squared / total, 5)
        stats["reconstruction_vs_variance"] = round(squared / total / statistics.mean(variance), 4)
    if history is not None and history.is_file():
        rows = [json.loads(line) for line in history.read_text().splitlines()]
        tail = rows[-max(1, len(rows) // 10) :]  # the last tenth of training
        stats["train_steps"] = len(rows)
        stats["train_codes_per_batch"] = round(statistics.mean(r["codes_used"] for r in tail), 1)
        stats["train_reconstruction"] = round(statistics.mean(r["reconstruction"] for r in tail), 5)
    return stats


# ---------------------------------------------------------------- the machine


def machine() -> dict:
    """The machine of a study run (mimkit.machine.machine_info, the description every report uses)."""
    return machine_info()


# ---------------------------------------------------------------- the report


def parse_cpu_scale(items: list[str]) -> dict[str, float]:
    """['Intel(R) Xeon(R) Processor=1.289'] -> {cpu name: factor}."""
    scale = {}
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not name.strip() or not factor > 0 or math.isinf(factor):
            raise SpecError(f"--cpu-scale {item!r}: expected CPU=FACTOR, the CPU as compare.json's `machines` name it "
                            "and a positive factor, e.g. 'Intel(R) Xeon(R) Processor=1.289'")  # fmt: skip
        scale[name.strip()] = factor
    return scale


def run_cpu_scale(name: str, machines: list[str], cpu_scale: dict[str, float]) -> float:
    """The factor that turns a run's core-minutes into the reference CPU's: 1 unless --cpu-scale names its CPU."""
    factors = {cpu_scale.get(cpu, 1.0) for cpu in machines}
    if len(factors) > 1:  # its clock does not say which steps ran where
        raise SpecError(f"--cpu-scale: run {name} was pretrained on several CPUs ({', '.join(machines)}) with "
                        "different factors; its core-minutes cannot be converted (drop --cpu-scale for it)")
    return factors.pop() if factors else 1.0


def std_error(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n test images: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def nearest(points: list[dict], key: str, target: float) -> dict:
    return min(points, key=lambda c: (abs(c[key] - target), -c[key]))


def finished(run: dict) -> bool:
    """Pretraining done and its final checkpoint scored."""
    return bool(run.get("done")) and any(c["step"] == run.get("final_step") for c in run["checkpoints"])


def readouts(runs: list[dict], reach: list[float] = ()) -> dict:
    """Each run at the largest epoch / core-minute count every run reached (its evaluated checkpoint nearest to it),
    and time to accuracy: the first evaluated checkpoint at which each run's probe reaches the best accuracy every run
    reached, and each of `reach` (percent). Runs with no scored checkpoint yet (a study under way) are left out, and
    so are runs still pretraining once some run has finished (else the slowest run's first checkpoint would set the
    budget of every row)."""
    out = {}
    runs = [r for r in runs if r["checkpoints"]]
    runs = [r for r in runs if finished(r)] or runs
    for key, label in (("epoch", "equal_epochs"), ("core_minutes", "equal_core_minutes")):
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
            return hit and {k: hit.get(k) for k in ("step", "epoch", "core_minutes")}

        rows = {name: {f"{t:g}": first(points, t) for t in targets} for name, points in curves.items()}
        out["to_reach"] = {"targets": [f"{t:g}" for t in targets], "common": None if common is None else f"{common:g}",
                           "rows": rows}  # fmt: skip
    return out


def _acc(row: dict, key: str) -> str:
    p, n = row.get(f"{key}_top1"), row.get("test_images")
    return "–" if p is None else f"{100 * p:.1f} ± {100 * std_error(p, n):.1f}"


def checkpoint_table(study: dict) -> list[str]:
    """Every run's probe top-1 at each evaluated checkpoint, a column per epoch, its core-minutes beside it; the CPU
    of each run when the study ran on more than one."""
    epochs = sorted({round(c["epoch"], 2) for r in study["runs"] for c in r["checkpoints"]})
    if not epochs:
        return []
    base = [b for b in study["baselines"] if b.get("probe_top1") is not None]
    epochs = [0.0] * bool(base) + epochs  # random init: epoch 0
    several = len({cpu for r in study["runs"] for cpu in r.get("machines", [])}) > 1
    lines = ["", "## Probe top-1 (%) at every evaluated checkpoint (pretraining core-minutes)", "",
             "| run | " + ("CPU | " if several else "") + " | ".join(f"{e:g} ep" for e in epochs) + " |",
             "|---|" + ("---|" if several else "") + "---:|" * len(epochs)]  # fmt: skip
    for b in base:
        cells = [f"{100 * b['probe_top1']:.1f}"] + [""] * (len(epochs) - 1)
        lines.append("| " + " | ".join([b["name"], *(["–"] if several else []), *cells]) + " |")
    for r in study["runs"]:
        at = {round(c["epoch"], 2): c for c in r["checkpoints"]}
        cells = ["" if e not in at else f"{100 * at[e]['probe_top1']:.1f}" + (
            "" if at[e].get("core_minutes") is None else f" ({at[e]['core_minutes']:.3g})") for e in epochs]
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
    header = ["| run | epoch | core-min | k-NN top-1 (%) | probe top-1 (%) | probe, best block (%) |",
              "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    base_rows = [f"| {b['name']} | 0 | 0 | {_acc(b, 'knn')} | {_acc(b, 'probe')} | {_acc(b, 'probe_best')} |"
                 for b in study["baselines"] if b.get("knn_top1") is not None]  # fmt: skip
    titles = {"equal_epochs": ("At equal epochs", "epochs"),
              "equal_core_minutes": ("At equal pretraining core-minutes", "core-minutes")}  # fmt: skip
    for label, (title, unit) in titles.items():
        r = study["readouts"].get(label)
        if r is None:
            continue
        lines += ["", f"## {title} ({r['target']:.3g} {unit}: each run's evaluated checkpoint nearest to it)", "",
                  *header, *base_rows]  # fmt: skip
        for name, c in r["rows"].items():
            cm = "–" if c.get("core_minutes") is None else f"{c['core_minutes']:.3g}"
            lines.append(f"| {name} | {c['epoch']:.3g} | {cm} | {_acc(c, 'knn')} | {_acc(c, 'probe')} | "
                         f"{_acc(c, 'probe_best')} (block {c.get('probe_best_block')}) |")  # fmt: skip
    lines += checkpoint_table(study)
    reach = study["readouts"].get("to_reach")
    if reach and reach["targets"]:
        lines += ["", "## Time to accuracy (the first evaluated checkpoint whose probe top-1 reaches it: epochs / "
                  "core-minutes; – not reached)", "",
                  "| run | " + " | ".join(f"{t}%" + (" (every run's best)" if t == reach["common"] else "")
                                          for t in reach["targets"]) + " |",
                  "|---|" + "---:|" * len(reach["targets"])]  # fmt: skip
        for name, row in reach["rows"].items():
            cells = ["–" if row[t] is None else f"{row[t]['epoch']:.3g} ep / " + (
                "–" if row[t]["core_minutes"] is None else f"{row[t]['core_minutes']:.3g} core-min")
                for t in reach["targets"]]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
    lines += ["", ("± is the standard error of the test-set accuracy, sqrt(p(1-p)/n) over the n test images. "
                   "Core-minutes: training-loop wall-clock (each run's metrics.jsonl, one record per step) x "
                   "pretraining threads; process start-up and evaluation are not counted. Probe: the cached-feature "
                   "linear probe, last block; best block is chosen on the test split.")]  # fmt: skip
    return "\n".join(lines) + "\n"


def plots(study: dict, out: Path) -> list[Path]:
    """probe_vs_epochs.png and probe_vs_core_minutes.png: a line per run, random init as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, label in (("epoch", "pretraining epochs"), ("core_minutes", "pretraining core-minutes")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for run in study["runs"]:
            points = sorted((c[key], 100 * c["probe_top1"]) for c in run["checkpoints"] if c.get(key) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=run["name"])
        for i, b in enumerate(b for b in study["baselines"] if b.get("probe_top1") is not None):
            ax.axhline(100 * b["probe_top1"], color="0.4", linestyle=("--", ":", "-.")[i % 3], label=b["name"])
        ax.set_xlabel(label + (" (--cpu-scale: one CPU's)" if key == "core_minutes" and study.get("cpu_scale") else ""))
        ax.set_ylabel("linear probe top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
        path = out / f"probe_vs_{'epochs' if key == 'epoch' else 'core_minutes'}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written

