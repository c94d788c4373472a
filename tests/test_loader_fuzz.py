"""Every loader of a checkpoint-like file, fed a few thousand mutations of genuine files (a training checkpoint,
DCP's `.metadata` of a sharded one, an official-style checkpoint with argparse / numpy scalars, a tokenizer, plain
pickles): byte flips, truncations, splices, and pickle
instructions inserted at instruction boundaries, among them GLOBAL / STACK_GLOBAL / INST / OBJ + REDUCE of
`os.system("touch MARKER")` and the dotted-name route to it through modules DCP's metadata names. Each load ends
in a result or a MimkitError (one line), never another exception, and the marker never appears.

Seeded (SEED below); a failure names the corpus, the input's number and the mutation, and leaves the input in the
test's tmp folder."""

from __future__ import annotations

import io
import pickle
import pickletools
import random
import re
import shutil
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, make_images

from mimkit.checkpoint import load_checkpoint, read_dcp_metadata, save_sharded, verify_checkpoint
from mimkit.datasets import read_cifar_pickle
from mimkit.errors import MimkitError
from mimkit.files import load_torch_file, load_weights_file
from mimkit.interop import read_source
from mimkit.tokenizers import DVAESpec, MimkitTokenizer, load_tokenizer

SEED = 20240632


# ---------------------------------------------------------------- payloads


def _u(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickle instructions that run `touch marker` when a plain unpickler reads them; each leaves the stack as it
    found it (POP at the end), so a genuine pickle around it still loads."""
    cmd = _u(f"touch {marker}")
    call1 = b"\x85R"  # TUPLE1, REDUCE

    def stack_global(module, name):
        return _u(module) + _u(name) + b"\x93"

    eval_code = _u(f"__import__('os').system('touch {marker}')")
    return {
        "GLOBAL os.system": b"cos\nsystem\n" + cmd + call1 + b"0",
        "GLOBAL posix.system": b"cposix\nsystem\n" + cmd + call1 + b"0",
        "GLOBAL dotted metadata.os.system": b"ctorch.distributed.checkpoint.metadata\nos.system\n" + cmd + call1 + b"0",
        "STACK_GLOBAL metadata os.system": stack_global("torch.distributed.checkpoint.metadata", "os.system")
        + cmd
        + call1
        + b"0",
        "STACK_GLOBAL torch os.system": stack_global("torch", "os.system") + cmd + call1 + b"0",
        "STACK_GLOBAL pathlib os.system": stack_global("pathlib", "os.system") + cmd + call1 + b"0",
        "STACK_GLOBAL builtins eval": stack_global("builtins", "eval") + eval_code + call1 + b"0",
        "collections itemgetter eval": stack_global("collections", "_itemgetter")
        + _u("eval")
        + call1
        + stack_global("collections", "namedtuple.__builtins__")
        + call1
        + eval_code
        + call1
        + b"0",
        "INST os.system": b"(" + cmd + b"ios\nsystem\n0",
        "OBJ os.system": b"(cos\nsystem\n" + cmd + b"o0",
        "NEWOBJ via dtype": stack_global("torch", "float32") + b")\x810",  # not callable: must fail, not crash
        "BUILD on a class": stack_global("torch.distributed.checkpoint.metadata", "Metadata")
        + b"N}"
        + _u("x")
        + _u("y")
        + b"s\x86b0",  # state (None, {'x': 'y'}): setattr on the class itself
    }


def live(payload: bytes) -> bytes:
    """A whole pickle: PROTO 4, the payload, None, STOP."""
    return b"\x80\x04" + payload + b"N."


# ---------------------------------------------------------------- the genuine files


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A training checkpoint (a real 1-step run), its sharded copy written by DCP, a mimkit tokenizer file and
    plain pickles, once for the module."""
    from mimkit.config import load_config
    from mimkit.train import pretrain

    root = tmp_path_factory.mktemp("fuzz-genuine")
    data = root / "tiny.npz"
    np.savez(data, x_train=make_images(16), y_train=np.arange(16) % 4)
    cfg = load_config(None, TINY_MODEL + [f"data.path={data}", "data.num_workers=0", "train.batch_size=8",
                                          "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
                                          "train.max_steps=1", f"train.out_dir={root / 'run'}"])  # fmt: skip
    torch.set_num_threads(1)
    checkpoint = pretrain(cfg).checkpoint
    state = load_checkpoint(checkpoint)
    folder = root / "sharded" / "checkpoint-00000001"
    save_sharded(folder, state["model"], state["optimizer"],
                 {k: v for k, v in state.items() if k not in ("model", "optimizer")}, is_main=True)  # fmt: skip
    spec = DVAESpec(vocab_size=16, hidden=8, downsample=2, code_dim=8)
    tokenizer = root / "tokenizer.pt"
    torch.save({"kind": "mimkit", "spec": asdict(spec), "state_dict": MimkitTokenizer(spec).dvae.state_dict()},
               tokenizer)  # fmt: skip
    official = root / "official.pth"  # what official releases store beside the weights: args, numpy scalars
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.randn(6, 2), "cls_token": torch.zeros(1, 1, 2)},
                "args": __import__("argparse").Namespace(lr=1.5e-4, input_size=224, best=np.float64(71.5),
                                                         path=Path("/data/imagenet")),
                "epoch": 799, "acc": np.float32(83.6), "steps": np.int64(-1), "big_endian": np.dtype(">f4").type(2.5)},
               official)  # fmt: skip
    plain = {
        "nested": pickle.dumps({"a": [1, 2.5, "x", b"yz", None, True], "b": (1, (2, 3)), "c": {"d": -7}}, protocol=4),
        "cifar-like": pickle.dumps(
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"batch_label": b"fuzz"}, protocol=2
        ),  # fmt: skip
        "ints": pickle.dumps(list(range(-300, 300, 7)), protocol=5),
    }
    return {
        "checkpoint": checkpoint,
        "folder": folder,
        "tokenizer": tokenizer,
        "plain": plain,
        "root": root,
        "official": official,
    }


