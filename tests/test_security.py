"""No command and no Python entry point runs code from a crafted checkpoint: a sharded (DCP) folder whose
optimizer param_groups hold an object with a `__reduce__` (DCP stores such entries as pickled bytes), or
whose meta.pt does. Every reader refuses it with one line naming the file, and the payload never runs."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mimkit
from mimkit.checkpoint import CheckpointError, load_checkpoint, save_sharded
from mimkit.cli import main
from mimkit.interop import InteropError, load_mimkit_checkpoint
from mimkit.train import pretrain

from conftest import TINY_MODEL, make_images
from test_distributed import free_port


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A real 2-step run (its checkpoint file and config), made once for the module."""
    root = tmp_path_factory.mktemp("genuine")
    data = root / "tiny.npz"
    np.savez(data, x_train=make_images(32), y_train=np.arange(32) % 4, x_test=make_images(8, seed=1), y_test=np.arange(8) % 4)
    from mimkit.config import load_config

    cfg = load_config(None, TINY_MODEL + [f"data.path={data}", "data.num_workers=0", "train.batch_size=8",
                                          "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                                          "train.max_steps=2", f"train.out_dir={root / 'run'}"])  # fmt: skip
    result = pretrain(cfg)
    return {"checkpoint": result.checkpoint, "data": data, "root": root}


def crafted_folder(genuine, where, marker, poison: str):
    """checkpoint-00000002/ written by DCP next to a meta.pt, with the payload in `poison` (optimizer | meta)."""
    state = load_checkpoint(genuine["checkpoint"])
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    optim = state["optimizer"]
    if poison == "optimizer":
        optim["param_groups"][0]["lr"] = Payload(marker)
    folder = where / "checkpoint-00000002"
    save_sharded(folder, state["model"], optim, meta, is_main=True)
    if poison == "meta":
        torch.save({**meta, "step": Payload(marker)}, folder / "meta.pt")
    shutil.copy(genuine["checkpoint"].parent / "config.yaml", where / "config.yaml")
    return folder


@pytest.fixture(params=["optimizer", "meta"])
def crafted(request, genuine, tmp_path):
    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    run.mkdir()
    folder = crafted_folder(genuine, run, marker, request.param)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(image)
    return {"folder": folder, "run": run, "marker": marker, "image": image, "data": genuine["data"], "tmp": tmp_path}


def cli_commands(c):
    common = [f"data.path={c['data']}", "data.num_workers=0", "train.progress=false", "train.tensorboard=false",
              "train.precision=fp32"]  # fmt: skip
    f, t = str(c["folder"]), c["tmp"]
    pre = ["pretrain", *common, *TINY_MODEL, "train.batch_size=8", "train.max_steps=4"]
    return {
        "export timm": ["export", f, "--to", "timm", str(t / "timm")],
        "export hf": ["export", f, "--to", "hf", str(t / "hf")],
        "visualize": ["visualize", f, str(c["image"]), "--out", str(t / "vis")],
        "attention": ["attention", f, str(c["image"]), "--out", str(t / "att.png")],
        "pretrain resume auto": [*pre, f"train.out_dir={c['run']}"],
        "pretrain resume path": [*pre, f"train.out_dir={t / 'other'}", f"train.resume={f}"],
        "knn": ["knn", f"encoder.checkpoint={f}", *[x.replace("train.", "run.") for x in common], f"run.out_dir={t / 'knn'}"],
        "linprobe": ["linprobe", f"encoder.checkpoint={f}", *common, f"train.out_dir={t / 'lp'}", "train.epochs=1"],
        "finetune": ["finetune", f"encoder.checkpoint={f}", *common, f"train.out_dir={t / 'ft'}", "train.max_steps=1"],
    }


def test_no_command_runs_code_from_a_crafted_sharded_checkpoint(crafted, capsys):
    for name, argv in cli_commands(crafted).items():
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, f"{name}: exit {code}"
        assert not crafted["marker"].exists(), f"{name} ran the payload"
        assert err and err[-1].startswith("mimkit: error: ") and "refused" in err[-1], f"{name}: {err[-3:]}"
        assert "checkpoint-00000002" in err[-1], f"{name}: the message names the folder"


def test_no_python_entry_point_runs_code_from_a_crafted_sharded_checkpoint(crafted):
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(crafted["folder"])
    with pytest.raises(InteropError, match="refused"):
        load_mimkit_checkpoint(crafted["folder"])
    with pytest.raises(CheckpointError, match="refused"):
        mimkit.run(None, [*TINY_MODEL, f"data.path={crafted['data']}", "data.num_workers=0", "train.progress=false",
                          "train.tensorboard=false", "train.batch_size=8", f"train.out_dir={crafted['run']}"])
    assert not crafted["marker"].exists()


def test_the_crafted_folder_would_run_code_if_read_as_dcp_reads_it(genuine, tmp_path):
    """The payload is live: torch's own converter (plain torch.load on DCP's byte entries) runs it."""
    marker = tmp_path / "code-ran"
    folder = crafted_folder(genuine, tmp_path, marker, "optimizer")
    code = ("import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save as f; "
            "f(sys.argv[1], sys.argv[2])")  # fmt: skip
    subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "out.pt")], capture_output=True, timeout=120)
    assert marker.exists()


def test_resume_under_torchrun_refuses_the_crafted_folder_on_every_rank(genuine, tmp_path):
    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    run.mkdir()
    crafted_folder(genuine, run, marker, "optimizer")
    argv = TINY_MODEL + [f"data.path={genuine['data']}", "data.num_workers=0", "train.batch_size=4",
                         "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                         "train.max_steps=4", "distributed.strategy=fsdp", f"train.out_dir={run}"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "mimkit.cli", "pretrain", *argv]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert not marker.exists()
    assert proc.stderr.count("mimkit: error: ") == 2 and "refused" in proc.stderr  # each rank, one line
