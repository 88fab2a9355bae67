#!/usr/bin/env bash
# The test command: install, start Redis/PostgreSQL if they are not running, fetch the pinned assets
# (the slow tests use the real SmolLM2), static checks, then the whole test suite (slow tests included;
# the vllm ones when .venv-vllm exists).
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
# Known vulnerabilities in the installed dependencies fail the run. An audit service that cannot be
# reached (an offline machine) is said plainly and the run goes on; so is every package it does not
# know (listed as skipped).
audit_log=$(mktemp)
if pip-audit --skip-editable --progress-spinner off >"$audit_log" 2>&1; then
  grep -q "could not be audited" "$audit_log" && grep -c "could not be audited" "$audit_log" \
    | xargs -I{} echo "note: pip-audit: {} installed package(s) unknown to its service were not audited"
  echo "pip-audit: no known vulnerabilities in the audited dependencies"
elif grep -qE "ConnectionError|NameResolutionError|Max retries exceeded|timed out|Temporary failure" "$audit_log"; then
  echo "note: pip-audit could not reach its vulnerability service; the dependency audit did not run"
  grep -m1 -E "ConnectionError|NameResolutionError|Max retries exceeded|timed out" "$audit_log" | cut -c1-200
else
  cat "$audit_log"
  exit 1
fi
rm -f "$audit_log"
if [ -x .venv-vllm/bin/python ]; then  # scripts/setup-vllm.sh made it: the vllm-marked tests run too
  echo "test: .venv-vllm exists: the tests marked vllm start the real vLLM server (about 2 min)"
else
  echo "note: no .venv-vllm (bash scripts/setup-vllm.sh): the tests marked vllm will skip"
fi
python -m pytest "$@"
