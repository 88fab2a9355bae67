#!/usr/bin/env bash
# The paper-scale quality runs in the background, niced, one after the other, each from a frozen checkout of
# one commit, so that edits to the working tree cannot change a run that takes several sessions. Their state
# goes to the working tree's docs/results/runs/ (commit it before the machine goes); a new session runs this
# again and each run restores from that state and goes on, from the same commit: a preset's first start
# records it in docs/results/runs/quality-<preset>.commit (committed with the state), so a later session's
# edits to the code cannot mix into a run's units. A preset whose docs/results/quality-<preset>.json exists
# is done and skipped (running it again would only restore it and re-stamp its report with this machine).
#   bash scripts/quality-paper.sh [COMMIT] [PRESET...]
# PRESET defaults to the chain "paper paper-k8 paper-s1" (paper-k8 reuses paper's single adapter). COMMIT
# defaults, per preset, to its recorded commit, else the first preset's recorded commit (the variants of one
# table run the same code), else HEAD; an empty COMMIT ("") means the default. Give COMMIT (or remove a
# preset's record) to start that preset over from another one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
given=${1:-}
shift || true
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(paper paper-k8 paper-s1)
if pgrep -f "bench/quality.py --preset" > /dev/null; then
  echo "a quality run is already running (pgrep -af 'bench/quality.py --preset'); not starting another" >&2
  exit 1
fi
first_record="docs/results/runs/quality-${presets[0]}.commit"
mkdir -p docs/results/runs var/logs
chain=()
for preset in "${presets[@]}"; do
  record="docs/results/runs/quality-$preset.commit"
  if [ -f "docs/results/quality-$preset.json" ]; then
    echo "quality $preset: done (docs/results/quality-$preset.json), skipped"
    continue
  elif [ -n "$given" ]; then
    commit=$(git rev-parse "$given")
  elif [ -f "$record" ]; then
    commit=$(cat "$record")
  elif [ -f "$first_record" ]; then
    commit=$(cat "$first_record")
  else
    commit=$(git rev-parse HEAD)
  fi
  echo "$commit" > "$record"
  frozen=${APA_FROZEN_CHECKOUT:-$root/var/frozen-${commit:0:12}}
  if [ ! -d "$frozen" ]; then
    git worktree add -q --detach "$frozen" "$commit"
  fi
  [ "$(git -C "$frozen" rev-parse HEAD)" = "$commit" ] || git -C "$frozen" checkout -q --detach "$commit"
  chain+=("cd '$frozen' && PYTHONPATH='$frozen' APA_HOME='$root/var' nice -n 19 '$root/.venv/bin/python' \
bench/quality.py --preset $preset --state '$root/docs/results/runs' --out '$root/docs/results/quality-$preset.json' \
>> '$root/var/logs/quality-$preset.log' 2>&1")
  echo "quality $preset: from $frozen at ${commit:0:12}; log var/logs/quality-$preset.log"
done
[ ${#chain[@]} -gt 0 ] || exit 0
script=$(printf '%s && ' "${chain[@]}")
nohup bash -c "${script% && }" > /dev/null 2>&1 &
echo "started: pid $!, the presets one after the other (each only if the one before finished)"
