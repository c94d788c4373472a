"""The metrics log of every run: JSONL on rank 0, TensorBoard beside it, one record per step."""

from __future__ import annotations

import json
from pathlib import Path

from mimkit.checkpoint import atomic_write_bytes
from mimkit.extras import tensorboard_writer


def _step_of(line: bytes) -> int:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return 0
    return step if isinstance(step, int) else 0


class MetricsLog:
    """JSONL on rank 0 (always), TensorBoard alongside when enabled."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, prefix: str = "pretrain",
                 resumed_step: int | None = None):  # fmt: skip
        self.path = out_dir / "metrics.jsonl"
        self.enabled, self.tb, self.prefix = enabled, None, prefix
        if enabled and self.path.exists():
            self._keep_until(resumed_step)
        if enabled and tensorboard:
            SummaryWriter = tensorboard_writer("run.tensorboard" if prefix == "knn" else "train.tensorboard")
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
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{self.prefix}/{k}", v, record["step"])
                elif isinstance(v, dict):  # e.g. per-block accuracies: one curve per entry
                    for name, x in v.items():
                        if isinstance(x, (int, float)) and not isinstance(x, bool):
                            self.tb.add_scalar(f"{self.prefix}/{k}/{name}", x, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