# ---------------------------------------------------------------- mutations


def boundaries(data: bytes) -> list[int]:
    """Positions where a pickle instruction starts (those of the readable prefix, for a damaged pickle)."""
    found = []
    try:
        for _, _, pos in pickletools.genops(data):
            found.append(pos)
    except Exception:
        pass
    return found or [0]


class Mutator:
    OPCODES = b"cRio\x81\x93bPQ\x82r\x94h(t0.}]\x8c\x95\x80"  # GLOBAL REDUCE INST OBJ NEWOBJ STACK_GLOBAL BUILD ...

    def __init__(self, seed: int, payloads: dict[str, bytes], others: list[bytes]):
        self.rng, self.payloads, self.others = random.Random(seed), payloads, others

    def __call__(self, data: bytes) -> tuple[bytes, str]:
        rng, n = self.rng, len(data)
        kind = rng.choice(["flip", "flip", "truncate", "splice", "inject", "inject", "inject", "opcode", "prefix",
                           "big-index"])  # fmt: skip
        if kind == "flip":
            out = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(n)] = rng.randrange(256)
            return bytes(out), kind
        if kind == "truncate":
            cut = rng.randrange(n)
            return data[:cut], f"truncate at {cut}"
        if kind == "splice":
            donor = rng.choice([data, *self.others])
            a = rng.randrange(len(donor))
            piece = donor[a : a + rng.randint(1, 64)]
            at = rng.randrange(n)
            return data[:at] + piece + data[at + rng.randint(0, 16) :], f"splice {len(piece)} bytes at {at}"
        name = rng.choice(list(self.payloads))
        if kind in ("inject", "prefix"):
            at = 2 if kind == "prefix" else rng.choice(boundaries(data))
            return data[:at] + self.payloads[name] + data[at:], f"{kind} {name!r} at {at}"
        if kind == "opcode":
            at = rng.choice(boundaries(data))
            op = bytes([rng.choice(self.OPCODES)])
            return data[:at] + op + data[at + rng.randint(0, 1) :], f"opcode {op!r} at {at}"
        at = rng.choice(boundaries(data))  # a memo index far beyond the data: LONG_BINPUT / LONG_BINGET
        return data[:at] + rng.choice([b"r", b"j"]) + rng.randbytes(4) + data[at:], f"big memo index at {at}"


def mutate_metadata(original: bytes, rng: random.Random) -> tuple[bytes, str]:
    """DCP's Metadata itself changed and pickled again: shard paths, offsets and lengths, tensor sizes, chunks and
    dtypes that no longer agree, entries dropped. These reach DCP's own read, past the unpickling."""
    metadata = pickle.loads(original)  # the genuine file: no payload in it
    infos = list(metadata.storage_data.values())
    tensors = [e for e in metadata.state_dict_metadata.values() if hasattr(e, "chunks")]
    changes = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["path", "offset", "length", "size", "chunk", "dtype", "drop", "swap"])
        if kind == "path":
            info = rng.choice(infos)
            info.relative_path = rng.choice(["", "nothing.distcp", "../x.distcp", "/etc/passwd", ".metadata", "meta.pt",
                                             infos[0].relative_path + "x", "./" + infos[0].relative_path])  # fmt: skip
        elif kind in ("offset", "length"):
            info = rng.choice(infos)
            setattr(info, kind, max(0, getattr(info, kind) + rng.choice([-1, 1]) * rng.randint(1, 2000)))
        elif kind == "size":
            entry = rng.choice(tensors)
            entry.size = torch.Size([max(0, d + rng.randint(-2, 2)) for d in entry.size] or [rng.randint(0, 3)])
        elif kind == "chunk":
            chunk = rng.choice(rng.choice(tensors).chunks)
            chunk.sizes = torch.Size([max(0, d + rng.randint(-2, 2)) for d in chunk.sizes])
            chunk.offsets = torch.Size([max(0, d + rng.randint(-1, 1)) for d in chunk.offsets])
        elif kind == "dtype":
            rng.choice(tensors).properties.dtype = rng.choice([torch.float64, torch.int8, torch.bool, torch.float16])
        elif kind == "drop":
            table = rng.choice([metadata.state_dict_metadata, metadata.storage_data])
            table.pop(rng.choice(list(table)))
        else:
            a, b = rng.sample(list(metadata.storage_data), 2)
            metadata.storage_data[a], metadata.storage_data[b] = metadata.storage_data[b], metadata.storage_data[a]
        changes.append(kind)
    return pickle.dumps(metadata, protocol=rng.choice([2, 4, 5])), f"metadata fields: {', '.join(changes)}"


