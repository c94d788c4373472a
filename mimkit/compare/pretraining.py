"""Pretraining a study's runs: each in its own `mimkit pretrain` process (its own thread count and cores, killed
with the study), resumed where it stopped; the BEiT tokenizer; the core-minute calibration of the schedule."""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mimkit import distributed as mdist
from mimkit.checkpoint import list_checkpoints
from mimkit.compare.budget import CALIBRATION_STEPS, step_clock
from mimkit.compare.dataset import DataInfo
from mimkit.compare.plan import (
    CONFIGS,
    PACKAGE,
    ROOT,
    Run,
    first_difference,
    locked,
    now,
    portable,
    read_json,
    write_json,
)
from mimkit.compare.spec import SpecError
from mimkit.compare.tokenizer import tokenizer_stats
from mimkit.config import load_config
from mimkit.data import die_with_parent
from mimkit.errors import MimkitError
from mimkit.eval import open_labelled_split
from mimkit.machine import machine_info as machine
from mimkit.runs import RunStopped
from mimkit.train import pretrain

log = logging.getLogger("compare")


class Pretraining:
    """The pretraining half of a Study (mimkit.compare.study): needs the Plan's attributes."""

    # what it reads of the Study it is part of (declared for the type checker: the Plan and the Study set them)
    args: argparse.Namespace
    threads: int
    trained: int
    failed: list[str]
    tokenizer: Path
    info: DataInfo
    img: int
    patch: int
    bookkeeping: Callable[[Path, int | None], list[str]]
    compute: Callable[[], tuple[float | None, int]]
    run_settings: Callable[[Run, dict], dict]
    save_every: Callable[[Run], int | None]
    tokenizer_overrides: Callable[[], list[str]]

    def launch(self, argv: list[str], log_path: Path) -> int:
        """`mimkit ARGV`: a pretraining as a function call in this process (--isolate: in a process of its own);
        0 done, else failed (said in the study's log)."""
        if argv[0] == "pretrain" and not getattr(self.args, "isolate", False):
            return self.pretrain_here(argv[1], argv[2:], log_path)
        return self.launch_process(argv, log_path)

    def pretrain_here(self, recipe: str, overrides: list[str], log_path: Path) -> int:
        """mimkit.train.pretrain in this process, on its threads and cores; its log lines also appended to
        log_path. A stop signal (RunStopped, its checkpoint written) stops the study too."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path, mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        mimkit_log = logging.getLogger("mimkit")
        mimkit_log.addHandler(handler)
        try:
            with open(log_path, "a") as f:
                f.write(f"\n# {now()} mimkit.train.pretrain {recipe} {' '.join(overrides)}\n")
            torch.set_num_threads(self.threads)
            pretrain(load_config(recipe, overrides))
            return 0
        except RunStopped:
            raise
        except (MimkitError, RuntimeError, ValueError, OSError) as e:  # the run failed; the study goes on
            log.error("pretraining %s failed: %s: %s (log: %s)", recipe, type(e).__name__, e, log_path)
            return 1
        finally:
            mimkit_log.removeHandler(handler)
            handler.close()
            mdist.cleanup()

    def launch_process(self, argv: list[str], log_path: Path) -> int:
        """`python -m mimkit.cli ARGV` on this study's threads and cores, output appended to log_path; it dies with
        this process (a killed study leaves no orphan writing into its run folder)."""
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE.parent), os.environ.get("PYTHONPATH")]))}  # fmt: skip
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(f"\n# {now()} mimkit {' '.join(argv)}\n")
            f.flush()
            rc = subprocess.call([sys.executable, "-m", "mimkit.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                 env=env, preexec_fn=functools.partial(die_with_parent, os.getpid()))  # fmt: skip
        if rc:
            tail = log_path.read_text().strip().splitlines()[-1:]
            log.error("mimkit %s failed (exit %d): %s (log: %s)", argv[0], rc, tail[0] if tail else "", log_path)
        return rc

    def calibrate(self, run: Run) -> dict:
        """Seconds per step of this run here, from a few steps in a scratch folder (removed after)."""
        scratch = run.dir / "calibration"
        shutil.rmtree(scratch, ignore_errors=True)
        overrides = run.fixed + run.user + self.bookkeeping(scratch, None) + [f"train.max_steps={CALIBRATION_STEPS}",
                                                                               "train.resume=none"]  # fmt: skip
        if self.launch(["pretrain", str(run.recipe), *overrides], run.dir / "train.log"):
            raise SpecError(f"{run.spec.text}: the calibration run failed (log: {run.dir / 'train.log'})")
        clock = step_clock(scratch / "metrics.jsonl")
        shutil.rmtree(scratch, ignore_errors=True)
        seconds = clock[max(clock)][1] / len(clock)
        times = [clock[k][1] for k in sorted(clock)]
        fastest = min(
            (b - a for a, b in itertools.pairwise(times)), default=seconds
        )  # the schedule's length: budget.schedule
        log.info("%s: %.3f s per step here (fastest %.3f s)", run.spec.text, seconds, fastest)
        return {"s_per_step": seconds, "s_per_step_fastest": fastest, "steps": len(clock), "threads": self.threads,
                "at": now(), "cpu": machine().get("cpu")}  # fmt: skip

    def train(self, run: Run) -> None:
        with locked(run.dir / ".train.lock") as mine:
            if not mine:
                log.info("%s: being pretrained by another process, skipped", run.spec.text)
                return
            record = read_json(run.record_path)
            if self.compute()[0] is not None and "calibration" not in record:
                record["calibration"] = self.calibrate(run)
            settings = self.run_settings(run, record)
            if record.get("done"):
                log.info("%s: pretrained (step %d), kept", run.spec.text, record["final_step"])
                return
            newest = list_checkpoints(run.dir / "pretrain")
            if not newest and record.get("segments"):  # e.g. a fresh clone of a study cut off mid-run: its work is
                # gone, and its segments say nothing about the run that starts now (its CPUs, its invocations)
                log.info("%s: no checkpoint of its earlier attempt (%d segment(s)) is left: pretraining again",
                         run.spec.text, len(record["segments"]))  # fmt: skip
                record["abandoned_segments"] = record.get("abandoned_segments", []) + record.pop("segments")
            record.update(spec=run.spec.text, settings=settings, save_every_steps=self.save_every(run),
                          steps_per_epoch=run.steps_per_epoch, segments=record.get("segments", []))  # fmt: skip
            log.info(
                "== %s: pretraining (%s) %s",
                run.spec.text,
                f"resuming after {newest[-1].name}" if newest else "from scratch",
                " ".join(settings["overrides"]),
            )
            start = time.time()
            here = machine()
            segment = {"started": now(), "threads": self.threads, "cpus": sorted(os.sched_getaffinity(0)),
                       "cpu": here.get("cpu"), "cpu_flags": here.get("cpu_flags"), "gpu": here.get("gpu"),
                       "exit": None}  # stays None if this process is killed  # fmt: skip
            record["segments"].append(segment)
            write_json(run.record_path, record)
            rc = self.launch(["pretrain", str(ROOT / settings["recipe"]), *settings["overrides"]],
                             run.dir / "train.log")  # fmt: skip
            final = list_checkpoints(run.dir / "pretrain")
            number = re.search(r"(\d+)", final[-1].name) if final else None  # checkpoint-NNNNNNNN(.pt)
            step = int(number.group(1)) if number else 0
            segment.update(wall_s=round(time.time() - start, 1), exit=rc, step=step)
            record.update(done=rc == 0, final_step=step, failed=rc != 0)
            write_json(run.record_path, record)
            self.trained += 1
            if rc:
                self.failed.append(run.spec.text)

    def ensure_tokenizer(self) -> None:
        """Train the tokenizer BEiT / mc-BEiT runs need (unless --tokenizer), then measure its codebook once."""
        folder = self.tokenizer.parent
        with locked(folder / ".tokenizer.lock", wait=True):
            if not self.args.tokenizer:
                record = read_json(folder / "compare-tokenizer.json")
                settings = {"overrides": self.tokenizer_overrides()}
                if record.get("settings") is not None and portable(record["settings"]) != portable(settings):
                    raise SpecError(f"{self.tokenizer} was trained with other settings "
                                    f"({first_difference(portable(record['settings']), portable(settings))}); give "
                                    "another --out")  # fmt: skip
                if not (record.get("done") and self.tokenizer.is_file()):
                    log.info("== tokenizer: training (%s)", " ".join(settings["overrides"]))
                    start = time.time()
                    recipe = str(CONFIGS / "tokenizer_cifar10.yaml")
                    if self.launch(["tokenizer", "train", recipe, *settings["overrides"]], folder / "tokenizer.log"):
                        raise SpecError(f"tokenizer training failed (log: {folder / 'tokenizer.log'})")
                    write_json(
                        folder / "compare-tokenizer.json",
                        {"settings": settings, "done": True, "wall_s": round(time.time() - start, 1)},
                    )
            # by content, not path or mtime: a fresh clone or another name for the same file reuses the stats
            with open(self.tokenizer, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            stamp = [digest, self.args.tokenizer_kind, self.info.num_test]
            if read_json(folder / "stats.json").get("stamp") != stamp:
                test = open_labelled_split(self.info.eval_path, self.info.val_split)
                stats = tokenizer_stats(str(self.tokenizer), self.args.tokenizer_kind, self.img // self.patch, test,
                                        self.tokenizer.with_suffix(".jsonl"))  # fmt: skip
                write_json(folder / "stats.json", {"stamp": stamp, **stats})
                log.info("tokenizer: %s", stats)
