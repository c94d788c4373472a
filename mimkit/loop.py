"""What every training loop shares (pretraining, fine-tuning, linear probing, tokenizer training): the run folder's
bookkeeping, the walk over epochs and steps, and what happens after each optimizer step.

    loop = TrainLoop("finetune", cfg.train, engine=engine, metrics=metrics, save=save, ...)
    for step, batches in loop.steps(open_epoch):      # open_epoch(epoch, in_epoch): the epoch's batches, resumed
        result = loop.step(step, forward)             # StepEngine.step + the stop / time-limit flags, divergence
        loop.after_step(result, lr)                   # metrics record, bar, epoch line, hooks, checkpoint, stop
    loop.close()

After a step, in this order: the metrics record (every `log_every` steps and at the last), the progress bar, the
epoch summary line at an epoch's end, the hooks that run before the checkpoint (an evaluation, whose result the
checkpoint holds), the checkpoint (periodic, at the last step, on a stop signal; no periodic one inside a streak of
non-finite steps), the graceful stop, then the end-of-epoch monitors (k-NN trend, picture grids).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimkit import distributed as mdist
from mimkit.checkpoint import atomic_write_text
from mimkit.engine import Forward, StepEngine, StepResult, TrainingDiverged
from mimkit.logs import EpochSummary, progress_bar
from mimkit.metrics import MetricsLog
from mimkit.runs import RunFolderBusy, RunLock, announce_stop, record_segment, stop_flag

log = logging.getLogger("mimkit")


# ---------------------------------------------------------------- decisions (pure)


def due(count: int, every: int | None) -> bool:
    """Every `every`-th count (never when `every` is 0 or None)."""
    return every is not None and every > 0 and count % every == 0


def save_due(done: int, *, last_step: int, steps_per_epoch: int, save_every_steps: int | None,
             save_every_epochs: int | None, nonfinite_streak: int = 0, stopping: bool = False) -> bool:  # fmt: skip
    """Whether step `done` writes a checkpoint: every `save_every_steps` steps and every `save_every_epochs` epochs
    (not inside a streak of non-finite steps: the last one before it is the one to go back to), at the last step,
    and when the run stops on a signal."""
    end_of_epoch = done % steps_per_epoch == 0
    periodic = due(done, save_every_steps) or (end_of_epoch and due(done // steps_per_epoch, save_every_epochs))
    return (periodic and nonfinite_streak == 0) or done == last_step or stopping


def out_of_time(start: float, max_minutes: float | None, now: float | None = None) -> bool:
    """Whether `max_minutes` (None: no limit) have passed since `start` (time.perf_counter())."""
    now = time.perf_counter() if now is None else now
    return max_minutes is not None and now - start > 60 * max_minutes


# ---------------------------------------------------------------- the run folder


def claim_run_folder(stack: contextlib.ExitStack, out_dir: Path, is_main: bool, key: str = "train.out_dir") -> None:
    """One writer per run folder: rank 0 holds its RunLock (released by `stack`), and every rank learns whether it
    got it (RunFolderBusy on all of them if not)."""
    busy = None
    if is_main:
        try:
            stack.enter_context(RunLock(out_dir, key=key))
        except RunFolderBusy as e:
            busy = str(e)
    busy = next((b for b in mdist.all_gather_objects(busy) if b), None)
    if busy:
        raise RunFolderBusy(busy)


def prepare_run_folder(out_dir: Path, config_text: str, segment: tuple | None = None) -> None:
    """Rank 0, before the first step: the folder, without the temporary files a kill during a checkpoint write left,
    its config.yaml, and (`segment`: (step, changes, allowed, resumed_from)) one line of config_history.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    atomic_write_text(out_dir / "config.yaml", config_text)
    if segment is not None:
        record_segment(out_dir, *segment)


# ---------------------------------------------------------------- the loop


