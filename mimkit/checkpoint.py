"""Checkpoints, written atomically; loading never executes code from them.

- ddp / single process: one torch file `checkpoint-N.pt`, loaded with `torch.load(weights_only=True)`.
- fsdp: a folder `checkpoint-N/` written by every rank through torch.distributed.checkpoint (DCP), plus
  `meta.pt` (step, RNG states, config). It is written as `.checkpoint-N.tmp/` and renamed only after every
  rank has finished, so it counts once all shards exist. DCP pickles its `.metadata` and stores
  non-tensor entries (the optimizer's param_groups) as pickled bytes, both read by DCP with plain
  pickle; mimkit reads the first with an allow-list of exact (module, name) pairs (DCP's metadata classes, torch.Size,
  the dtypes: never a module prefix, never a dotted name, which pickle resolves through getattr to anything those
  modules import) and the second with `torch.load(weights_only=True)`, so a crafted folder cannot run code. The
  metadata is checked before DCP reads a shard: every shard path stays inside the folder (symlinks followed), every
  tensor entry fits the bytes stored for it.

Every failure to read a checkpoint is a `CheckpointError` naming the file and what is wrong with it.

Optimizer state is stored keyed by parameter name (torch.distributed.checkpoint.state_dict), so a
checkpoint moves between ddp and fsdp and between world sizes.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import io
import logging
import os
import pathlib
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from mimkit.errors import MimkitError
from mimkit.files import LoadFailed, LoadRefused, weights_only_load

log = logging.getLogger("mimkit")

CKPT_PATTERN = re.compile(r"^checkpoint-(\d+)(\.pt)?$")


class CheckpointError(MimkitError, ValueError):
    """A checkpoint that cannot be used: missing, truncated, not a checkpoint, refused, or of another run."""


def checkpoint_path(out_dir: str | Path, step: int, sharded: bool = False) -> Path:
    return Path(out_dir) / (f"checkpoint-{step:08d}" if sharded else f"checkpoint-{step:08d}.pt")


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints in out_dir, oldest first (by step number in the name)."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_PATTERN.match(p.name))
             and (p.is_file() if m.group(2) else (p / "meta.pt").is_file())]  # fmt: skip
    return [p for _, p in sorted(found)]


def current_umask() -> int:
    """The process's umask: from /proc/self/status on Linux (read-only, no race), else by setting and restoring
    it (os.umask has no getter; the two calls are process-wide, so a thread creating a file in between would
    create it with mode 0o777 / 0o666 unmasked)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over the target. The file gets the
    mode an ordinary open() would give it (0o666 less the umask), not mkstemp's private 0o600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        written = Path(tmp).stat().st_size if Path(tmp).exists() else 0  # before the failure
        e.partial_bytes = written  # type: ignore[attr-defined]  # an attribute of ours, read by save_checkpoint
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # e.g. ENOSPC from write(): say which file
            e.filename = str(path)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode()))


def save_checkpoint(path: str | Path, state: dict) -> Path:
    path = Path(path)
    try:
        atomic_write_bytes(path, lambda f: torch.save(state, f))
    except RuntimeError as e:
        # torch's zip writer reports a failed write (a full disk, a vanished mount) as a RuntimeError
        if not re.search(r"inline_container|PytorchStreamWriter|unexpected pos", str(e)):
            raise
        free = shutil.disk_usage(path.parent).free  # after the partial file was removed
        code = errno.ENOSPC if free <= getattr(e, "partial_bytes", 0) + (64 << 20) else errno.EIO
        raise OSError(code, f"{os.strerror(code)} ({free // 1024} KiB free)", str(path)) from None
    return path


