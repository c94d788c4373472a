"""Evaluation of pretrained encoders: `mimkit knn`, `mimkit linprobe`, `mimkit finetune`, and the k-NN
trend monitor for pretraining loops.

    from mimkit.eval import evaluate
    result = evaluate("linprobe", "configs/eval/linprobe_vit_tiny_cifar10.yaml", ["encoder.checkpoint=run/ckpt.pt"])
    print(result.metrics["top1"])
"""

from __future__ import annotations

from mimkit.config import ConfigError
from mimkit.eval.common import EvalResult, open_labelled_split
from mimkit.eval.config import FinetuneConfig, KnnConfig, LinprobeConfig, dump_eval_yaml, load_eval_config
from mimkit.eval.encoders import KeyReport, load_encoder
from mimkit.eval.finetune import run_finetune
from mimkit.eval.knn import knn_accuracy, knn_monitor, knn_scores, run_knn
from mimkit.eval.linprobe import run_linprobe
from mimkit.logs import ensure_logging

RUNNERS = {"knn": run_knn, "linprobe": run_linprobe, "finetune": run_finetune}


def evaluate(
    command: str, config_path: str | None = None, overrides: list[str] | None = None, **sections
) -> EvalResult:
    """Run `mimkit knn | linprobe | finetune` from Python: command "knn", "linprobe" or "finetune"; the config is
    defaults <- YAML recipe <- keyword sections (e.g. data={"path": "torchvision:CIFAR10"}) <- `key=value`
    overrides, as on the command line. Returns an EvalResult: `.metrics` (what metrics.json holds: top1, top5, ...),
    `.metrics_path`, `.out_dir`, `.checkpoint`."""
    if command not in RUNNERS:
        raise ConfigError(f"evaluate: unknown command {command!r}; allowed: {', '.join(RUNNERS)}")
    ensure_logging()
    return RUNNERS[command](load_eval_config(command, config_path, overrides, **sections))


__all__ = [
    "EvalResult", "FinetuneConfig", "KeyReport", "KnnConfig", "LinprobeConfig", "evaluate", "knn_accuracy",
    "knn_monitor", "knn_scores", "load_encoder", "dump_eval_yaml", "load_eval_config", "open_labelled_split",
    "run_finetune", "run_knn", "run_linprobe",
]  # fmt: skip
