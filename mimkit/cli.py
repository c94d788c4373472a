"""The command line, all of its argument parsing: `mimkit pretrain | knn | linprobe | finetune | visualize |
attention | export | import | tokenizer train`, each `CONFIG [section.key=value ...]` where it takes a config."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import textwrap
from pathlib import Path

from mimkit import distributed as mdist
from mimkit.checkpoint import load_checkpoint
from mimkit.compare.command import add_compare_parser
from mimkit.config import Config, active_loggers, dump_yaml, load_config, resolved
from mimkit.errors import MimkitError
from mimkit.eval import RUNNERS, dump_eval_yaml, load_eval_config
from mimkit.eval.common import eval_transform
from mimkit.eval.config import IMAGENET_MEAN, IMAGENET_STD
from mimkit.eval.embed import embed_images
from mimkit.interop import ImportOptions, InteropError, export_hf, export_timm, import_checkpoint, timm_usage
from mimkit.interop.classifier import (
    export_classifier_hf,
    export_classifier_timm,
    finetuned_classifier,
    load_classifier,
    predict_topk,
    write_topk_csv,
)
from mimkit.logs import progress_bar
from mimkit.registry import method_names, method_spec
from mimkit.report import build_report
from mimkit.runs import EXIT_STOPPED, RunStopped
from mimkit.tokenizer_training import train_tokenizer
from mimkit.tokenizers import TokenizerError
from mimkit.train import pretrain
from mimkit.version import __version__
from mimkit.visualize import attention_figure, expand_images, visualize

# ---------------------------------------------------------------- shipped recipes


def recipes_dir() -> Path:
    """The recipes that ship with the package: mimkit/recipes in an installed wheel (setup.py copies configs/
    there), the repository's configs/ in a source checkout (an editable install)."""
    here = Path(__file__).resolve().parent
    return here / "recipes" if (here / "recipes").is_dir() else here.parent / "configs"


def shipped_recipes(kind: str = "pretrain") -> dict[str, Path]:
    """name -> file of the shipped recipes: pretraining (and tokenizer) ones, or the evaluation ones (kind 'eval')."""
    folder = recipes_dir() / ("eval" if kind == "eval" else "")
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_recipe(config: str | None, kind: str = "pretrain") -> str | None:
    """A recipe argument as a path: an existing file as is, a bare name (no folder, optionally .yaml) as the shipped
    recipe of that name; anything else as given (load_config names a missing file)."""
    if config is None or Path(config).exists() or "/" in config or Path(config).suffix not in ("", ".yaml"):
        return config
    found = shipped_recipes(kind).get(Path(config).stem)
    if found is None:
        names = ", ".join(shipped_recipes(kind)) or "none"
        raise MimkitError(f"recipe {config!r}: no such file and no shipped recipe of that name (shipped: {names}; "
                          "`mimkit recipes` lists them)")  # fmt: skip
    return str(found)


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _recipes(args: argparse.Namespace) -> int:
    for kind, usage in (("pretrain", "mimkit pretrain NAME (tokenizer_*: mimkit tokenizer train NAME)"),
                        ("eval", "mimkit knn | linprobe | finetune NAME")):  # fmt: skip
        found = shipped_recipes(kind)
        print(f"{usage}  [{recipes_dir() / ('eval' if kind == 'eval' else '')}]")
        width = max((len(n) for n in found), default=0)
        for name, path in found.items():
            print(f"  {name:<{width}}  {_first_comment(path)}")
    return 0


DEFAULT_SCHEDULE_KEYS = ("train.epochs=", "train.max_steps=", "optim.warmup_epochs=")


def _warn_default_schedule(config: str | None, overrides: list[str]) -> None:
    """No recipe and no schedule set: the defaults are ImageNet's (800 epochs, 40 warmup epochs), said in one line."""
    if config is None and not any(o.startswith(DEFAULT_SCHEDULE_KEYS) for o in overrides):
        d = Config()
        logging.getLogger("mimkit").warning(
            "no recipe: the default schedule is ImageNet's (%d epochs, %d warmup epochs, cosine); for a short run pass "
            "a recipe (`mimkit recipes` lists them, e.g. mimkit pretrain quickstart) or set train.epochs and "
            "optim.warmup_epochs", d.train.epochs, d.optim.warmup_epochs)  # fmt: skip


