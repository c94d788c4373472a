"""DDP on CPU (gloo): 2 processes x batch B must train like 1 process x batch 2B."""

import os
import socket
import subprocess
import sys

import torch
from conftest import TINY_MODEL

from mimkit.checkpoint import load_checkpoint
from mimkit.train import pretrain


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_double_batch(tmp_path, npz_data, tiny_cfg):
    steps = 6
    single = pretrain(tiny_cfg("train.batch_size=8", f"train.max_steps={steps}", out="single"))

    overrides = TINY_MODEL + [
        f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=4", "train.epochs=2",
        f"train.max_steps={steps}", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
        "optim.blr=1e-3", "optim.warmup_epochs=1", f"train.out_dir={tmp_path / 'ddp'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "mimkit.cli", "pretrain", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr and "effective batch 8 (4 x 2 x accum 1)" in proc.stderr

    ddp = load_checkpoint(tmp_path / "ddp" / f"checkpoint-{steps:08d}.pt")
    ref = load_checkpoint(single.checkpoint)
    assert len(ddp["rng"]) == 2  # every rank's RNG state is kept
    for k, v in ref["model"].items():
        got = ddp["model"][k]
        if k.endswith("attn.qkv.bias"):
            # the key bias has an exactly-zero true gradient (softmax is shift-invariant per query), so Adam
            # amplifies rounding noise into lr-sized steps of random sign: compare q and v biases only
            dim = v.shape[0] // 3
            v, got = torch.cat([v[:dim], v[2 * dim :]]), torch.cat([got[:dim], got[2 * dim :]])
        torch.testing.assert_close(got, v, rtol=1e-4, atol=2e-6, msg=k)


def torchrun(overrides, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "mimkit.cli", "pretrain", *overrides]  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def ddp_overrides(npz_data, out, *extra):
    return TINY_MODEL + [
        f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=4", "train.epochs=2",
        "train.precision=fp32", "train.progress=false", "train.tensorboard=false", "optim.blr=1e-3",
        "optim.warmup_epochs=1", f"train.out_dir={out}", *extra,
    ]  # fmt: skip


def worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (read from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            found[int(env[b"RANK"])] = int(entry)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return found


def test_a_dying_rank_ends_all_ranks_without_hanging(tmp_path, npz_data):
    import signal
    import time

    out = tmp_path / "dying"
    proc = torchrun(ddp_overrides(npz_data, out, "train.epochs=500", "train.save_every_steps=2"))
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("checkpoint-*.pt")):
        time.sleep(0.1)
    pids = worker_pids(proc.pid)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    start = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - start < 60  # torchrun tears the survivors down; nothing waits for the 30-min timeout
    assert "Signal 9" in err or "SIGKILL" in err or "exitcode" in err
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    load_checkpoint(sorted(out.glob("checkpoint-*.pt"))[-1])  # the last checkpoint is readable


def test_resume_on_another_world_size(tmp_path, npz_data, tiny_cfg):
    """2 processes x 4 for 5 steps, then 1 process x 8 to step 10: matches 1 x 8 for 10 steps."""
    proc = torchrun(ddp_overrides(npz_data, tmp_path / "switch", "train.max_steps=5"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    resumed = pretrain(tiny_cfg("train.batch_size=8", "train.max_steps=10", out="switch"))
    straight = pretrain(tiny_cfg("train.batch_size=8", "train.max_steps=10", out="straight"))
    assert resumed.step == 10
    a, b = load_checkpoint(resumed.checkpoint)["model"], load_checkpoint(straight.checkpoint)["model"]
    for k, v in b.items():
        got = a[k]
        if k.endswith("attn.qkv.bias"):  # see above: the key bias only carries rounding noise
            dim = v.shape[0] // 3
            v, got = torch.cat([v[:dim], v[2 * dim :]]), torch.cat([got[:dim], got[2 * dim :]])
        torch.testing.assert_close(got, v, rtol=1e-4, atol=5e-6, msg=k)


def test_dry_run_on_every_rank(tmp_path, npz_data):
    proc = torchrun(ddp_overrides(npz_data, tmp_path / "dry", "distributed.strategy=fsdp") + ["--dry-run"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "dry run OK: 1 step on 2 process(es)" in out
    assert not (tmp_path / "dry" / "dry-run").exists()
