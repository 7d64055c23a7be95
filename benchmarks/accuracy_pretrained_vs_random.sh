#!/usr/bin/env bash
# Reduced-budget accuracy check: MACE-MP-0 small, pretrained vs random init, same recipe and
# budget; the two runs go side by side, one thread each.
# Usage: bash benchmarks/accuracy_pretrained_vs_random.sh [TASK] [FOLD] [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:-matbench_jdft2d}; FOLD=${2:-0}; EPOCHS=${3:-40}
mkdir -p benchmarks/results/accuracy
for INIT in pretrained random; do
  .venv/bin/matxfer train --task "$TASK" --fold "$FOLD" --init "$INIT" --epochs "$EPOCHS" \
    --threads 1 --out "runs/accuracy/$TASK-fold$FOLD-$INIT" --overwrite \
    > "runs/accuracy-$TASK-fold$FOLD-$INIT.log" 2>&1 &
done
wait
for INIT in pretrained random; do
  cp "runs/accuracy/$TASK-fold$FOLD-$INIT/result.json" "benchmarks/results/accuracy/$TASK-fold$FOLD-$INIT.json"
  cp "runs/accuracy/$TASK-fold$FOLD-$INIT/history.csv" "benchmarks/results/accuracy/$TASK-fold$FOLD-$INIT-history.csv"
done
