"""Each way a run can be pointed at something unusable ends in one line, `mimkit: error: ...`, naming the
file, key or value, with exit status 2 — never a traceback — and before any compute is spent."""

import errno
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_ENCODER, TINY_MODEL, one_error_line
from PIL import Image

import mimkit.checkpoint as checkpoint_module
from mimkit.checkpoint import list_checkpoints, load_checkpoint
from mimkit.cli import main


@pytest.fixture
def run_args(npz_data, tmp_path):
    def build(*extra, out="run"):
        method = next((e.split("=", 1)[1] for e in reversed(extra) if e.startswith("method=")), "mae")
        tiny = TINY_ENCODER if method != "mae" else TINY_MODEL  # MAE's tiny decoder only where it is read
        return ["pretrain", *tiny, f"data.path={npz_data}", "data.num_workers=0", "train.batch_size=8",
                "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                f"train.out_dir={tmp_path / out}", *extra]  # fmt: skip

    return build


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
        state["model"] = {
            k: (torch.zeros(1, 1, 48) if k == "encoder.cls_token" else v) for k, v in state["model"].items()
        }
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
    line = one_error_line(capsys)
    assert "checkpoint-00000002.pt" in line
    assert "cannot resume" in line or "would change how it trains: train.batch_size 8 -> 4" in line, line


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


# ---------------------------------------------------------------- files that are not checkpoints: one line each

FIFTEEN_BYTES = {  # what a copy cut short after 15 bytes, or a wrong file, starts with
    "zip head": b"PK\x03\x04\x00\x00\x08\x08\x00\x00\x00\x00\x00\x00\x00",  # torch.save's archive
    "legacy head": b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.",  # torch's legacy format: struct.error inside
    "random": bytes(range(200, 215)),
}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "i.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    return path


def tool_argv(command, ckpt, tmp_path, image, npz_data):
    labelled = tmp_path / "labelled.npz"
    if command == "knn":
        from conftest import make_images

        np.savez(labelled, x_train=make_images(16), y_train=np.arange(16) % 4, x_test=make_images(8, seed=1),
                 y_test=np.arange(8) % 4)  # fmt: skip
    return {"visualize": ["visualize", str(ckpt), str(image), "--out", str(tmp_path / "v")],
            "export": ["export", str(ckpt), "--to", "timm", str(tmp_path / "e")],
            "attention": ["attention", str(ckpt), str(image)],
            "import": ["import", str(ckpt), str(tmp_path / "imported.pt")],
            "knn": ["knn", f"encoder.checkpoint={ckpt}", f"data.path={labelled}", "data.num_workers=0",
                    f"train.out_dir={tmp_path / 'knn'}"],
            "pretrain resume": ["pretrain", *TINY_MODEL, f"data.path={npz_data}", "data.num_workers=0",
                                "train.progress=false", "train.tensorboard=false", f"train.resume={ckpt}",
                                f"train.out_dir={tmp_path / 'run'}"]}[command]  # fmt: skip


@pytest.mark.parametrize("head", list(FIFTEEN_BYTES))
@pytest.mark.parametrize("command", ["import", "export", "visualize", "attention", "knn", "pretrain resume"])
def test_a_15_byte_checkpoint(tmp_path, capsys, image, npz_data, command, head):
    ckpt = tmp_path / "checkpoint-00000001.pt"
    ckpt.write_bytes(FIFTEEN_BYTES[head])
    assert main(tool_argv(command, ckpt, tmp_path, image, npz_data)) == 2
    line = one_error_line(capsys)
    assert "checkpoint-00000001.pt" in line, line
    assert ("not a weights file" if command == "import" and head == "random" else "cannot read") in line, line
    with pytest.raises(checkpoint_module.CheckpointError, match=r"checkpoint-00000001\.pt: cannot read checkpoint"):
        load_checkpoint(ckpt)


def test_auto_resume_passes_over_a_15_byte_newest_checkpoint(run_args, finished, capsys, caplog):
    run = finished.parent
    (run / "checkpoint-00000004.pt").write_bytes(FIFTEEN_BYTES["legacy head"])
    assert main(run_args("train.max_steps=4")) == 0
    assert any("skipping an unreadable checkpoint" in r.message and "checkpoint-00000004.pt" in r.message
               for r in caplog.records)  # fmt: skip
    assert load_checkpoint(run / "checkpoint-00000004.pt")["step"] == 4  # resumed from step 2, saved over it


@pytest.mark.parametrize("name, content, expected", [
    ("passwd", b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n", "not a weights file"),
    ("weights.pth", b"\xff\xfe\x00\x81garbage", "not a weights file"),
    ("weights.pth", b"\x80\x02c\xff\xfe\xfd\nsystem\n(S'x'\ntR.", "cannot read as a PyTorch checkpoint"),  # non-UTF-8
    ("config.json", b'{"model_type": "vit_mae"}\n', "not a weights file (a JSON file"),
    ("recipe.yaml", b"model:\n  arch: vit_base_patch16_224\n", "not a weights file (a YAML file"),
    ("empty.pt", b"", "the file is empty"),
])  # fmt: skip
def test_import_of_a_file_that_is_not_weights(tmp_path, capsys, name, content, expected):
    src = tmp_path / name
    src.write_bytes(content)
    assert main(["import", str(src), str(tmp_path / "out.pt")]) == 2
    line = one_error_line(capsys)
    assert expected in line and str(src) in line, line
    assert "pickles Python objects" not in line
    if "not a weights file" in expected:
        assert ".pth / .pt / .bin" in line and ".safetensors" in line and "Hugging Face / timm model folder" in line
    assert not (tmp_path / "out.pt").exists()


def test_import_of_etc_passwd(tmp_path, capsys):
    if not os.path.isfile("/etc/passwd"):
        pytest.skip("no /etc/passwd here")
    assert main(["import", "/etc/passwd", str(tmp_path / "out.pt")]) == 2
    assert "/etc/passwd: not a weights file" in one_error_line(capsys)


def test_dcp_metadata_holding_an_empty_dict(tmp_path, capsys):
    import pickle

    folder = tmp_path / "checkpoint-00000001"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps({}))
    torch.save({"step": 1}, folder / "meta.pt")
    with pytest.raises(checkpoint_module.CheckpointError, match=r"\.metadata: not DCP metadata \(it holds a dict"):
        load_checkpoint(folder)
    assert main(["export", str(folder), "--to", "timm", str(tmp_path / "e")]) == 2
    assert ".metadata: not DCP metadata" in one_error_line(capsys)


@pytest.mark.parametrize("seed", ["9223372036854775807", "1e23", "1.0e+23", "-1", "4294967296",
                                  "100000000000000000000000"])  # fmt: skip
def test_a_seed_out_of_range(run_args, capsys, seed):
    assert main(run_args("train.max_steps=1", f"train.seed={seed}")) == 2
    line = one_error_line(capsys)
    assert "train.seed" in line
    if seed not in ("1e23", "1.0e+23"):  # those are no integer at all (YAML reads the first as a string)
        assert "[0, 4294967295]" in line, line
    from mimkit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.seed"):
        load_config(None, [f"train.seed={seed}"])


def test_the_largest_seed_allowed_trains(run_args, capsys):
    """The bound is one the code meets: torch, numpy and the samplers' derived seeds all take it."""
    assert main(run_args("train.max_steps=1", "train.seed=4294967295")) == 0
