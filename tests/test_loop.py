"""mimkit.loop on its own: the checkpoint decisions, the time limit, and a TrainLoop driven over a tiny linear model
(records, checkpoints, epoch walk after a mid-epoch resume, the time limit, a stop signal, divergence)."""

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from mimkit.engine import StepEngine, TrainingDiverged
from mimkit.loop import Hook, TrainLoop, due, out_of_time, save_due
from mimkit.metrics import MetricsLog
from mimkit.runs import GracefulStop, RunStopped


def test_due_never_fires_for_zero_or_none():
    assert [n for n in range(1, 10) if due(n, 3)] == [3, 6, 9]
    assert not any(due(n, 0) or due(n, None) for n in range(1, 10))


def saves(last_step=20, spe=5, every_steps=None, every_epochs=2, streak_at=(), stop_at=None) -> list[int]:
    return [d for d in range(1, last_step + 1)
            if save_due(d, last_step=last_step, steps_per_epoch=spe, save_every_steps=every_steps,
                        save_every_epochs=every_epochs, nonfinite_streak=int(d in streak_at), stopping=d == stop_at)]  # fmt: skip


def test_checkpoint_decisions():
    assert saves() == [10, 20]  # every 2nd epoch of 5 steps, and the last step
    assert saves(last_step=17) == [10, 17]  # a last step mid-epoch
    assert saves(every_steps=4, every_epochs=None) == [4, 8, 12, 16, 20]
    assert saves(every_steps=3) == [3, 6, 9, 10, 12, 15, 18, 20]
    # inside a streak of non-finite steps no periodic checkpoint; the last step and a stop still write one
    assert saves(streak_at=(10, 20)) == [20]
    assert saves(streak_at=(7,), stop_at=7) == [7, 10, 20]


def test_time_limit():
    assert not out_of_time(100.0, None, now=1e9)
    assert not out_of_time(100.0, 1.0, now=160.0)
    assert out_of_time(100.0, 1.0, now=160.5)


class Run:
    """A TrainLoop over a 1-parameter regression, steps_per_epoch 4, last step 10, with its saves and hook calls."""

    def __init__(self, tmp_path, step=0, nan_from=None, hooks=(), **train):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.engine = StepEngine(self.model, opt, device=torch.device("cpu"), precision="fp32", max_nonfinite_steps=2)
        t = SimpleNamespace(**{"log_every": 3, "save_every_steps": None, "save_every_epochs": 1, "progress": False,
                               **train})  # fmt: skip
        self.saved, self.calls, self.nan_from = [], [], nan_from
        self.metrics = MetricsLog(tmp_path, True, False)
        self.loop = TrainLoop("test", t, engine=self.engine, metrics=self.metrics, save=self.save, out_dir=tmp_path,
                              is_main=True, step=step, last_step=10, steps_per_epoch=4, effective_batch=2,
                              hooks=hooks)  # fmt: skip
        self.path = tmp_path / "metrics.jsonl"

    def save(self, done):
        self.saved.append(done)
        return f"ckpt-{done}"

    def run(self, before_step=lambda step: None):
        for step, batches in self.loop.steps(lambda epoch, in_epoch: iter([(epoch, in_epoch)] * 8)):
            before_step(step)
            epoch_start = next(batches)
            self.calls.append((step, epoch_start))
            x = torch.ones(2, 1)
            bad = self.nan_from is not None and step >= self.nan_from

            def forward(micro):
                y = self.model(x)
                return ((y - 1) ** 2).mean() * (float("nan") if bad else 1.0), {"term": 1.0}

            result = self.loop.step(step, forward, lambda: {"seen": 2.0})
            assert result.extras["seen"] == 2.0
            self.loop.after_step(result, 0.1, {"n": step}, result.terms)
        self.loop.close()

    def records(self):
        return [json.loads(x) for x in self.path.read_text().splitlines()]


def test_the_loop_records_saves_and_walks_epochs_from_a_mid_epoch_resume(tmp_path):
    events = []
    hooks = (Hook(1, lambda d: events.append(("eval", d)), before_save=True, at_last_step=True),
             Hook(2, lambda d: events.append(("monitor", d))))  # fmt: skip
    r = Run(tmp_path, step=2, hooks=hooks)
    r.run()
    # each epoch's batches opened once, at the resumed position
    assert r.calls == [(2, (0, 2)), (3, (0, 2)), (4, (1, 0)), (5, (1, 0)), (6, (1, 0)), (7, (1, 0)), (8, (2, 0)),
                       (9, (2, 0))]  # fmt: skip
    assert r.saved == [4, 8, 10] and r.engine.last_checkpoint == "ckpt-10"
    assert events == [("eval", 4), ("eval", 8), ("monitor", 8), ("eval", 10)]
    recs = r.records()
    assert [x["step"] for x in recs] == [3, 6, 9, 10]
    assert list(recs[0]) == ["step", "epoch", "loss", "lr", "img_per_s", "n", "time", "term"]
    assert recs[-1]["n"] == 9 and recs[-1]["epoch"] == 2.5 and r.loop.done == 10


def test_the_time_limit_ends_the_run_at_the_step_it_is_reached_with_a_checkpoint(tmp_path):
    r = Run(tmp_path, max_minutes=1.0)
    r.loop.start -= 3600  # an hour ago: the first step is past the limit
    r.run()
    assert [c[0] for c in r.calls] == [0] and r.saved == [1] and r.loop.last_step == 1
    assert [x["step"] for x in r.records()] == [1]


def test_a_stop_signal_saves_and_raises_run_stopped(tmp_path):
    r = Run(tmp_path)
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(GracefulStop(None))

        def signal_at_6(step):
            if step == 5:
                stop.requested = "SIGTERM"

        with pytest.raises(RunStopped) as stopped:
            r.run(signal_at_6)
    assert stopped.value.step == 6 and stopped.value.checkpoint == "ckpt-6" and r.saved == [4, 6]
    assert r.records()[-1]["event"] == "stopped"


def test_divergence_writes_the_event_and_keeps_the_last_checkpoint(tmp_path):
    r = Run(tmp_path, nan_from=5)
    with pytest.raises(TrainingDiverged, match="ckpt-4"):
        r.run()
    assert r.saved == [4] and r.records()[-1] == {"event": "diverged", "step": 7, "nonfinite_steps": 2}