def step_in_name(path: str | Path) -> int | None:
    m = CKPT_PATTERN.match(Path(path).name)
    return int(m.group(1)) if m else None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint as one dict of plain tensors (a sharded folder is consolidated in memory).
    Raises CheckpointError (naming the file) for anything that is not a readable checkpoint."""
    path = Path(path)
    if path.is_dir():
        state = load_sharded_full(path)
    elif not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist (a checkpoint-N.pt file or a sharded checkpoint-N folder)"
        )
    else:
        state = _torch_load(path, what="checkpoint")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a mimkit checkpoint (it holds a {type(state).__name__}, not a dict)")
    check_step_matches_name(path, state)
    return state


def _torch_load(path: Path | str, what: str, source=None):
    """torch.load with weights_only=True; every way it can fail becomes one CheckpointError line."""
    try:
        return weights_only_load(source if source is not None else path)
    except LoadRefused as e:
        raise CheckpointError(f"{path}: refused to load {what}: {e.detail}; nothing from it was run") from None
    except LoadFailed as e:
        plain = e.reason == "the file is empty" or e.reason.startswith("not a PyTorch file")
        reason = e.reason if plain else f"truncated or not a PyTorch checkpoint: {e.reason}"
        raise CheckpointError(f"{path}: cannot read {what} ({reason})") from None


def check_step_matches_name(path: Path, state) -> None:
    """checkpoint-N must hold step N: a renamed or mixed-up file would otherwise resume at the wrong place."""
    named = step_in_name(path)
    if named is not None and isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] != named:
        raise CheckpointError(f"{path}: its name says step {named} but it holds step {state['step']}")


def verify_checkpoint(path: Path) -> dict:
    """Read a checkpoint's metadata completely enough to trust it for a resume; returns what was read
    (the full state for a file, meta.pt for a sharded folder whose shard files are all present)."""
    path = Path(path)
    if path.is_file():
        return load_checkpoint(path)
    meta = _read_sharded_meta(path)
    _check_shard_sizes(path, read_dcp_metadata(path))
    return meta


def _check_shard_sizes(path: Path, metadata) -> None:
    """Every shard file the metadata names exists and reaches the end of its last entry."""
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sizes.items():
        shard = path / rel
        if not shard.is_file():
            raise CheckpointError(f"{path}: shard file {rel} is missing")
        if shard.stat().st_size < end:
            raise CheckpointError(f"{path}: shard file {rel} is truncated ({shard.stat().st_size} bytes; its entries "
                                  f"reach byte {end})")  # fmt: skip


def resume_point(out_dir: str | Path, resume: str, key: str = "train.resume") -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and what was read of it (the whole state for a file, meta.pt for a
    sharded folder), or (None, None) for a fresh start. `auto` takes the newest checkpoint that reads back
    completely and says which unreadable ones (a copy cut short, a full disk) it passed over."""
    if resume == "none":
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not (path.is_file() or (path.is_dir() and (path / "meta.pt").exists())):
            raise CheckpointError(f"{key}: {path} is neither a checkpoint file nor a sharded checkpoint folder")
        return path, verify_checkpoint(path)
    found, newest_error = list_checkpoints(out_dir), None
    for path in reversed(found):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            newest_error = newest_error or e
            log.warning("%s: skipping an unreadable checkpoint (%s); trying the one before", key, e)
    if found:
        raise CheckpointError(
            f"{key}=auto: none of the {len(found)} checkpoints in {out_dir} is readable (newest: {newest_error}); "
            f"move them aside or set {key}=none to start over"
        )
    return None, None


def check_out_dir(path: str | Path, key: str = "train.out_dir") -> Path:
    """Refuse an output folder that is a file or lies under one, before any compute is spent."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"lies under {p}, which is a file"
                raise CheckpointError(f"{key}: {path} {what}; give a folder")
            break
    return path


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------- sharded (DCP) checkpoints


@functools.cache
def dcp_metadata_globals() -> dict[tuple[str, str], object]:
    """Every global DCP's `.metadata` pickles (torch 2.14, model and optimizer states, tensor and bytes entries),
    as exact (module, name) pairs: its metadata dataclasses, the file system writer's _StorageInfo, torch.Size,
    the layout helper, the dtypes (by their own names), and the checkpoint path of StorageMeta. Nothing else:
    no module prefix, no dotted name (pickle protocol 4 resolves `a.b` through getattr, which reaches any module
    those modules import)."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], object] = {
        ("torch.distributed.checkpoint.metadata", name): getattr(metadata, name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
    }  # fmt: skip
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath  # StorageMeta.checkpoint_id, Path(checkpoint_id)
    allowed[("pathlib", "WindowsPath")] = pathlib.WindowsPath
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) and str(value) == f"torch.{name}":  # pickled by its own name
            allowed[("torch", name)] = value
    return allowed


