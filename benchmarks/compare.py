"""Equal-compute study of masked-image-modeling methods on any labelled dataset: every run spec pretrains from its
method's recipe, its checkpoints are scored by k-NN and the cached linear probe as they appear, and the runs are
read out at equal epochs and at equal pretraining core-minutes, beside random-init encoders of each backbone family.

    python benchmarks/compare.py --data PATH.npz --methods mae,emae,bootmae,beit,mcbeit,bootmae+parallel --epochs 10
    python benchmarks/compare.py --data DIR ...        # DIR/train and DIR/val (or DIR/test): ImageFolder trees
    python benchmarks/compare.py --data TRAIN VAL ...  # two ImageFolder trees
    python benchmarks/compare.py ... --core-minutes 120 --eval-every 0.5 --threads 1 --cpus 1
    python benchmarks/compare.py ... --role train --cpus 0   # and beside it the same command, --role eval --cpus 1
    python benchmarks/compare.py ... --sweep 'optim.blr=1.5e-4,3e-4,6e-4;train.batch_size=64,128' --epochs 1

Run specs: METHOD[+PART...][:section.key=value,...], e.g. mae, bootmae+parallel, mae+block, mae+hybrid, simmim,
'mae:optim.blr=3e-4,train.batch_size=64' (parts: compare_helpers.PARTS). The base recipe is
configs/<method>_vit_tiny_cifar10.yaml with the data's fields replaced: data.path / format / mean / std (computed from
the training images unless --mean / --std), model.img_size (the images' side) and model.patch_size (a grid of at most
14 tokens a side; --patch-size). Pretraining runs in a subprocess (`python -m mimkit.cli pretrain`) on --threads
threads, data.num_workers=0 so that all of its work is on those threads; --cpus pins the study (taskset-style list).

Budget: --epochs E (default: the recipe's) or --core-minutes C per run. Core-minutes = training-loop wall-clock x
pretraining threads, the wall-clock summed from the run's metrics.jsonl (one record per step; see
compare_helpers.step_clock). A core-minute budget becomes a step count from a short timed calibration run
(train.schedule_steps, warmup 10% of it, train.max_minutes 1.5x as a safety stop). An epoch budget keeps the
recipe's warmup, capped at 10% of the run. A checkpoint is written and evaluated every --eval-every epochs and at
the end; all are kept (ViT-T/4 MAE: ~47 MB each, weights and optimizer state). Each run records the CPU it pretrained
on; --cpu-scale 'CPU=FACTOR' multiplies the core-minutes of runs from CPU so that a study continued on other machines
reads out in one CPU's core-minutes. On a GPU the same clock gives
train_minutes (wall-clock) in compare.json; core-minutes still multiply it by the CPU threads.

Restarting the same command continues a killed study: pretraining resumes exactly (train.resume auto), finished
evaluations are kept (evals/<run>/step-N.json), an interrupted one continues from its feature caches. --role train
and --role eval split the work between two processes (each on its own cores): the eval process polls the run
folders and scores each checkpoint once. Outputs in --out: compare.json (everything), compare.md (the tables, also
printed), probe_vs_epochs.png, probe_vs_core_minutes.png, compare.log; runs/<run>/ and evals/<run>/ hold the work.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import torch
from compare_helpers import (
    SpecError,
    choose_patch,
    data_info,
    is_scored_step,
    machine,
    markdown,
    parse_cpu_scale,
    parse_specs,
    plots,
    readouts,
    run_cpu_scale,
    std_error,
    step_clock,
    sweep_specs,
    tokenizer_stats,
)

from mimkit.checkpoint import atomic_write_text, checkpoint_path, list_checkpoints
from mimkit.config import load_config, reads_key, resolved
from mimkit.data import die_with_parent
from mimkit.errors import MimkitError
from mimkit.eval import evaluate, load_eval_config, open_labelled_split

log = logging.getLogger("compare")
CONFIGS = ROOT / "configs"
EVAL_RECIPES = {c: CONFIGS / "eval" / f"{c}_vit_tiny_cifar10.yaml" for c in ("knn", "linprobe", "finetune")}
SET_TARGETS = ("pretrain", "knn", "linprobe", "finetune", "tokenizer")
CALIBRATION_STEPS = 6  # timed steps of a core-minute budget's calibration run (the first counts as their median)
EVERY = 10**6  # keep_last / save_every_epochs: every checkpoint is kept, none at epoch ends
CORE_MINUTES = ("training-loop wall-clock summed from each run's metrics.jsonl (one record per step; a process's first "
                "step counted at its median step) x pretraining threads; start-up and evaluation excluded")
PROBE_KEYS = ("top1", "top5", "best_top1", "best_block", "block", "per_block_top1", "val_images", "train_images",
              "wall_clock_s", "epochs", "ema_top1", "knn_top1", "knn_top5", "knn_k", "knn_block")  # fmt: skip


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


@contextlib.contextmanager
def locked(path: Path, wait: bool = False):
    """An exclusive lock on `path` (True), or False at once when another process holds it and not `wait`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def first_difference(a: dict, b: dict) -> str:
    for key in a.keys() | b.keys():
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), list) and isinstance(b.get(key), list):
                return f"{key}: " + next((f"{x} vs {y}" for x, y in zip(a[key], b[key]) if x != y), "lengths differ")
            return f"{key}: {a.get(key)} vs {b.get(key)}"
    return "none"


