"""The metrics log of every run: JSONL on rank 0; TensorBoard, CSV, Weights & Biases and / or MLflow beside it, one
record per step."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from mimkit.checkpoint import atomic_write_bytes
from mimkit.extras import MissingExtra, require, tensorboard_writer

log = logging.getLogger("mimkit")


def _step_of(line: bytes) -> int:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return 0
    return step if isinstance(step, int) else 0


# record keys that are no curve: the wall clock (TensorBoard keeps its own) and the k-NN monitor's constants
NOT_CURVES = frozenset({"time", "knn_k", "knn_train_images", "knn_val_images"})


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers, per-block dicts flattened to `key/name`, bools and non-numbers left out."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, dict):  # e.g. per-block accuracies: one curve per entry
            for name, x in v.items():
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    out[f"{k}/{name}"] = x
    return out


class CsvLog:
    """OUT_DIR/metrics.csv: one row per logged step (a later record of the same step, e.g. the k-NN monitor's at an
    epoch's end, fills in that row), the header the union of the records' scalar keys in first-seen order. Rows
    are appended while the header holds; a new key or a filled-in row rewrites the file atomically. Opened, it is
    rebuilt from metrics.jsonl (already cut back to the resumed step): the two always hold the same steps."""

    def __init__(self, path: Path, records: list[dict]):
        self.path, self.header = path, ["step"]
        self.rows: dict[int, dict] = {}  # step -> its values
        for record in records:
            self._add(record)
        self._rewrite()

    def _add(self, record: dict) -> bool:
        """Merge the record into its step's row; True when the file must be rewritten (not just appended to)."""
        if not isinstance(record.get("step"), int) or "event" in record:
            return False
        values = scalars(record)
        new_keys = [k for k in values if k not in self.header]
        self.header += new_keys
        step = record["step"]
        refill = step in self.rows
        self.rows.setdefault(step, {}).update(values)
        return bool(new_keys) or refill or step != max(self.rows)

    def _text(self, rows) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.header, lineterminator="\n")
        for row in rows:
            writer.writerow(row)
        return buf.getvalue()

    def _rewrite(self) -> None:
        text = ",".join(self.header) + "\n" + self._text(self.rows[s] for s in sorted(self.rows))
        atomic_write_bytes(self.path, lambda f: f.write(text.encode()))

    def write(self, record: dict) -> None:
        if self._add(record):
            self._rewrite()
        elif isinstance(record.get("step"), int) and "event" not in record:
            with open(self.path, "a") as f:
                f.write(self._text([self.rows[record["step"]]]))


def flat_params(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as `section.key: value` (lists as text): the run's hyperparameters for W&B and MLflow."""
    out: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class TrackerLog:
    """A Weights & Biases or MLflow run for the run folder: created on the first start with the config as its
    hyperparameters, continued on a resume (its id is kept in OUT_DIR/.NAME_run_id), one point per step record.
    Where they go is each tool's own setting: W&B's WANDB_PROJECT / WANDB_MODE (offline works without a network),
    MLflow's MLFLOW_TRACKING_URI (default: OUT_DIR/mlruns) and MLFLOW_EXPERIMENT_NAME."""

    def __init__(self, kind: str, out_dir: Path, config: dict | None, prefix: str):
        self.kind, self.prefix = kind, prefix
        id_file = out_dir / f".{kind}_run_id"
        known = id_file.read_text().strip() if id_file.is_file() else None
        params = flat_params(config or {})
        if kind == "wandb":
            wandb = require("wandb", "wandb", "train.loggers: wandb")
            self.run = wandb.init(project=None, name=out_dir.name, dir=str(out_dir), id=known, resume="allow",
                                  config=params)  # fmt: skip
            run_id = self.run.id
        else:
            self.mlflow = require("mlflow", "mlflow", "train.loggers: mlflow")
            if "MLFLOW_TRACKING_URI" not in os.environ:  # a store in the run folder unless one is named: MLflow's
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # file store (no server, no database)
                self.mlflow.set_tracking_uri((out_dir / "mlruns").resolve().as_uri())
            self.run = self.mlflow.start_run(run_id=known, run_name=None if known else out_dir.name)
            run_id = self.run.info.run_id
            if known is None:  # parameters are written once: a resume continues the same run
                self.mlflow.log_params(params)
        if known != run_id:
            atomic_write_bytes(id_file, lambda f: f.write(f"{run_id}\n".encode()))

    def write(self, step: int, values: dict[str, float]) -> None:
        named = {f"{self.prefix}/{k}": v for k, v in values.items()}
        if self.kind == "wandb":
            self.run.log(named, step=step)
        else:
            self.mlflow.log_metrics(named, step=step)

    def close(self) -> None:
        if self.kind == "wandb":
            self.run.finish()
        else:
            self.mlflow.end_run()


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


class MetricsLog:
    """JSONL on rank 0 (always); TensorBoard and CSV alongside as `loggers` asks (a list of names; True / False:
    TensorBoard or nothing, as before train.loggers)."""

    def __init__(self, out_dir: Path, enabled: bool, loggers: bool | Sequence[str], prefix: str = "pretrain",
                 resumed_step: int | None = None, config: dict | None = None):  # fmt: skip
        self.path = out_dir / "metrics.jsonl"
        self.enabled, self.tb, self.csv, self.prefix = enabled, None, None, prefix
        self.trackers = [TrackerLog(kind, out_dir, config, prefix) for kind in ("wandb", "mlflow")
                         if enabled and kind in (loggers if not isinstance(loggers, bool) else ())]  # fmt: skip
        if isinstance(loggers, bool):
            loggers = ("tensorboard",) if loggers else ()
        tensorboard = "tensorboard" in loggers or "tensorboard-if-installed" in loggers
        if enabled and self.path.exists():
            self._keep_until(resumed_step)
        if enabled and "csv" in loggers:
            self.csv = CsvLog(out_dir / "metrics.csv", _records(self.path) if self.path.exists() else [])
        if enabled and tensorboard:
            key = "train.tensorboard"
            try:
                SummaryWriter = tensorboard_writer(key)
            except MissingExtra as e:
                if "tensorboard" in loggers:  # asked for by name (tensorboard: true)
                    raise
                log.info("no TensorBoard logs: %s", str(e).split(": ", 1)[1].replace(f"{key}=false", f"{key}=true to "
                         "require it"))  # fmt: skip
            else:
                self.tb = SummaryWriter(str(out_dir / "tb"))

    def _keep_until(self, resumed_step: int | None) -> None:
        """Drop a torn last line (a kill mid-write) and, on resume, every record past the step resumed from: those
        steps are about to run again, and the log keeps one record per step."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        kept = lines[:-1]  # the last element is b"" or a torn line
        if resumed_step is not None:
            kept = [x for x in kept if _step_of(x) <= resumed_step]
        new = b"".join(x + b"\n" for x in kept)
        if new != data:
            atomic_write_bytes(self.path, lambda f: f.write(new))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.csv is not None:
            self.csv.write(record)
        if "step" not in record or (self.tb is None and not self.trackers):
            return
        curves = {k: v for k, v in scalars(record).items() if k != "step" and k not in NOT_CURVES}
        if self.tb is not None:
            for k, v in curves.items():
                self.tb.add_scalar(f"{self.prefix}/{k}", v, record["step"])
            self.tb.flush()
        for tracker in self.trackers:
            tracker.write(record["step"], curves)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close()
