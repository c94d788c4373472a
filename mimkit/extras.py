"""Optional dependencies (pyproject extras): a missing one is named in one line with the pip command."""

from __future__ import annotations

import importlib

from mimkit.errors import MimkitError


class MissingExtra(MimkitError, ImportError):
    """An optional dependency is not installed."""


def require(module: str, extra: str, what: str):
    """Import `module`, or raise one line naming the extra that provides it: `pip install 'mimkit[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{what} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install 'mimkit[{extra}]' (or pip install {module.split('.')[0]})") from e  # fmt: skip