def _pretrain(args: argparse.Namespace) -> int:
    args.config = resolve_recipe(args.config)
    _warn_default_schedule(args.config, args.overrides)
    overrides = list(args.overrides)
    if args.dry_run:  # one step and one checkpoint save on every rank, in a scratch folder
        base = load_config(args.config, overrides)
        overrides += ["train.max_steps=1", "train.resume=none", f"train.out_dir={Path(base.train.out_dir) / 'dry-run'}"]
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_yaml(resolved(cfg)), end="")
        return 0
    result = pretrain(cfg)
    if args.dry_run:
        if mdist.world_from_env()[0] == 0:
            assert result.checkpoint is not None  # the dry run's step is saved
            load_checkpoint(result.checkpoint)  # the checkpoint every rank wrote reads back
            shutil.rmtree(cfg.train.out_dir, ignore_errors=True)
            print(f"dry run OK: 1 step on {mdist.world_from_env()[1]} process(es), loss {result.loss:.4f}, "
                  "checkpoint written and read back (scratch folder removed)")  # fmt: skip
        mdist.cleanup()
        return 0
    if mdist.world_from_env()[0] == 0 and result.already_finished:
        print(
            f"\nalready finished: {result.out_dir} is at step {result.step}, final loss {result.loss:.4f}; nothing "
            "was trained (raise train.max_steps, or train.epochs with train.resume_allow=train.epochs, to go on)"
        )
        print(f"  checkpoint: {result.checkpoint}")
    elif mdist.world_from_env()[0] == 0:
        print(f"\ndone: step {result.step}, loss {result.loss:.4f}")
        print(f"  checkpoint: {result.checkpoint}")
        print(f"  config:     {result.config}")
        print(f"  metrics:    {result.metrics}{_beside(result.out_dir, active_loggers(cfg.train))}")
        print(f"  report:     mimkit report {result.out_dir}  (one HTML page: curves, reconstructions, evaluations)")
        if result.nonfinite_steps or result.skipped_images:
            print(f"  skipped:    {result.nonfinite_steps} non-finite steps, {result.skipped_images} corrupt images")
    mdist.cleanup()
    return 0


def _beside(out_dir: Path, loggers) -> str:
    """' (TensorBoard: OUT/tb, CSV: OUT/metrics.csv)' for the loggers a run wrote, '' for none."""
    where = {"tensorboard": f"TensorBoard: {out_dir / 'tb'}", "csv": f"CSV: {out_dir / 'metrics.csv'}"}
    named = [where[n] for n in loggers if n in where]
    return f" ({', '.join(named)})" if named else ""


# ---------------------------------------------------------------- visualize / export / import / attention


