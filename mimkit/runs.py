"""A run folder's rules: one writer at a time (a lock file), a graceful stop on SIGTERM / SIGINT / SIGUSR1
(finish the step, write a checkpoint, exit with EXIT_STOPPED), and a resumed run that stays the run its
folder describes (config changes that alter the trajectory are refused unless named, and recorded).
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from mimkit.distributed import barrier
from mimkit.errors import MimkitError

log = logging.getLogger("mimkit")

# Exit status of a command stopped by a signal after writing its checkpoint: resumable, so a requeue script
# starts it again (sysexits' EX_TEMPFAIL, "try again later"). Bad input exits 2, a crash 1.
EXIT_STOPPED = 75

LOCK_NAME = ".mimkit.lock"
HISTORY_NAME = "config_history.jsonl"


class RunStopped(Exception):
    """A run stopped by a signal after writing a checkpoint from which it resumes exactly. Not a failure:
    the command line exits with EXIT_STOPPED."""

    def __init__(self, message: str, *, signal_name: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class RunFolderBusy(MimkitError, RuntimeError):
    """Another process holds the run folder's lock."""


class ConfigDrift(MimkitError, ValueError):
    """A resume whose config would change how the earlier steps were trained."""


# ---------------------------------------------------------------- graceful stop


def signal_by_name(name: str) -> signal.Signals:
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    try:
        return signal.Signals[key]
    except KeyError:
        raise MimkitError(
            f"train.stop_signal: unknown signal '{name}'; e.g. SIGUSR1, SIGUSR2, SIGHUP, or none"
        ) from None


class GracefulStop:
    """While active, SIGTERM, SIGINT and `extra` (SLURM's --signal, SIGUSR1 by default) only set `requested`:
    the loop finishes its optimizer step, writes a checkpoint and stops. A second signal ends the process at
    once (its default action). Handlers can only be installed from the main thread; elsewhere this is inert."""

    _active: list[GracefulStop] = []  # innermost last: what loops deep inside a command consult

    def __init__(self, extra: str | None = "SIGUSR1"):
        sigs = [signal.SIGTERM, signal.SIGINT]
        if extra and extra.lower() != "none":
            sigs.append(signal_by_name(extra))
        self.signals = list(dict.fromkeys(sigs))
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        GracefulStop._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
        if self in GracefulStop._active:
            GracefulStop._active.remove(self)

    @classmethod
    def requested_now(cls) -> str | None:
        """The signal that asked the innermost active stop to stop, if any."""
        return cls._active[-1].requested if cls._active else None

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:  # the second signal: stop now
            log.warning("%s again: stopping at once (the last checkpoint written is intact)", name)
            self.restore()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = name
        log.warning("%s received: finishing this step, then writing a checkpoint and stopping (send it again to stop "
                    "at once)", name)  # fmt: skip


def stop_flag() -> float:
    """1.0 once a stop signal arrived: an extra sum of the step's all-reduce, so every process stops at the same
    step."""
    return float(GracefulStop.requested_now() is not None)


def announce_stop(done: int, checkpoint: Path | None, out_dir: Path, metrics, close) -> RunStopped:
    """A training loop's graceful stop at step `done`, its checkpoint written: the `stopped` event in the metrics
    log, `close()` (the loop's bar and logs), every rank waited for, and one line that says so: the RunStopped the
    loop raises."""
    name = GracefulStop.requested_now() or "a signal on another process"
    metrics.write({"event": "stopped", "step": done, "signal": name, "checkpoint": str(checkpoint)})
    close()
    barrier()
    message = (f"stopped by {name} at step {done}; checkpoint {checkpoint or '(named by rank 0)'}; run the same "
               f"command to resume {out_dir} exactly")  # fmt: skip
    log.warning("%s", message)
    return RunStopped(message, signal_name=name, step=done, checkpoint=checkpoint)


# ---------------------------------------------------------------- one writer per folder


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"
    except (OSError, ValueError):
        return "another process"


class RunLock:
    """An exclusive lock on a run folder, held while a process writes it: `fcntl.flock` on `.mimkit.lock`
    (released by the kernel on any exit, a SIGKILL included, so a crashed holder never leaves it stale; on NFS
    the Linux client maps it to a server-side lock). The file names the holder's host and pid."""

    def __init__(self, folder: str | Path, key: str = "train.out_dir"):
        self.folder, self.key = Path(folder), key
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(f"{self.key}: {self.folder} is being written by {_holder(self.path)}; wait for "
                                    f"that run to end or choose another {self.key}") from None  # fmt: skip
            raise
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- config drift on resume


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every value that differs (a key one side lacks counts as its other value)."""
    a, b = flatten(old), flatten(new)
    missing = object()
    changes = {}
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key, missing), b.get(key, missing)
        if x is missing or y is missing:
            continue  # a key added or retired between versions: its default applied then and now
        if x != y:
            changes[key] = (x, y)
    return changes


def check_drift(
    changes: dict[str, tuple[Any, Any]],
    free: set[str],
    allowed: set[str],
    where: Path,
    allow_key: str = "train.resume_allow",
) -> dict[str, tuple[Any, Any]]:
    """Refuse changes outside `free` (keys that never alter the trajectory) and `allowed` (named by the user).
    Returns the changes that alter the trajectory and were allowed."""
    refused = {k: v for k, v in changes.items() if k not in free and k not in allowed}
    if refused:
        listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
        raise ConfigDrift(f"resuming {where} would change how it trains: {listed}; to change them on purpose, add "
                          f"{allow_key}={','.join(refused)} (recorded in {HISTORY_NAME}), or start a new run in "
                          "another folder")  # fmt: skip
    return {k: v for k, v in changes.items() if k in allowed}


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def record_segment(
    folder: Path,
    step: int,
    changes: dict[str, tuple[Any, Any]],
    allowed: dict[str, tuple[Any, Any]],
    resumed_from: Path | None,
) -> None:
    """Append one line per segment (start or resume) to config_history.jsonl: the step it starts at and what
    changed from the checkpoint's config."""
    record = {"step": step, "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "resumed_from": str(resumed_from) if resumed_from else None,
              "changes": {k: [a, b] for k, (a, b) in changes.items()}, "allowed": sorted(allowed)}  # fmt: skip
    with open(folder / HISTORY_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_history(folder: Path) -> list[dict]:
    path = Path(folder) / HISTORY_NAME
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
