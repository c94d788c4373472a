"""CIFAR-10 results table: random-init vs MAE-pretrained ViT-T/4@32 under k-NN, linear probe and fine-tuning,
top-1 on the 10,000 test images, each row with its budget (epochs, wall-clock, machine).

    python benchmarks/cifar10_eval.py                                   # pretrain (recipe), then the 6 evaluations
    python benchmarks/cifar10_eval.py --checkpoint runs/mae_vit_tiny_cifar10/checkpoint-00001950.pt   # reuse a run
    python benchmarks/cifar10_eval.py --pretrain-epochs 60 --finetune-epochs 10
    python benchmarks/cifar10_eval.py --set finetune:optim.blr=2e-3 --set linprobe:probe.pool=cls
    python benchmarks/cifar10_eval.py --quick                           # smoke test: a few hundred images, ~2 min

Recipes: configs/mae_vit_tiny_cifar10.yaml (pretraining) and configs/eval/{knn,linprobe,finetune}_vit_tiny_cifar10.yaml.
Writes <out>.md (the table), <out>.log (everything logged) and <out>.json (every metric); runs go to --work.
Every step is resumable: run the same command again after an interruption and finished rows are read back
from <out>.json, an interrupted pretraining / fine-tuning continues from its last checkpoint (exactly), and
feature extraction from its partial cache. A full run is hours on 2 CPU cores (see the recipes' comments).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mimkit import distributed as mdist  # noqa: E402
from mimkit.config import load_config  # noqa: E402
from mimkit.eval import evaluate  # noqa: E402
from mimkit.eval.common import machine_description  # noqa: E402
from mimkit.train import pretrain  # noqa: E402

log = logging.getLogger("mimkit")

RECIPES = {
    "pretrain": ROOT / "configs" / "mae_vit_tiny_cifar10.yaml",
    "knn": ROOT / "configs" / "eval" / "knn_vit_tiny_cifar10.yaml",
    "linprobe": ROOT / "configs" / "eval" / "linprobe_vit_tiny_cifar10.yaml",
    "finetune": ROOT / "configs" / "eval" / "finetune_vit_tiny_cifar10.yaml",
}
EVALS = ("knn", "linprobe", "finetune")

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


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {k: [] for k in RECIPES}
    for item in items:
        command, _, override = item.partition(":")
        if command not in out or "=" not in override:
            raise SystemExit(f"--set {item!r}: expected COMMAND:section.key=value with COMMAND in {', '.join(RECIPES)}")
        out[command].append(override)
    return out


def run_pretraining(args, sets, work: Path) -> dict:
    overrides = [f"data.path={args.data}", f"train.out_dir={work / 'pretrain'}", "train.progress=false"]
    if args.pretrain_epochs is not None:
        overrides.append(f"train.epochs={args.pretrain_epochs}")
    overrides += (QUICK["pretrain"] if args.quick else []) + sets["pretrain"]
    cfg = load_config(RECIPES["pretrain"], overrides)
    log.info("== pretraining: MAE %s, %d epochs (%s %s)", cfg.model.arch, cfg.train.epochs, RECIPES["pretrain"].name,
             " ".join(overrides))  # fmt: skip
    start = time.perf_counter()
    result = pretrain(cfg)
    return {"checkpoint": str(result.checkpoint), "epochs": cfg.train.epochs, "steps": result.step,
            "final_loss": result.loss, "wall_clock_s": round(time.perf_counter() - start, 1),
            "overrides": overrides, "note": "wall-clock of this invocation (a resumed run counts only its own part)"}  # fmt: skip


def describe_checkpoint(path: Path) -> dict:
    """Budget of a given pretraining run: epochs from the checkpoint, wall-clock (approximate: first to last
    record of its metrics.jsonl, pauses between resumes included) when its log is beside it."""
    from mimkit.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    info = {"checkpoint": str(path), "epochs": round(float(state["epoch"]), 2), "steps": state["step"]}
    records = path.parent / "metrics.jsonl"
    if records.is_file():
        times = [r["time"] for r in map(json.loads, records.read_text().splitlines()) if "time" in r]
        if len(times) > 1:
            info["wall_clock_s"] = round(times[-1] - times[0], 1)
            info["note"] = "wall-clock approximate: first to last metrics record of the run"
    return info


def run_eval(command: str, encoder: str, checkpoint: str, args, sets, work: Path) -> dict:
    run_section = "run" if command == "knn" else "train"
    overrides = [f"encoder.checkpoint={checkpoint}", f"data.path={args.data}",
                 f"{run_section}.out_dir={work / f'{encoder}_{command}'}", f"{run_section}.progress=false"]  # fmt: skip
    if command == "linprobe" and args.linprobe_epochs is not None:
        overrides.append(f"train.epochs={args.linprobe_epochs}")
    if command == "finetune" and args.finetune_epochs is not None:
        overrides.append(f"train.epochs={args.finetune_epochs}")
    overrides += (QUICK[command] if args.quick else []) + sets[command]
    log.info("== %s, %s encoder (%s %s)", command, encoder, RECIPES[command].name, " ".join(overrides))
    result = evaluate(command, str(RECIPES[command]), overrides)
    return {**result.metrics, "overrides": overrides}


def table(state: dict) -> str:
    pre = state.get("pretrain")
    pre_text = "–"
    if pre:
        clock = f", {'≈' if 'note' in pre and 'approximate' in pre['note'] else ''}{minutes(pre['wall_clock_s'])}" if "wall_clock_s" in pre else ""
        pre_text = f"{pre['epochs']} ep{clock}"
    lines = [
        "| encoder | evaluation | top-1 (%) | evaluation budget | pretraining budget |",
        "|---|---|---|---|---|",
    ]
    names = {"random": "random init", "mae": "MAE"}
    for command in EVALS:
        for encoder in ("random", "mae"):
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
                what = "fine-tune (LLRD, RandAug, Mixup/CutMix" + (", EMA" if "ema_top1" in m else "") + ")"
                top1 = f"{m['top1']:.2f}" + (f" (EMA {m['ema_top1']:.2f})" if "ema_top1" in m else "")
                budget = f"{m['epochs']} ep, {budget}"
            images = f"; {m['train_images']} train / {m['val_images']} test images"
            lines.append(f"| {names[encoder]} | {what} | {top1} | {budget}{images} | {'–' if encoder == 'random' else pre_text} |")
    lines.append("")
    lines.append(f"Machine: {state['machine']}. Data: {state['data']} (test split). Wall-clock includes feature "
                 "extraction and every test-set evaluation.")  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10.npz"))
    parser.add_argument("--checkpoint", default=None, help="a MAE pretraining checkpoint: skip pretraining")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--linprobe-epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--evals", default=",".join(EVALS), help="comma-separated subset of knn,linprobe,finetune")
    parser.add_argument("--encoders", default="random,mae", help="comma-separated subset of random,mae")
    parser.add_argument("--set", action="append", default=[], metavar="COMMAND:KEY=VALUE",
                        help="extra override for one command (pretrain, knn, linprobe, finetune); repeatable")
    parser.add_argument("--quick", action="store_true", help="smoke test: a few hundred images, one short epoch each")
    parser.add_argument("--work", default=None, help="run folders (default: runs/cifar10_eval[_quick])")
    parser.add_argument("--out", default=None, help="results stem: <out>.md, .log, .json "
                        "(default: benchmarks/cifar10_eval; with --quick: runs/cifar10_eval_quick/results)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="recompute rows already in <out>.json")
    args = parser.parse_args(argv)

    suffix = "_quick" if args.quick else ""
    work = Path(args.work or ROOT / "runs" / f"cifar10_eval{suffix}")
    out = Path(args.out or (work / "results" if args.quick else ROOT / "benchmarks" / "cifar10_eval"))
    out.parent.mkdir(parents=True, exist_ok=True)
    setup_logging(out.with_suffix(".log"))
    sets = parse_sets(args.set)
    evals = [e for e in args.evals.split(",") if e]
    encoders = [e for e in args.encoders.split(",") if e]
    if not set(evals) <= set(EVALS) or not set(encoders) <= {"random", "mae"}:
        raise SystemExit("--evals takes knn,linprobe,finetune; --encoders takes random,mae")
    state_path = out.with_suffix(".json")
    state = json.loads(state_path.read_text()) if state_path.is_file() and not args.force else {}
    state.setdefault("rows", {})
    state.update({"data": args.data, "machine": machine_description(mdist.resolve_device("auto")),
                  "quick": args.quick, "updated": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])})  # fmt: skip
    log.info("cifar10_eval: %s | torch %s, %d threads | work %s | results %s", state["machine"], torch.__version__,
             torch.get_num_threads(), work, out)  # fmt: skip

    def save() -> None:
        state_path.write_text(json.dumps(state, indent=2) + "\n")
        out.with_suffix(".md").write_text(table(state))

    if "mae" in encoders:
        if args.checkpoint:
            state["pretrain"] = describe_checkpoint(Path(args.checkpoint))
        elif "epochs" not in state.get("pretrain", {}) or args.force:
            state["pretrain"] = run_pretraining(args, sets, work)
            save()
        log.info("pretrained encoder: %s", state["pretrain"]["checkpoint"])
    for command in evals:
        for encoder in encoders:
            key = f"{encoder}_{command}"
            if key in state["rows"] and not args.force:
                log.info("== %s: already measured (top-1 %.2f%%), kept; --force recomputes", key, state["rows"][key]["top1"])
                continue
            checkpoint = "none" if encoder == "random" else state["pretrain"]["checkpoint"]
            state["rows"][key] = run_eval(command, encoder, checkpoint, args, sets, work)
            save()
    save()
    print(table(state))
    log.info("wrote %s, %s, %s", out.with_suffix(".md"), out.with_suffix(".json"), out.with_suffix(".log"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
