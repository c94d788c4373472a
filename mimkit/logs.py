"""Logging for the Python API: mimkit logs to the "mimkit" logger; when the program configured no logging at all
(no handler on it or on the root logger), mimkit adds one INFO handler to stderr, as the command line shows.

While a progress bar is shown (`progress_bar`), the console handlers of the "mimkit" and the root logger write
through `tqdm.write`: each log line gets a line of its own above the bar instead of being printed onto it."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def ensure_logging() -> None:
    logger = logging.getLogger("mimkit")
    if logger.hasHandlers():  # the application's own setup (or the command line's basicConfig) decides
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def _is_console(handler: logging.Handler) -> bool:
    """A plain StreamHandler on stdout / stderr (not a file handler; not already a stand-in: bars nest)."""
    return type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr, sys.__stdout__,
                                                                         sys.__stderr__)  # fmt: skip


class _TqdmHandler(logging.StreamHandler):
    """A console handler's stand-in while a bar is shown: the same stream, level, format and filters; the line
    is written by tqdm.write, which clears the bar, writes the line and draws the bar again below it."""

    def __init__(self, original: logging.StreamHandler):
        super().__init__(original.stream)
        self.setLevel(original.level)
        self.setFormatter(original.formatter)
        for f in original.filters:
            self.addFilter(f)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def logging_through_tqdm():
    """Within: the console handlers of the "mimkit" and root loggers write through tqdm.write (none is added, so a
    line is never written twice; other handlers, e.g. files, are left as they are)."""
    loggers = [logging.getLogger("mimkit"), logging.getLogger()]
    swapped: dict[logging.Handler, logging.Handler] = {}  # stand-in -> the handler it stands for
    try:
        for lg in loggers:
            handlers = []
            for h in lg.handlers:
                if _is_console(h):
                    swapped[_TqdmHandler(h)] = h
                    h = next(reversed(swapped))
                handlers.append(h)
            lg.handlers = handlers
        yield
    finally:  # only the stand-ins are swapped back: handlers added or removed meanwhile stay so
        for lg in loggers:
            lg.handlers = [swapped.get(h, h) for h in lg.handlers]


def progress_bar(**kwargs):
    """A tqdm bar (tqdm.auto) during whose life log lines go through tqdm.write (logging_through_tqdm); closing
    the bar (or dropping it) restores the handlers."""
    from tqdm.auto import tqdm

    redirect = logging_through_tqdm()
    redirect.__enter__()
    try:
        bar = tqdm(**kwargs)
    except BaseException:
        redirect.__exit__(None, None, None)
        raise
    close = bar.close
    state = {"open": True}

    def close_and_restore() -> None:
        try:
            close()
        finally:
            if state["open"]:
                state["open"] = False
                redirect.__exit__(None, None, None)

    bar.close = close_and_restore
    return bar


def clock_text(seconds: float) -> str:
    """'1h02m03s', '2m03s', '3.4s'."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


class EpochSummary:
    """The line every training loop logs at an epoch's end: the mean of the epoch's finite step losses (this
    segment's, after a mid-epoch resume), the lr, img/s over the epoch's training time (the evaluations and
    monitors after it left out) and the time since the loop started."""

    def __init__(self, steps_per_epoch: int, effective_batch: int, enabled: bool = True):
        self.steps_per_epoch, self.effective_batch, self.enabled = steps_per_epoch, effective_batch, enabled
        self.run_start = self.epoch_start = time.perf_counter()
        self.losses: list[float] = []

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def end_epoch(self, done: int, lr: float, last_step: int) -> None:
        """At the epoch's last step, before its evaluation or monitor: log the line, start the next epoch's losses."""
        if self.enabled:
            finite = [x for x in self.losses if math.isfinite(x)]
            img_s = len(self.losses) * self.effective_batch / max(time.perf_counter() - self.epoch_start, 1e-9)
            logging.getLogger("mimkit").info(
                "epoch %d/%d | mean loss %s over %d steps | lr %.3g | %.1f img/s | elapsed %s",
                done // self.steps_per_epoch, -(-last_step // self.steps_per_epoch),
                f"{sum(finite) / len(finite):.4f}" if finite else "nan", len(self.losses), lr, img_s,
                clock_text(time.perf_counter() - self.run_start),
            )  # fmt: skip
        self.losses = []

    def restart_clock(self) -> None:
        """After the epoch's evaluation, monitor and checkpoint: the next epoch's training time starts now."""
        self.epoch_start = time.perf_counter()