class _DCPMetadataUnpickler(pickle._Unpickler):
    """pickle's Python unpickler (its memo is a dict: a crafted index cannot make it allocate gigabytes, as the C
    one's array does) admitting the globals above, and setting the state of DCP's own dataclass instances only
    (never of a class or function, which would change them for the whole process)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        found = dcp_metadata_globals().get((module, name)) if "." not in name else None
        if found is None:
            raise pickle.UnpicklingError(f"it pickles {module}.{name}, which DCP metadata never holds")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent id, which DCP metadata never holds")

    def load_build(self):
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if type(target) not in _dcp_dataclasses():
            raise pickle.UnpicklingError(
                f"it sets the state of a {type(target).__name__}, which DCP metadata never does"
            )
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]  # typeshed types it for pickle.Unpickler


@functools.cache
def _dcp_dataclasses() -> frozenset:
    allowed = dcp_metadata_globals()
    return frozenset(v for (m, _), v in allowed.items() if m.startswith("torch.distributed.checkpoint.")
                     and isinstance(v, type) and dataclasses.is_dataclass(v))  # fmt: skip


def _check_storage(folder: Path, meta_path: Path, metadata) -> None:
    """Every shard DCP would open lies inside the folder: a relative path without '..', which, with every
    symlink followed, resolves inside the folder too. Checked before any shard is read."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    storage = getattr(metadata, "storage_data", None)
    if storage is None:
        return
    if not isinstance(storage, dict):
        raise CheckpointError(f"{meta_path}: not DCP metadata (storage_data is a {type(storage).__name__}, not a dict)")
    root = folder.resolve()
    checked: set[str] = set()
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{meta_path}: not DCP metadata (storage_data holds a {type(info).__name__})")
        rel = info.relative_path
        if not isinstance(rel, str) or not rel:
            raise CheckpointError(f"{meta_path}: entry {index.fqn!r} names no shard file (relative_path {rel!r})")
        for field, value in (("offset", info.offset), ("length", info.length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"{meta_path}: entry {index.fqn!r} has {field} {value!r}; a shard {field} is an "
                                      "integer >= 0")  # fmt: skip
        if rel in checked:
            continue
        checked.add(rel)
        parts = rel.replace("\\", "/").split("/")
        if rel.startswith(("/", "\\")) or Path(rel).is_absolute() or (len(rel) > 1 and rel[1] == ":") or ".." in parts:
            raise CheckpointError(f"{meta_path}: refused: shard path {rel!r} is not a plain name inside the "
                                  "checkpoint folder (absolute or with '..'); nothing was read")  # fmt: skip
        target = (folder / rel).resolve()
        if target != root and root not in target.parents:
            raise CheckpointError(f"{meta_path}: refused: shard {rel!r} resolves to {target}, outside the checkpoint "
                                  f"folder {root} (a symlink?); nothing was read")  # fmt: skip


def read_dcp_metadata(folder: Path):
    """DCP's .metadata, unpickled with the exact allow-list above and checked: a Metadata whose entries are
    DCP's own types and whose shard files all lie inside the folder."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    folder = Path(folder)
    meta = folder / ".metadata"
    if not meta.is_file():
        raise CheckpointError(f"sharded checkpoint {folder} has no .metadata (incomplete or not a DCP folder)")
    try:
        data = meta.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{meta}: cannot read ({e.strerror or e})") from None
    if not data:
        raise CheckpointError(f"{meta}: cannot read (the file is empty)")
    try:
        metadata = _DCPMetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        detail = (str(e).strip().splitlines() or ["not allowed"])[0][:300]
        if detail.startswith("it "):
            raise CheckpointError(f"{meta}: refused: {detail}; nothing from it was run") from None
        raise CheckpointError(f"{meta}: cannot read (damaged or not DCP metadata: {detail})") from None
    except (MemoryError, RecursionError) as e:
        raise CheckpointError(f"{meta}: cannot read (damaged or not DCP metadata: {type(e).__name__})") from None
    except Exception as e:  # EOFError, struct / Unicode / Key / Index / Attribute / Type / ValueError ...
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{meta}: cannot read (truncated or not DCP metadata: {type(e).__name__}"
                              f"{': ' + detail if detail else ''})") from None  # fmt: skip
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{meta}: not DCP metadata (it holds a {type(metadata).__name__}, not a Metadata)")
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict) or not all(
        isinstance(k, str) and isinstance(v, (TensorStorageMetadata, BytesStorageMetadata)) for k, v in entries.items()
    ):
        raise CheckpointError(f"{meta}: not DCP metadata (state_dict_metadata is not a dict of names to DCP entries)")
    _check_storage(folder, meta, metadata)
    _check_tensor_entries(meta, metadata)
    return metadata


def _check_tensor_entries(meta_path: Path, metadata) -> None:
    """Tensor entries DCP's load would allocate: a dtype, a size, chunks that tile it, and no more bytes than their
    shard entries hold (a crafted size cannot make a reader allocate more than the files on disk)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata

    def dims(value) -> bool:
        return isinstance(value, torch.Size) and all(type(d) is int and d >= 0 for d in value)

    stored: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        if info.transform_descriptors:
            raise CheckpointError(f"{meta_path}: entry {index.fqn!r} is stored through {list(info.transform_descriptors)} "
                                  "(a compressed DCP checkpoint); mimkit reads the uncompressed ones it writes")  # fmt: skip
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            continue
        props, size, chunks = entry.properties, entry.size, entry.chunks
        bad = None
        if not isinstance(props, TensorProperties) or not isinstance(getattr(props, "dtype", None), torch.dtype):
            bad = "no dtype"
        elif not dims(size) or not isinstance(chunks, list):
            bad = f"size {size!r}"
        elif not all(isinstance(c, ChunkStorageMetadata) and dims(c.offsets) and dims(c.sizes)
                     and len(c.offsets) == len(c.sizes) == len(size)
                     and all(o + n <= d for o, n, d in zip(c.offsets, c.sizes, size)) for c in chunks):  # fmt: skip
            bad = "chunks outside its size"
        elif sum(c.sizes.numel() for c in chunks) != size.numel():
            bad = f"chunks that do not tile its size {list(size)}"
        elif size.numel() * props.dtype.itemsize > stored.get(fqn, 0):
            bad = (f"size {list(size)} ({size.numel() * props.dtype.itemsize} bytes) but {stored.get(fqn, 0)} bytes "
                   "stored")  # fmt: skip
        if bad:
            raise CheckpointError(f"{meta_path}: not DCP metadata mimkit can read: tensor {fqn!r} has {bad}")


@functools.cache
def _safe_dcp_classes():
    """A FileSystemReader whose metadata goes through the allow-list, and load planners that read DCP's
    pickled non-tensor entries with weights_only=True (DCP's own use plain torch.load)."""

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import ReadItem

    class SafeReader(FileSystemReader):
        checked = None  # the metadata _dcp_read read and checked: the one the shards are read by

        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{self.path}: per-rank DCP metadata is not supported")
            metadata = self.checked if self.checked is not None else read_dcp_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    def safe_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = _torch_load(f"{self._folder} (entry {fqn})", what="a sharded-checkpoint entry", source=value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    class SafeLoadPlanner(DefaultLoadPlanner):
        load_bytes = safe_bytes

    class SafeEmptyLoadPlanner(_EmptyStateDictLoadPlanner):
        load_bytes = safe_bytes

    return SafeReader, SafeLoadPlanner, SafeEmptyLoadPlanner


def _read_sharded_meta(folder: Path) -> dict:
    meta_path = folder / "meta.pt"
    if not meta_path.is_file():
        raise CheckpointError(f"sharded checkpoint {folder} has no meta.pt (incomplete or not a mimkit checkpoint)")
    meta = _torch_load(meta_path, what="checkpoint metadata")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not mimkit checkpoint metadata (expected a dict)")
    check_step_matches_name(folder, meta)
    return meta


def save_sharded(folder: Path, model_state: dict, optim_state: dict, meta: dict | None, is_main: bool) -> Path:
    """Every rank writes its shards into a temporary folder; after all have finished, rank 0 renames it."""
    import torch.distributed.checkpoint as dcp

    tmp = folder.parent / f".{folder.name}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    if is_main:
        with open(tmp / "meta.pt", "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
    if dist.is_initialized():
        dist.barrier()  # every rank's shards are on disk
    if is_main:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    if dist.is_initialized():
        dist.barrier()
    return folder


def _dcp_read(folder: Path, state: dict, planner, collective: bool) -> None:
    """DCP's own read loop with the safe reader and planner; every failure becomes a CheckpointError."""
    metadata = read_dcp_metadata(folder)  # refused here with its own message, before any read
    _check_shard_sizes(folder, metadata)
    planner._folder = folder
    no_dist = not (collective and dist.is_available() and dist.is_initialized())
    reader = _safe_dcp_classes()[0](str(folder))
    reader.checked = metadata
    try:
        _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # DCP's own wraps reader errors (ours among them); a BaseException
        causes = list(_causes(e))
        stop = next((x for x in causes if isinstance(x, (KeyboardInterrupt, SystemExit))), None)
        if stop is not None:  # DCP wraps every BaseException of a rank: an interrupt stays an interrupt
            raise stop from None
        inner = next((x for x in causes if isinstance(x, CheckpointError)), None)
        if inner is not None:
            raise inner from None
        real = next((x for x in causes if not isinstance(x, CheckpointException)), e)
        first = (str(real).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{folder}: cannot read sharded checkpoint ({type(real).__name__}"
                              f"{': ' + first if first else ''})") from None  # fmt: skip


def _causes(e: BaseException):
    """e and every exception it wraps: causes, contexts, and the per-rank failures of DCP's CheckpointException."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):  # {rank: (exception, traceback)}
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def load_sharded_into(folder: Path, model_state: dict, optim_state: dict) -> dict:
    """Fill (possibly sharded) state dicts in place from a DCP folder, resharding to this world size.
    Returns the meta dict."""
    meta = _read_sharded_meta(folder)
    _dcp_read(folder, {"model": model_state, "optimizer": optim_state}, _safe_dcp_classes()[1](), collective=True)
    return meta


def load_sharded_full(folder: Path) -> dict:
    """Consolidate a sharded checkpoint into one dict of plain tensors (for export, evaluation, or a
    single-file copy), in this process alone."""
    meta = _read_sharded_meta(folder)
    full: dict = {}
    _dcp_read(folder, full, _safe_dcp_classes()[2](), collective=False)
    if "model" not in full or "optimizer" not in full:
        raise CheckpointError(f"{folder}: not a mimkit sharded checkpoint (no 'model' / 'optimizer' entries)")
    return {**meta, "model": full["model"], "optimizer": full["optimizer"]}


def rng_state() -> dict:
    """Every RNG a training step may touch, in weights_only-loadable form."""
    legacy = np.random.get_state(legacy=True)  # numpy's default, which its stubs get wrong
    assert isinstance(legacy, tuple)  # the global RandomState: MT19937's (kind, keys, pos, has_gauss, gauss)
    kind, keys, pos, has_gauss, gauss = legacy
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
