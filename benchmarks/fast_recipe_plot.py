"""The fast recipe's probe curve against MAE's 3 epochs and CrossMAE's decoder at equal compute, from the study
folders' compare.json (results/study/cifar10-main, cifar10-fast): results/study/cifar10-fast/fast_recipe.png and
its copy in docs/assets (docs/results/study.md shows it).
Run from the repository root: python benchmarks/fast_recipe_plot.py"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STUDY = Path("results/study")
CURVES = [  # (folder, run name, label)
    ("cifar10-main", "mae:optim.blr=3e-3", "MAE, 3 epochs (fp32)"),
    ("cifar10-fast", "mae:optim.blr=3e-3,mae.decoder_depth=1,train.max_steps=1150",
     "fast recipe: one-block decoder, stopped at 1,150 steps (fp32)"),
    ("cifar10-fast", "mae:optim.blr=3e-3,mae.decoder_depth=1,train.max_steps=1150,train.precision=auto",
     "fast recipe in bf16 (auto)"),
    ("cifar10-fast", "mae+crossmae:optim.blr=1.5e-3,optim.warmup_epochs=0.125,train.schedule_steps=977",
     "CrossMAE decoder, 977-step schedule (fp32)"),
    ("cifar10-fast", "mae:optim.blr=3e-3,optim.warmup_epochs=0.1,train.schedule_steps=760",
     "MAE, 760-step schedule (fp32)"),
]  # fmt: skip


def main() -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    curves = []
    for folder, name, label in CURVES:
        runs = {r["name"]: r for r in json.loads((STUDY / folder / "compare.json").read_text())["runs"]}
        curves.append([(c["core_minutes"], 100 * c["probe_top1"]) for c in runs[name]["checkpoints"]])
        ax.plot(*zip(*curves[-1]), marker="o", label=label)
    mae_end = curves[0][-1][1]  # the target: MAE's probe after its 3 epochs
    ax.axhline(mae_end, color="gray", linestyle="--", linewidth=1, label=f"MAE's 3-epoch probe ({mae_end:.1f}%)")
    # MAE's 3 epochs re-timed in the same hour as the fast runs (results/study/fast.cmd): 33.3 core-minutes
    ax.axvline(33.3 / 3, color="gray", linestyle=":", linewidth=1, label="a third of MAE's 33.3 core-minutes")
    ax.set_xlabel("pretraining core-minutes (one AMD EPYC core)")
    ax.set_ylabel("linear probe top-1 (%), CIFAR-10 test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    for out in (STUDY / "cifar10-fast" / "fast_recipe.png", Path("docs/assets/fast_recipe.png")):
        fig.savefig(out, dpi=120)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
