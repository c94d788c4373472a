"""Peak memory per rank of MAE pretraining steps: DDP vs FSDP2, with and without activation checkpointing.

    python benchmarks/memory.py [--arch vit_large_patch16_224] [--nproc 2] [--batch 2] [--steps 2]

Each configuration runs the real training loop (`mimkit pretrain`) under torchrun on generated 224-px
images and reports every rank's peak resident memory (CPU) or peak allocated memory (CUDA), plus
s/step. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mimkit.machine import cpu_flags, cpu_model


def worker(args: argparse.Namespace) -> None:
    """Runs inside each torchrun process: a few pretraining steps, then this rank's peak memory."""
    from mimkit.config import load_config
    from mimkit.train import pretrain

    cfg = load_config(None, args.overrides)
    start = time.perf_counter()
    result = pretrain(cfg)
    elapsed = time.perf_counter() - start
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rank = int(os.environ.get("RANK", 0))
    Path(args.report).with_suffix(f".rank{rank}.json").write_text(
        json.dumps({"rank": rank, "peak_mib": peak, "seconds": elapsed, "steps": result.step})
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_large_patch16_224")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="images per rank per step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    work = Path(tempfile.mkdtemp(prefix="mimkit-mem-"))
    data = work / "images.npz"
    n = args.batch * args.nproc * args.steps
    np.savez(data, x_train=np.random.default_rng(0).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8))
    print(f"# {cpu_model()} ({' '.join(cpu_flags())}) | torch {torch.__version__} | {args.arch} MAE "
          f"(decoder 512 x 8) | {args.nproc} processes x batch {args.batch} | {args.steps} steps | "
          f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
    print()
    print("| strategy | activation checkpointing | peak memory per rank (MiB) | s/step (incl. setup) |")
    print("|---|---|---|---:|")
    for strategy in ("ddp", "fsdp"):
        for ac in (False, True):
            report = work / f"{strategy}-{ac}"
            overrides = [
                f"model.arch={args.arch}", f"data.path={data}", "data.num_workers=0", f"train.batch_size={args.batch}",
                "train.epochs=1", f"train.max_steps={args.steps}", "train.progress=false", "train.tensorboard=false",
                f"train.out_dir={work / 'run' / report.name}", "train.save_every_epochs=1000",
                f"distributed.strategy={strategy}", f"distributed.activation_checkpointing={str(ac).lower()}",
            ]  # fmt: skip
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, "--worker",
                   "--report", str(report), *overrides]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                print(f"| {strategy} | {ac} | failed: {proc.stderr[-300:]!r} | |")
                continue
            ranks = [json.loads(report.with_suffix(f".rank{r}.json").read_text()) for r in range(args.nproc)]
            peaks = " / ".join(f"{r['peak_mib']:.0f}" for r in ranks)
            secs = max(r["seconds"] for r in ranks) / args.steps
            print(f"| {strategy} | {'on' if ac else 'off'} | {peaks} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