def _visualize(args: argparse.Namespace) -> int:
    for done in visualize(args.checkpoint, args.images, args.out, seed=args.seed, scale=args.scale, bands=args.bands):
        print(done.path)
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        if args.ema:
            raise InteropError(f"{args.checkpoint}: --ema is for fine-tuned checkpoints")
        return _export_pretrained(args)
    except InteropError:  # not a pretraining checkpoint: a fine-tuned classifier (mimkit finetune), or the error
        classifier = finetuned_classifier(args.checkpoint, ema=args.ema)
        if classifier is None:
            raise
    if args.to == "timm":
        written = export_classifier_timm(classifier, args.out)
        print(
            f"wrote the fine-tuned classifier ({classifier.model_args['num_classes']} classes) to {written['weights']} "
            f"and {written['config']}\nload with: timm.create_model('local-dir:{args.out}', pretrained=True)"
        )
        return 0
    written = export_classifier_hf(classifier, args.out)
    print(
        f"wrote transformers.{written['class']} folder {written['folder']} "
        f"({written['class']}.from_pretrained('{written['folder']}'))"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".csv":
        raise InteropError(f"--out: {out} has suffix '{out.suffix}'; predict writes a .csv table")
    if args.top_k < 1:
        raise InteropError(f"--top-k: {args.top_k}; give 1 or more")
    images = expand_images(args.images)
    classifier = load_classifier(args.classifier)
    transform = eval_transform(classifier.img_size, classifier.mean, classifier.std, classifier.crop_pct)
    bar = progress_bar(total=len(images), desc="predict", unit="img", dynamic_ncols=True)
    try:
        rows = predict_topk(classifier, images, transform, args.top_k, args.batch_size,
                            mdist.resolve_device(args.device), bar)  # fmt: skip
    finally:
        bar.close()
    write_topk_csv(out, images, rows)
    print(f"wrote {out}: top-{min(args.top_k, classifier.model_args['num_classes'])} classes of {len(images)} images")
    return 0


def _export_pretrained(args: argparse.Namespace) -> int:
    if args.to == "timm":
        written = export_timm(args.checkpoint, args.out)
        print(f"wrote {written['weights']} and {written['config']}\nload with:\n{timm_usage(args.out)}")
    else:
        written = export_hf(args.checkpoint, args.out)
        if "beit" in written:  # BEiT / mc-BEiT: transformers' Beit classes
            print(
                f"wrote transformers.BeitModel folder {written['beit']} "
                f"(BeitModel.from_pretrained('{written['beit']}', add_pooling_layer=False))"
            )
            print(
                f"wrote transformers.BeitForMaskedImageModeling folder {written['beit_mim']} "
                f"(BeitForMaskedImageModeling.from_pretrained('{written['beit_mim']}'))"
            )
            return 0
        if "ijepa" in written:  # I-JEPA: no cls token, transformers' IJepaModel
            print(
                f"wrote transformers.IJepaModel folder {written['ijepa']} "
                f"(IJepaModel.from_pretrained('{written['ijepa']}', add_pooling_layer=False))"
            )
            return 0
        print(
            f"wrote transformers.ViTModel folder {written['vit']} "
            f"(ViTModel.from_pretrained('{written['vit']}', add_pooling_layer=False))"
        )
        if "vit_mae" in written:
            print(
                f"wrote transformers.ViTMAEForPreTraining folder {written['vit_mae']} "
                f"(ViTMAEForPreTraining.from_pretrained('{written['vit_mae']}'))"
            )
    return 0


def _embed(args: argparse.Namespace) -> int:
    e = embed_images(args.checkpoint, args.data, args.out, pool=args.pool, block=args.block, split=args.split,
                     arch=args.arch, img_size=args.img_size, batch_size=args.batch_size, device=args.device,
                     precision=args.precision, mean=tuple(args.mean), std=tuple(args.std), crop_pct=args.crop_pct,
                     num_workers=args.num_workers, root=args.root, download=args.download)  # fmt: skip
    labels = f", labels of {len(e.classes or []) or 'unnamed'} classes" if e.labels is not None else ""
    print(
        f"wrote {args.out}: {e.features.shape[0]} images x {e.features.shape[1]} features ({args.pool}, block "
        f"{args.block}){labels}"
    )
    return 0


def _add_embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="features without masking of every image of a folder, .npz or dataset -> "
                       ".npy / .npz / .parquet", description="Encoder features (no masking) of every image, pooled as "
                       "the evaluation commands pool them (features.pool, features.block), written with the image "
                       "identities: relative paths for a folder, indices for arrays and datasets (.npz: features, ids, "
                       "labels and classes when known; .npy: the features, the ids in OUT.ids.txt; .parquet: needs "
                       "pyarrow, pip install 'mimkit[parquet]').")  # fmt: skip
    p.add_argument(
        "checkpoint", help="a mimkit checkpoint (pretraining or `mimkit import`ed), or 'none' (random init of --arch)"
    )
    p.add_argument(
        "data",
        help="a folder of images (ImageFolder tree or flat), a .npz (x_SPLIT, y_SPLIT optional), "
        "or torchvision:NAME[:SPLIT]",
    )
    p.add_argument("--out", required=True, help="the file to write: .npy, .npz or .parquet")
    p.add_argument(
        "--pool",
        default="auto",
        choices=("auto", "cls", "mean", "cls_mean"),
        help="features.pool (default auto: the checkpoint's method's, cls, or mean for I-JEPA)",
    )
    p.add_argument("--block", type=int, default=-1, help="features.block: 1-based block, -1 = last (default)")
    p.add_argument("--split", default=None, help=".npz: x_SPLIT (default train); torchvision: the split")
    p.add_argument("--arch", default=None, help="encoder preset (required with checkpoint none)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--mean", type=float, nargs=3, default=list(IMAGENET_MEAN), help="normalisation mean (ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, default=list(IMAGENET_STD), help="normalisation std (ImageNet's)")
    p.add_argument("--crop-pct", type=float, default=None, help="data.crop_pct (default 0.875 from 128 px, else 1)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--root", default="data", help="torchvision datasets: data.root")
    p.add_argument("--download", action="store_true", help="torchvision datasets: download into --root if missing")
    p.set_defaults(func=_embed)


def _import(args: argparse.Namespace) -> int:
    opts = ImportOptions(
        fmt=args.format, key=args.key, img_size=args.img_size, num_heads=args.num_heads, decoder_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads, mask_ratio=args.mask_ratio,
        norm_pix_loss=args.norm_pix_loss, mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None, strict=args.strict,
    )  # fmt: skip
    report = import_checkpoint(args.source, args.out, opts)
    print(report.text())
    return 0


def _attention(args: argparse.Namespace) -> int:
    images = expand_images(args.images)
    single_file = len(images) == 1 and args.out is not None and args.out.lower().endswith(".png")
    for image in images:
        out = Path(args.out) if single_file else Path(args.out or ".") / f"{image.stem}_attention.png"
        path, _ = attention_figure(args.checkpoint, image, out, scale=args.scale)
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    rep = build_report(args.run_dir, args.out, images=args.images, checkpoints=args.checkpoints,
                       num_images=args.num_images, evals=args.evals)  # fmt: skip
    print(
        f"wrote {rep.html} and {rep.png} ({rep.steps_plotted} steps, {len(rep.evals)} evaluation runs, "
        f"reconstructions by {', '.join(rep.checkpoints_drawn) or 'none'})"
    )
    for note in rep.notes:
        print(f"  note: {note}")
    return 0


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page + PNG summary of a pretraining run",
                       description="Curves (loss and its terms, lr, img/s, skipped; resumes marked), reconstructions of "
                       "fixed images by the initial model and several checkpoints, the k-NN trend, every evaluation "
                       "run of the run's checkpoints (metrics.json of mimkit knn / linprobe / finetune under RUN_DIR, "
                       "in RUN_DIR's sibling folders and their sub-folders, and under --evals), the resolved config "
                       "and the machine. Needs matplotlib: pip install 'mimkit[report]'.")  # fmt: skip
    p.add_argument(
        "run_dir", help="a pretraining run's folder (train.out_dir: config.yaml, metrics.jsonl, checkpoints)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="the HTML page to write (default RUN_DIR/report.html); the PNG summary "
        "goes beside it with the suffix .png",
    )
    p.add_argument(
        "--images",
        nargs="+",
        default=None,
        help="images (files or folders) to reconstruct (default: train.vis_images images spread over the run's data)",
    )
    p.add_argument("--num-images", type=int, default=None, help="how many images (default: the run's train.vis_images)")
    p.add_argument(
        "--checkpoints",
        type=int,
        default=None,
        help="checkpoints drawn besides the initial model, spread "
        "from the oldest kept to the newest (default: every kept checkpoint, up to 8)",
    )
    p.add_argument("--evals", nargs="+", default=[], help="more folders to search for evaluation runs (any depth)")
    p.set_defaults(func=_report)


def _add_tool_parsers(sub) -> None:
    p = sub.add_parser("visualize", help="reconstruction grids (original, masked, reconstruction, pasted) as PNGs")
    p.add_argument("checkpoint", help="a mimkit checkpoint (.pt)")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--out", default="visualizations", help="output folder (default: visualizations)")
    p.add_argument("--seed", type=int, default=0, help="masking seed (default 0): same seed, same mask")
    p.add_argument("--scale", type=int, default=None, help="integer upscaling of the panels (default: to >= 192 px)")
    p.add_argument(
        "--bands",
        type=lambda v: tuple(int(b) for b in v.split(",")),
        default=None,
        help="multi-band models: three 1-based bands drawn as R,G,B, e.g. 3,2,1 (default: 1,2,3)",
    )
    p.set_defaults(func=_visualize)

    p = sub.add_parser("export", help="export for timm or Hugging Face transformers (safetensors + config); a "
                       "fine-tuned checkpoint exports its classifier (head, class names)")  # fmt: skip
    p.add_argument(
        "checkpoint", help="a mimkit checkpoint (.pt): pretraining, imported, or fine-tuned (mimkit finetune)"
    )
    p.add_argument("--to", choices=("timm", "hf"), required=True, help="target library")
    p.add_argument("out", help="output folder")
    p.add_argument("--ema", action="store_true", help="a fine-tuned checkpoint: export its EMA weights")
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="top-k classes of images by a fine-tuned classifier, as a CSV table",
                       description="The top-k classes (and probabilities) of every image, by a fine-tuned checkpoint "
                       "(mimkit finetune) or its timm export (mimkit export --to timm): one CSV line per image, path, "
                       "class_1, probability_1, ..., class_k, probability_k.")  # fmt: skip
    p.add_argument("classifier", help="a fine-tuned checkpoint (.pt) or a timm export folder of one")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5, at most the class count)")
    p.add_argument("--out", default="predictions.csv", help="the CSV table to write (default predictions.csv)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=_predict)

    p = sub.add_parser("import", help="official MAE / BEiT / mc-BEiT / BootMAE / HF ViTMAE -> mimkit checkpoint")
    p.add_argument("source", help="a .pth/.pt/.bin/.safetensors file, or a Hugging Face / timm model folder")
    p.add_argument("out", help="the mimkit checkpoint to write (.pt)")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "mimkit", "mae", "beit", "bootmae", "hf"),
        help="source key layout (default: detected from the key names)",
    )
    p.add_argument(
        "--key",
        default=None,
        help="entry of the checkpoint dict holding the weights (default: model, "
        "module, state_dict, or the top level); e.g. model_ema",
    )
    p.add_argument("--img-size", type=int, default=None, help="target resolution; position embeddings are resampled")
    p.add_argument("--num-heads", type=int, default=None, help="encoder heads (default: from the config or the width)")
    p.add_argument("--decoder-dim", type=int, default=None, help="decoder width when the source has no decoder (512)")
    p.add_argument("--decoder-depth", type=int, default=None, help="decoder depth when the source has no decoder (8)")
    p.add_argument("--decoder-heads", type=int, default=None, help="decoder heads (default: config, 16 at 512)")
    p.add_argument("--mask-ratio", type=float, default=None, help="mask.ratio of the written config")
    p.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mae.norm_pix_loss of the written config (default: from the source, else true)",
    )
    p.add_argument("--mean", type=float, nargs=3, default=None, help="data.mean (default: source's, else ImageNet)")
    p.add_argument("--std", type=float, nargs=3, default=None, help="data.std (default: source's, else ImageNet)")
    p.add_argument("--strict", action="store_true", help="fail on any missing or unexpected key")
    p.set_defaults(func=_import)

    p = sub.add_parser("attention", help="last-block cls attention per head + PCA of patch features, as a PNG")
    p.add_argument("checkpoint", help="a mimkit checkpoint (.pt)")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument(
        "--out",
        default=None,
        help="output folder for <image stem>_attention.png (default: the current "
        "folder); with one image, a path ending in .png names the file",
    )
    p.add_argument("--scale", type=int, default=None, help="integer upscaling of the panels")
    p.set_defaults(func=_attention)


