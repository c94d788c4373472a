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
# tests/test_report.py renders the report in headless Chromium: install Debian's chromium when missing
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; } \
    || echo "scripts/test.sh: could not install chromium; the Chromium rendering test will be skipped" >&2
fi
# lint, format and types (pyproject.toml [tool.ruff], [tool.mypy]) before the tests: a finding fails the run
ruff check .
ruff format --check .
mypy mimkit
# one pytest-xdist worker per core (tests/conftest.py gives each one thread), tests handed out as workers free up;
# the slowest 15 listed at the end; `bash scripts/test.sh -n 0 tests/x.py` runs in one process
python -m pytest -q -n auto --dist worksteal --durations=15 "$@"
