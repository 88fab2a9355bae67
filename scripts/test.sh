#!/usr/bin/env bash
# The test command: install, fetch the pinned assets (the slow tests use the real SmolLM2),
# static checks, then the whole test suite (slow tests included). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
apa assets fetch
ruff check .
mypy
lint-imports
python -m pytest "$@"
