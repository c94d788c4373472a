"""The plan of a study, checked before any compute: its run folders, each run's recipe and overrides, the random-
init baselines, the evaluation settings; the small file helpers the other pieces share."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mimkit.checkpoint import atomic_write_text, checkpoint_path
from mimkit.compare.budget import EVERY, schedule
from mimkit.compare.dataset import choose_patch, data_info
from mimkit.compare.spec import RunSpec, SpecError, parse_cpu_scale, parse_cpus, parse_sets, parse_specs, sweep_specs
from mimkit.config import Config, load_config, reads_key, resolved
from mimkit.errors import MimkitError
from mimkit.eval import load_eval_config
from mimkit.registry import method_pool

log = logging.getLogger("compare")
PACKAGE = Path(__file__).resolve().parents[1]
# the recipes: mimkit/recipes in an installed wheel, the repository's configs/ in a source checkout
CONFIGS = PACKAGE / "recipes" if (PACKAGE / "recipes").is_dir() else PACKAGE.parent / "configs"
ROOT = CONFIGS.parent  # run records name their recipe relative to it (configs/mae_vit_tiny_cifar10.yaml)
EVAL_RECIPES = {c: CONFIGS / "eval" / f"{c}_vit_tiny_cifar10.yaml" for c in ("knn", "linprobe", "finetune")}
IN_STUDY_FOLDER = ("train.out_dir=", "tokenizer.path=")  # paths under --out: a moved study folder keeps its runs


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
    spec: RunSpec
    base: str  # the spec before --sweep's overrides
    recipe: Path
    fixed: list[str]  # the data's fields and the spec's parts
    user: list[str]  # --set and the spec's own overrides: after the budget, so they win
    cfg: Config  # the recipe with fixed + user
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


class Plan:
    """What a study will do: built from the command's arguments, refused in one line before any compute."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        specs = [(s, b.text) for b in parse_specs(args.methods)
                 for s in (sweep_specs([b], args.sweep) if args.sweep else [b])]  # fmt: skip
        if getattr(args, "gpu_minutes", None) is not None and args.role != "eval" and not torch.cuda.is_available():
            raise SpecError("--gpu-minutes: no CUDA GPU here (torch.cuda.is_available() is false); on CPUs the "
                            "budget is --core-minutes")  # fmt: skip
        self.sets = parse_sets(args.set)
        self.cpu_scale = parse_cpu_scale(args.cpu_scale)
        if args.cpus:
            os.sched_setaffinity(0, parse_cpus(args.cpus))
        self.threads = args.threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(self.threads)
        args.data = [os.path.abspath(p) for p in args.data]  # records name files absolutely, wherever it is run from
        self.out = Path(args.out or Path("runs") / "compare" / Path(args.data[0]).stem).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        setup_logging(self.out / "compare.log")
        self.info = data_info(args.data, self.out, args.train_samples, args.test_samples)
        side = args.img_size or self.info.image_size
        self.patch: int
        self.img: int
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
        fixed += spec.part_overrides() + (["train.device=cuda"] if self.on_gpu else [])  # GPU-minutes: one GPU a run
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
        """Schedule overrides of --epochs, --steps, --core-minutes or --gpu-minutes (mimkit.compare.budget.schedule)."""
        epochs = self.args.steps / steps_per_epoch if getattr(self.args, "steps", None) else self.args.epochs
        return schedule(cfg, steps_per_epoch, epochs, *self.compute(), calibration)

    @property
    def on_gpu(self) -> bool:
        return getattr(self.args, "gpu_minutes", None) is not None

    @property
    def compute_key(self) -> str:
        """The study's compute axis (compare.json's `compute`): gpu_minutes with --gpu-minutes, else core_minutes."""
        return "gpu_minutes" if self.on_gpu else "core_minutes"

    def compute(self) -> tuple[float | None, int]:
        """The compute budget per run (None: epochs or steps) and what one minute of a run's clock counts: its
        threads (core-minutes) or its one GPU (GPU-minutes)."""
        return (self.args.gpu_minutes, 1) if self.on_gpu else (self.args.core_minutes, self.threads)

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
        """One random-init encoder per backbone family and shape among the runs (and, for a method whose encoder
        has no cls token, I-JEPA's, the encoder that method starts from)."""
        keys = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads")
        shapes = list(dict.fromkeys((r.spec.family, *(getattr(resolved(r.cfg).model, k) for k in keys),
                                     r.spec.method if method_pool(r.spec.method) == "mean" else None)
                                    for r in self.runs))  # fmt: skip
        out = []
        for key in shapes:
            family, arch, img, patch, dim, depth, heads, method = key
            label = {"vit": "ViT", "beit": "Beit"}[family]
            same = [k for k in shapes if k[0] == family and k[-1] == method]
            name = f"random-init {label}" + (f" {dim}x{depth}" if len(same) > 1 else "")
            name += f" ({method}'s, no cls token)" if method else ""
            encoder = [f"encoder.family={family}", f"encoder.arch={arch}", f"encoder.img_size={img}",
                       f"encoder.patch_size={patch}", f"encoder.embed_dim={dim}", f"encoder.depth={depth}",
                       f"encoder.num_heads={heads}", *([f"encoder.method={method}"] if method else [])]  # fmt: skip
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
        run = self.run_of(encoder)
        method = run.spec.method if run is not None else next(
            (e.split("=", 1)[1] for e in encoder if e.startswith("encoder.method=")), "mae")  # fmt: skip
        if method_pool(method) == "mean" and command in ("knn", "linprobe"):
            # no cls token (I-JEPA): the recipes' [cls ‖ mean] feature is the mean of the patch tokens here
            ov.append("features.pool=mean" if command == "knn" else "probe.pool=mean")
        if command == "finetune":
            epochs = self.args.finetune_epochs
            # the recipe's warmup is 1 epoch: a third of a shorter run
            ov += [f"train.epochs={epochs}", f"optim.warmup_epochs={min(1.0, epochs / 3):.4g}"]
        return ov + self.sets[command]

    def run_of(self, encoder: list[str]) -> Run | None:
        """The run whose checkpoint `encoder` names (None: a random init)."""
        named = next((e.split("=", 1)[1] for e in encoder if e.startswith("encoder.checkpoint=")), "")
        return next((r for r in self.runs if Path(named).parent == r.dir / "pretrain"), None)

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

    def run_settings(self, run: Run, record: dict) -> dict:
        """What a run's pretraining is launched with; a run folder started with other settings is refused."""
        overrides = (run.fixed + self.budget(run.cfg, run.steps_per_epoch, record.get("calibration")) + run.user
                     + self.bookkeeping(run.dir / "pretrain", self.save_every(run)))  # fmt: skip
        settings = {"recipe": str(run.recipe.relative_to(ROOT)), "overrides": overrides, "threads": self.threads}
        if record.get("done") and record.get("settings") and portable(record["settings"]) == portable(settings, False):
            return record["settings"]  # pretrained before the schedules ran on the budget's clock: kept as they are
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


def portable(settings: dict, clock_schedule: bool = True) -> dict:
    """A run's or tokenizer's settings without the paths that only say where the study folder is (and, not
    `clock_schedule`, without train.budget_minutes, which earlier core-minute runs were launched without)."""
    drop = IN_STUDY_FOLDER + (() if clock_schedule else ("train.budget_minutes=",))
    return {**settings, "overrides": [o for o in settings["overrides"] if not o.startswith(drop)]}


def pretrained(run: Run, step: int) -> list[str]:
    """encoder.* overrides of a run's checkpoint (its own architecture)."""
    return [f"encoder.checkpoint={checkpoint_path(run.dir / 'pretrain', step)}", "encoder.arch=null"]


def setup_logging(path: Path) -> None:
    """The study's log on stdout and in `path`, in place of the root logger's handlers (mimkit's own lines, e.g.
    the evaluations', go there too; stderr is left to the one-line errors)."""
    fmt = logging.Formatter(f"%(asctime)s [{os.getpid()}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if isinstance(handler, logging.FileHandler):
            handler.close()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path, mode="a")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
