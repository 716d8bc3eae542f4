#!/usr/bin/env bash
# README command 2: install everything, then lint (ruff, mypy) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
printf '\n==> ruff\n'
"$PY" -m ruff check appliance tests bench
printf '\n==> mypy\n'
"$PY" -m mypy
printf '\n==> pytest\n'
"$PY" -m pytest -q "$@"
