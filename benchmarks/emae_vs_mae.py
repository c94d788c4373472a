"""EMAE vs MAE at equal wall-clock on CIFAR-10, ViT-T/4@32: linear probe and k-NN against minutes of
pretraining. Writes a markdown table, a PNG plot and a JSON of every point.

    python benchmarks/emae_vs_mae.py --minutes 10 --points 2 [--data ../shared/data/cifar10.npz]

Each method pretrains for the same wall-clock budget on this machine (`train.max_minutes`), saving a
checkpoint at every step so that the encoder at each fraction of the budget can be evaluated (the
checkpoint whose logged time is closest below it). Both use the recipe files unchanged
(configs/mae_vit_tiny_cifar10.yaml, configs/emae_vit_tiny_cifar10.yaml), so the cosine schedule is that
of the recipe's epochs and is cut by the budget identically for both. Evaluation: k-NN (k 20, T 0.07) and
the cached-feature linear probe (AdamW, best block), on seeded subsets of the train and test splits.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from mimkit.checkpoint import list_checkpoints
from mimkit.eval import evaluate
from mimkit.train import run as pretrain_run

ROOT = Path(__file__).resolve().parent.parent


def pretrain(method: str, args: argparse.Namespace, out: Path) -> list[tuple[float, Path]]:
    """Pretrain for the budget; return (minutes since start, checkpoint) for every checkpoint kept."""
    pretrain_run(
        str(ROOT / "configs" / f"{method}_vit_tiny_cifar10.yaml"),
        [f"data.path={args.data}", f"train.out_dir={out}", f"train.max_minutes={args.minutes}",
         "train.save_every_steps=10", "train.keep_last=1000", "train.log_every=10", "train.progress=false",
         "train.resume=none", "train.precision=auto", "train.tensorboard=false"],
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    start = records[0]["time"] - records[0]["step"] * (records[1]["time"] - records[0]["time"]) / max(
        records[1]["step"] - records[0]["step"], 1
    )
    times = {r["step"]: (r["time"] - start) / 60 for r in records}
    return [(times[int(p.stem.split("-")[1])], p) for p in list_checkpoints(out) if int(p.stem.split("-")[1]) in times]


def evaluate_encoder(checkpoint: str, args: argparse.Namespace, out: Path) -> dict:
    common = [f"data.path={args.data}", f"data.train_samples={args.train_samples}",
              f"data.val_samples={args.val_samples}", f"encoder.checkpoint={checkpoint}", "encoder.arch=vit_tiny_patch4_32"]  # fmt: skip
    knn = evaluate("knn", str(ROOT / "configs/eval/knn_vit_tiny_cifar10.yaml"), common + [f"run.out_dir={out}/knn"])
    probe = evaluate("linprobe", str(ROOT / "configs/eval/linprobe_vit_tiny_cifar10.yaml"),
                     common + [f"train.out_dir={out}/linprobe", "train.epochs=60", "train.log_every=1000"])  # fmt: skip
    return {"knn": knn.metrics, "linprobe": probe.metrics}


def top1(metrics: dict) -> float:
    for key in ("best_top1", "top1", "knn_top1", "val_top1"):
        if key in metrics:
            return float(metrics[key])
    raise KeyError(f"no top-1 in {sorted(metrics)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10.npz"))
    parser.add_argument("--minutes", type=float, default=10.0, help="pretraining budget per method")
    parser.add_argument("--points", type=int, default=2, help="evaluations per method (at i/points of the budget)")
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--val-samples", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "runs/emae_vs_mae"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = [{"method": "random init", "minutes": 0.0, **evaluate_encoder("none", args, out / "random")}]
    for method in ("mae", "emae"):
        t0 = time.time()
        ckpts = pretrain(method, args, out / method)
        print(f"{method}: pretrained {args.minutes} min ({time.time() - t0:.0f} s with setup), {len(ckpts)} checkpoints")
        for i in range(1, args.points + 1):
            target = args.minutes * i / args.points
            minutes, ckpt = max((c for c in ckpts if c[0] <= target + 1e-6), key=lambda c: c[0], default=ckpts[0])
            rows.append({"method": method.upper(), "minutes": round(minutes, 2), "checkpoint": str(ckpt),
                         **evaluate_encoder(str(ckpt), args, out / f"{method}-{i}")})  # fmt: skip
    (out / "results.json").write_text(json.dumps(rows, indent=2))

    lines = [f"# {platform.processor() or platform.machine()}, 2 cores | budget {args.minutes} min per method | "
             f"k-NN / linear probe on {args.train_samples} train / {args.val_samples} test images | {time.strftime('%Y-%m-%d')}",
             "", "| encoder | pretraining minutes | k-NN top-1 | linear probe top-1, last block | best block: top-1 |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lp = r["linprobe"]
        lines.append(f"| {r['method']} | {r['minutes']:.1f} | {top1(r['knn']):.1f}% | {lp['top1']:.1f}% | "
                     f"{lp.get('best_block', '-')}: {top1(lp):.1f}% |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    base = rows[0]
    for method in ("MAE", "EMAE"):
        pts = [base] + [r for r in rows if r["method"] == method]
        for ax, key in zip(axes, ("knn", "linprobe")):
            ax.plot([p["minutes"] for p in pts], [top1(p[key]) for p in pts], marker="o", label=method)
    for ax, title in zip(axes, ("k-NN top-1 (%)", "linear probe top-1 (%)")):
        ax.set_xlabel("pretraining wall-clock (min)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "emae_vs_mae.png", dpi=120)
    print(f"wrote {out / 'results.md'}, {out / 'emae_vs_mae.png'}")


if __name__ == "__main__":
    main()
