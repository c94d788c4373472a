"""Kill a pretraining run with SIGKILL at random moments (checkpoint writes included), resume each time:
the final parameters equal an uninterrupted run's bit for bit, and every checkpoint left is readable."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import TINY_MODEL

from mimkit.checkpoint import list_checkpoints, load_checkpoint
from mimkit.train import pretrain


def test_sigkill_and_resume_loses_nothing(tmp_path, npz_data, tiny_cfg, one_thread):
    # one thread here and in the killed processes: the same kernels' reductions, whatever an earlier test left set
    steps = 16
    reference = pretrain(tiny_cfg(f"train.max_steps={steps}", "train.save_every_steps=1", "model.drop_path_rate=0.1",
                                  out="reference"))  # fmt: skip

    out = tmp_path / "killed"
    overrides = TINY_MODEL + [
        f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=8", "train.epochs=2",
        f"train.max_steps={steps}", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "train.log_every=1", "optim.blr=1e-3", "optim.warmup_epochs=1", "train.save_every_steps=1",
        f"train.out_dir={out}", "model.drop_path_rate=0.1",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "mimkit.cli", "pretrain", *overrides]
    rng = random.Random(0)
    kills, runs = 0, 0
    while runs < 20:
        runs += 1
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        if kills < 3:
            # kill a few steps after this run's first new checkpoint, at a random moment (often mid-write);
            # the target is counted in steps, not seconds, so a fast machine cannot finish the run first
            target = newest_step(out) + rng.randint(1, 3)
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline and newest_step(out) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.02))
            assert proc.poll() is None, "the run ended before it could be killed"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            for ckpt in list_checkpoints(out):  # nothing half-written is ever visible
                load_checkpoint(ckpt)
            continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        break
    assert kills == 3
    final = load_checkpoint(list_checkpoints(out)[-1])
    ref = load_checkpoint(reference.checkpoint)
    assert final["step"] == steps
    for k, v in ref["model"].items():
        assert torch.equal(final["model"][k], v), k
    assert all(torch.equal(final["rng"][0][k], ref["rng"][0][k]) for k in ("torch",))
    # every metrics line is valid JSON (a torn line from a kill is dropped on resume)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in records if r.get("event") == "resume") >= 3
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))  # one record per step
    assert not list(out.glob(".checkpoint-*.tmp"))  # temporaries of killed writes are cleaned up on resume


def newest_step(out) -> int:
    ckpts = list_checkpoints(out)
    return int(ckpts[-1].stem.split("-")[1]) if ckpts else 0


def test_loader_workers_die_with_a_killed_run(tmp_path, npz_data):
    """A SIGKILLed run leaves no DataLoader worker behind (torch's own watchdog takes seconds)."""
    overrides = TINY_MODEL + [
        f"data.path={npz_data}", "data.num_workers=2", "train.batch_size=8", "train.epochs=50",
        "train.precision=fp32", "train.progress=false", "train.tensorboard=false", f"train.out_dir={tmp_path / 'o'}",
    ]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "mimkit.cli", "pretrain", *overrides], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    workers = []
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = children(proc.pid)
        time.sleep(0.05)
    assert len(workers) == 2, "the run did not start its workers"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    while time.time() - killed_at < 1 and any(alive(w) for w in workers):
        time.sleep(0.01)
    assert not any(alive(w) for w in workers), "a DataLoader worker outlived its killed parent by 1 s"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError):
                continue
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
