#!/usr/bin/env bash
# Set up a virtual environment (if needed) and run the quickstart: MAE pretraining of a ViT-Tiny on the
# embedded default dataset (scikit-image's bundled photos). Prints where the checkpoint, logs and config went.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -e ".[tensorboard]"  # the quickstart writes TensorBoard logs (train.tensorboard)
mimkit pretrain configs/quickstart.yaml "$@"
