"""Logging and the terminal: log lines never land on the progress bar's line, the k-NN monitor and a per-epoch
summary reach the terminal, the gradient norm is always logged, TensorBoard gets curves only, and train.loggers
writes OUT_DIR/metrics.csv (one row per step, also after a resume)."""

import contextlib
import csv
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images

from mimkit.config import ConfigError, load_config
from mimkit.logs import FORMAT
from mimkit.metrics import MetricsLog
from mimkit.train import pretrain

TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) ")


@contextlib.contextmanager
def console():
    """A console handler on the "mimkit" logger writing to the (captured) stderr, as the command line's."""
    logger = logging.getLogger("mimkit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # (not `.level =`: setLevel clears the logger's cached isEnabledFor answers)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def labelled_npz(tmp_path):
    path = tmp_path / "labelled.npz"
    x, y = make_images(48, seed=3), np.arange(48) % 3
    np.savez(path, x_train=x, y_train=y, x_test=x[:16], y_test=y[:16])
    return str(path)


def records(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_lines_start_their_own_line_under_a_bar_and_the_epoch_and_knn_lines_show(tiny_cfg, labelled_npz, capsys,
                                                                                      one_thread):  # fmt: skip
    cfg = tiny_cfg(f"data.path={labelled_npz}", "train.progress=true", "train.knn_every_epochs=1",
                   "train.knn_samples=[24,12]", "train.log_every=2")  # fmt: skip
    with console():
        pretrain(cfg)
    err = capsys.readouterr().err
    assert "pretrain:" in err and ("step/s" in err or "s/step" in err)  # the bar was drawn
    segments = re.split(r"[\r\n]", err)
    logged = [s for s in segments if " INFO " in s or " WARNING " in s]
    assert logged, err[-2000:]
    for s in logged:  # the bar's text never precedes a log line's timestamp
        assert TIMESTAMP.match(s), repr(s)
    summaries = [s for s in logged if re.search(r"INFO epoch \d+/2 \| mean loss [\d.]+ over \d+ steps \| lr \S+ \| "
                                                 r"[\d.]+ img/s \| elapsed \S+$", s)]  # fmt: skip
    assert len(summaries) == 2, logged
    knn = [s for s in logged if re.search(r"INFO epoch [12] k-NN monitor: top-1 [\d.]+%", s)]
    assert len(knn) == 2, logged
    steps = [r for r in records(Path(cfg.train.out_dir) / "metrics.jsonl") if "loss" in r]
    assert steps and all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in steps)  # no clipping set


def test_grad_norm_without_clipping_equals_clip_grad_norm(tiny_cfg, one_thread):
    """The norm logged without optim.clip_grad is the one clip_grad_norm_ reports (with a clip too large to act),
    and reading it leaves the update exactly as it was."""
    plain = pretrain(tiny_cfg("train.max_steps=3", out="plain"))
    huge = pretrain(tiny_cfg("train.max_steps=3", "optim.clip_grad=1e30", out="huge"))
    a = [r["grad_norm"] for r in records(Path(plain.metrics)) if "loss" in r]
    b = [r["grad_norm"] for r in records(Path(huge.metrics)) if "loss" in r]
    assert len(a) == 3 and np.allclose(a, b, rtol=1e-5)
    sa, sb = torch.load(plain.checkpoint, weights_only=False), torch.load(huge.checkpoint, weights_only=False)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_tensorboard_gets_no_wall_clock_or_constants(tmp_path, monkeypatch):
    written = []

    class Writer:
        def __init__(self, *a, **k):
            pass

        def add_scalar(self, tag, value, step):
            written.append(tag)

        def flush(self):
            pass

        def close(self):
            pass

    import mimkit.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "tensorboard_writer", lambda key: Writer, raising=False)
    log = MetricsLog(tmp_path, True, ["tensorboard"])
    if log.tb is None or not isinstance(log.tb, Writer):
        log.tb = Writer()
    log.write({"step": 1, "epoch": 0.5, "loss": 1.0, "time": 1.7e9, "per_block": {"1": 0.5}})
    log.write({"step": 2, "knn_top1": 40.0, "knn_k": 20, "knn_train_images": 10, "knn_val_images": 5})
    assert sorted(written) == ["pretrain/epoch", "pretrain/knn_top1", "pretrain/loss", "pretrain/per_block/1"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_one_row_per_step_also_after_a_resume(tiny_cfg, one_thread):
    cfg = tiny_cfg("train.loggers=[csv]", "train.max_steps=5", "train.save_every_steps=2", "train.keep_last=5")
    first = pretrain(cfg)
    out = first.out_dir
    rows = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert {"step", "epoch", "loss", "lr", "img_per_s", "grad_norm", "time"} <= set(rows[0])
    assert float(rows[-1]["loss"]) == pytest.approx(first.loss)
    assert not (out / "tb").exists()  # loggers [csv]: no TensorBoard
    # resume from step 2 (as after a crash past it): steps 3.. run again, the CSV keeps one row per step
    (out / "checkpoint-00000004.pt").unlink()
    (out / "checkpoint-00000005.pt").unlink()
    again = pretrain(
        tiny_cfg("train.loggers=csv", "train.max_steps=6", "train.save_every_steps=2", "train.keep_last=5")
    )
    rows = read_csv(again.out_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    jsonl = [r for r in records(again.metrics) if "loss" in r]
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4, 5, 6]
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in jsonl])


