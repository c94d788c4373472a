"""Each way a run can be pointed at something unusable ends in one line, `mimkit: error: ...`, naming the
file, key or value, with exit status 2 — never a traceback — and before any compute is spent."""

import errno
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import mimkit.checkpoint as checkpoint_module
from mimkit.checkpoint import list_checkpoints, load_checkpoint
from mimkit.cli import main

from conftest import TINY_MODEL


@pytest.fixture
def run_args(npz_data, tmp_path):
    def build(*extra, out="run"):
        return ["pretrain", *TINY_MODEL, f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=8",
                "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                f"train.out_dir={tmp_path / out}", *extra]  # fmt: skip

    return build


def one_error_line(capsys) -> str:
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert err and err[-1].startswith("mimkit: error: "), err[-5:]
    assert not any(x.startswith("Traceback") for x in err), err
    return err[-1]


@pytest.fixture
def finished(run_args, capsys):
    assert main(run_args("train.max_steps=2")) == 0
    capsys.readouterr()
    return list_checkpoints(run_args()[-1].split("=", 1)[1])[-1]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["truncated", "empty", "malicious", "other-method", "other-size", "not-a-run"])
def test_train_resume_on_an_unusable_checkpoint(run_args, finished, tmp_path, capsys, damage):
    bad = tmp_path / "given" / "checkpoint-00000002.pt"
    bad.parent.mkdir()
    state = load_checkpoint(finished)
    expected = {
        "truncated": "cannot read checkpoint (truncated",
        "empty": "the file is empty",
        "malicious": "refused",
        "other-method": "a 'emae' checkpoint cannot resume a 'mae' run",
        "other-size": "'encoder.cls_token' has shape [1, 1, 48]",
        "not-a-run": "not a mimkit pretraining checkpoint",
    }[damage]
    if damage == "truncated":
        bad.write_bytes(finished.read_bytes()[:5000])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "malicious":
        torch.save({**state, "extra": Payload(tmp_path / "code-ran")}, bad)
    elif damage == "other-method":
        torch.save({**state, "method": "emae"}, bad)
    elif damage == "other-size":
        state["model"] = {k: (torch.zeros(1, 1, 48) if k == "encoder.cls_token" else v) for k, v in state["model"].items()}
        torch.save(state, bad)
    else:
        torch.save({"model": state["model"]}, bad)
    assert main(run_args("train.max_steps=4", f"train.resume={bad}", out="fresh")) == 2
    line = one_error_line(capsys)
    assert expected in line and "checkpoint-00000002.pt" in line
    assert not (tmp_path / "code-ran").exists()
    assert not list_checkpoints(tmp_path / "fresh")  # stopped before training


def test_resume_with_another_batch_layout(run_args, finished, capsys):
    assert main(run_args("train.max_steps=4", "train.batch_size=4")) == 2
    assert "cannot resume" in one_error_line(capsys)


def test_no_readable_image_in_the_data_source(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"not a png")
    args = ["pretrain", *TINY_MODEL, f"data.path={folder}", "data.num_workers=0", "train.progress=false",
            "train.tensorboard=true", "train.batch_size=2", "train.max_steps=1", f"train.out_dir={tmp_path / 'o'}"]  # fmt: skip
    assert main(args) == 2
    assert "no readable image in the data source" in one_error_line(capsys)


def test_a_tokenizer_file_that_is_not_one(run_args, tmp_path, capsys):
    bogus = tmp_path / "tok.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    assert main(run_args("method=beit", f"tokenizer.path={bogus}", "train.max_steps=1")) == 2
    assert "tok.pt" in one_error_line(capsys)


def test_cuda_asked_for_without_cuda(run_args, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has CUDA
    assert main(run_args("train.device=cuda", "train.max_steps=1")) == 2
    assert "train.device" in one_error_line(capsys)


@pytest.mark.parametrize("where", ["equal", "under"])
def test_out_dir_that_is_a_file(npz_data, tmp_path, capsys, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker if where == "equal" else blocker / "run"
    args = ["pretrain", *TINY_MODEL, f"data.path={npz_data}", "data.num_workers=0", "train.progress=false",
            "train.tensorboard=false", "train.max_steps=1", f"train.out_dir={out}"]  # fmt: skip
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "train.out_dir" in line and "a-file" in line and "is a file" in line


@pytest.mark.parametrize("reported_as", ["OSError", "torch zip writer"])
def test_a_full_disk_during_a_checkpoint_write(run_args, tmp_path, capsys, monkeypatch, reported_as):
    assert main(run_args("train.max_steps=2")) == 0
    capsys.readouterr()
    real = checkpoint_module.atomic_write_bytes

    def disk_full(path, write):
        if not path.name.startswith("checkpoint-"):
            return real(path, write)

        def partial_then_full(f):
            f.write(b"\0" * 1000)
            if reported_as == "OSError":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            # what torch.save raises when the disk fills under it (seen on a full tmpfs)
            full = shutil.disk_usage("/")._replace(free=0)
            monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda _: full)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 35503296 vs 35503188")

        return real(path, partial_then_full)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", disk_full)
    assert main(run_args("train.max_steps=4")) == 2
    line = one_error_line(capsys)
    assert "checkpoint-00000004.pt" in line and "No space left on device" in line and "checkpoint-00000002.pt" in line
    out = tmp_path / "run"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-00000002.pt"]
    assert load_checkpoint(out / "checkpoint-00000002.pt")["step"] == 2  # the previous one is intact
    assert not list(out.glob(".checkpoint-*"))  # no temporary left behind


@pytest.mark.parametrize("command", ["visualize", "export", "attention"])
def test_a_zero_byte_checkpoint_in_the_tools(tmp_path, capsys, command):
    ckpt = tmp_path / "checkpoint-00000001.pt"
    ckpt.write_bytes(b"")
    image = tmp_path / "i.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    argv = {"visualize": ["visualize", str(ckpt), str(image), "--out", str(tmp_path / "v")],
            "export": ["export", str(ckpt), "--to", "timm", str(tmp_path / "e")],
            "attention": ["attention", str(ckpt), str(image)]}[command]  # fmt: skip
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "checkpoint-00000001.pt" in line and "empty" in line


def test_a_full_disk_elsewhere_names_the_file(run_args, tmp_path, capsys, monkeypatch):
    real = checkpoint_module.atomic_write_bytes

    def disk_full(path, write):
        def full(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, full)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", disk_full)
    assert main(run_args("train.max_steps=1")) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "config.yaml" in line
