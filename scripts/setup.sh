#!/usr/bin/env bash
# Create (or refresh) the project virtualenv at .venv and install everything the project needs.
# torch comes first, pinned, so pip takes the CPU build from this machine's disk instead of a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[dev,bench]"
