#!/usr/bin/env bash
# The paper-scale quality run in the background, niced, from a frozen checkout of one commit, so that
# edits to the working tree cannot change a run that takes several sessions. Its state goes to the
# working tree's docs/results/runs/ (commit it before the machine goes); a new session runs this again
# and the run restores from that state and goes on.
#   bash scripts/quality-paper.sh [COMMIT] [PRESET]     (default: HEAD, paper)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
commit=$(git rev-parse "${1:-HEAD}")
preset=${2:-paper}
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
