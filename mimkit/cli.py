"""Command line: `mimkit pretrain CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import sys

from mimkit.config import ConfigError, dump_yaml, load_config
from mimkit.data import DataError


def _pretrain(args: argparse.Namespace) -> int:
    from mimkit import distributed as mdist
    from mimkit.train import pretrain

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    result = pretrain(cfg)
    if mdist.world_from_env()[0] == 0:
        print(f"\ndone: step {result.step}, loss {result.loss:.4f}")
        print(f"  checkpoint: {result.checkpoint}")
        print(f"  config:     {result.config}")
        print(f"  metrics:    {result.metrics} (TensorBoard: {result.out_dir / 'tb'})")
        if result.nonfinite_steps or result.skipped_images:
            print(f"  skipped:    {result.nonfinite_steps} non-finite steps, {result.skipped_images} corrupt images")
    mdist.cleanup()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimkit", description="Masked-image-modeling pretraining for timm ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain an encoder (MAE); run under torchrun/srun for several processes")
    p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/quickstart.yaml (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=5 optim.blr=1e-3")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "pretrain" and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"mimkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
