"""Reading weight files without running code: safetensors, or ``torch.load(weights_only=True)`` with a short
allow-list of inert classes that official training checkpoints store next to their weights
(``argparse.Namespace`` holding the run's arguments, paths, numpy scalars). Anything else in a pickle is
refused, and the error names the file and the globals."""

from __future__ import annotations

import argparse
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch

from mimkit.errors import MimkitError


class InteropError(MimkitError, ValueError):
    """A problem with a file to import or export, naming the file and, where there is one, the key."""


# =============================================================================================
# Reading files without running code


def _inert_globals() -> list:
    """Classes official training checkpoints pickle beside their tensors, none of which runs code
    when rebuilt: the argparse Namespace of the run's arguments, paths, numpy scalars and dtypes."""
    import numpy as np

    allowed: list = [
        argparse.Namespace,
        pathlib.PosixPath,
        pathlib.WindowsPath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        np.dtype,
    ]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed += [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` plus the inert allowlist; clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_inert_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            found = []
        inert = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in _inert_globals()}
        blocked = [g for g in found if g not in inert]
        what = ", ".join(blocked) if blocked else str(e).splitlines()[0]
        raise InteropError(
            f"{path}: refused to load: it pickles Python objects that weights-only loading does not allow ({what}). "
            "Nothing from the file was run. If you trust it, re-save only its tensors (e.g. "
            "torch.save({'model': ckpt['model']}, 'weights.pth') in an environment you control) and import that."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InteropError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def load_weights_file(path: str | Path) -> Any:
    """A .safetensors file (tensors only) or a PyTorch file (see :func:`load_torch_file`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"weights not found: {path}")
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise InteropError(f"{path}: cannot read as safetensors ({type(e).__name__}: {e})") from None
    return load_torch_file(path)
