"""Kill a pretraining run with SIGKILL R times, at random moments and in the middle of checkpoint writes,
resume it each time, and compare its final state with an uninterrupted run's, bit for bit: parameters,
optimizer state and the saved RNG states (stochastic depth is on, so a shifted RNG stream would show).
Then fill a small tmpfs during a checkpoint write: the run must stop with one clear line and leave the
previous checkpoint loadable.

    python benchmarks/fault_injection.py --kills 20 [--steps 60] [--seed 0] [--drop-path 0.1] [--no-full-disk]

Prints one line per kill (when, what was on disk, whether every checkpoint was readable, how long the
killed run's DataLoader workers outlived it) and a summary table. Exit code 0 only if nothing was lost:
final state identical, no checkpoint unreadable, one metrics record per step, and the full-disk run ended
as described. The full-disk part mounts a tmpfs and needs root (it says so and fails otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mimkit.checkpoint import list_checkpoints, load_checkpoint


def overrides(data: Path, out: Path, steps: int, drop_path: float) -> list[str]:
    # ViT-Tiny/4 at 32 px with batch 16: steps take ~0.1-0.3 s and a checkpoint (~70 MB with AdamW state)
    # takes a comparable time to write, so random kills land in both.
    return [
        "model.arch=vit_tiny_patch4_32", "mae.decoder_dim=128", "mae.decoder_depth=2", "mae.decoder_heads=4",
        f"data.path={data}", "data.num_workers=1", "train.batch_size=16", "train.epochs=10",
        f"train.max_steps={steps}", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "train.save_every_steps=3", "train.keep_last=2", "train.log_every=1", "optim.blr=1e-3",
        "optim.warmup_epochs=1", f"train.out_dir={out}", f"model.drop_path_rate={drop_path}",
    ]  # fmt: skip


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (the run's DataLoader workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def outlived_by(pids: list[int], limit: float = 30.0) -> float:
    """Seconds until every pid has exited (or limit)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive:
            break
        time.sleep(0.01)
    return time.perf_counter() - start


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def same_state(a: dict, b: dict) -> bool:
    """Model, optimizer state and every RNG state equal, bit for bit."""
    if a["step"] != b["step"] or a["model"].keys() != b["model"].keys():
        return False
    model = all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
    optim = all(torch.equal(x, b["optimizer"]["state"][name][k]) for name, st in a["optimizer"]["state"].items()
                for k, x in st.items())  # fmt: skip
    rng = all(torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]
              and torch.equal(ra["numpy"]["keys"], rb["numpy"]["keys"]) for ra, rb in zip(a["rng"], b["rng"]))  # fmt: skip
    return model and optim and rng


def one_record_per_step(out: Path) -> bool:
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return steps == list(range(1, len(steps) + 1))


def full_disk_run(data: Path, work: Path, steps: int, drop_path: float, checkpoint_bytes: int) -> tuple[bool, str]:
    """Run on a tmpfs with room for about 1.5 checkpoints: the second write fills it."""
    mount = work / "small-disk"
    mount.mkdir()
    size = int(checkpoint_bytes * 1.5) + (1 << 20)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        return False, f"could not mount a tmpfs (needs root): {done.stderr.strip()}"
    try:
        args = overrides(data, mount / "run", steps, drop_path) + ["train.save_every_steps=3", "train.keep_last=5"]
        proc = subprocess.run([sys.executable, "-m", "mimkit.cli", "pretrain", *args], capture_output=True, text=True)
        err = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        last = err[-1] if err else ""
        ckpts = list_checkpoints(mount / "run")
        readable = bool(ckpts)
        for ckpt in ckpts:
            try:
                load_checkpoint(ckpt)
            except Exception:
                readable = False
        ok = (proc.returncode == 2 and last.startswith("mimkit: error: ") and "No space left on device" in last
              and not any(x.startswith("Traceback") for x in err) and readable
              and not list((mount / "run").glob(".checkpoint-*")))  # fmt: skip
        return ok, f"exit {proc.returncode}; {len(ckpts)} checkpoint(s) left, readable: {readable}; last line: {last}"
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


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
    parser.add_argument("--drop-path", type=float, default=0.1, help="model.drop_path_rate (default 0.1)")
    parser.add_argument("--no-full-disk", action="store_true", help="skip the tmpfs full-disk run")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="mimkit-faults-"))
    data = work / "data.npz"
    images = np.random.default_rng(0).integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    np.savez(data, x_train=images)

    t0 = time.time()
    ref = launch(overrides(data, work / "reference", args.steps, args.drop_path))
    _, err = ref.communicate()
    if ref.returncode:
        print(err.decode()[-3000:])
        return 1
    print(f"uninterrupted run: {args.steps} steps in {time.time() - t0:.0f} s")

    out = work / "killed"
    kills, during_write, unreadable, launches, worst_orphan = 0, 0, 0, 0, 0.0
    while True:
        launches += 1
        proc = launch(overrides(data, out, args.steps, args.drop_path))
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
        workers = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        orphan_s = outlived_by(workers)
        worst_orphan = max(worst_orphan, orphan_s)
        kills += 1
        during_write += tmp_present
        ok, bad = all_readable(out)
        unreadable += bad
        print(f"kill {kills:2d} ({mode}): newest checkpoint step {newest_step(out)}, temp file present: "
              f"{tmp_present}, checkpoints readable {ok}/{ok + bad}, {len(workers)} worker(s) gone "
              f"{orphan_s:.2f} s after the kill")  # fmt: skip

    final = load_checkpoint(list_checkpoints(out)[-1])
    reference_ckpt = list_checkpoints(work / "reference")[-1]
    identical = same_state(final, load_checkpoint(reference_ckpt))
    per_step = one_record_per_step(out)
    disk_ok, disk_note = True, "skipped (--no-full-disk)"
    if not args.no_full_disk:
        disk_ok, disk_note = full_disk_run(data, work, args.steps, args.drop_path, reference_ckpt.stat().st_size)
    lost = 0 if identical and unreadable == 0 and per_step and disk_ok else 1
    print()
    print(f"drop path {args.drop_path}; full-disk run: {'OK' if disk_ok else 'FAILED'} ({disk_note})")
    print()
    print("| kills | of which mid-write | launches | unreadable checkpoints | final model + optimizer + RNG bit-identical "
          "| one metrics record per step | workers outlived the kill by (max) | full disk: clear error, previous "
          "checkpoint loadable | runs lost |")
    print("|---:|---:|---:|---:|---|---|---:|---|---:|")
    print(f"| {kills} | {during_write} | {launches} | {unreadable} | {identical} | {per_step} | {worst_orphan:.2f} s "
          f"| {disk_ok} | {lost} |")
    print(f"\ntotal {time.time() - t0:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return lost


if __name__ == "__main__":
    sys.exit(main())
