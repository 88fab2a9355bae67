#!/usr/bin/env bash
# The test command: install, start Redis/PostgreSQL if they are not running, fetch the pinned assets
# (the slow tests use the real SmolLM2), static checks, then the whole test suite (slow tests included).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
bash scripts/services.sh redis postgres
if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then  # validates docker-compose.yml offline
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null 2>&1 \
    || echo "note: docker-compose could not be installed; its config test will skip"
fi
apa assets fetch
ruff check .
mypy
lint-imports
python -m pytest "$@"
