"""Scoring a study's checkpoints as they appear: k-NN and the cached linear probe (mimkit.eval.evaluate, in this
process), each checkpoint the plan names once, the lowest epoch first; fine-tuning of the final encoders."""

from __future__ import annotations

import argparse
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from mimkit.checkpoint import checkpoint_path, list_checkpoints
from mimkit.compare.budget import is_scored_step
from mimkit.compare.plan import EVAL_RECIPES, Baseline, Run, locked, now, pretrained, read_json, write_json
from mimkit.eval import evaluate

log = logging.getLogger("compare")
PROBE_KEYS = ("top1", "top5", "best_top1", "best_block", "block", "per_block_top1", "val_images", "train_images",
              "wall_clock_s", "epochs", "ema_top1", "knn_top1", "knn_top5", "knn_k", "knn_block")  # fmt: skip


class Scoring:
    """The evaluation half of a Study (mimkit.compare.study): needs the Plan's attributes and `report()`."""

    # what it reads of the Study it is part of (declared for the type checker: the Plan and the Study set them)
    args: argparse.Namespace
    threads: int
    evaluated: int
    scored: tuple[str, str] | tuple[str]
    runs: list[Run]
    baselines: list[Baseline]
    eval_overrides: Callable[[str, list[str], Path], list[str]]
    settings: Callable[[list[str]], list[str]]
    report: Callable[[], dict]

    def evaluate(self, encoder: list[str], path: Path, commands: tuple[str, ...]) -> bool:
        """Score one encoder by `commands` into the record `path`, each command once (a record with the same
        settings is kept); False if another process holds it."""
        with locked(path.with_suffix(".lock")) as mine:
            if not mine:
                return False
            record = read_json(path)
            for command in commands:
                work = path.with_suffix("") / command
                overrides = self.eval_overrides(command, encoder, work)
                if record.get(command, {}).get("settings") == self.settings(overrides):
                    continue
                log.info("== %s: %s of %s", path.parent.name, command, path.stem)
                metrics = evaluate(command, str(EVAL_RECIPES[command]), overrides).metrics
                record[command] = {"settings": self.settings(overrides), "evaluated_at": now(), "threads": self.threads,
                                   **{k: metrics[k] for k in PROBE_KEYS if k in metrics}}  # fmt: skip
                write_json(path, record)
                for big in [*work.glob("features-*.pt"), *work.glob("checkpoint-*")]:  # caches and heads: not results
                    shutil.rmtree(big) if big.is_dir() else big.unlink()
                self.evaluated += 1
            return True

    def done(self, path: Path, encoder: list[str], commands: tuple[str, ...]) -> bool:
        record = read_json(path)
        return all(record.get(c, {}).get("settings") == self.settings(self.eval_overrides(c, encoder, path))
                   for c in commands)  # fmt: skip

    def jobs(self) -> list[tuple]:
        """(epoch, order, encoder overrides, record, commands) still to score, the lowest epoch first."""
        pending = [(0.0, i, b.encoder, b.evals / "step-00000000.json", self.scored)
                   for i, b in enumerate(self.baselines)]  # fmt: skip
        for i, run in enumerate(self.runs, start=len(self.baselines)):
            record = read_json(run.record_path)
            every, final = record.get("save_every_steps"), record.get("final_step") if record.get("done") else None
            for ckpt in list_checkpoints(run.dir / "pretrain"):
                found = re.search(r"(\d+)", ckpt.name)
                assert found is not None  # list_checkpoints: checkpoint-<step> names
                step = int(found.group(1))
                if is_scored_step(step, every, final):
                    pending.append((step / run.steps_per_epoch, i, pretrained(run, step),
                                    run.evals / f"step-{step:08d}.json", self.scored))  # fmt: skip
        if self.args.finetune_epochs:  # each run as soon as it is done: its final checkpoint is needed until then
            last = len(self.baselines) + len(self.runs)  # the random inits after the runs: they need no checkpoint
            pending += [(math.inf, last + i, b.encoder, b.evals / "finetune.json", ("finetune",))
                        for i, b in enumerate(self.baselines)]  # fmt: skip
            for i, run in enumerate(self.runs, start=len(self.baselines)):
                record = read_json(run.record_path)
                if record.get("done") and checkpoint_path(run.dir / "pretrain", record["final_step"]).exists():
                    pending.append((math.inf, i, pretrained(run, record["final_step"]), run.evals / "finetune.json",
                                    ("finetune",)))  # fmt: skip
        return sorted((j for j in pending if not self.done(j[3], j[2], j[4])), key=lambda j: (j[0], j[1]))

    def evaluate_all(self, wait: bool) -> None:
        """Score what is pending; with `wait`, poll for more until every run has finished pretraining and is scored."""
        said = False
        while True:
            jobs = self.jobs()
            if any(self.evaluate(j[2], j[3], j[4]) for j in jobs):  # stops at the first it did: rescan
                self.report()
                said = False
                continue
            ended = [read_json(r.record_path) for r in self.runs]
            if not wait or (not jobs and all(e.get("done") or e.get("failed") for e in ended)):
                return
            if not said:
                log.info("waiting for checkpoints (looking every %d s; %d being scored elsewhere)", self.args.poll,
                         len(jobs))  # fmt: skip
                said = True
            time.sleep(self.args.poll)
