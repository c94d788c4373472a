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


def install_hint(extra: str, instead: str | None = None) -> str:
    """The pip command that installs an extra, and the setting that does without it."""
    return f"pip install 'mimkit[{extra}]'" + (f" (or {instead})" if instead else "")


def tensorboard_writer(key: str = "train.tensorboard"):
    """torch's TensorBoard `SummaryWriter` class, or one line naming the `tensorboard` extra and `key`, the config key
    that turns TensorBoard off (torch.utils.tensorboard imports the tensorboard package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise MissingExtra(f"{key}: TensorBoard logging needs the tensorboard package: "
                           f"{install_hint('tensorboard', f'{key}=false')}") from e  # fmt: skip
    return SummaryWriter
