"""Reading weight files without running code: safetensors, or ``torch.load(weights_only=True)`` with a short
allow-list of inert classes that official training checkpoints store next to their weights
(``argparse.Namespace`` holding the run's arguments, paths, numpy scalars). Anything else in a pickle is
refused, and the error names the file and the globals.

Every way a file can fail to load (truncated, not a PyTorch file at all, a damaged zip or pickle) becomes one
error line naming the file: :func:`weights_only_load` is the one place that calls ``torch.load``, and it turns
every ``Exception`` (never KeyboardInterrupt / SystemExit) into :class:`LoadRefused` or :class:`LoadFailed`,
which each reader reports as its own error class."""

from __future__ import annotations

import argparse
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from mimkit.errors import MimkitError


class InteropError(MimkitError, ValueError):
    """A problem with a file to import or export, naming the file and, where there is one, the key."""


# =============================================================================================
# Reading files without running code


NUMERIC_KINDS = "biufc"  # numpy dtype kinds of plain numbers: bool, int, uint, float, complex


class InertDType:
    """What a pickled numpy dtype becomes in a weights-only load: a plain numeric dtype, built from its string code,
    whose pickled state (byte order only) is checked before it is applied. numpy's own ``dtype.__setstate__``
    trusts its input (a crafted state crashes the interpreter), so it is never called on file data."""

    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:] == (None, None, None, -1, -1, 0)):  # fmt: skip
            raise ValueError(f"numpy dtype state {state!r:.80} is not that of a plain numeric dtype")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])

    def __repr__(self) -> str:
        return f"InertDType({self.dtype})"


def numeric_dtype(spec, align=False, copy=False):
    """``numpy.dtype(spec)`` for a plain numeric type code ('f8', '<i4', 'u1', 'b1', 'c16'), as an InertDType."""
    import numpy as np

    if not isinstance(spec, str) or len(spec) > 8:
        raise ValueError(f"numpy dtype {spec!r:.40} is not a numeric type code")
    dtype = np.dtype(spec)
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"numpy dtype {spec!r} is not a plain numeric type")
    return InertDType(dtype)


