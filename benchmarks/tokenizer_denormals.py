"""Why `mimkit tokenizer train` flushes subnormal floats: one dVAE training step (CIFAR recipe: 512 codes, batch 128,
32 px) timed at three Gumbel temperatures with torch.set_flush_denormal off and on, interleaved, median of N.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/tokenizer_denormals.py --steps 5

The model is first trained briefly at the lowest temperature, so its logits are as confident as late in a run (where
the softmax underflows most). Timings are ratios within one run; the CPU is printed with them."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from compare_helpers import machine  # benchmarks/, on sys.path when run as a script

from mimkit.tokenizers import DVAE, DVAESpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per (temperature, flush) cell")
    ap.add_argument("--prime", type=int, default=40, help="steps at the lowest temperature before timing")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = DVAE(DVAESpec())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(128, 3, 32, 32) * 2 - 1

    def step(tau: float) -> float:
        t = time.perf_counter()
        loss, *_ = model.loss(x, tau, 1e-3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    for _ in range(args.prime):
        step(0.0625)
    taus, cells = (1.0, 0.25, 0.0625), {}
    for _ in range(args.steps):  # interleaved: drift of the machine hits every cell alike
        for tau in taus:
            for flush in (False, True):
                torch.set_flush_denormal(flush)
                cells.setdefault((tau, flush), []).append(step(tau))
    torch.set_flush_denormal(False)
    m = machine()
    print(f"CPU: {m['cpu']} ({m.get('cpu_flags', '')}); torch {m['torch']}, {m['torch_threads']} thread(s)")
    print("\n| Gumbel tau | s/step, subnormals kept | s/step, flushed | kept / flushed |\n|---:|---:|---:|---:|")
    for tau in taus:
        kept, flushed = (statistics.median(cells[(tau, f)]) for f in (False, True))
        print(f"| {tau:g} | {kept:.3f} | {flushed:.3f} | {kept / flushed:.2f}x |")


if __name__ == "__main__":
    main()
