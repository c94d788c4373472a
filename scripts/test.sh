#!/usr/bin/env bash
# Set up a virtual environment (if needed) and run the test suite. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -e ".[dev]"
python -m pytest -q "$@"
