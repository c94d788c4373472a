"""How far apart two pretrainings of one run spec are: per-step losses (first differing step, largest difference,
final losses) from each study folder's runs/<run>/pretrain/metrics.jsonl, and the scores of the checkpoints both
folders evaluated (evals/<run>/step-N.json). Every folder after the first is compared with the first.

    python benchmarks/study_same_run.py 'bootmae+parallel_optim.blr=1.5e-3' \
        results/study/lost-bootmae+parallel-1thread results/study/lost-bootmae+parallel-2thread \
        results/study/cifar10-main
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def losses(metrics: Path) -> dict[int, float]:
    """step -> loss; a step run again after a resume replaces the earlier record."""
    steps = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps[record["step"]] = record["loss"]
    return steps


def scores(evals: Path) -> dict[int, tuple[float, float, float]]:
    """step -> (probe, k-NN, best-block probe) top-1, % of the checkpoints scored in a folder."""
    found = {}
    for path in sorted(evals.glob("step-*.json")):
        probe = json.loads(path.read_text())["linprobe"]
        found[int(path.stem.split("-")[1])] = (probe["top1"], probe["knn_top1"], probe["best_top1"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run's folder name under runs/ and evals/")
    parser.add_argument("studies", type=Path, nargs="+", help="compare.py --out folders holding that run")
    args = parser.parse_args()
    first = args.studies[0]
    base, base_scores = (
        losses(first / "runs" / args.run / "pretrain" / "metrics.jsonl"),
        scores(first / "evals" / args.run),
    )
    print(f"reference: {first} ({len(base)} steps, final loss {base[max(base)]!r})")
    for other in args.studies[1:]:
        steps = losses(other / "runs" / args.run / "pretrain" / "metrics.jsonl")
        common = sorted(set(base) & set(steps))
        differ = [s for s in common if base[s] != steps[s]]
        largest = max((abs(base[s] - steps[s]) for s in common), default=0.0)
        print(
            f"\n{other}: {len(steps)} steps, final loss {steps[max(steps)]!r}; of {len(common)} common steps "
            f"{len(differ)} differ"
            + (
                f", first at step {differ[0]} (by {abs(base[differ[0]] - steps[differ[0]]):.2e}), largest {largest:.2e}"
                if differ
                else ""
            )
        )
        theirs = scores(other / "evals" / args.run)
        for step in sorted(set(base_scores) & set(theirs)):
            print(
                f"  step {step}: probe / k-NN / best block {' / '.join(map(str, base_scores[step]))} vs "
                f"{' / '.join(map(str, theirs[step]))}"
            )


if __name__ == "__main__":
    main()