def numeric_scalar(dtype, data=None):
    """A numpy scalar (what ``numpy.core.multiarray.scalar`` rebuilds) of a numeric dtype from its exact bytes."""
    import numpy as np

    dtype = dtype.dtype if isinstance(dtype, InertDType) else dtype
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_KINDS or dtype.fields is not None:
        raise ValueError("a numpy scalar of a dtype that is not plain numeric")
    if isinstance(data, str):  # a Python 2 pickle read with encoding='latin1'
        data = data.encode("latin1")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ValueError(f"a numpy {dtype} scalar needs {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype)[0].copy()


def _inert_globals() -> list:
    """Classes official training checkpoints pickle beside their tensors, none of which runs code
    when rebuilt: the argparse Namespace of the run's arguments, paths, numpy scalars and their dtypes (rebuilt by
    the checked stand-ins above, never by numpy's own unpickling). torch's weights-only unpickler looks each up by
    its exact ``module.qualname`` (no module prefixes, no attribute chains)."""
    return [
        argparse.Namespace,
        pathlib.PosixPath,
        pathlib.WindowsPath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        (numeric_dtype, "numpy.dtype"),
        (numeric_scalar, "numpy.core.multiarray.scalar"),
        (numeric_scalar, "numpy._core.multiarray.scalar"),
        (InertDType, "mimkit.files.InertDType"),  # so that a dtype's pickled state is applied (checked)
    ]


def inert_global_names() -> set[str]:
    """The fully qualified names :func:`_inert_globals` admits."""
    return {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _inert_globals()}


class LoadRefused(Exception):
    """The file asks for something weights-only loading does not allow (a global, a pickle instruction);
    `detail` says what. Nothing from the file was run."""

    def __init__(self, detail: str, globals_: list[str] | None = None):
        super().__init__(detail)
        self.detail, self.globals = detail, globals_ or []


class LoadFailed(Exception):
    """The file cannot be read (empty, truncated, damaged, or not a PyTorch file); `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a torch.save zip archive (the second: an empty archive)


def sniff(head: bytes) -> str:
    """What the first bytes of a file say it is: 'empty', 'zip' (torch.save), 'pickle' (torch's legacy format,
    a plain pickle), 'safetensors', or 'other'."""
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode, protocol 2..5
        return "pickle"
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < (100 << 20) and head[8:9] == b"{":
        return "safetensors"
    return "other"


def _head(source) -> bytes:
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            return f.read(16)
    pos = source.tell()
    try:
        return source.read(16)
    finally:
        source.seek(pos)


def _first_line(text: object, default: str) -> str:
    lines = [x.strip() for x in str(text).splitlines() if x.strip()]
    return (lines[0] if lines else default)[:300]


def _unpickling_error(e: pickle.UnpicklingError) -> Exception:
    """torch's weights-only failure (a multi-paragraph message) as LoadRefused / LoadFailed with one line."""
    text = str(e)
    found = re.search(r"GLOBAL (\S+) was not an allowed global", text) or re.search(r"GLOBAL (\S+) whose module", text)
    if found:
        return LoadRefused(f"it pickles {found.group(1)}, which is not allowed", [found.group(1)])
    op = re.search(r"Unsupported operand (\S+)", text)
    if op:
        return LoadRefused(f"it uses pickle instruction {op.group(1)}, which weights-only loading does not allow")
    inner = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    inner = inner.replace("Weights only load failed.", "")
    line = _first_line(inner, type(e).__name__)
    if re.search(r"Can only|allowlist|must be imported|not an allowed", line):
        return LoadRefused(line)
    return LoadFailed(line)


def weights_only_load(source, extra_globals: list | tuple = ()) -> Any:
    """``torch.load(source, weights_only=True)`` (a path or a binary file object) on the CPU, with
    `extra_globals` also allowed. Raises LoadRefused or LoadFailed for every way the file can fail, with a
    one-line detail; other BaseExceptions (KeyboardInterrupt, SystemExit) pass through."""
    try:
        kind = sniff(_head(source))
    except OSError as e:
        raise LoadFailed(f"cannot open it: {e.strerror or e}") from None
    if kind == "empty":
        raise LoadFailed("the file is empty")
    if kind not in ("zip", "pickle"):
        raise LoadFailed(
            "not a PyTorch file: it is neither a torch.save zip archive nor a pickle"
            + (" (it looks like safetensors: name it .safetensors)" if kind == "safetensors" else "")
        )
    try:
        if extra_globals:
            with torch.serialization.safe_globals(list(extra_globals)):
                return torch.load(source, map_location="cpu", weights_only=True)
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(e) from None
    except MemoryError:
        raise LoadFailed("damaged: it asks for more memory than there is (MemoryError)") from None
    except RecursionError:
        raise LoadFailed("damaged: nested too deeply (RecursionError)") from None
    except Exception as e:  # struct.error, UnicodeDecodeError, zip / RuntimeError, IndexError, KeyError, ...
        raise LoadFailed(f"{type(e).__name__}: {_first_line(e, 'no detail')}") from None


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` plus the inert allowlist; clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return weights_only_load(path, _inert_globals())
    except LoadRefused as e:
        blocked = e.globals
        if not blocked:
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception:
                found = []
            blocked = [g for g in found if g not in inert_global_names()]
        what = ", ".join(blocked) if blocked else e.detail
        raise InteropError(
            f"{path}: refused to load: it pickles Python objects that weights-only loading does not allow ({what}). "
            "Nothing from the file was run. If you trust it, re-save only its tensors (e.g. "
            "torch.save({'model': ckpt['model']}, 'weights.pth') in an environment you control) and import that."
        ) from None
    except LoadFailed as e:
        raise InteropError(f"{path}: cannot read as a PyTorch checkpoint ({e.reason})") from None


def load_weights_file(path: str | Path) -> Any:
    """A .safetensors file (tensors only) or a PyTorch file (see :func:`load_torch_file`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"weights not found: {path}")
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except MemoryError:
            raise InteropError(
                f"{path}: cannot read as safetensors (damaged: it asks for more memory than there is)"
            ) from None
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
            raise InteropError(
                f"{path}: cannot read as safetensors ({type(e).__name__}: {_first_line(e, 'no detail')})"
            ) from None
    return load_torch_file(path)


def is_weights_file(path: str | Path) -> bool:
    """Whether a file's first bytes are those of a torch.save archive, a pickle or a safetensors file."""
    try:
        with open(path, "rb") as f:
            return sniff(f.read(16)) in ("zip", "pickle", "safetensors")
    except OSError:
        return False


__all__ = [
    "InteropError",
    "LoadFailed",
    "LoadRefused",
    "is_weights_file",
    "load_torch_file",
    "load_weights_file",
    "sniff",
    "weights_only_load",
]
