"""Kill a pretraining run with SIGKILL R times, at random moments and in the middle of checkpoint writes,
resume it each time, and compare its final parameters with an uninterrupted run's, bit for bit.

    python benchmarks/fault_injection.py --kills 10 [--steps 60] [--seed 0]

Prints one line per kill (when, what was on disk, whether every checkpoint was readable) and a summary
table. Exit code 0 only if nothing was lost: final parameters identical and no checkpoint unreadable.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mimkit.checkpoint import list_checkpoints, load_checkpoint


def overrides(data: Path, out: Path, steps: int) -> list[str]:
    # ViT-Tiny/4 at 32 px with batch 16: steps take ~0.1-0.3 s and a checkpoint (~70 MB with AdamW state)
    # takes a comparable time to write, so random kills land in both.
    return [
        "model.arch=vit_tiny_patch4_32", "mae.decoder_dim=128", "mae.decoder_depth=2", "mae.decoder_heads=4",
        f"data.path={data}", "data.num_workers=1", "train.batch_size=16", "train.epochs=10",
        f"train.max_steps={steps}", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "train.save_every_steps=3", "train.keep_last=2", "train.log_every=1", "optim.blr=1e-3",
        "optim.warmup_epochs=1", f"train.out_dir={out}",
    ]  # fmt: skip


def launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mimkit.cli", "pretrain", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def newest_step(out: Path) -> int:
    ckpts = list_checkpoints(out)
    return int(ckpts[-1].stem.split("-")[1]) if ckpts else 0


def all_readable(out: Path) -> tuple[int, int]:
    ok = bad = 0
    for ckpt in list_checkpoints(out):
        try:
            load_checkpoint(ckpt)
            ok += 1
        except Exception:
            bad += 1
    return ok, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="mimkit-faults-"))
    data = work / "data.npz"
    images = np.random.default_rng(0).integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    np.savez(data, x_train=images)

    t0 = time.time()
    ref = launch(overrides(data, work / "reference", args.steps))
    _, err = ref.communicate()
    if ref.returncode:
        print(err.decode()[-3000:])
        return 1
    print(f"uninterrupted run: {args.steps} steps in {time.time() - t0:.0f} s")

    out = work / "killed"
    kills, during_write, unreadable, launches = 0, 0, 0, 0
    while True:
        launches += 1
        proc = launch(overrides(data, out, args.steps))
        if kills >= args.kills:
            _, err = proc.communicate()
            if proc.returncode:
                print(err.decode()[-3000:])
                return 1
            break
        mode = "during checkpoint write" if kills % 2 else "random moment"
        start_step = newest_step(out)
        if mode == "random moment":
            # after the process is up and has made progress, at a random time
            while proc.poll() is None and newest_step(out) <= start_step:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5))
        else:
            # poll for the temporary file of an atomic write and kill while it exists
            while proc.poll() is None and not list(out.glob(".checkpoint-*.tmp")):
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 0.01))
        if proc.poll() is not None:  # finished before we could kill it: relaunch counts as nothing
            break
        tmp_present = bool(list(out.glob(".checkpoint-*.tmp")))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        during_write += tmp_present
        ok, bad = all_readable(out)
        unreadable += bad
        print(f"kill {kills:2d} ({mode}): newest checkpoint step {newest_step(out)}, temp file present: "
              f"{tmp_present}, checkpoints readable {ok}/{ok + bad}")  # fmt: skip

    final = load_checkpoint(list_checkpoints(out)[-1])
    reference = load_checkpoint(list_checkpoints(work / "reference")[-1])
    identical = final["step"] == reference["step"] and all(
        torch.equal(final["model"][k], v) for k, v in reference["model"].items()
    )
    lost = 0 if identical and unreadable == 0 else 1
    print()
    print("| kills | of which mid-write (temp file present) | launches | unreadable checkpoints | final params bit-identical | runs lost |")
    print("|---:|---:|---:|---:|---|---:|")
    print(f"| {kills} | {during_write} | {launches} | {unreadable} | {identical} | {lost} |")
    print(f"\ntotal {time.time() - t0:.0f} s; work dir {work}")
    return lost


if __name__ == "__main__":
    sys.exit(main())
