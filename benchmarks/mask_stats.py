"""Statistics of BEiT-style block masks: mimkit's `beit` generator (BEiT's own) and its `exact` variant (BootMAE's
own: each round draws until a block fits), against the figures measured on the official BEiT generator (14x14
patches, 75 targeted, 2,000 masks). BootMAE's block part (120 in blocks of <= 60) is checked against an independent
implementation of its generator in tests/test_masking.py.

    python benchmarks/mask_stats.py [--masks 20000]

Prints, per generator: mean masked count, share of masks short of the target, 4-connected components per mask
and cells per component (each with its standard error). tests/test_masking.py uses the same statistics.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from scipy import ndimage

from mimkit.masking import beit_block_mask, block_mask

TARGET = 75
# the official generator's figures (issue 16), rounded as published: (value, half a unit of the last digit)
OFFICIAL = {"count": (74.5, 0.05), "short": (0.31, 0.005), "components": (1.44, 0.005), "size": (52.0, 0.5)}
OFFICIAL_MASKS = 2000


def block_mask_statistics(masks: np.ndarray) -> dict[str, tuple[float, float]]:
    """(estimate, standard deviation of one mask's contribution) per statistic; the ratio estimator's by the delta
    method, so estimate +- sd / sqrt(n) is its sampling error."""
    counts = masks.reshape(len(masks), -1).sum(1).astype(float)
    comps = np.array([ndimage.label(m)[1] for m in masks], dtype=float)  # 4-connectivity (scipy's default)
    short = (counts < TARGET).astype(float)
    size = counts.sum() / comps.sum()
    return {
        "count": (counts.mean(), counts.std()),
        "short": (short.mean(), short.std()),
        "components": (comps.mean(), comps.std()),
        "size": (size, (counts - size * comps).std() / comps.mean()),
    }


def masks_of(generator, n: int) -> np.ndarray:
    return np.stack([generator((14, 14), TARGET, generator=torch.Generator().manual_seed(s)).numpy() for s in range(n)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=int, default=20000)
    n = parser.parse_args().masks
    print(f"14x14 patches, {TARGET} targeted, {n} masks per generator (± one standard error)\n")
    print("| generator | mean count | share short | components per mask | cells per component |")
    print("|---|---:|---:|---:|---:|")
    print("| official (issue 16, 2,000 masks) | 74.5 | 31% | 1.44 | ~52 |")
    for name, gen in (("mimkit beit", beit_block_mask), ("mimkit exact (BootMAE's generator)", block_mask)):
        s = {k: (v, sd / math.sqrt(n)) for k, (v, sd) in block_mask_statistics(masks_of(gen, n)).items()}
        print(f"| {name} | {s['count'][0]:.2f} ± {s['count'][1]:.2f} | {100 * s['short'][0]:.1f}% ± "
              f"{100 * s['short'][1]:.1f} | {s['components'][0]:.3f} ± {s['components'][1]:.3f} | "
              f"{s['size'][0]:.1f} ± {s['size'][1]:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
