"""FSDP2 on CPU (gloo, 2 processes): matches DDP; sharded checkpoints round-trip, also into 1 process."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_distributed import ddp_overrides, free_port

from mimkit.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mimkit.train import pretrain


def run_torchrun(overrides, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "mimkit.cli", "pretrain", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_close_models(a, b, atol=2e-6):
    for k, v in b.items():
        got = a[k]
        if k.endswith("attn.qkv.bias"):  # the key bias has a zero true gradient: only rounding noise
            dim = v.shape[0] // 3
            v, got = torch.cat([v[:dim], v[2 * dim :]]), torch.cat([got[:dim], got[2 * dim :]])
        torch.testing.assert_close(got, v, rtol=1e-4, atol=atol, msg=k)


def test_fsdp_matches_ddp_and_its_sharded_checkpoint_round_trips(tmp_path, npz_data, tiny_cfg):
    ddp = tmp_path / "ddp"
    fsdp = tmp_path / "fsdp"
    run_torchrun(ddp_overrides(npz_data, ddp, "train.max_steps=4"))
    run_torchrun(
        ddp_overrides(npz_data, fsdp, "train.max_steps=4", "distributed.strategy=fsdp", "train.save_every_steps=2")
    )
    sharded = list_checkpoints(fsdp)
    assert [p.name for p in sharded] == ["checkpoint-00000002", "checkpoint-00000004"]
    assert sharded[-1].is_dir() and (sharded[-1] / ".metadata").is_file() and (sharded[-1] / "meta.pt").is_file()
    assert len(list(sharded[-1].glob("*.distcp"))) == 2  # one shard file per rank
    full_fsdp, full_ddp = load_checkpoint(sharded[-1]), load_checkpoint(list_checkpoints(ddp)[-1])
    assert full_fsdp["step"] == 4 and len(full_fsdp["rng"]) == 2
    assert_close_models(full_fsdp["model"], full_ddp["model"])
    # optimizer state has the same layout (parameter names) under both strategies
    assert set(full_fsdp["optimizer"]["state"]) == set(full_ddp["optimizer"]["state"])

    # resume the sharded run in 2 processes (fsdp) and, separately, in 1 process from a copy
    run_torchrun(ddp_overrides(npz_data, fsdp, "train.max_steps=6", "distributed.strategy=fsdp"))
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    shutil.copytree(fsdp / "checkpoint-00000004", single_dir / "checkpoint-00000004")
    one = pretrain(tiny_cfg("train.batch_size=8", "train.max_steps=6", out="single"))
    run_torchrun(ddp_overrides(npz_data, ddp, "train.max_steps=6"))
    reference = load_checkpoint(list_checkpoints(ddp)[-1])["model"]
    assert_close_models(load_checkpoint(list_checkpoints(fsdp)[-1])["model"], reference)
    assert_close_models(load_checkpoint(one.checkpoint)["model"], reference, atol=5e-6)


def test_consolidated_copy_of_a_sharded_checkpoint_is_a_normal_checkpoint(tmp_path, npz_data):
    out = tmp_path / "fsdp"
    proc = run_torchrun(ddp_overrides(npz_data, out, "train.max_steps=2", "distributed.strategy=fsdp"))
    assert "returned a view tensor" not in proc.stderr  # the methods return no views of their outputs (issue 17)
    full = load_checkpoint(list_checkpoints(out)[-1])
    path = save_checkpoint(tmp_path / "single.pt", full)
    again = torch.load(path, weights_only=True)
    assert again["step"] == 2 and set(again["model"]) == set(full["model"])


def test_crafted_dcp_metadata_is_refused(tmp_path):
    import pickle

    from mimkit.checkpoint import CheckpointError, read_dcp_metadata

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "checkpoint-00000001"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(Exploit()))
    torch.save({"step": 1}, folder / "meta.pt")  # a genuine-looking meta.pt beside it
    with pytest.raises(CheckpointError, match="refus.*posix.system"):
        read_dcp_metadata(folder)
    with pytest.raises(CheckpointError, match="refus"):
        load_checkpoint(folder)
    assert not marker.exists()


def test_activation_checkpointing_gives_the_same_training(tiny_cfg):
    plain = pretrain(tiny_cfg("train.max_steps=3", out="plain"))
    ac = pretrain(tiny_cfg("train.max_steps=3", "distributed.activation_checkpointing=true", out="ac"))
    a, b = load_checkpoint(plain.checkpoint)["model"], load_checkpoint(ac.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
