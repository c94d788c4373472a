"""Median pretraining step time of each run of a study folder, overall and per checkpoint interval, from the runs'
metrics.jsonl (compare_helpers.step_clock: the clock compare.py's core-minutes come from; core-minutes multiply it
by the run's pretraining threads, from its compare-run.json). A contended stretch shows as an interval slower than
the others.

    python benchmarks/study_step_times.py results/study/cifar10-main [--every 390]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_helpers import step_clock  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a compare.py --out folder")
    parser.add_argument("--every", type=int, default=390, help="steps per interval (default: 390)")
    args = parser.parse_args()
    print("| run | threads | steps | core-min | median s/step | median s/step per interval |")
    print("|---|---:|---:|---:|---:|---|")
    for metrics in sorted(args.study.glob("runs/*/pretrain/metrics.jsonl")):
        clock = step_clock(metrics)
        steps = sorted(clock)
        if len(steps) < 2:
            continue
        gaps = [clock[b][1] - clock[a][1] for a, b in zip(steps, steps[1:])]
        windows = [statistics.median(gaps[i : i + args.every]) for i in range(0, len(gaps), args.every)]
        run = metrics.parent.parent  # STUDY/runs/<run>/pretrain/metrics.jsonl
        record = run / "compare-run.json"
        threads = json.loads(record.read_text())["settings"]["threads"] if record.is_file() else 1
        print(
            f"| {run.name} | {threads} | {len(steps)} | {clock[steps[-1]][1] / 60 * threads:.1f} | "
            f"{statistics.median(gaps):.3f} | {' '.join(f'{w:.2f}' for w in windows)} |"
        )


if __name__ == "__main__":
    main()
