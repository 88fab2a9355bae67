#!/usr/bin/env bash
# The paper-scale quality run in the background, niced, from a frozen checkout of one commit, so that
# edits to the working tree cannot change a run that takes several sessions. Its state goes to the
# working tree's docs/results/runs/ (commit it before the machine goes); a new session runs this again
# and the run restores from that state and goes on, from the same commit: the first start records it in
# docs/results/runs/quality-<preset>.commit (committed with the state), so a later session's edits to the
# code cannot mix into a run's units. Give COMMIT (or remove that file) to start over from another one.
#   bash scripts/quality-paper.sh [COMMIT] [PRESET]     (default: the recorded commit, else HEAD; paper)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
preset=${2:-paper}
record="docs/results/runs/quality-$preset.commit"
if [ -n "${1:-}" ]; then
  commit=$(git rev-parse "$1")
elif [ -f "$record" ]; then
  commit=$(cat "$record")
else
  commit=$(git rev-parse HEAD)
fi
mkdir -p docs/results/runs
echo "$commit" > "$record"
frozen=${APA_FROZEN_CHECKOUT:-$root/var/frozen-$preset}
if [ ! -d "$frozen" ]; then
  git worktree add -q --detach "$frozen" "$commit"
fi
[ "$(git -C "$frozen" rev-parse HEAD)" = "$commit" ] || git -C "$frozen" checkout -q --detach "$commit"
mkdir -p var/logs
cd "$frozen"
PYTHONPATH="$frozen" APA_HOME="$root/var" nohup nice -n 19 "$root/.venv/bin/python" bench/quality.py \
  --preset "$preset" --state "$root/docs/results/runs" --out "$root/docs/results/quality-$preset.json" \
  >> "$root/var/logs/quality-$preset.log" 2>&1 &
echo "quality $preset: pid $! from $frozen at ${commit:0:12}; log var/logs/quality-$preset.log"