@dataclass
class Hook:
    """A task's callable run at the end of every `every`-th epoch, given the step: an evaluation (`before_save`: the
    checkpoint holds its result; `at_last_step`: also at a last step mid-epoch) or a monitor (after the checkpoint,
    skipped when the run stops)."""

    every: int | None
    run: Callable[[int], Any]
    before_save: bool = False
    at_last_step: bool = False


class TrainLoop:
    """The bookkeeping around a task's optimizer steps. `t` is the task's run section (log_every, save_every_steps,
    save_every_epochs, progress; max_minutes if it has one); `save(done)` writes a checkpoint and returns its path
    (None on ranks that write none)."""

    def __init__(self, name: str, t, *, engine: StepEngine, metrics: MetricsLog, save: Callable[[int], Path | None],
                 out_dir: Path, is_main: bool, step: int, last_step: int, steps_per_epoch: int, effective_batch: int,
                 hooks: tuple[Hook, ...] = (), step_lines: bool = False, clock_s: float = 0.0) -> None:  # fmt: skip
        self.name, self.t, self.engine, self.metrics, self.save = name, t, engine, metrics, save
        self.out_dir, self.is_main, self.hooks, self.step_lines = out_dir, is_main, hooks, step_lines
        self.last_step, self.steps_per_epoch, self.effective_batch = last_step, steps_per_epoch, effective_batch
        self.done, self.current, self.loss = step, step, float("nan")
        self.max_minutes = getattr(t, "max_minutes", None)
        budget = getattr(t, "budget_minutes", None)  # pretraining's compute budget, on which its schedules run
        self.budget_s = None if budget is None else 60.0 * budget
        # the run's training seconds so far, agreed by every process (a resumed run's start from its checkpoint)
        self.clock_s = self.clock_start = clock_s
        self.progress = None
        if is_main and t.progress:
            self.progress = progress_bar(total=last_step, initial=step, desc=name, unit="step", dynamic_ncols=True)
        self.start = self.window_start = time.perf_counter()
        self.window_steps = 0
        self.epoch_line = EpochSummary(steps_per_epoch, effective_batch, enabled=is_main)

    def steps(self, open_epoch: Callable[[int, int], Any]) -> Iterator[tuple[int, Any]]:
        """(step, its epoch's batches) for every step left; `open_epoch(epoch, in_epoch)` gives an epoch's batches
        from its `in_epoch`-th step on. Ends early when the time limit or the compute budget shortens the run."""
        start = self.done
        while start < self.last_step:
            epoch, in_epoch = divmod(start, self.steps_per_epoch)
            batches = open_epoch(epoch, in_epoch)
            for step in range(start, min((epoch + 1) * self.steps_per_epoch, self.last_step)):
                yield step, batches
                if self.done >= self.last_step:  # max_minutes or budget_minutes reached mid-epoch
                    break
            start = self.done

    def schedule_step(self, step: int, total_steps: int) -> int:
        """The step the schedules (lr, weight decay, a method's ramps and EMA) are read at: `step`, or under a
        compute budget (train.budget_minutes) the share of it spent so far x `total_steps`."""
        if self.budget_s is None:
            return step
        return min(int(self.clock_s / self.budget_s * total_steps), total_steps - 1)

    def step(self, step: int, forward: Forward, extras: Callable[[], Mapping[str, float]] | None = None,
             on_update: Callable[[], None] | None = None) -> StepResult:  # fmt: skip
        """One optimizer step through the engine; its all-reduce also carries the task's `extras`, the time limit
        and the stop flag (every rank stops at the same step). A diverged run writes the `diverged` event, closes
        the bar and the logs, and raises TrainingDiverged."""
        self.current = step

        def flags() -> dict[str, float]:
            named = dict(extras() if extras is not None else {})
            if self.max_minutes is not None:
                named["out_of_time"] = float(out_of_time(self.start, self.max_minutes))
            if self.budget_s is not None:  # this process's clock; the all-reduce sums it over the processes
                named["clock_s"] = self.clock_start + time.perf_counter() - self.start
            named["stop"] = stop_flag()
            return named

        try:
            return self.engine.step(step, forward, flags, on_update=on_update)
        except TrainingDiverged:
            self.metrics.write({"event": "diverged", "step": step + 1, "nonfinite_steps": self.engine.nonfinite_total})
            self.close()
            raise

    def after_step(self, result: StepResult, lr: float, fields: dict | None = None, tail: dict | None = None,
                   loss: float | None = None) -> None:  # fmt: skip
        """The bookkeeping of the step just run: `loss` (default: the step's) and `fields` go in the metrics record
        before its time, `tail` after it. Raises RunStopped after the checkpoint when a stop signal arrived."""
        done = self.done = self.current + 1
        self.loss = result.loss if loss is None else loss
        self.window_steps += 1
        self.epoch_line.add(self.loss)
        stopping = result.extras.get("stop", 0.0) > 0 and done < self.last_step  # on some rank: all stop here
        if self.budget_s is not None:
            self.clock_s = result.extras.get("clock_s", 0.0) / mdist.world_size()
        spent = self.budget_s is not None and self.clock_s >= self.budget_s
        if (result.extras.get("out_of_time", 0.0) > 0 or spent) and done < self.last_step:  # on any rank: stop here
            self.last_step = done
            if self.progress is not None:
                self.progress.total = done
        if due(done, self.t.log_every) or done == self.last_step:
            self.record(done, lr, fields, tail)
        if self.progress is not None:
            self.progress.update(1)
        end_of_epoch = done % self.steps_per_epoch == 0
        if end_of_epoch:  # before the evaluation and monitors, whose time is not training's
            self.epoch_line.end_epoch(done, lr, self.last_step)
        ran = self.run_hooks(done, before_save=True)
        if save_due(done, last_step=self.last_step, steps_per_epoch=self.steps_per_epoch,
                    save_every_steps=self.t.save_every_steps, save_every_epochs=self.t.save_every_epochs,
                    nonfinite_streak=self.engine.consecutive_nonfinite, stopping=stopping):  # fmt: skip
            self.engine.last_checkpoint = self.save(done) or self.engine.last_checkpoint
        if stopping:
            raise announce_stop(done, self.engine.last_checkpoint, self.out_dir, self.metrics, self.close)
        ran = self.run_hooks(done, before_save=False) or ran
        if ran:
            self.window_start = time.perf_counter()
        if end_of_epoch:
            self.epoch_line.restart_clock()  # the next epoch's training time starts after its evaluation and save

    def record(self, done: int, lr: float, fields: dict | None, tail: dict | None) -> None:
        """The metrics record of step `done` (img/s over the steps since the last one), and the bar's postfix."""
        img_s = self.window_steps * self.effective_batch / max(time.perf_counter() - self.window_start, 1e-9)
        self.metrics.write({"step": done, "epoch": round(done / self.steps_per_epoch, 4), "loss": self.loss, "lr": lr,
                            "img_per_s": round(img_s, 2), **(fields or {}), "time": time.time(), **(tail or {})})  # fmt: skip
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{self.loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}", refresh=False)
        elif self.step_lines and self.is_main:
            log.info("step %d/%d loss %.4f lr %.3g %.1f img/s", done, self.last_step, self.loss, lr, img_s)
        self.window_start, self.window_steps = time.perf_counter(), 0

    def run_hooks(self, done: int, before_save: bool) -> bool:
        """The hooks of this kind due at step `done`; whether any ran."""
        end_of_epoch, ran = done % self.steps_per_epoch == 0, False
        for hook in self.hooks:
            if hook.before_save != before_save:
                continue
            if (end_of_epoch and due(done // self.steps_per_epoch, hook.every)) or (
                hook.at_last_step and done == self.last_step
            ):
                hook.run(done)
                ran = True
        return ran

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.metrics.close()
