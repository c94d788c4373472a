"""Evaluation commands under torch.distributed (2 CPU processes, gloo) agree with one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from test_eval import TINY_ENCODER, eval_cfg, labelled_npz  # noqa: F401  (fixtures)

from mimkit.checkpoint import load_checkpoint
from mimkit.eval import finetune as ft
from mimkit.eval.knn import run_knn


def torchrun(command: str, overrides: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "mimkit.cli", command, *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def common(labelled_npz, out, section: str = "train") -> list[str]:
    return TINY_ENCODER + [
        f"data.path={labelled_npz}", "data.num_workers=0", f"{section}.precision=fp32", f"{section}.progress=false",
        f"{section}.tensorboard=false", f"{section}.batch_size=4", f"{section}.out_dir={out}",
    ]  # fmt: skip


def test_two_processes_fine_tune_like_one_with_double_batch(eval_cfg, tmp_path, labelled_npz):
    deterministic = ["model.drop_path_rate=0", "aug.mixup=0", "aug.cutmix=0", "train.max_steps=4"]
    single = ft.run_finetune(eval_cfg("finetune", *deterministic, "train.batch_size=8", out="single"))
    extra = ["train.epochs=2", "train.log_every=1", "optim.warmup_epochs=1"]
    proc = torchrun("finetune", common(labelled_npz, tmp_path / "ddp") + deterministic + extra)
    assert "effective batch 8 (4 x 2 x accum 1)" in proc.stderr
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["top1"] == single.metrics["top1"] and ddp["val_images"] == 32  # sharded evaluation, summed counts
    a, b = (
        load_checkpoint(single.checkpoint)["model"],
        load_checkpoint(tmp_path / "ddp" / "checkpoint-00000004.pt")["model"],
    )
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_processes_extract_the_same_features(eval_cfg, tmp_path, labelled_npz):
    single = run_knn(eval_cfg("knn", "knn.k=5", out="single"))
    torchrun("knn", common(labelled_npz, tmp_path / "ddp", "run") + ["knn.k=5"])
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["top1"] == single.metrics["top1"]
    for split in ("train", "val"):
        a = load_checkpoint(single.out_dir / f"features-{split}.pt")
        b = load_checkpoint(tmp_path / "ddp" / f"features-{split}.pt")
        assert torch.equal(a["labels"], b["labels"])  # shards put back in order
        torch.testing.assert_close(b["features"], a["features"], rtol=1e-5, atol=1e-5)
