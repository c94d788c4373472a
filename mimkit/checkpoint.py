"""Checkpoints, written atomically; loading never executes code from them.

- ddp / single process: one torch file `checkpoint-N.pt`, loaded with `torch.load(weights_only=True)`.
- fsdp: a folder `checkpoint-N/` written by every rank through torch.distributed.checkpoint (DCP), plus
  `meta.pt` (step, RNG states, config). It is written as `.checkpoint-N.tmp/` and renamed only after every
  rank has finished, so it counts once all shards exist. DCP pickles its `.metadata` and stores
  non-tensor entries (the optimizer's param_groups) as pickled bytes, both read by DCP with plain
  pickle; mimkit reads the first with an allow-list of DCP's own metadata types and the second with
  `torch.load(weights_only=True)`, so a crafted folder cannot run code.

Every failure to read a checkpoint is a `CheckpointError` naming the file and what is wrong with it.

Optimizer state is stored keyed by parameter name (torch.distributed.checkpoint.state_dict), so a
checkpoint moves between ddp and fsdp and between world sizes.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
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


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        e.partial_bytes = Path(tmp).stat().st_size if Path(tmp).exists() else 0  # written before the failure
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
        raise CheckpointError(f"checkpoint {path} does not exist (a checkpoint-N.pt file or a sharded checkpoint-N folder)")
    else:
        state = _torch_load(path, what="checkpoint")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a mimkit checkpoint (it holds a {type(state).__name__}, not a dict)")
    check_step_matches_name(path, state)
    return state


def _torch_load(path: Path | str, what: str, source=None):
    """torch.load with weights_only=True; every way it can fail becomes one CheckpointError line."""
    try:
        return torch.load(source if source is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported|Unsupported) (?:GLOBAL|global|operand)[^\n]*?(?=\.?\n|\.?$| whose)", str(e))
        detail = f" ({found.group(0).strip()})" if found else ""
        raise CheckpointError(
            f"{path}: refused to load {what}: it pickles Python objects outside the allow-list{detail}; nothing from it was run"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        size = Path(path).stat().st_size if Path(path).is_file() else None
        reason = "the file is empty" if size == 0 else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot read {what} (truncated or not a PyTorch checkpoint: {reason})") from None


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
    metadata = read_dcp_metadata(path)
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        sizes[rel] = max(sizes.get(rel, 0), end)
    for rel, end in sizes.items():
        shard = path / rel
        if not shard.is_file() or shard.stat().st_size < end:
            raise CheckpointError(f"{path}: shard file {rel} is missing or truncated")
    return meta


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


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                  ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                                  ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )  # fmt: skip
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's DCP metadata")
        return super().find_class(module, name)


def read_dcp_metadata(folder: Path):
    """DCP's .metadata, unpickled with the allow-list above."""
    meta = Path(folder) / ".metadata"
    if not meta.is_file():
        raise CheckpointError(f"sharded checkpoint {folder} has no .metadata (incomplete or not a DCP folder)")
    try:
        with open(meta, "rb") as f:
            return _DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{meta}: refused: {e}; nothing from it was run") from None
    except (EOFError, OSError, ValueError, AttributeError, TypeError, IndexError) as e:
        raise CheckpointError(f"{meta}: cannot read (truncated or not DCP metadata: {type(e).__name__})") from None


@functools.cache
def _safe_dcp_classes():
    """A FileSystemReader whose metadata goes through the allow-list, and load planners that read DCP's
    pickled non-tensor entries with weights_only=True (DCP's own use plain torch.load)."""
    import io

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import ReadItem

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{self.path}: per-rank DCP metadata is not supported")
            metadata = read_dcp_metadata(Path(self.path))
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
    read_dcp_metadata(folder)  # refused here with its own message (inside DCP it would be wrapped twice)
    planner._folder = folder
    no_dist = not (collective and dist.is_available() and dist.is_initialized())
    try:
        _load_state_dict(state, storage_reader=_safe_dcp_classes()[0](str(folder)), planner=planner, no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # DCP's own wraps reader errors (ours among them); a BaseException
        inner = next((x for x in _causes(e) if isinstance(x, CheckpointError)), None)
        if inner is not None:
            raise inner from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{folder}: cannot read sharded checkpoint ({first[:300]})") from None


def _causes(e: BaseException):
    """e and every exception it wraps: causes, contexts, and the per-rank failures of DCP's CheckpointException."""
    seen, stack = set(), [e]
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
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
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
