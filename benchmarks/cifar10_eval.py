"""CIFAR-10 results table: random init vs pretrained ViT-T/4@32 encoders (MAE, and BootMAE / BEiT / mc-BEiT /
EMAE at an equal wall-clock budget) under k-NN, linear probe and fine-tuning, top-1 on the test split, each
row with its budget (epochs, wall-clock, machine).

    python benchmarks/cifar10_eval.py                                   # MAE: pretrain (recipe), then 6 evaluations
    python benchmarks/cifar10_eval.py --checkpoint runs/mae_vit_tiny_cifar10/checkpoint-00001950.pt   # reuse a run
    python benchmarks/cifar10_eval.py --methods mae,bootmae,beit,mcbeit --minutes 20   # equal wall-clock budgets
    python benchmarks/cifar10_eval.py --set finetune:optim.blr=2e-3 --set linprobe:probe.pool=cls
    python benchmarks/cifar10_eval.py --quick                           # smoke test: a few hundred images, ~2 min

Recipes: configs/<method>_vit_tiny_cifar10.yaml (pretraining; BEiT / mc-BEiT need the tokenizer of
configs/tokenizer_cifar10.yaml) and configs/eval/{knn,linprobe,finetune}_vit_tiny_cifar10.yaml.
With --minutes M every method gets the same budget: a short timed run measures its seconds per step on this
machine, then the recipe runs for M minutes' worth of steps (train.schedule_steps) with the lr / method
schedules compressed to fit, warmup 10% of it (train.max_minutes = 1.5 M is a safety stop).
Writes <out>.md (the table), <out>.log (everything logged) and <out>.json (every metric); runs go to --work.
Every step is resumable: run the same command again after an interruption and finished rows are read back
from <out>.json, an interrupted pretraining / fine-tuning continues from its last checkpoint (exactly), and
feature extraction from its partial cache. `--only pretrain` and `--only eval --wait` split the work between
two processes (e.g. each pinned to its own cores): the eval process picks up each encoder as it is pretrained.
A full run is hours on 2 CPU cores (see the recipes' comments).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mimkit import distributed as mdist  # noqa: E402
from mimkit.checkpoint import atomic_write_text, load_checkpoint  # noqa: E402
from mimkit.config import load_config  # noqa: E402
from mimkit.eval import evaluate  # noqa: E402
from mimkit.eval.common import machine_description  # noqa: E402
from mimkit.eval.config import load_eval_config  # noqa: E402
from mimkit.train import pretrain  # noqa: E402

log = logging.getLogger("mimkit")

METHODS = ("mae", "bootmae", "beit", "mcbeit", "emae")
NAMES = {"random": "random init", "mae": "MAE", "bootmae": "BootMAE", "beit": "BEiT", "mcbeit": "mc-BEiT", "emae": "EMAE"}
EVAL_RECIPES = {c: ROOT / "configs" / "eval" / f"{c}_vit_tiny_cifar10.yaml" for c in ("knn", "linprobe", "finetune")}
EVALS = tuple(EVAL_RECIPES)
WARMUP_FRACTION = 0.1  # of a budgeted schedule (the recipes: 1 of 10 epochs)
CALIBRATION_STEPS = 3


def recipe(method: str) -> Path:
    return ROOT / "configs" / f"{method}_vit_tiny_cifar10.yaml"


# --quick: the same models and code paths on a few hundred images, one short epoch each
QUICK = {
    "pretrain": ["data.num_samples=512", "train.epochs=1", "train.batch_size=64", "train.save_every_steps=null",
                 "optim.warmup_epochs=0.5"],
    "knn": ["data.train_samples=512", "data.val_samples=256"],
    "linprobe": ["data.train_samples=512", "data.val_samples=256", "train.epochs=3", "train.batch_size=64",
                 "optim.warmup_epochs=1", "train.eval_every_epochs=1"],
    "finetune": ["data.train_samples=512", "data.val_samples=256", "train.epochs=1", "train.batch_size=32",
                 "optim.warmup_epochs=0.2", "train.eval_every_epochs=1", "train.save_every_steps=null"],
}  # fmt: skip


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def setup_logging(path: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path, mode="a")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def parse_sets(items: list[str], random_items: list[str] = ()) -> dict[str, list[str]]:
    """--set COMMAND:override per command; --random-set COMMAND:override (an evaluation's, random-init rows only)
    under 'random:COMMAND'."""
    out: dict[str, list[str]] = {k: [] for k in ("pretrain", *EVALS, *(f"random:{c}" for c in EVALS))}
    for prefix, flag, allowed, entries in (("", "--set", ("pretrain", *EVALS), items),
                                           ("random:", "--random-set", EVALS, random_items)):  # fmt: skip
        for item in entries:
            command, _, override = item.partition(":")
            if command not in allowed or "=" not in override:
                raise SystemExit(f"{flag} {item!r}: expected COMMAND:section.key=value with COMMAND in {', '.join(allowed)}")
            out[prefix + command].append(override)
    return out


def seconds_per_step(method: str, base: list[str], work: Path) -> tuple[float, int]:
    """(seconds per optimizer step, steps per epoch) of `method`'s recipe here, from a short timed run."""
    out = work / f"{method}_calibration"
    cfg = load_config(recipe(method), base + [f"train.out_dir={out}", f"train.max_steps={CALIBRATION_STEPS}",
                                              "train.log_every=1", "train.resume=none", "train.save_every_steps=null",
                                              "train.tensorboard=false", "train.knn_every_epochs=0"])  # fmt: skip
    result = pretrain(cfg)
    times = {r["step"]: r["time"] for r in map(json.loads, result.metrics.read_text().splitlines()) if "loss" in r}
    first, last = min(times), max(times)  # step 1 includes start-up; time the steps after it
    per_step = (times[last] - times[first]) / (last - first)
    return per_step, load_checkpoint(result.checkpoint)["steps_per_epoch"]


def run_pretraining(method: str, args, sets, work: Path, state: "State") -> dict:
    overrides = [f"data.path={args.data}", f"train.out_dir={work / f'{method}_pretrain'}", "train.progress=false"]
    if args.pretrain_epochs is not None:
        overrides.append(f"train.epochs={args.pretrain_epochs}")
    overrides += (QUICK["pretrain"] if args.quick else []) + sets["pretrain"]
    budget = {}
    if args.minutes is not None:
        # measured once and kept: a resumed run (another session) keeps the schedule it started with
        calibration = state.refresh()["calibration"].get(method)
        if calibration is None or calibration["minutes"] != args.minutes:
            per_step, steps_per_epoch = seconds_per_step(method, overrides, work)
            calibration = {"minutes": args.minutes, "s_per_step": per_step, "steps_per_epoch": steps_per_epoch}
            state.save("calibration", method, calibration)
        per_step, steps_per_epoch = calibration["s_per_step"], calibration["steps_per_epoch"]
        steps = max(1, int(args.minutes * 60 / per_step))
        overrides += [f"train.schedule_steps={steps}", f"optim.warmup_epochs={WARMUP_FRACTION * steps / steps_per_epoch:.4f}",
                      f"train.max_minutes={1.5 * args.minutes}"]  # fmt: skip
        budget = {"budget_minutes": args.minutes, "calibrated_s_per_step": round(per_step, 3), "schedule_steps": steps}
        log.info("== %s: %.2f s/step here -> %d steps (%.2f epochs) in %.1f min", method, per_step, steps,
                 steps / steps_per_epoch, args.minutes)  # fmt: skip
    cfg = load_config(recipe(method), overrides)
    log.info("== pretraining: %s %s (%s %s)", NAMES[method], cfg.model.arch, recipe(method).name, " ".join(overrides))
    start = time.perf_counter()
    result = pretrain(cfg)
    state = load_checkpoint(result.checkpoint)
    return {"checkpoint": str(result.checkpoint), "epochs": round(float(state["epoch"]), 2), "steps": result.step,
            "final_loss": result.loss, "wall_clock_s": round(time.perf_counter() - start, 1), **budget,
            "threads": torch.get_num_threads(), "overrides": overrides,
            "note": "wall-clock of this invocation (a resumed run counts only its own part)"}  # fmt: skip


def describe_checkpoint(path: Path) -> dict:
    """Budget of a given pretraining run: epochs from the checkpoint, wall-clock (approximate: first to last
    record of its metrics.jsonl, pauses between resumes included) when its log is beside it."""
    state = load_checkpoint(path)
    info = {"checkpoint": str(path), "epochs": round(float(state["epoch"]), 2), "steps": state["step"]}
    records = path.parent / "metrics.jsonl"
    if records.is_file():
        times = [r["time"] for r in map(json.loads, records.read_text().splitlines()) if "time" in r]
        if len(times) > 1:
            info["wall_clock_s"] = round(times[-1] - times[0], 1)
            info["note"] = "wall-clock approximate: first to last metrics record of the run"
    return info


def eval_overrides(command: str, encoder: str, checkpoint: str, args, sets, work: Path) -> list[str]:
    run_section = "run" if command == "knn" else "train"
    overrides = [f"encoder.checkpoint={checkpoint}", f"data.path={args.data}",
                 f"{run_section}.out_dir={work / f'{encoder}_{command}'}", f"{run_section}.progress=false"]  # fmt: skip
    if checkpoint != "none":
        overrides.append("encoder.arch=null")  # the checkpoint's own architecture
    if args.train_samples is not None:
        overrides.append(f"data.train_samples={args.train_samples}")
    if args.val_samples is not None:
        overrides.append(f"data.val_samples={args.val_samples}")
    if command == "linprobe" and args.linprobe_epochs is not None:
        overrides.append(f"train.epochs={args.linprobe_epochs}")
    if command == "finetune" and args.finetune_epochs is not None:
        overrides.append(f"train.epochs={args.finetune_epochs}")
    overrides += (QUICK[command] if args.quick else []) + sets[command]
    if encoder == "random":
        overrides += sets[f"random:{command}"]
    return overrides


def same_evaluation(a: list[str], b: list[str]) -> bool:
    """Two rows' overrides describe the same evaluation (their run folders aside)."""
    def key(overrides: list[str]) -> list[str]:
        return [o for o in overrides if not o.startswith(("train.out_dir=", "run.out_dir="))]
    return key(a) == key(b)


def baseline_row(path: str | None, key: str, overrides: list[str]) -> dict | None:
    """The row `key` of another results file, if it was measured with these settings."""
    if path is None:
        return None
    row = json.loads(Path(path).read_text())["rows"].get(key)
    if row is None or not same_evaluation(row["overrides"], overrides):
        log.info("== %s: not reused from %s (%s)", key, path, "absent" if row is None else "other settings")
        return None
    return {**row, "reused_from": str(path)}


def run_eval(command: str, encoder: str, checkpoint: str, args, sets, work: Path) -> dict:
    overrides = eval_overrides(command, encoder, checkpoint, args, sets, work)
    log.info("== %s, %s encoder (%s %s)", command, NAMES[encoder], EVAL_RECIPES[command].name, " ".join(overrides))
    result = evaluate(command, str(EVAL_RECIPES[command]), overrides)
    return {**result.metrics, "threads": torch.get_num_threads(), "overrides": overrides}


def pretrain_text(pre: dict | None) -> str:
    if not pre:
        return "–"
    approx = "≈" if "approximate" in pre.get("note", "") else ""
    clock = f", {approx}{minutes(pre['wall_clock_s'])}" if "wall_clock_s" in pre else ""
    threads = f" on {pre['threads']} thread{'s' if pre['threads'] > 1 else ''}" if "threads" in pre else ""
    return f"{pre['epochs']} ep / {pre['steps']} steps{clock}{threads}"


def finetune_recipe(row: dict) -> str:
    """What a fine-tune row's config turned on, read back from its recipe and overrides."""
    cfg = load_eval_config("finetune", EVAL_RECIPES["finetune"], row["overrides"])
    parts = [f"LLRD {cfg.optim.layer_decay:g}" if cfg.optim.layer_decay < 1 else "no LLRD",
             f"batch {cfg.train.batch_size}, blr {cfg.optim.blr:g}" if cfg.optim.lr is None else f"lr {cfg.optim.lr:g}"]
    if cfg.aug.rand_augment:
        parts.append("RandAug")
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        parts.append("Mixup/CutMix")
    if "ema_top1" in row:
        parts.append("EMA")
    return ", ".join(parts)


def table(state: dict) -> str:
    lines = [
        "| encoder | evaluation | top-1 (%) | evaluation budget | pretraining budget |",
        "|---|---|---|---|---|",
    ]
    encoders = ["random", *[m for m in METHODS if m in state.get("pretrain", {})]]
    for command in EVALS:
        for encoder in encoders:
            m = state["rows"].get(f"{encoder}_{command}")
            if m is None:
                continue
            budget = minutes(m["wall_clock_s"])
            if command == "knn":
                what = f"k-NN (k={m['k']}, T={m['temperature']}, {m['pool']}, block {m['block']})"
                top1 = f"{m['top1']:.2f}"
            elif command == "linprobe":
                what = f"linear probe ({m['mode']}, {m['pool']}, {m['optimizer']}; block {m['block']} / best block {m['best_block']})"
                top1 = f"{m['top1']:.2f} / {m['best_top1']:.2f}"
                budget = f"{m['epochs']} ep, {budget}"
            else:
                what = f"fine-tune ({finetune_recipe(m)})"
                top1 = f"{m['top1']:.2f}" + (f" (EMA {m['ema_top1']:.2f})" if "ema_top1" in m else "")
                budget = f"{m['epochs']} ep, {budget}"
            images = f"; {m['train_images']} train / {m['val_images']} test images"
            pre = None if encoder == "random" else state["pretrain"].get(encoder)
            lines.append(f"| {NAMES[encoder]} | {what} | {top1} | {budget}{images} | {pretrain_text(pre)} |")
    lines.append("")
    lines.append(f"Machine: {state['machine']}. Data: {state['data']} (test split). Wall-clock includes feature "
                 "extraction and every test-set evaluation.")  # fmt: skip
    if state.get("minutes"):
        lines.append(f"Pretraining: every method the same budget, {state['minutes']} min of wall-clock here (its steps "
                     "set from a timed calibration run, lr / method schedules compressed to fit, 10% warmup). The wall-clock in "
                     "the table is each run's own: other work sharing the machine, or a calibration that ran on a busier "
                     "machine, stretches or shrinks it; the step counts are the budget.")  # fmt: skip
    rows = state["rows"]
    checks = []
    if "mae_linprobe" in rows:
        lp = rows["mae_linprobe"]
        checks.append(f"- linear probe (MAE) ≥ 48%: last block {lp['top1']:.2f}%, best block {lp['best_top1']:.2f}% "
                      f"-> {'met' if max(lp['top1'], lp['best_top1']) >= 48 else 'missed'}")  # fmt: skip
    if "mae_finetune" in rows and "random_finetune" in rows:
        gain = rows["mae_finetune"]["top1"] - rows["random_finetune"]["top1"]
        checks.append(f"- fine-tune gain over random init at the same budget ≥ 3 points: {gain:+.2f} -> "
                      f"{'met' if gain >= 3 else 'missed'}")  # fmt: skip
    if checks:
        lines += ["", "Targets (issue 3):", *checks]
    lines += ["", "k-NN on MIM features is a trend monitor, not a quality measure (MAE features score low on k-NN)."]
    return "\n".join(lines) + "\n"


SECTIONS = ("rows", "pretrain", "calibration")  # merged entry by entry between processes


class State:
    """<out>.json, shared safely by processes that split the work (--only): every save merges this process's
    new entries into the file's current content under a lock, then replaces it atomically."""

    def __init__(self, path: Path, fresh: dict):
        self.path, self.lock = path, path.with_suffix(".lock")
        self.data = {name: {} for name in SECTIONS}
        self.refresh()
        self.data.update(fresh)

    @contextlib.contextmanager
    def _locked(self):
        with open(self.lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _merge_from_disk(self) -> None:
        """Entries other processes wrote join this process's (its own win); the caller holds the lock."""
        disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
        for name, value in disk.items():
            self.data[name] = {**value, **self.data[name]} if name in SECTIONS else self.data.get(name, value)

    def refresh(self) -> dict:
        with self._locked():
            self._merge_from_disk()
        return self.data

    def save(self, section: str | None = None, key: str | None = None, value: dict | None = None) -> None:
        with self._locked():
            self._merge_from_disk()
            if section is not None:
                self.data[section][key] = value
            atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")
            atomic_write_text(self.path.with_suffix(".md"), table(self.data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10.npz"))
    parser.add_argument("--methods", default="mae", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--checkpoint", default=None, help="a pretraining checkpoint of the (single) method: skip pretraining")
    parser.add_argument("--minutes", type=float, default=None, help="pretraining budget per method (default: the recipe's epochs)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--linprobe-epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--train-samples", type=int, default=None, help="evaluate on a seeded subset of the train split")
    parser.add_argument("--val-samples", type=int, default=None, help="evaluate on a seeded subset of the test split")
    parser.add_argument("--evals", default=",".join(EVALS), help="comma-separated subset of knn,linprobe,finetune")
    parser.add_argument("--no-random", action="store_true", help="skip the random-init rows")
    parser.add_argument("--only", choices=("pretrain", "eval"), default=None, help="do one half of the work")
    parser.add_argument("--wait", action="store_true", help="with --only eval: wait for encoders still being pretrained")
    parser.add_argument("--set", action="append", default=[], metavar="COMMAND:KEY=VALUE",
                        help="extra override for one command (pretrain, knn, linprobe, finetune); repeatable")
    parser.add_argument("--random-set", action="append", default=[], metavar="COMMAND:KEY=VALUE",
                        help="extra override for the random-init rows only (e.g. finetune:optim.layer_decay=1.0)")
    parser.add_argument("--baseline-from", default=None, metavar="JSON",
                        help="reuse the random-init rows of another results file measured with the same settings")
    parser.add_argument("--quick", action="store_true", help="smoke test: a few hundred images, one short epoch each")
    parser.add_argument("--work", default=None, help="run folders (default: runs/cifar10_eval[_quick])")
    parser.add_argument("--out", default=None, help="results stem: <out>.md, .log, .json "
                        "(default: benchmarks/cifar10_eval; with --quick: runs/cifar10_eval_quick/results)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="recompute rows already in <out>.json")
    args = parser.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    evals = [e for e in args.evals.split(",") if e]
    if not set(evals) <= set(EVALS) or not set(methods) <= set(METHODS):
        raise SystemExit(f"--evals takes knn,linprobe,finetune; --methods takes {','.join(METHODS)}")
    if args.checkpoint and len(methods) != 1:
        raise SystemExit("--checkpoint goes with exactly one method (--methods)")
    suffix = "_quick" if args.quick else ""
    work = Path(args.work or ROOT / "runs" / f"cifar10_eval{suffix}")
    out = Path(args.out or (work / "results" if args.quick else ROOT / "benchmarks" / "cifar10_eval"))
    out.parent.mkdir(parents=True, exist_ok=True)
    setup_logging(out.with_suffix(".log"))
    sets = parse_sets(args.set, args.random_set)
    fresh = {"data": args.data, "machine": machine_description(mdist.resolve_device("auto")), "quick": args.quick,
             "updated": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
    if args.minutes is not None:
        fresh["minutes"] = args.minutes
    if args.force:  # start the results file afresh (the runs' own checkpoints are kept)
        out.with_suffix(".json").unlink(missing_ok=True)
    state = State(out.with_suffix(".json"), fresh)
    log.info("cifar10_eval: %s | torch %s, %d threads | methods %s | work %s | results %s", fresh["machine"],
             torch.__version__, torch.get_num_threads(), ",".join(methods), work, out)  # fmt: skip

    if args.only != "eval":
        for method in methods:
            if args.checkpoint:
                state.save("pretrain", method, describe_checkpoint(Path(args.checkpoint)))
            elif method not in state.refresh()["pretrain"]:
                state.save("pretrain", method, run_pretraining(method, args, sets, work, state))
            log.info("pretrained %s encoder: %s", NAMES[method], state.data["pretrain"][method]["checkpoint"])
    if args.only != "pretrain":
        encoders = ([] if args.no_random else ["random"]) + methods
        while encoders:
            ready = [e for e in encoders if e == "random" or e in state.refresh()["pretrain"]]
            if not ready:
                if not args.wait:
                    raise SystemExit(f"not pretrained yet: {', '.join(encoders)} (run with --only pretrain first, or --wait)")
                time.sleep(30)
                continue
            encoder = ready[0]
            for command in evals:
                key = f"{encoder}_{command}"
                if key in state.refresh()["rows"]:
                    log.info("== %s: already measured (top-1 %.2f%%), kept; --force recomputes", key,
                             state.data["rows"][key]["top1"])  # fmt: skip
                    continue
                checkpoint = "none" if encoder == "random" else state.data["pretrain"][encoder]["checkpoint"]
                reused = None
                if encoder == "random":  # the pretrained rows are this run's own by definition
                    reused = baseline_row(args.baseline_from, key, eval_overrides(command, encoder, checkpoint, args, sets, work))
                if reused is not None:
                    log.info("== %s: reused from %s (top-1 %.2f%%, same settings)", key, args.baseline_from, reused["top1"])
                    state.save("rows", key, reused)
                    continue
                state.save("rows", key, run_eval(command, encoder, checkpoint, args, sets, work))
            encoders.remove(encoder)
    state.save()
    print(table(state.data))
    log.info("wrote %s, %s, %s", out.with_suffix(".md"), out.with_suffix(".json"), out.with_suffix(".log"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
