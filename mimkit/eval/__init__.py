"""Evaluation of pretrained encoders: `mimkit knn`, `mimkit linprobe`, `mimkit finetune`, and the k-NN
trend monitor for pretraining loops.

    from mimkit.eval import evaluate
    result = evaluate("linprobe", "configs/eval/linprobe_vit_tiny_cifar10.yaml", ["encoder.checkpoint=run/ckpt.pt"])
    print(result.metrics["top1"])
"""

from __future__ import annotations

from mimkit.eval.common import EvalResult, KeyReport, load_encoder, open_labelled_split
from mimkit.eval.config import FinetuneConfig, KnnConfig, LinprobeConfig, dump_eval_yaml, load_eval_config
from mimkit.eval.finetune import run_finetune
from mimkit.eval.knn import knn_accuracy, knn_monitor, knn_scores, run_knn
from mimkit.eval.linprobe import run_linprobe

RUNNERS = {"knn": run_knn, "linprobe": run_linprobe, "finetune": run_finetune}


def evaluate(command: str, config_path: str | None = None, overrides: list[str] | None = None, **sections) -> EvalResult:
    """Python entry point: defaults <- YAML recipe <- keyword sections <- `key=value` overrides, then run."""
    return RUNNERS[command](load_eval_config(command, config_path, overrides, **sections))


__all__ = [
    "EvalResult", "FinetuneConfig", "KeyReport", "KnnConfig", "LinprobeConfig", "evaluate", "knn_accuracy",
    "knn_monitor", "knn_scores", "load_encoder", "dump_eval_yaml", "load_eval_config", "open_labelled_split",
    "run_finetune", "run_knn", "run_linprobe",
]  # fmt: skip
