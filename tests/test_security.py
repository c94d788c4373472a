"""No command and no Python entry point runs code from a crafted checkpoint: a sharded (DCP) folder whose
optimizer param_groups hold an object with a `__reduce__` (DCP stores such entries as pickled bytes), whose
meta.pt does, or whose `.metadata` starts with pickle instructions that reach `os.system` through an attribute
chain of a module DCP's metadata legitimately names (`torch.distributed.checkpoint.metadata` + `os.system`: pickle
protocol 4 resolves dotted names with getattr). Every reader refuses it with one line naming the file, and the
payload never runs. Shards are read only inside the checkpoint folder, and the files mimkit writes follow the
umask."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, make_images
from PIL import Image
from test_distributed import free_port

import mimkit
from mimkit.checkpoint import CheckpointError, load_checkpoint, save_sharded
from mimkit.cli import main
from mimkit.interop import InteropError, load_mimkit_checkpoint
from mimkit.train import pretrain


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
    np.savez(
        data, x_train=make_images(32), y_train=np.arange(32) % 4, x_test=make_images(8, seed=1), y_test=np.arange(8) % 4
    )
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
        "knn": ["knn", f"encoder.checkpoint={f}", *common, f"train.out_dir={t / 'knn'}"],
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
                          "train.tensorboard=false", "train.batch_size=8", "train.precision=fp32",
                          f"train.out_dir={crafted['run']}"])  # fmt: skip
    assert not crafted["marker"].exists()


def test_the_crafted_folder_would_run_code_if_read_as_dcp_reads_it(genuine, tmp_path):
    """The payload is live: torch's own converter (plain torch.load on DCP's byte entries) runs it."""
    marker = tmp_path / "code-ran"
    folder = crafted_folder(genuine, tmp_path, marker, "optimizer")
    code = ("import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save as f; "
            "f(sys.argv[1], sys.argv[2])")  # fmt: skip
    subprocess.run(
        [sys.executable, "-c", code, str(folder), str(tmp_path / "out.pt")], capture_output=True, timeout=120
    )
    assert marker.exists()


def test_resume_under_torchrun_refuses_the_crafted_folder_on_every_rank(genuine, tmp_path):
    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    run.mkdir()
    crafted_folder(genuine, run, marker, "optimizer")
    argv = TINY_MODEL + [f"data.path={genuine['data']}", "data.num_workers=0", "train.batch_size=8",
                         "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                         "train.max_steps=4", "distributed.strategy=fsdp", f"train.out_dir={run}"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "mimkit.cli", "pretrain", *argv]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert not marker.exists()
    assert proc.stderr.count("mimkit: error: ") == 2 and "refused" in proc.stderr  # each rank, one line


# ---------------------------------------------------------------- a `.metadata` that calls os.system on unpickling


def _u(text: str) -> bytes:
    """SHORT_BINUNICODE: push a str."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _call(module: str, name: str, arg: bytes) -> bytes:
    """Push module.name (STACK_GLOBAL, resolved by pickle through getattr for a dotted name), call it on `arg`."""
    return _u(module) + _u(name) + b"\x93" + arg + b"\x85R"  # STACK_GLOBAL, TUPLE1, REDUCE


def _attack(kind: str, marker) -> bytes:
    """Pickle instructions that run `touch marker` and leave the stack as they found it (no memo entries, so the
    genuine pickle that follows still reads back). PROTO 4, ..., POP."""
    cmd = _u(f"touch {marker}")
    if kind == "GLOBAL metadata os.system":  # the text opcode: module and name on lines of their own
        run = b"ctorch.distributed.checkpoint.metadata\nos.system\n" + cmd + b"\x85R"
    elif kind.startswith("collections"):  # collections imports no os: itemgetter('eval')(namedtuple.__builtins__)
        getter = _call("collections", "_itemgetter", _u("eval"))
        builtins_dict = _u("collections") + _u("namedtuple.__builtins__") + b"\x93"
        run = getter + builtins_dict + b"\x85R" + _u(f"__import__('os').system('touch {marker}')") + b"\x85R"
    else:
        module, name = ATTACKS[kind]
        run = _call(module, name, cmd)
    return b"\x80\x04" + run + b"0"


