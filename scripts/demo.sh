#!/usr/bin/env bash
# The main job, end to end on this machine's CPU: install, fetch the pinned assets, train a small APA
# model (K=4 shards; 256 training samples, at most 2 epochs), record it in the ledger, start the gateway and the
# retraining worker, ask /recommend, ingest three new ratings of a user (the next /recommend uses them;
# a forced retrain trains them into new versions whose manifests name them), forget that user, follow
# the deletion to `completed`, print the certificate and /admin/status, stop, and replay every version on
# disk from its manifest (`apa verify --all`).
# Ledger: SQLite in the run folder unless APA_DATABASE_URL is set (it must point at an empty database).
# Redis: APA_REDIS_URL (default 127.0.0.1:6379; started here if nothing answers there).
# Size: DEMO_SHARDS, DEMO_TRAIN, DEMO_VALID, DEMO_TEST, DEMO_EPOCHS. DEMO_EVAL=1 adds `apa eval`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
apa assets fetch
run="${APA_HOME:-var}/runs/demo-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$run/logs"
export APA_DATABASE_URL="${APA_DATABASE_URL:-sqlite:///$(realpath "$run")/apa.db}"
export APA_ADMIN_TOKEN="${APA_ADMIN_TOKEN:-$(python -c 'import secrets; print(secrets.token_urlsafe(24))')}"
# APA_HMAC_KEY unset: the key that names deleted data afterwards is kept where its default keeps it,
# ${APA_HOME:-var}/hmac.key (owner-only, made on first use), so the demo's HMACs can be checked later.
bash scripts/services.sh redis

apa train --shards "${DEMO_SHARDS:-4}" --train-samples "${DEMO_TRAIN:-256}" \
  --valid-samples "${DEMO_VALID:-64}" --test-samples "${DEMO_TEST:-64}" \
  --max-epochs "${DEMO_EPOCHS:-2}" --no-single --no-sisa --out "$run"
if [ "${DEMO_EVAL:-0}" = 1 ]; then apa eval --run "$run" --out "$run/eval.json"; fi

port="${DEMO_PORT:-8000}"
pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap stop EXIT
apa serve --port "$port" > "$run/logs/gateway.log" 2>&1 & pids+=($!)
apa worker > "$run/logs/worker.log" 2>&1 & pids+=($!)
python scripts/demo_client.py --url "http://127.0.0.1:$port" --run "$run"
stop  # the worker finishes its job first (the purge that follows the deletion), so the run folder is still
# Every version on disk, those the deletion's retrains wrote included, replays from its manifest to the same
# bytes (exit 1 names the first differing tensor).
apa verify "$run" --all
echo "run: $run  (logs: $run/logs, summary: $run/demo.json)"