# ---------------------------------------------------------------- knn / linprobe / finetune


EVAL_HELP = {
    "knn": "k-NN top-1 of frozen encoder features (cosine, k=20, T=0.07); a trend monitor for MIM encoders",
    "linprobe": "linear probe of a frozen encoder (MAE protocol: BN + Linear, LARS, cosine); cached-feature fast "
                "path and block scan",
    "finetune": "fine-tune an encoder end to end (layer-wise lr decay, drop path, Mixup/CutMix, RandAugment, EMA)",
}  # fmt: skip


def _evaluate(args: argparse.Namespace) -> int:
    if args.config and "=" in args.config:  # `mimkit knn key=value ...` without a recipe
        args.overrides.insert(0, args.config)
        args.config = None
    cfg = load_eval_config(args.command, resolve_recipe(args.config, "eval"), args.overrides)
    if args.print_config:
        print(dump_eval_yaml(cfg), end="")
        return 0
    result = RUNNERS[args.command](cfg)
    if mdist.world_from_env()[0] == 0:
        m = result.metrics
        line = f"\ndone: {args.command} top-1 {m['top1']:.2f}%"
        if m.get("best_block") is not None and m.get("best_block") != m.get("block"):
            line += f" (best block {m['best_block']}: {m['best_top1']:.2f}%)"
        if m.get("ema_top1") is not None:
            line += f", EMA top-1 {m['ema_top1']:.2f}%"
        print(line + f" on {m['val_images']} val images, {m['wall_clock_s']:.0f} s")
        beside = _beside(result.out_dir, active_loggers(cfg.train))[2:-1]
        print(
            f"  metrics:    {result.metrics_path} (JSONL: {result.out_dir / 'metrics.jsonl'}{', ' + beside if beside else ''})"
        )
        if result.checkpoint is not None:
            print(f"  checkpoint: {result.checkpoint}")
    mdist.cleanup()
    return 0


