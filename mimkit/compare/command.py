"""Equal-compute study of masked-image-modeling methods on any labelled dataset: every run spec pretrains from its
method's recipe, its checkpoints are scored by k-NN and the cached linear probe as they appear, and the runs are
read out at equal epochs and at equal pretraining core-minutes, beside random-init encoders of each backbone family.

    mimkit compare --data PATH.npz --methods mae,emae,bootmae,beit,mcbeit,bootmae+parallel --epochs 10
    mimkit compare --data DIR ...        # DIR/train and DIR/val (or DIR/test): ImageFolder trees
    mimkit compare --data TRAIN VAL ...  # two ImageFolder trees
    mimkit compare ... --core-minutes 120 --eval-every 0.5 --threads 1 --cpus 1
    mimkit compare ... --role train --cpus 0   # and beside it the same command, --role eval --cpus 1
    mimkit compare ... --sweep 'optim.blr=1.5e-4,3e-4,6e-4;train.batch_size=64,128' --epochs 1

Run specs: METHOD[+PART...][:section.key=value,...], e.g. mae, bootmae+parallel, mae+block, mae+hybrid, simmim,
'mae:optim.blr=3e-4,train.batch_size=64' (parts: mimkit.compare.spec.PARTS). The base recipe is
configs/<method>_vit_tiny_cifar10.yaml with the data's fields replaced: data.path / format / mean / std (computed from
the training images unless --mean / --std), model.img_size (the images' side) and model.patch_size (a grid of at most
14 tokens a side; --patch-size). Pretraining is a function call (mimkit.train.pretrain; --isolate: a
`mimkit pretrain` process each) on --threads threads, data.num_workers=0 so that all of its work is on those threads; --cpus pins the study (taskset-style list).

Budget: --epochs E (default: the recipe's), --steps N, --core-minutes C or --gpu-minutes G per run. Core-minutes = training-loop wall-clock x
pretraining threads, the wall-clock summed from the run's metrics.jsonl (one record per step; see
mimkit.compare.budget.step_clock). A core-minute budget runs each run's learning-rate and
method schedules on its own clock and stops it there (train.budget_minutes = the budget / its threads, counted over
resumes; warmup 10% of it; a checkpoint is written at the stop); a short timed calibration run sets only a cap on its
steps (train.schedule_steps). An epoch budget keeps the
recipe's warmup, capped at 10% of the run. A checkpoint is written and evaluated every --eval-every epochs and at
the end; all are kept (ViT-T/4 MAE: ~47 MB each, weights and optimizer state). Each run records the CPU it pretrained
on; --cpu-scale 'CPU=FACTOR' multiplies the core-minutes of runs from CPU so that a study continued on other machines
reads out in one CPU's core-minutes. --gpu-minutes G is the same budget on GPUs: each run pretrains on one CUDA GPU
(train.device=cuda) for G minutes of its clock, the tables and plots read out in GPU-minutes and the rows name the GPU.

Restarting the same command continues a killed study: pretraining resumes exactly (train.resume auto), finished
evaluations are kept (evals/<run>/step-N.json), an interrupted one continues from its feature caches. --role train
and --role eval split the work between two processes (each on its own cores): the eval process polls the run
folders and scores each checkpoint once. Outputs in --out: compare.json (everything), compare.md (the tables, also
printed), probe_vs_epochs.png, probe_vs_core_minutes.png, compare.log; runs/<run>/ and evals/<run>/ hold the work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from mimkit.compare.page import build_study_page
from mimkit.compare.readout import markdown
from mimkit.compare.spec import SET_TARGETS
from mimkit.compare.study import Study, log
from mimkit.errors import MimkitError

DESCRIPTION = __doc__.split("\n\n")[0]
EPILOG = __doc__.split("\n\n", 1)[1]


def parser(prog: str = "mimkit compare") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    return add_arguments(p)


def add_compare_parser(sub) -> None:
    """`mimkit compare` as a subcommand of the mimkit command line."""
    add_arguments(sub.add_parser("compare", help="which method for this data at this budget: an equal-compute "
                                 "study of run specs, scored as checkpoints appear, with a page (mimkit report DIR)",
                                 description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter))  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `mimkit compare` (and of benchmarks/compare.py, which calls it)."""
    add = p.add_argument
    add(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="a labelled .npz (x_train, y_train, x_test, y_test), "
        "a folder with train/ and val/ (or test/) ImageFolder trees, or two folders TRAIN VAL",
    )
    add("--methods", default="mae", help="comma-separated run specs (default: mae)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, default=None, help="pretraining epochs per run (default: the recipe's)")
    budget.add_argument("--steps", type=int, default=None, help="pretraining optimizer steps per run")
    budget.add_argument(
        "--core-minutes",
        type=float,
        default=None,
        help="pretraining core-minutes per run, measured "
        "by each run's own clock (wall-clock x threads), which runs its schedules and stops it",
    )
    budget.add_argument(
        "--gpu-minutes",
        type=float,
        default=None,
        help="pretraining GPU-minutes per run (one CUDA GPU a run: wall-clock x 1), on each run's own clock as "
        "--core-minutes; the rows name their GPU",
    )
    add("--eval-every", type=float, default=1.0, help="epochs between evaluated checkpoints (0: the final one only)")
    add("--out", default=None, help="study folder (default: runs/compare/<data name>)")
    add(
        "--role",
        choices=("all", "train", "eval"),
        default="all",
        help="all: pretrain each run, then score it; train / eval: one half each, in two processes",
    )
    add("--poll", type=int, default=60, help="--role eval: seconds between looks (0: score what is there, then stop)")
    add("--threads", type=int, default=None, help="torch threads of pretraining and evaluation (default: CPUs allowed)")
    add("--cpus", default=None, help="pin the study to these CPUs (as taskset -c: 1, 0,2, 0-3)")
    add_scoring_arguments(p)
    p.set_defaults(func=run_command)
    return p


def add_scoring_arguments(p: argparse.ArgumentParser) -> None:
    """The options of how the runs are set up and scored: CPU scaling, --set, data statistics and geometry,
    k-NN, tokenizer, fine-tuning, sweeps, reach and smoke-run limits."""
    add = p.add_argument
    add(
        "--cpu-scale",
        action="append",
        default=[],
        metavar="CPU=FACTOR",
        help="multiply the core-minutes of runs pretrained on CPU (as compare.json's `machines` name it) by FACTOR, "
        "e.g. a reference step's time on the reference CPU over its time on CPU, so that rows pretrained on "
        "different machines count in one CPU's core-minutes; repeatable",
    )
    add(
        "--set",
        action="append",
        default=[],
        metavar="[COMMAND:]KEY=VALUE",
        help=f"an override for every run; COMMAND: {', '.join(SET_TARGETS)} (default pretrain); repeatable",
    )
    add("--mean", type=float, nargs=3, default=None, help="data mean (default: computed from the training images)")
    add("--std", type=float, nargs=3, default=None, help="data std (default: computed from the training images)")
    add("--img-size", type=int, default=None, help="model image size (default: the training images' side)")
    add("--patch-size", type=int, default=None, help="patch size (default: a grid of at most 14 tokens a side)")
    add(
        "--knn",
        default="probe",
        choices=("probe", "command"),
        help="probe: the k-NN vote on the linear probe's cached features (one extraction per checkpoint); command: "
        "a separate `mimkit knn` run (its own extraction, --set knn:...)",
    )
    add("--tokenizer", default=None, help="BEiT / mc-BEiT tokenizer file (default: one trained on the data)")
    add("--tokenizer-kind", default="mimkit", choices=("mimkit", "dalle", "vqgan"), help="kind of --tokenizer")
    add("--tokenizer-steps", type=int, default=None, help="tokenizer training steps (default: the recipe's)")
    add("--finetune-epochs", type=int, default=None, help="also fine-tune each final encoder and each random init")
    add(
        "--sweep",
        default=None,
        metavar="GRID",
        help="'key=v1,v2;key=v1,v2': every spec at every grid point, the "
        "final checkpoint scored, the best probe per spec written to sweep_winners.json",
    )
    add(
        "--reach",
        type=float,
        nargs="+",
        default=[],
        metavar="PERCENT",
        help="also read out the pretraining "
        "epochs and core-minutes at which each run's probe first reaches these top-1 accuracies",
    )
    add("--train-samples", type=int, default=None, help="a seeded subset of the training images (.npz; smoke runs)")
    add("--test-samples", type=int, default=None, help="a seeded subset of the test images (.npz; smoke runs)")
    add(
        "--isolate",
        action="store_true",
        help="pretrain each run in a process of its own (`mimkit pretrain`; its "
        "output in runs/RUN/train.log; a crash ends that run only) instead of a function call in this process",
    )
    add("--no-page", action="store_true", help="do not write the study page (report.html; `mimkit report DIR` does)")
    add("--max-steps", type=int, default=None, help="stop each pretraining after N steps (smoke runs)")


def run_study(args: argparse.Namespace) -> tuple[Study, dict]:
    """Plan, pretrain and score as args.role says; the study's record (compare.json) and its page are written."""
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
    if not args.no_page:
        build_study_page(study.out)
    return study, result


def run_command(args: argparse.Namespace) -> int:
    study, result = run_study(args)
    print(markdown(result))
    failed = f"; failed: {', '.join(study.failed)}" if study.failed else ""
    log.info("trained %d run(s), evaluated %d; wrote %s (.md, .json, probe_vs_*.png, report.html)%s", study.trained,
             study.evaluated, study.out / "compare.json", failed)  # fmt: skip
    return 1 if study.failed else 0


def main(argv: list[str] | None = None, prog: str = "mimkit compare") -> int:
    """The command: 0 done, 1 a run failed, 2 a problem with the input said in one line."""
    args = parser(prog).parse_args(argv)
    name = prog.split()[-1]
    try:
        return run_command(args)
    except MimkitError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder it may not write: name the file
        print(f"{name}: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2


def compare(data: str | list[str], methods: str = "mae", **options) -> dict:
    """The study in Python: `mimkit.compare("cifar10.npz", "mae,mae+crossmae", core_minutes=30, eval_every=0.5,
    out="study")` runs what `mimkit compare` runs (options: its flags, - as _) and returns compare.json's record.

    Args:
        data: a labelled .npz, a folder with train/ and val/ (or test/) ImageFolder trees, or [TRAIN, VAL] folders.
        methods: comma-separated run specs, `METHOD[+PART...][:section.key=value,...]`.
        **options (object): epochs, core_minutes, eval_every, out, role, threads, cpus, set (a list), sweep, reach, ...

    Returns:
        The study's record, as OUT/compare.json holds it (runs, baselines, readouts, summary).
    """
    args = parser().parse_args(["--data", *([data] if isinstance(data, str) else data), "--methods", methods])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise TypeError(f"compare(): unknown option(s) {', '.join(unknown)}; options: {', '.join(sorted(vars(args)))}")
    for key, value in options.items():
        setattr(args, key, list(value) if isinstance(value, tuple) else value)
    root, cpus, threads = logging.getLogger(), os.sched_getaffinity(0), torch.get_num_threads()
    handlers, level = list(root.handlers), root.level
    try:
        return run_study(args)[1]
    finally:  # the caller's logging, cores and threads as they were (the study's log: OUT/compare.log)
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
