"""The `knn`, `linprobe` and `finetune` subcommands; mimkit.cli registers them with one call."""

from __future__ import annotations

import argparse

HELP = {
    "knn": "k-NN top-1 of frozen encoder features (cosine, k=20, T=0.07); a trend monitor for MIM encoders",
    "linprobe": "linear probe of a frozen encoder (MAE protocol: BN + Linear, LARS, cosine); cached-feature fast "
                "path and block scan",
    "finetune": "fine-tune an encoder end to end (layer-wise lr decay, drop path, Mixup/CutMix, RandAugment, EMA)",
}  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from mimkit import distributed as mdist
    from mimkit.eval import RUNNERS
    from mimkit.eval.config import dump_eval_yaml, load_eval_config

    if args.config and "=" in args.config:  # `mimkit knn key=value ...` without a recipe
        args.overrides.insert(0, args.config)
        args.config = None
    cfg = load_eval_config(args.command, args.config, args.overrides)
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
        print(f"  metrics:    {result.metrics_path} (JSONL: {result.out_dir / 'metrics.jsonl'}, TensorBoard: {result.out_dir / 'tb'})")
        if result.checkpoint is not None:
            print(f"  checkpoint: {result.checkpoint}")
    mdist.cleanup()
    return 0


def register_eval_commands(sub) -> None:
    """Add `mimkit knn | linprobe | finetune CONFIG [section.key=value ...] [--print-config]`."""
    for name, text in HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", nargs="?", help=f"YAML recipe, e.g. configs/eval/{name}_vit_tiny_cifar10.yaml")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. encoder.checkpoint=runs/x/checkpoint-00001000.pt")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.set_defaults(func=_run)