@dataclass
class Run:
    spec: object  # compare_helpers.RunSpec
    base: str  # the spec before --sweep's overrides
    recipe: Path
    fixed: list[str]  # the data's fields and the spec's parts
    user: list[str]  # --set and the spec's own overrides: after the budget, so they win
    cfg: object  # mimkit Config of the recipe with fixed + user
    steps_per_epoch: int
    dir: Path
    evals: Path

    @property
    def record_path(self) -> Path:
        return self.dir / "compare-run.json"


@dataclass
class Baseline:
    name: str
    family: str
    encoder: list[str]  # encoder.* overrides of a random init of this shape
    evals: Path


class Study:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        specs = [(s, b.text) for b in parse_specs(args.methods)
                 for s in (sweep_specs([b], args.sweep) if args.sweep else [b])]  # fmt: skip
        self.sets = parse_sets(args.set)
        self.cpu_scale = parse_cpu_scale(args.cpu_scale)
        if args.cpus:
            os.sched_setaffinity(0, parse_cpus(args.cpus))
        self.threads = args.threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(self.threads)
        args.data = [os.path.abspath(p) for p in args.data]  # records name files absolutely, wherever it is run from
        self.out = Path(args.out or ROOT / "runs" / "compare" / Path(args.data[0]).stem).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        setup_logging(self.out / "compare.log")
        self.info = data_info(args.data, self.out, args.train_samples, args.test_samples)
        side = args.img_size or self.info.image_size
        self.patch, self.img = (args.patch_size, side // args.patch_size * args.patch_size) if args.patch_size \
            else choose_patch(side)  # fmt: skip
        self.mean, self.std = args.mean or self.info.mean, args.std or self.info.std
        self.eval_every = 0.0 if args.sweep else args.eval_every
        self.tokenizer = Path(args.tokenizer or self.out / "tokenizer" / "tokenizer.pt")
        self.trained = self.evaluated = 0
        self.failed: list[str] = []
        self.scored = ("knn", "linprobe") if args.knn == "command" else ("linprobe",)  # what scores a checkpoint
        if args.knn == "probe" and self.sets["knn"]:
            raise SpecError("--set knn:... needs --knn command; with --knn probe the k-NN reads the probe's features "
                            "(set its data with --set linprobe:...)")  # fmt: skip
        self.runs = [self.plan(spec, base) for spec, base in specs]
        self.baselines = self.plan_baselines()
        self.check_eval_settings()
        if args.role != "eval":  # the eval role may run on other threads than pretraining
            for run in self.runs:
                self.run_settings(run, read_json(run.record_path))
        d = self.info
        log.info("compare: %d runs, %d baselines | data %s: %d train / %d test, %d classes, %d px -> model %d px, "
                 "patch %d | mean %s std %s | %d threads | out %s", len(self.runs), len(self.baselines), args.data,
                 d.num_train, d.num_test, d.num_classes, d.image_size, self.img, self.patch, self.mean, self.std,
                 self.threads, self.out)  # fmt: skip

    # ---------------------------------------------------------------- the plan (checked before any compute)

    def data_overrides(self) -> list[str]:
        return [f"data.path={self.info.pretrain_path}", f"data.format={self.info.kind}", "data.num_workers=0",
                f"data.mean={self.mean}", f"data.std={self.std}"]  # fmt: skip

    def plan(self, spec, base: str) -> Run:
        recipe = CONFIGS / f"{spec.method}_vit_tiny_cifar10.yaml"
        fixed = self.data_overrides() + [f"model.img_size={self.img}", f"model.patch_size={self.patch}"]
        if spec.method == "simmim":  # mask cells of two patches where they tile the image, else one
            fixed.append(f"simmim.mask_patch_size={2 * self.patch if self.img % (2 * self.patch) == 0 else self.patch}")
        if spec.family == "beit":
            fixed += [f"tokenizer.kind={self.args.tokenizer_kind}", f"tokenizer.path={self.tokenizer}"]
        fixed += spec.part_overrides()
        try:  # a --set applies to the runs whose method reads it (mae.decoder_dim: the pixel methods)
            own = load_config(recipe, fixed + self.sets["pretrain"] + spec.overrides, strict=False)
            user = [o for o in self.sets["pretrain"] if reads_key(own, o.split("=", 1)[0])] + spec.overrides
            cfg = load_config(recipe, fixed + user)
            n = min(self.info.num_train * cfg.data.repeats, cfg.data.num_samples or math.inf)
            steps_per_epoch = int(n // (cfg.train.batch_size * cfg.train.accum_steps))
            if steps_per_epoch < 1:
                raise SpecError(f"{n} training images cannot fill one step of batch {cfg.train.batch_size}; add "
                                "train.batch_size=N to the spec or --set")  # fmt: skip
            load_config(recipe, fixed + self.budget(cfg, steps_per_epoch, calibration=None) + user)
        except (MimkitError, SpecError) as e:
            raise SpecError(f"run spec {spec.text!r}: {e}") from None
        return Run(spec, base, recipe, fixed, user, cfg, steps_per_epoch, self.out / "runs" / spec.name,
                   self.out / "evals" / spec.name)  # fmt: skip

    def budget(self, cfg, steps_per_epoch: int, calibration: dict | None) -> list[str]:
        """Schedule overrides: --epochs (default the recipe's), or --core-minutes turned into steps by `calibration`."""
        a = self.args
        if a.core_minutes is None:
            epochs = a.epochs or cfg.train.epochs
            warmup = min(cfg.optim.warmup_epochs, 0.1 * epochs)  # the recipes' 1 of 10 epochs, kept for longer runs
            steps = max(1, round(epochs * steps_per_epoch))
            return [f"train.epochs={max(1, math.ceil(epochs))}", f"train.schedule_steps={steps}",
                    f"optim.warmup_epochs={warmup:.4g}"]  # fmt: skip
        if calibration is None:  # before the calibration (plan checks): values of the right type
            return ["train.schedule_steps=1", "optim.warmup_epochs=0"]
        steps = max(1, int(a.core_minutes * 60 / self.threads / calibration["s_per_step"]))
        return [f"train.schedule_steps={steps}", f"optim.warmup_epochs={0.1 * steps / steps_per_epoch:.4g}",
                f"train.max_minutes={1.5 * a.core_minutes / self.threads:.4g}"]  # fmt: skip

    def save_every(self, run: Run) -> int | None:
        return max(1, round(self.eval_every * run.steps_per_epoch)) if self.eval_every > 0 else None

    def bookkeeping(self, out_dir: Path, save_every: int | None) -> list[str]:
        """Set last: where the run writes, one metrics record per step (the clock), the evaluated checkpoints kept."""
        extra = [f"train.max_steps={self.args.max_steps}"] if self.args.max_steps else []
        epochs = [f"train.save_every_epochs={EVERY}"] if save_every else []  # else epoch ends, to resume from
        return [f"train.out_dir={out_dir}", "train.resume=auto", "train.log_every=1", "train.progress=false",
                "train.tensorboard=false", "train.knn_every_epochs=0", "train.vis_every_epochs=0",
                f"train.keep_last={EVERY}", f"train.save_every_steps={save_every or 'null'}", *epochs,
                *extra]  # fmt: skip

    def plan_baselines(self) -> list[Baseline]:
        """One random-init encoder per backbone family and shape among the runs."""
        keys = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads")
        shapes = list(dict.fromkeys((r.spec.family, *(getattr(resolved(r.cfg).model, k) for k in keys))
                                    for r in self.runs))  # fmt: skip
        out = []
        for key in shapes:
            family, arch, img, patch, dim, depth, heads = key
            label = {"vit": "ViT", "beit": "Beit"}[family]
            same = [k for k in shapes if k[0] == family]
            name = f"random-init {label}" + (f" {dim}x{depth}" if len(same) > 1 else "")
            encoder = [f"encoder.family={family}", f"encoder.arch={arch}", f"encoder.img_size={img}",
                       f"encoder.patch_size={patch}", f"encoder.embed_dim={dim}", f"encoder.depth={depth}",
                       f"encoder.num_heads={heads}"]  # fmt: skip
            out.append(Baseline(name, family, encoder, self.out / "evals" / re.sub(r"[^\w.+=-]", "_", name)))
        return out

    def eval_overrides(self, command: str, encoder: list[str], out_dir: Path) -> list[str]:
        section = "run" if command == "knn" else "train"
        d = self.info
        ov = [f"data.path={d.eval_path}", f"data.format={d.kind}", f"data.train_split={d.train_split}",
              f"data.val_split={d.val_split}", f"data.mean={self.mean}", f"data.std={self.std}", "data.num_workers=0",
              *encoder, f"{section}.out_dir={out_dir}", f"{section}.progress=false",
              f"{section}.tensorboard=false"]  # fmt: skip
        if command == "linprobe" and self.args.knn == "probe":  # the knn recipe's vote, on the probe's features
            knn = load_eval_config("knn", EVAL_RECIPES["knn"], []).knn
            ov += [f"probe.knn_k={knn.k}", f"probe.knn_temperature={knn.temperature}"]
        if command == "finetune":
            epochs = self.args.finetune_epochs
            # the recipe's warmup is 1 epoch: a third of a shorter run
            ov += [f"train.epochs={epochs}", f"optim.warmup_epochs={min(1.0, epochs / 3):.4g}"]
        return ov + self.sets[command]

    @staticmethod
    def settings(overrides: list[str]) -> list[str]:
        """What an evaluation's result depends on besides its encoder: its overrides but for the folder it works in."""
        return [o for o in overrides if not o.startswith(("run.out_dir=", "train.out_dir=", "encoder.checkpoint="))]

    def check_eval_settings(self) -> None:
        commands = [*self.scored] + (["finetune"] if self.args.finetune_epochs else [])
        for b in self.baselines:
            for command in commands:
                try:
                    load_eval_config(command, EVAL_RECIPES[command], self.eval_overrides(command, b.encoder, self.out))
                except MimkitError as e:
                    raise SpecError(f"{command} settings (--set {command}:...): {e}") from None
        if self.needs_tokenizer() and not self.args.tokenizer:
            try:
                load_config(CONFIGS / "tokenizer_cifar10.yaml", self.tokenizer_overrides(), also_reads=("tokenizer",))
            except MimkitError as e:
                raise SpecError(f"tokenizer settings (--set tokenizer:...): {e}") from None
        elif self.needs_tokenizer() and not self.tokenizer.is_file():
            raise SpecError(f"--tokenizer {self.tokenizer}: no such file")

    # ---------------------------------------------------------------- pretraining

    def launch(self, argv: list[str], log_path: Path) -> int:
        """`python -m mimkit.cli ARGV` on this study's threads and cores, output appended to log_path; it dies with
        this process (a killed study leaves no orphan writing into its run folder)."""
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
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
        log.info("%s: %.3f s per step here", run.spec.text, seconds)
        return {"s_per_step": seconds, "steps": len(clock), "threads": self.threads, "at": now(),
                "cpu": machine().get("cpu")}  # fmt: skip

    def train(self, run: Run) -> None:
        with locked(run.dir / ".train.lock") as mine:
            if not mine:
                log.info("%s: being pretrained by another process, skipped", run.spec.text)
                return
            record = read_json(run.record_path)
            if self.args.core_minutes is not None and "calibration" not in record:
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
            log.info("== %s: pretraining (%s) %s", run.spec.text,
                     f"resuming after {newest[-1].name}" if newest else "from scratch", " ".join(settings["overrides"]))
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
            step = int(re.search(r"(\d+)", final[-1].name).group(1)) if final else 0
            segment.update(wall_s=round(time.time() - start, 1), exit=rc, step=step)
            record.update(done=rc == 0, final_step=step, failed=rc != 0)
            write_json(run.record_path, record)
            self.trained += 1
            if rc:
                self.failed.append(run.spec.text)

    def run_settings(self, run: Run, record: dict) -> dict:
        """What a run's pretraining is launched with; a run folder started with other settings is refused."""
        overrides = (run.fixed + self.budget(run.cfg, run.steps_per_epoch, record.get("calibration")) + run.user
                     + self.bookkeeping(run.dir / "pretrain", self.save_every(run)))  # fmt: skip
        settings = {"recipe": str(run.recipe.relative_to(ROOT)), "overrides": overrides, "threads": self.threads}
        if record.get("settings") is not None and portable(record["settings"]) != portable(settings):
            raise SpecError(f"{run.dir} was started with other settings ("
                            f"{first_difference(portable(record['settings']), portable(settings))}); give another "
                            "--out, or remove that folder to start the run again")  # fmt: skip
        return settings

    def needs_tokenizer(self) -> bool:
        return any(r.spec.family == "beit" for r in self.runs)

    def tokenizer_overrides(self) -> list[str]:
        steps = [f"tokenizer.train_steps={self.args.tokenizer_steps}"] if self.args.tokenizer_steps else []
        return [f"data.path={self.info.pretrain_path}", f"data.format={self.info.kind}", f"model.img_size={self.img}",
                f"model.patch_size={self.patch}", f"tokenizer.path={self.tokenizer}", "train.progress=false", *steps,
                *self.sets["tokenizer"]]  # fmt: skip

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
                    write_json(folder / "compare-tokenizer.json",
                               {"settings": settings, "done": True, "wall_s": round(time.time() - start, 1)})
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

    # ---------------------------------------------------------------- evaluation

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
                step = int(re.search(r"(\d+)", ckpt.name).group(1))
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

    # ---------------------------------------------------------------- the report

    def scores(self, record: dict) -> dict:
        probe = record["linprobe"]
        knn = record.get("knn") or {"top1": probe["knn_top1"], "wall_clock_s": 0.0}  # --knn command / probe
        n, p_knn, p_probe = probe["val_images"], knn["top1"] / 100, probe["top1"] / 100
        return {"knn_top1": p_knn, "knn_se": round(std_error(p_knn, n), 5), "probe_top1": p_probe,
                "probe_se": round(std_error(p_probe, n), 5), "probe_best_top1": probe["best_top1"] / 100,
                "probe_best_block": probe.get("best_block"), "test_images": n, "evaluated_at": probe["evaluated_at"],
                "eval_wall_s": round(knn["wall_clock_s"] + probe["wall_clock_s"], 1)}  # fmt: skip

    def finetune_scores(self, evals: Path, encoder: list[str]) -> dict | None:
        if not (self.args.finetune_epochs and self.done(evals / "finetune.json", encoder, ("finetune",))):
            return None
        r = read_json(evals / "finetune.json")["finetune"]
        return {"finetune_top1": r["top1"] / 100, "test_images": r["val_images"], "epochs": r.get("epochs")}

    def collect(self) -> dict:
        runs = []
        for run in self.runs:
            record, clock = read_json(run.record_path), step_clock(run.dir / "pretrain" / "metrics.jsonl")
            threads = record.get("settings", {}).get("threads", self.threads)
            points = []
            every, final = record.get("save_every_steps"), record.get("final_step") if record.get("done") else None
            machines = sorted({g["cpu"] for g in record.get("segments", []) if g.get("cpu")})
            scale = run_cpu_scale(run.spec.text, machines, self.cpu_scale)
            for path in sorted(run.evals.glob("step-*.json")):
                step = int(path.stem.split("-")[1])
                if not is_scored_step(step, every, final) or not self.done(path, pretrained(run, step), self.scored):
                    continue
                epoch, seconds = clock.get(step, (step / run.steps_per_epoch, None))
                minutes = None if seconds is None else seconds / 60
                point = {"step": step, "epoch": round(epoch, 4), "train_minutes": minutes and round(minutes, 5),
                         "core_minutes": minutes and round(minutes * threads * scale, 5)}  # fmt: skip
                if scale != 1.0 and minutes:  # in the reference CPU's units; what this CPU's clock said beside it
                    point["core_minutes_measured"] = round(minutes * threads, 5)
                points.append({**point, **self.scores(read_json(path))})
            settings = record.get("settings", {})
            runs.append({"name": run.spec.text, "sweep_base": run.base, "method": run.spec.method,
                         "family": run.spec.family, "recipe": settings.get("recipe"),
                         "overrides": settings.get("overrides"),
                         "steps_per_epoch": run.steps_per_epoch, "done": bool(record.get("done")),
                         "final_step": record.get("final_step"), "calibration": record.get("calibration"),
                         "train_invocations": len(record.get("segments", [])), "segments": record.get("segments", []),
                         "machines": machines, "core_minute_scale": scale, "threads": threads,
                         "abandoned_segments": len(record.get("abandoned_segments", [])),
                         "checkpoints": points, "finetune": self.finetune_scores(
                             run.evals, pretrained(run, record.get("final_step", 0)))})  # fmt: skip
        seen = {cpu for r in runs for cpu in r["machines"]}
        for cpu in sorted(set(self.cpu_scale) - seen):
            log.warning("--cpu-scale %r: no run was pretrained on that CPU (theirs: %s)", cpu, sorted(seen) or "none yet")
        baselines = []
        for b in self.baselines:
            path = b.evals / "step-00000000.json"
            scores = self.scores(read_json(path)) if self.done(path, b.encoder, self.scored) else {}
            baselines.append({"name": b.name, "family": b.family, "encoder": b.encoder, **scores,
                              "finetune": self.finetune_scores(b.evals, b.encoder)})  # fmt: skip
        a = self.args
        tokenizer = {k: v for k, v in read_json(self.tokenizer.parent / "stats.json").items() if k != "stamp"}
        study = {"command": sys.argv, "updated": now(), "data_path": " ".join(a.data), "data": asdict(self.info),
                 "img_size": self.img, "patch_size": self.patch, "mean": self.mean, "std": self.std,
                 "threads": self.threads, "budget": {"epochs": a.epochs, "core_minutes": a.core_minutes,
                                                     "max_steps": a.max_steps},
                 "eval_every_epochs": self.eval_every, "finetune_epochs": a.finetune_epochs, "machine": machine(),
                 "core_minutes_note": CORE_MINUTES, "cpu_scale": self.cpu_scale, "runs": runs, "baselines": baselines,
                 "readouts": readouts(runs, a.reach),
                 "tokenizer": tokenizer if self.needs_tokenizer() else None}  # fmt: skip
        if a.sweep:
            study["sweep_winners"] = sweep_winners(runs)
        return study

    def report(self) -> dict:
        study = self.collect()
        write_json(self.out / "compare.json", study)
        atomic_write_text(self.out / "compare.md", markdown(study))
        plots(study, self.out)
        if study.get("sweep_winners"):
            write_json(self.out / "sweep_winners.json", study["sweep_winners"])
        return study


IN_STUDY_FOLDER = ("train.out_dir=", "tokenizer.path=")  # paths under --out: a moved study folder keeps its runs


def portable(settings: dict) -> dict:
    """A run's or tokenizer's settings without the paths that only say where the study folder is."""
    return {**settings, "overrides": [o for o in settings["overrides"] if not o.startswith(IN_STUDY_FOLDER)]}


def pretrained(run: Run, step: int) -> list[str]:
    """encoder.* overrides of a run's checkpoint (its own architecture)."""
    return [f"encoder.checkpoint={checkpoint_path(run.dir / 'pretrain', step)}", "encoder.arch=null"]


def sweep_winners(runs: list[dict]) -> dict:
    """Per swept spec, the grid point whose final checkpoint probes best."""
    best: dict[str, dict] = {}
    for run in runs:
        if run["checkpoints"]:
            final = max(run["checkpoints"], key=lambda c: c["step"])
            held = best.get(run["sweep_base"])
            if held is None or (final["probe_top1"], final["knn_top1"]) > (held["probe_top1"], held["knn_top1"]):
                best[run["sweep_base"]] = {"spec": run["name"], "probe_top1": final["probe_top1"],
                                           "knn_top1": final["knn_top1"]}  # k-NN breaks a tie  # fmt: skip
    return best


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {t: [] for t in SET_TARGETS}
    for item in items:
        target, sep, override = item.partition(":")
        if not sep or target not in SET_TARGETS:
            target, override = "pretrain", item
        if not re.match(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=", override):
            raise SpecError(f"--set {item!r}: expected [COMMAND:]section.key=value, COMMAND one of "
                            f"{', '.join(SET_TARGETS)}")  # fmt: skip
        out[target].append(override)
    return out


def parse_cpus(text: str) -> set[int]:
    """'1' / '0,2' / '0-3' (taskset -c) -> CPU numbers."""
    try:
        cpus = {c for part in text.split(",") for c in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
    except ValueError:
        raise SpecError(f"--cpus {text!r}: expected a CPU list like 1, 0,2 or 0-3") from None
    if not cpus <= os.sched_getaffinity(0):
        raise SpecError(f"--cpus {text!r}: this process may use CPUs {sorted(os.sched_getaffinity(0))} only")
    return cpus


def setup_logging(path: Path) -> None:
    fmt = logging.Formatter(f"%(asctime)s [{os.getpid()}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path, mode="a")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add = p.add_argument
    add("--data", nargs="+", required=True, metavar="PATH", help="a labelled .npz (x_train, y_train, x_test, y_test), "
        "a folder with train/ and val/ (or test/) ImageFolder trees, or two folders TRAIN VAL")
    add("--methods", default="mae", help="comma-separated run specs (default: mae)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, default=None, help="pretraining epochs per run (default: the recipe's)")
    budget.add_argument("--core-minutes", type=float, default=None, help="pretraining core-minutes per run")
    add("--eval-every", type=float, default=1.0, help="epochs between evaluated checkpoints (0: the final one only)")
    add("--out", default=None, help="study folder (default: runs/compare/<data name>)")
    add("--role", choices=("all", "train", "eval"), default="all",
        help="all: pretrain each run, then score it; train / eval: one half each, in two processes")
    add("--poll", type=int, default=60, help="--role eval: seconds between looks (0: score what is there, then stop)")
    add("--threads", type=int, default=None, help="torch threads of pretraining and evaluation (default: CPUs allowed)")
    add("--cpus", default=None, help="pin the study to these CPUs (as taskset -c: 1, 0,2, 0-3)")
    add("--cpu-scale", action="append", default=[], metavar="CPU=FACTOR",
        help="multiply the core-minutes of runs pretrained on CPU (as compare.json's `machines` name it) by FACTOR, "
             "e.g. a reference step's time on the reference CPU over its time on CPU, so that rows pretrained on "
             "different machines count in one CPU's core-minutes; repeatable")
    add("--set", action="append", default=[], metavar="[COMMAND:]KEY=VALUE",
        help=f"an override for every run; COMMAND: {', '.join(SET_TARGETS)} (default pretrain); repeatable")
    add("--mean", type=float, nargs=3, default=None, help="data mean (default: computed from the training images)")
    add("--std", type=float, nargs=3, default=None, help="data std (default: computed from the training images)")
    add("--img-size", type=int, default=None, help="model image size (default: the training images' side)")
    add("--patch-size", type=int, default=None, help="patch size (default: a grid of at most 14 tokens a side)")
    add("--knn", default="probe", choices=("probe", "command"),
        help="probe: the k-NN vote on the linear probe's cached features (one extraction per checkpoint); command: "
             "a separate `mimkit knn` run (its own extraction, --set knn:...)")
    add("--tokenizer", default=None, help="BEiT / mc-BEiT tokenizer file (default: one trained on the data)")
    add("--tokenizer-kind", default="mimkit", choices=("mimkit", "dalle", "vqgan"), help="kind of --tokenizer")
    add("--tokenizer-steps", type=int, default=None, help="tokenizer training steps (default: the recipe's)")
    add("--finetune-epochs", type=int, default=None, help="also fine-tune each final encoder and each random init")
    add("--sweep", default=None, metavar="GRID", help="'key=v1,v2;key=v1,v2': every spec at every grid point, the "
        "final checkpoint scored, the best probe per spec written to sweep_winners.json")
    add("--reach", type=float, nargs="+", default=[], metavar="PERCENT", help="also read out the pretraining "
        "epochs and core-minutes at which each run's probe first reaches these top-1 accuracies")
    add("--train-samples", type=int, default=None, help="a seeded subset of the training images (.npz; smoke runs)")
    add("--test-samples", type=int, default=None, help="a seeded subset of the test images (.npz; smoke runs)")
    add("--max-steps", type=int, default=None, help="stop each pretraining after N steps (smoke runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        study = Study(args)
        if args.role != "train":
            study.evaluate_all(wait=False)  # the random-init rows, and whatever is already there
        if args.role != "eval":
            if study.needs_tokenizer():
                study.ensure_tokenizer()
            for run in study.runs:
                study.train(run)
                if args.role == "all":
                    study.evaluate_all(wait=False)
        else:
            study.evaluate_all(wait=args.poll > 0)
        result = study.report()
    except (SpecError, MimkitError) as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder it may not write: name the file
        print(f"compare.py: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    print(markdown(result))
    failed = f"; failed: {', '.join(study.failed)}" if study.failed else ""
    log.info("trained %d run(s), evaluated %d; wrote %s (.md, .json, probe_vs_*.png)%s", study.trained,
             study.evaluated, study.out / "compare.json", failed)
    return 1 if study.failed else 0


if __name__ == "__main__":
    sys.exit(main())