def register_eval_commands(sub) -> None:
    """Add `mimkit knn | linprobe | finetune CONFIG [section.key=value ...] [--print-config]`."""
    for name, text in EVAL_HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "config",
            nargs="?",
            help=f"YAML recipe, e.g. configs/eval/{name}_vit_tiny_cifar10.yaml, or "
            f"a shipped recipe's name, e.g. {name}_vit_tiny_cifar10",
        )
        alias = " (run.*, knn's former name for train.*, is still read)" if name == "knn" else ""
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. "
                       f"encoder.checkpoint=runs/x/checkpoint-00001000.pt train.out_dir=runs/{name}{alias}")  # fmt: skip
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.set_defaults(func=_evaluate)


# ---------------------------------------------------------------- tokenizer train


def register_tokenizer_commands(sub) -> None:
    """`mimkit tokenizer train CONFIG [section.key=value ...]`."""
    p = sub.add_parser("tokenizer", help="visual tokenizers for BEiT / mc-BEiT (train mimkit's own dVAE)")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    q = tsub.add_parser("train", help="train mimkit's dVAE tokenizer on data.path; writes tokenizer.path")
    q.add_argument(
        "config", nargs="?", help="YAML recipe, e.g. configs/tokenizer_cifar10.yaml, or its name tokenizer_cifar10"
    )
    q.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. tokenizer.train_steps=100")
    q.set_defaults(func=_train_command)