def mutate_zip(archive: bytes, mutator: Mutator) -> tuple[bytes, str]:
    """The archive with its data.pkl mutated and rewritten as a valid zip (so the pickle itself is reached), or,
    one time in four, the archive's raw bytes mutated."""
    if mutator.rng.random() < 0.25:
        out, how = mutator(archive)
        return out, f"raw zip: {how}"
    src = zipfile.ZipFile(io.BytesIO(archive))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            content = src.read(name)
            if name.endswith("/data.pkl"):  # torch.save names the folder inside after the file
                content, how = mutator(content)
            dst.writestr(name, content)
    return buf.getvalue(), f"data.pkl: {how}"


# ---------------------------------------------------------------- the loaders


def file_loaders(path: Path) -> dict:
    return {
        "load_checkpoint": lambda: load_checkpoint(path),
        "verify_checkpoint": lambda: verify_checkpoint(path),
        "load_torch_file": lambda: load_torch_file(path),
        "load_weights_file": lambda: load_weights_file(path),
        "load_tokenizer": lambda: load_tokenizer("mimkit", path),
        "read_source (import)": lambda: read_source(path),
        "read_cifar_pickle": lambda: read_cifar_pickle(path),
    }


def folder_loaders(folder: Path, full: int) -> dict:
    loaders = {
        "read_dcp_metadata": lambda: read_dcp_metadata(folder),
        "verify_checkpoint (folder)": lambda: verify_checkpoint(folder),
    }
    if full:  # the whole DCP read, the slow ones: on a share of the inputs
        loaders["load_checkpoint (folder)"] = lambda: load_checkpoint(folder)
    if full > 1:
        loaders["read_source (import, folder)"] = lambda: read_source(folder)
    return loaders


def run_loaders(loaders: dict, marker: Path, what: str, keep: Path, tally: dict) -> None:
    """Each loader: a result or a MimkitError with a one-line message. Counts the loads that succeeded and the
    refusals (a global or an instruction not allowed) in `tally`."""
    for name, load in loaders.items():
        try:
            load()
            tally["loaded"] += 1
        except MimkitError as e:
            assert "\n" not in str(e), f"{name} on {what}: a message of several lines: {e!r} (input: {keep})"
            tally["refused"] += bool(re.search(r"refused|not allowed", str(e)))
        except Exception as e:  # noqa: BLE001 (the point of the test)
            raise AssertionError(f"{name} on {what}: {type(e).__name__}: {e} (input kept: {keep})") from e
        assert not marker.exists(), f"{name} on {what} ran the payload (input kept: {keep})"


# ---------------------------------------------------------------- tests


def test_the_payloads_are_live(tmp_path):
    """Through a plain unpickler every code-running payload runs: a loader that admits it would run it too."""
    marker = tmp_path / "marker"
    for name, payload in payloads(marker).items():
        if name in ("NEWOBJ via dtype", "BUILD on a class"):
            continue
        pickle.loads(live(payload))
        assert marker.exists(), name
        marker.unlink()


CASES = {  # corpus -> number of mutated inputs
    "checkpoint file": 240,
    "tokenizer file": 400,
    "plain pickles": 1200,
    "dcp .metadata": 360,
}


