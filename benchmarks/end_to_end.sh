#!/bin/bash
# Issue 16 target 6: one run of the reproduction study's CPU protocol (experiment=reproduction/fast), reduced to 16
# training and 32 test items per task (all 14 tasks), before this issue's changes (commit 8f761a3, in a git worktree)
# and after (this tree: eval.schedule=minimal, the sweep cache cold and then warm, length-grouped evaluation,
# one-pass label scoring; train.length_grouping=false so that both train on the same batches). Then
#   .venv/bin/python benchmarks/end_to_end.py /tmp/e2e      -> benchmarks/results/end_to_end.json
# Usage: LMAS_CL_BENCHMARK=../shared/data/cl_benchmark benchmarks/end_to_end.sh [OUT=/tmp/e2e]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/tmp/e2e}
BEFORE=${BEFORE:-8f761a3}
ARGS="experiment=reproduction/fast stream.max_train=16 stream.max_eval=32 seed=0 logger=csv"
mkdir -p "$OUT"
test -d "$OUT/wt_before" || git -C "$REPO" worktree add -q "$OUT/wt_before" "$BEFORE"
(cd "$OUT/wt_before" && PYTHONPATH="$OUT/wt_before" LMAS_OUTPUT="$OUT/before" "$REPO/.venv/bin/python" -m lmas.train $ARGS)
for k in cold warm; do
  (cd "$REPO" && LMAS_OUTPUT="$OUT/after_$k" "$REPO/.venv/bin/python" -m lmas.train $ARGS \
     train.length_grouping=false eval.cache="$OUT/cache")
done
