#!/usr/bin/env bash
# The GPU check of issue 19, in one command from the repository root (<= 8 minutes on one H200):
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine: results under $OUT, else benchmarks/gpu/
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps at tiny sizes on the CPU (gloo), tens of seconds
# It uses the machine's own python3 (torch, timm, transformers, pytest) and mimkit from this checkout through
# PYTHONPATH (nothing is installed). Wheels of anything missing (webdataset, braceexpand: only the WebDataset rows
# of the data benchmark need them) may be put in .whl/ beforehand; they are unpacked into a scratch folder.
# Steps, results and the summary table: benchmarks/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d /tmp/mimkit-wheels-XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$site"
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
