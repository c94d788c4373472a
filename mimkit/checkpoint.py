"""Checkpoints, written atomically; loading never executes code from them.

- ddp / single process: one torch file `checkpoint-N.pt`, loaded with `torch.load(weights_only=True)`.
- fsdp: a folder `checkpoint-N/` written by every rank through torch.distributed.checkpoint (DCP), plus
  `meta.pt` (step, RNG states, config). It is written as `.checkpoint-N.tmp/` and renamed only after every
  rank has finished, so it counts once all shards exist. DCP pickles its `.metadata`: we unpickle it
  first with an allow-list of DCP's own metadata types and refuse anything else.

Optimizer state is stored keyed by parameter name (torch.distributed.checkpoint.state_dict), so a
checkpoint moves between ddp and fsdp and between world sizes.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^checkpoint-(\d+)(\.pt)?$")


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint as one dict of plain tensors (a sharded folder is consolidated in memory)."""
    path = Path(path)
    if path.is_dir():
        return load_sharded_full(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


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


def check_dcp_metadata(folder: Path) -> None:
    """Unpickle DCP's .metadata with an allow-list before DCP itself (which uses plain pickle) reads it."""
    meta = folder / ".metadata"
    if not meta.is_file():
        raise FileNotFoundError(f"sharded checkpoint {folder} has no .metadata (incomplete or not a DCP folder)")
    with open(meta, "rb") as f:
        _DCPMetadataUnpickler(f).load()


def save_sharded(folder: Path, model_state: dict, optim_state: dict, meta: dict | None, is_main: bool) -> Path:
    """Every rank writes its shards into a temporary folder; after all have finished, rank 0 renames it."""
    import torch.distributed as dist
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


def load_sharded_into(folder: Path, model_state: dict, optim_state: dict) -> dict:
    """Fill (possibly sharded) state dicts in place from a DCP folder, resharding to this world size.
    Returns the meta dict."""
    import torch.distributed.checkpoint as dcp

    check_dcp_metadata(folder)
    dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
    return torch.load(folder / "meta.pt", map_location="cpu", weights_only=True)


def load_sharded_full(folder: Path) -> dict:
    """Consolidate a sharded checkpoint into one dict of plain tensors (for export, evaluation, or a
    single-file copy), without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    check_dcp_metadata(folder)
    with tempfile.TemporaryDirectory() as tmp:
        full_path = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(folder), str(full_path))
        full = torch.load(full_path, map_location="cpu", weights_only=True)
    meta = torch.load(folder / "meta.pt", map_location="cpu", weights_only=True)
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