def test_csv_row_of_a_step_takes_a_later_record_and_new_keys(tmp_path):
    log = MetricsLog(tmp_path, True, ["csv"])
    log.write({"step": 1, "loss": 2.0})
    log.write({"step": 2, "loss": 1.5})
    log.write({"step": 2, "epoch": 1, "knn_top1": 30.0})  # the k-NN monitor at the epoch's end
    log.write({"event": "stopped", "step": 2})
    log.write({"step": 3, "loss": 1.0})
    rows = read_csv(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[1] == {"step": "2", "loss": "1.5", "epoch": "1", "knn_top1": "30.0"}
    assert rows[2]["knn_top1"] == "" and rows[2]["loss"] == "1.0"


def test_loggers_key_is_checked_and_tensorboard_false_still_removes_it():
    from mimkit.config import active_loggers
    from mimkit.eval import load_eval_config

    assert active_loggers(load_config(None, []).train) == ("tensorboard-if-installed",)  # tensorboard: auto
    assert active_loggers(load_config(None, ["train.tensorboard=true"]).train) == ("tensorboard",)
    assert active_loggers(load_config(None, ["train.loggers=[tensorboard,csv]", "train.tensorboard=false"]).train) == (
        "csv",
    )
    with pytest.raises(
        ConfigError, match=r"train.loggers: 'wand' is not a logger; allowed: tensorboard, csv, wandb, mlflow"
    ):
        load_config(None, ["train.loggers=[wand]"])
    assert load_config(None, ["train.loggers=csv,wandb,mlflow"]).train.loggers == ("csv", "wandb", "mlflow")
    cfg = load_eval_config("linprobe", None, ["encoder.arch=vit_tiny_patch16_224", "data.path=x.npz",
                                              "train.loggers=csv"])  # fmt: skip
    assert active_loggers(cfg.train) == ("csv",)


def test_fp16_grad_norm_without_clipping_is_of_the_unscaled_gradients(tiny_cfg, one_thread):
    """Under fp16 the gradients are still scaled when the norm is read without clipping: the logged norm is divided
    by the scale, so it matches what unscale_ + clip_grad_norm_ reports (a clip too large to act)."""
    plain = pretrain(tiny_cfg("train.precision=fp16", "train.max_steps=2", out="fp16"))
    huge = pretrain(tiny_cfg("train.precision=fp16", "train.max_steps=2", "optim.clip_grad=1e30", out="fp16clip"))
    a = [r.get("grad_norm") for r in records(Path(plain.metrics)) if "loss" in r]
    b = [r.get("grad_norm") for r in records(Path(huge.metrics)) if "loss" in r]
    assert len(a) == 2 and all(x is not None and 0 < x < 1e3 for x in a), a
    assert np.allclose(a, b, rtol=1e-3), (a, b)


def test_eval_loop_bar_keeps_log_lines_apart_and_writes_csv(tmp_path, labelled_npz, capsys, one_thread):
    from mimkit.eval import load_eval_config
    from mimkit.eval.linprobe import run_linprobe

    cfg = load_eval_config("linprobe", None, [
        "encoder.checkpoint=none", "encoder.arch=vit_tiny_patch4_32", "encoder.img_size=16", "encoder.patch_size=4",
        "encoder.embed_dim=32", "encoder.depth=2", "encoder.num_heads=2", f"data.path={labelled_npz}",
        "data.num_workers=0", "probe.mode=cached", "train.epochs=2", "train.batch_size=16", "train.log_every=1",
        "train.precision=fp32", "train.progress=true", "train.loggers=[csv]", f"train.out_dir={tmp_path / 'lp'}",
    ])  # fmt: skip
    with console():
        run_linprobe(cfg)
    err = capsys.readouterr().err
    assert "linprobe:" in err, err[-3000:]  # the bar was drawn
    logged = [s for s in re.split(r"[\r\n]", err) if " INFO " in s or " WARNING " in s]
    assert logged and all(TIMESTAMP.match(s) for s in logged), (logged, err[-3000:])
    rows = read_csv(tmp_path / "lp" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6] and "top1" in rows[0]
    # a summary line per epoch, as pretraining prints: the mean of the epoch's logged losses
    summaries = [re.search(r"epoch (\d)/2 \| mean loss ([\d.]+) over 3 steps \| lr \S+ \| [\d.]+ img/s \| elapsed", s)
                 for s in logged if "| mean loss" in s]  # fmt: skip
    assert [m.group(1) for m in summaries if m] == ["1", "2"], logged
    for m in summaries:
        epoch = int(m.group(1))
        losses = [float(r["loss"]) for r in rows if 3 * (epoch - 1) < int(r["step"]) <= 3 * epoch]
        assert float(m.group(2)) == pytest.approx(sum(losses) / 3, abs=6e-5)
    assert not (tmp_path / "lp" / "tb").exists()


def test_nested_bars_restore_the_handlers_whatever_the_order():
    from mimkit.logs import _TqdmHandler, progress_bar

    logger = logging.getLogger("mimkit")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        outer = progress_bar(total=2, disable=False)
        inner = progress_bar(total=2, disable=False)
        assert len(logger.handlers) == 1 and isinstance(logger.handlers[0], _TqdmHandler)
        outer.close()  # out of order
        inner.close()
        assert logger.handlers == [handler]
        dropped = progress_bar(total=1)
        del dropped  # never closed: tqdm closes it when it is collected
        import gc

        gc.collect()
        assert logger.handlers == [handler]
    finally:
        logger.removeHandler(handler)