@pytest.mark.parametrize("corpus", list(CASES))
def test_loaders_survive_mutated_inputs(genuine, tmp_path, corpus):
    torch.set_num_threads(1)
    marker = tmp_path / "MARKER"
    plain = list(genuine["plain"].values())
    mutator = Mutator(SEED + list(CASES).index(corpus), payloads(marker), plain)
    count, tally, started = CASES[corpus], {"loaded": 0, "refused": 0}, time.monotonic()
    if corpus == "dcp .metadata":
        folder = tmp_path / "checkpoint-00000001"
        shutil.copytree(genuine["folder"], folder)
        original = (genuine["folder"] / ".metadata").read_bytes()
        for i in range(count):
            structured = i % 4 == 0
            data, how = mutate_metadata(original, mutator.rng) if structured else mutator(original)
            (folder / ".metadata").write_bytes(data)
            what = f"{corpus} #{i} ({how})"
            keep = tmp_path / f"failing-{i}.metadata"
            shutil.copy(folder / ".metadata", keep)
            full = (1 + (i % 8 == 0)) if structured else 0
            run_loaders(folder_loaders(folder, full), marker, what, keep, tally)
            keep.unlink()
    else:
        path = tmp_path / "input.pt"
        sources = {"checkpoint file": [genuine["checkpoint"].read_bytes(), genuine["official"].read_bytes()],
                   "tokenizer file": [genuine["tokenizer"].read_bytes()], "plain pickles": plain}[corpus]  # fmt: skip
        for i in range(count):
            original = sources[i % len(sources)]
            data, how = mutate_zip(original, mutator) if original.startswith(b"PK") else mutator(original)
            path.write_bytes(data)
            what = f"{corpus} #{i} ({how})"
            run_loaders(file_loaders(path), marker, what, path, tally)
    # some inputs still load (the loaders were exercised past the header) and many payloads reached the
    # unpicklers' allow-lists and were refused there
    assert tally["loaded"] > 0 and tally["refused"] > count // 10, (corpus, tally)
    print(f"{corpus}: {count} inputs, {tally} loads, {time.monotonic() - started:.1f} s")


def test_the_unmutated_files_load(genuine):
    """The corpus itself is accepted by the loaders meant for it (the mutations start from readable files)."""
    assert load_checkpoint(genuine["checkpoint"])["step"] == 1
    assert load_checkpoint(genuine["folder"])["step"] == 1
    assert read_dcp_metadata(genuine["folder"]).state_dict_metadata
    assert load_tokenizer("mimkit", genuine["tokenizer"]).vocab_size == 16
    assert read_source(genuine["checkpoint"])[0]
    assert set(read_source(genuine["folder"])[0]) == set(read_source(genuine["checkpoint"])[0])  # `import` of a folder
    official = load_torch_file(genuine["official"])
    assert official["acc"] == np.float32(83.6) and official["args"].best == 71.5 and official["big_endian"] == 2.5
    path = genuine["root"] / "cifar-like"
    path.write_bytes(genuine["plain"]["cifar-like"])
    assert read_cifar_pickle(path)["labels"] == [0, 1]


CRAFTED_DTYPE_STATE = (
    b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00u1\x89\x88\x87R"  # numpy.dtype('u1', False, True)
    b"(K\x03X\x01\x00\x00\x00|NJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb."
)  # BUILD: 6-tuple state

_CRASH_CHECK = """
import io, sys, zipfile, torch
from pathlib import Path
pkl, folder, how = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]), sys.argv[3]
if how == "numpy":  # what plain pickle with numpy's own dtype does with the state
    import pickle
    pickle.loads(pkl)
    print("survived")
    sys.exit(0)
buf = io.BytesIO()
torch.save({"a": 1}, buf)
src, out = zipfile.ZipFile(io.BytesIO(buf.getvalue())), io.BytesIO()
with zipfile.ZipFile(out, "w") as dst:
    for name in src.namelist():
        dst.writestr(name, pkl if name.endswith("data.pkl") else src.read(name))
(folder / "crafted.pth").write_bytes(out.getvalue())
(folder / "data_batch_1").write_bytes(pkl)
from mimkit.datasets import read_cifar_pickle
from mimkit.errors import MimkitError
from mimkit.files import load_torch_file
for load, path in ((load_torch_file, folder / "crafted.pth"), (read_cifar_pickle, folder / "data_batch_1")):
    try:
        load(path)
        print("loaded")
    except MimkitError as e:
        print(type(e).__name__, e)
"""


def test_a_crafted_numpy_dtype_state_is_an_error_not_a_crash(tmp_path):
    """numpy's dtype.__setstate__ trusts its input: this state crashes the interpreter (shown in a subprocess).
    Through the allow-listed numpy names of weights-only loading and of the CIFAR reader it is one error line."""
    import subprocess
    import sys

    (tmp_path / "state.pkl").write_bytes(CRAFTED_DTYPE_STATE)

    def run(how):
        return subprocess.run([sys.executable, "-c", _CRASH_CHECK, str(tmp_path / "state.pkl"), str(tmp_path), how],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    assert run("numpy").returncode < 0  # killed by a signal (SIGSEGV): the danger is real
    proc = run("mimkit")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("InteropError") and lines[1].startswith("DataError"), lines
    assert all("not that of a plain numeric dtype" in x or "not a plain numeric one" in x for x in lines), lines