def _train_command(args) -> int:
    overrides = list(args.overrides)
    if args.config and "=" in args.config:
        overrides.insert(0, args.config)
        args.config = None
    cfg = load_config(resolve_recipe(args.config), overrides, also_reads=("tokenizer",))
    try:
        result = train_tokenizer(cfg)
    except TokenizerError as e:
        print(f"mimkit: error: {e}")
        return 2
    last = result["history"][-1]
    print(f"\ndone: {last['step']} steps, loss {last['loss']:.4f} (reconstruction {last['reconstruction']:.4f})\n"
          f"  tokenizer: {result['path']}\n  metrics:   {result['path'].with_suffix('.jsonl')}")  # fmt: skip
    return 0


def _config_sections() -> str:
    lines, defaults = [], Config()
    for f in dataclasses.fields(Config):
        section = getattr(defaults, f.name)
        keys = ", ".join(g.name for g in dataclasses.fields(section)) if dataclasses.is_dataclass(section) else (
            "mae | emae | bootmae | beit | mcbeit | simmim")  # fmt: skip
        lines.append(textwrap.fill(keys, 100, initial_indent=f"  {f.name:<12} ", subsequent_indent=" " * 15))
    return "\n".join(lines)


PRETRAIN_DESCRIPTION = """Self-supervised pretraining of a timm ViT by masked image modeling: method=mae (default), emae,
bootmae, beit, mcbeit or simmim. A YAML recipe, then section.key=value overrides; --print-config shows every
resolved value. Several processes: torchrun / srun (distributed.strategy=ddp or fsdp).

config sections and keys (docs/reference/config.md; mimkit/config.py documents each):
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimkit", description="Masked-image-modeling pretraining for timm ViTs.",
                                     epilog="exit status: 0 done; 2 a problem with the input, said in one line; "
                                     f"{EXIT_STOPPED} stopped by SIGTERM / SIGINT / train.stop_signal after writing a "
                                     "checkpoint (resumable: run the same command again); 130 interrupted")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain an encoder (method=NAME: `mimkit methods` lists them); run under "
                       "torchrun/srun for several processes", description=PRETRAIN_DESCRIPTION + _config_sections(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "config",
        nargs="?",
        help="YAML recipe, e.g. configs/quickstart.yaml, or a shipped recipe's name "
        "(`mimkit recipes`), e.g. quickstart (default: built-in defaults, ImageNet's schedule)",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=5 optim.blr=1e-3")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run one step and one checkpoint save on every rank (in OUT_DIR/dry-run), then exit",
    )
    p.set_defaults(func=_pretrain)
    p = sub.add_parser("recipes", help="the recipes shipped with mimkit (name and first line); pass a name where a "
                       "recipe file goes, e.g. mimkit pretrain mae_vit_tiny_cifar10")  # fmt: skip
    p.set_defaults(func=_recipes)
    p = sub.add_parser("methods", help="the registered pretraining methods: name, encoder, mask types, what they learn")
    p.set_defaults(func=_methods)
    _add_tool_parsers(sub)
    _add_embed_parser(sub)
    _add_report_parser(sub)
    add_compare_parser(sub)  # compare: the equal-compute study (mimkit.compare)
    register_eval_commands(sub)  # knn, linprobe, finetune
    register_tokenizer_commands(sub)  # tokenizer train
    return parser


def _methods(args: argparse.Namespace) -> int:
    """One line per registered method (mimkit.registry): what `method=` takes."""
    for name in method_names():
        spec = method_spec(name)
        print(f"{name:<8} {spec.family:<4} mask.type {'|'.join(spec.mask_types):<28} {spec.summary}")
    return 0


# the flags of the commands that take `CONFIG [section.key=value ...]`: accepted anywhere among the overrides
FLAGS_ANYWHERE = {"pretrain": ("--print-config", "--dry-run"), "knn": ("--print-config",),
                  "linprobe": ("--print-config",), "finetune": ("--print-config",)}  # fmt: skip
# the one-value options of the commands that take a list of images: accepted anywhere among the images
OPTIONS_ANYWHERE = {"visualize": ("--out", "--seed", "--scale", "--bands"), "attention": ("--out", "--scale"),
                    "predict": ("--top-k", "--out", "--batch-size", "--device")}  # fmt: skip


def flags_first(argv: list[str]) -> list[str]:
    """`pretrain CONFIG --dry-run key=value` as `pretrain --dry-run CONFIG key=value`: argparse takes the positional
    CONFIG and overrides in one go, so a flag between them would end them (its parse_intermixed_args does not go
    into subcommands). The flags moved take no value; everything else keeps its order."""
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] in OPTIONS_ANYWHERE:
        return options_first(argv, command, OPTIONS_ANYWHERE[argv[command]])
    if command is None or argv[command] not in FLAGS_ANYWHERE:
        return argv
    head, rest = argv[: command + 1], argv[command + 1 :]
    if "--" in rest:  # after a lone `--` everything is positional
        cut = rest.index("--")
        rest, tail = rest[:cut], rest[cut:]
    else:
        tail = []
    flags = FLAGS_ANYWHERE[argv[command]] + ("-h", "--help")
    moved = [a for a in rest if a in flags]
    return head + moved + [a for a in rest if a not in flags] + tail


def options_first(argv: list[str], command: int, options: tuple[str, ...]) -> list[str]:
    """`visualize CKPT a.png --out x b.png` as `visualize --out x CKPT a.png b.png`: a list of images ends at an
    option, so the one-value options (`--out x`, `--out=x`) move before the positionals."""
    head, rest, moved, kept = argv[: command + 1], argv[command + 1 :], [], []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--":
            kept += rest[i:]
            break
        if a in options and i + 1 < len(rest):
            moved += rest[i : i + 2]
            i += 2
            continue
        (moved if a.split("=", 1)[0] in options else kept).append(a)
        i += 1
    return head + moved + kept


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(flags_first(list(sys.argv[1:] if argv is None else argv)))
    if args.command == "pretrain" and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except MimkitError as e:  # a problem with the user's files, config or machine: one line, no traceback
        print(f"mimkit: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # SIGTERM / SIGINT / train.stop_signal: the checkpoint is written, the run resumable
        print(f"mimkit: {e}", file=sys.stderr)
        mdist.cleanup()
        return EXIT_STOPPED
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (those stop gracefully): nothing half-written is kept
        print("mimkit: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a missing file, a full disk, no permission: name the file
        where = f": {e.filename}" if e.filename else ""
        print(f"mimkit: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
