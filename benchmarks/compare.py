"""The equal-compute study, now `mimkit compare` (mimkit/compare/; docs/compare.md): this script calls it with the
same flags, e.g. python benchmarks/compare.py --data PATH.npz --methods mae,mae+crossmae --core-minutes 30."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout without an install

from mimkit.compare.command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="compare.py"))