ATTACKS = {  # name -> (module, dotted name) that pickle.loads resolves to os.system
    "metadata.os.system": ("torch.distributed.checkpoint.metadata", "os.system"),
    "filesystem.os.system": ("torch.distributed.checkpoint.filesystem", "os.system"),
    "torch.os.system": ("torch", "os.system"),
    "torch.serialization.os.system": ("torch.serialization", "os.system"),
    "pathlib.os.system": ("pathlib", "os.system"),
    "GLOBAL metadata os.system": None,
    "collections namedtuple.__builtins__ eval": None,
}


@pytest.fixture(scope="module")
def clean_sharded(genuine):
    """A run folder holding the genuine run's checkpoint as a sharded folder (written by DCP), its config and
    metrics: a copy of it is poisoned per test."""
    run = genuine["root"] / "sharded-run"
    run.mkdir()
    state = load_checkpoint(genuine["checkpoint"])
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    save_sharded(run / "checkpoint-00000002", state["model"], state["optimizer"], meta, is_main=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(genuine["checkpoint"].parent / name, run / name)
    return run


def poison(folder, kind: str, marker) -> bytes:
    data = _attack(kind, marker) + (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(data)
    return data


@pytest.fixture(params=list(ATTACKS))
def poisoned(request, clean_sharded, genuine, tmp_path):
    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    shutil.copytree(clean_sharded, run, symlinks=True)
    folder = run / "checkpoint-00000002"
    data = poison(folder, request.param, marker)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(image)
    return {"folder": folder, "run": run, "marker": marker, "image": image, "data": genuine["data"], "tmp": tmp_path,
            "bytes": data, "kind": request.param}  # fmt: skip


def test_the_poisoned_metadata_is_live(poisoned):
    """The same bytes through plain pickle (what DCP's own FileSystemReader uses) run the command, and still give
    back DCP's Metadata: only an allow-list of exact names stops them."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata

    assert isinstance(pickle.loads(poisoned["bytes"]), Metadata)
    assert poisoned["marker"].exists(), f"{poisoned['kind']}: the payload did not run through pickle.loads"
    poisoned["marker"].unlink()
    FileSystemReader(str(poisoned["folder"])).read_metadata()
    assert poisoned["marker"].exists(), f"{poisoned['kind']}: the payload did not run through DCP's reader"


def test_no_command_runs_code_from_poisoned_metadata(poisoned, capsys):
    from mimkit.cli import main as cli

    t, f = poisoned["tmp"], str(poisoned["folder"])
    commands = {**cli_commands(poisoned),
                "import": ["import", f, str(t / "imported.pt")],
                "linprobe resume": ["linprobe", "encoder.checkpoint=none", *TINY_MODEL_EVAL, f"data.path={poisoned['data']}",
                                    "data.num_workers=0", "train.progress=false", "train.tensorboard=false",
                                    "train.precision=fp32", "train.batch_size=8", f"train.out_dir={t / 'lp2'}",
                                    f"train.resume={f}"]}  # fmt: skip
    for name, argv in commands.items():
        code = cli(argv)
        err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
        assert not poisoned["marker"].exists(), f"{name} ran the payload ({poisoned['kind']})"
        assert code == 2, f"{name}: exit {code}: {err[-3:]}"
        assert err and err[-1].startswith("mimkit: error: ") and "refused" in err[-1], f"{name}: {err[-3:]}"
        assert "checkpoint-00000002/.metadata" in err[-1], f"{name}: the message names the file: {err[-1]}"
        assert not any(x.startswith("Traceback") for x in err), f"{name}: {err}"
    # the report reads every checkpoint of the run: it notes the refusal on its page instead of failing
    assert cli(["report", str(poisoned["run"]), "--images", str(poisoned["image"])]) == 0
    assert not poisoned["marker"].exists()
    page = (poisoned["run"] / "report.html").read_text()
    assert "refused" in page and "checkpoint-00000002/.metadata" in page


TINY_MODEL_EVAL = [x.replace("model.", "encoder.") for x in TINY_MODEL if not x.startswith("mae.")]


def test_no_python_entry_point_runs_code_from_poisoned_metadata(poisoned):
    from mimkit.checkpoint import read_dcp_metadata, resume_point, verify_checkpoint
    from mimkit.interop import read_source

    f = poisoned["folder"]
    for name, call, error in [("load_checkpoint", lambda: load_checkpoint(f), CheckpointError),
                              ("verify_checkpoint", lambda: verify_checkpoint(f), CheckpointError),
                              ("read_dcp_metadata", lambda: read_dcp_metadata(f), CheckpointError),
                              ("resume_point", lambda: resume_point(f.parent, str(f)), CheckpointError),
                              ("load_mimkit_checkpoint", lambda: load_mimkit_checkpoint(f), InteropError),
                              ("read_source", lambda: read_source(f), InteropError)]:  # fmt: skip
        with pytest.raises(error, match=r"\.metadata: refused: it pickles ") as info:
            call()
        assert "\n" not in str(info.value), name
        assert not poisoned["marker"].exists(), f"{name} ran the payload"


def test_the_allow_list_is_exact_names():
    """Every entry is a (module, name) pair with no '.' in the name; the classes a real save pickles are in it,
    and nothing reachable through them is."""
    import pickle

    from mimkit.checkpoint import _DCPMetadataUnpickler, dcp_metadata_globals

    allowed = dcp_metadata_globals()
    assert all("." not in name for _, name in allowed)
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in allowed and ("torch", "bfloat16") in allowed
    for module, name in [("torch.distributed.checkpoint.metadata", "os"), ("torch.distributed.checkpoint.metadata",
                         "Metadata.__init__"), ("torch", "load"), ("builtins", "eval"), ("collections", "OrderedDict"),
                         ("torch", "float"), ("pathlib", "Path.write_text")]:  # fmt: skip
        with pytest.raises(pickle.UnpicklingError, match="DCP metadata never holds"):
            _DCPMetadataUnpickler(__import__("io").BytesIO(b"")).find_class(module, name)


def test_a_real_save_needs_nothing_outside_the_allow_list(tmp_path):
    """DCP's metadata of model and optimizer states with every kind of entry (tensors of several dtypes, a
    0-dim step, a non-contiguous tensor, ints, floats, strings, bytes, None) reads back through the allow-list."""
    import pickle
    import pickletools

    import torch.distributed.checkpoint as dcp

    from mimkit.checkpoint import dcp_metadata_globals, read_dcp_metadata

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optim.step()
    state = {"model": model.state_dict(), "optimizer": optim.state_dict(),
             "extra": {"i": 3, "f": 1.5, "s": "x", "b": b"xy", "none": None, "list": [1, "a"],
                       **{str(dt): torch.zeros(2, dtype=dt) for dt in (torch.bfloat16, torch.float16, torch.int8,
                                                                       torch.bool, torch.complex64, torch.uint8)},
                       "t": torch.zeros(3, 2).t(), "scalar": torch.tensor(2.0)}}  # fmt: skip
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "ck"))
    data = (tmp_path / "ck" / ".metadata").read_bytes()
    names = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            names.add((module, name))
            return super().find_class(module, name)

    Recorder(__import__("io").BytesIO(data)).load()
    assert any(op.name == "STACK_GLOBAL" for op, _, _ in pickletools.genops(data))
    assert names <= set(dcp_metadata_globals()), names - set(dcp_metadata_globals())
    metadata = read_dcp_metadata(tmp_path / "ck")
    assert "optimizer.state.0.weight.step" in metadata.state_dict_metadata or any(
        k.endswith(".step") for k in metadata.state_dict_metadata
    )


# ---------------------------------------------------------------- shards stay inside the checkpoint folder


def _rewrite_paths(folder, rewrite):
    import pickle

    from mimkit.checkpoint import read_dcp_metadata

    metadata = read_dcp_metadata(folder)
    for info in metadata.storage_data.values():
        info.relative_path = rewrite(info.relative_path)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.fixture
def sharded_copy(clean_sharded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(clean_sharded, run)
    return run / "checkpoint-00000002"


def _no_shard_read(monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    def refuse(*args, **kwargs):
        raise AssertionError("a shard was read")

    monkeypatch.setattr(FileSystemReader, "read_data", refuse)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlinked file", "symlinked folder"])
def test_shards_outside_the_folder_are_refused_before_any_read(sharded_copy, tmp_path, monkeypatch, capsys, where):
    from mimkit.checkpoint import verify_checkpoint

    folder = sharded_copy
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = next(folder.glob("*.distcp"))
    shutil.copy(shard, outside / shard.name)  # a readable copy: only the check stops the read
    if where == "absolute":
        _rewrite_paths(folder, lambda rel: str(outside / rel))
    elif where == "dotdot":
        _rewrite_paths(folder, lambda rel: f"../../outside/{rel}")
        (folder.parent / "outside").mkdir()
        shutil.copy(shard, folder.parent / "outside" / shard.name)
    elif where == "symlinked file":
        shard.unlink()
        shard.symlink_to(outside / shard.name)
    else:
        (folder / "sub").symlink_to(outside, target_is_directory=True)
        _rewrite_paths(folder, lambda rel: f"sub/{rel}")
    _no_shard_read(monkeypatch)
    for call in (load_checkpoint, verify_checkpoint):
        with pytest.raises(CheckpointError, match=r"\.metadata: refused: shard .*(absolute or with '\.\.'|outside the "
                                                  r"checkpoint folder)") as info:  # fmt: skip
            call(folder)
        assert "\n" not in str(info.value)
    assert main(["export", str(folder), "--to", "timm", str(tmp_path / "timm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mimkit: error: ") and "refused: shard" in err[-1]


def test_a_symlink_inside_the_folder_is_followed(sharded_copy):
    """The check is on where a shard resolves, not on symlinks as such: one to a file inside the folder reads."""
    folder = sharded_copy
    shard = next(folder.glob("*.distcp"))
    (folder / "real").mkdir()
    shard.rename(folder / "real" / shard.name)
    shard.symlink_to(folder / "real" / shard.name)
    state = load_checkpoint(folder)
    assert state["step"] == 2 and "encoder.cls_token" in state["model"]


def test_a_failed_sharded_read_says_what_is_wrong_in_one_line(sharded_copy):
    """DCP wraps a failure in `CheckpointException ranks:dict_keys([0])` and a traceback: the cause is unwrapped."""
    shard = next(sharded_copy.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # present, but cut short
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(sharded_copy)
    message = str(info.value)
    assert "\n" not in message and "CheckpointException" not in message and "ranks:" not in message
    assert str(sharded_copy) in message and f"shard file {shard.name} is truncated (100 bytes" in message


# ---------------------------------------------------------------- files follow the umask


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_written_files_follow_the_umask(umask, genuine, tmp_path):
    from mimkit.checkpoint import atomic_write_text, current_umask, save_checkpoint
    from mimkit.interop import export_hf, export_timm

    assert current_umask() == umask
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    ckpt = save_checkpoint(tmp_path / "checkpoint-00000001.pt", {"step": 1})
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    for path in (ckpt, tmp_path / "config.yaml"):
        assert path.stat().st_mode & 0o777 == file_mode, (oct(path.stat().st_mode), oct(umask))
    assert {0o644: 0o022, 0o664: 0o002}[file_mode] == umask  # the two cases the issue names
    state = load_checkpoint(genuine["checkpoint"])
    folder = save_sharded(tmp_path / "checkpoint-00000002", state["model"], state["optimizer"],
                          {k: v for k, v in state.items() if k not in ("model", "optimizer")}, is_main=True)  # fmt: skip
    assert folder.stat().st_mode & 0o777 == dir_mode
    export_timm(genuine["checkpoint"], tmp_path / "timm")
    export_hf(genuine["checkpoint"], tmp_path / "hf")
    written = [*folder.rglob("*"), *(tmp_path / "timm").rglob("*"), *(tmp_path / "hf").rglob("*")]
    assert {"model.safetensors", "config.json", "meta.pt", ".metadata"} <= {p.name for p in written}
    for path in written:
        assert path.stat().st_mode & 0o777 == (dir_mode if path.is_dir() else file_mode), (
            path,
            oct(path.stat().st_mode),
        )
