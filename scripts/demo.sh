#!/usr/bin/env bash
# The main job, end to end on this machine's CPU: install, fetch the pinned assets, train a small
# APA model (K=2 shards, 256 training samples, 3 epochs) and evaluate it against its baselines.
# Size it with the environment: DEMO_SHARDS, DEMO_TRAIN, DEMO_VALID, DEMO_TEST, DEMO_EPOCHS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
apa assets fetch
run="${APA_HOME:-var}/runs/demo-$(date -u +%Y%m%dT%H%M%SZ)"
apa train --shards "${DEMO_SHARDS:-2}" --train-samples "${DEMO_TRAIN:-256}" \
  --valid-samples "${DEMO_VALID:-128}" --test-samples "${DEMO_TEST:-128}" \
  --epochs "${DEMO_EPOCHS:-3}" --out "$run"
apa eval --run "$run" --out "$run/eval.json"
echo "report: $run/eval.json (table: $run/eval.md)"
