#!/usr/bin/env bash
# The accuracy campaign: per fold, the searched MACE-MP-0 study, then MACE-MP-0 without
# regularisers and MACE-RI side by side, all with the same epoch budget, on one local Ray head
# and one MLflow server; then the 5-fold summaries, Matbench records and `matxfer report`.
#
#   bash benchmarks/accuracy.sh CONFIG [FOLD ...]      # default folds 0 1 2 3 4
#   e.g. bash benchmarks/accuracy.sh tune_configs/cpu/matbench_jdft2d.yaml
#
# Finished folds are skipped (their result.json exists), so rerunning continues a campaign.
# Run it alone: a second Ray instance on the same machine (a test's local Ray) makes Ray's own
# helper processes fail with "Found multiple active Ray instances" and trials wait forever.
# Environment: ACC_DIR (runs/accuracy: MLflow store, Ray results, logs), RAY_PORT (26500),
# MLFLOW_PORT (5077).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: benchmarks/accuracy.sh CONFIG [FOLD ...]}; shift
if [ $# -gt 0 ]; then FOLDS=("$@"); else FOLDS=(0 1 2 3 4); fi
ACC_DIR=${ACC_DIR:-runs/accuracy}; RAY_PORT=${RAY_PORT:-26500}; MLFLOW_PORT=${MLFLOW_PORT:-5077}
BIN=.venv/bin; RAY_STATE=/tmp/mxacc-$RAY_PORT
mkdir -p "$ACC_DIR/logs"
ACC_DIR=$(cd "$ACC_DIR" && pwd)  # absolute: the MLflow server gets it as DATA_DIR
LOG=$ACC_DIR/logs/$(basename "$CONFIG" .yaml).log
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
# drivers and Ray workers import this checkout's matxfer (not whatever the venv points to), so
# a campaign run from a frozen worktree is not changed by edits elsewhere
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

stop_services() {
  STATE_DIR=$RAY_STATE PORT_BASE=$RAY_PORT cluster/local_cluster.sh stop || true
  [ -n "${MLFLOW_PID:-}" ] && kill -TERM -- "-$MLFLOW_PID" 2>/dev/null || true
}
trap stop_services EXIT

DATA_DIR=$ACC_DIR/mlflow PORT=$MLFLOW_PORT WORKERS=1 \
  setsid mlflow_server/start.sh sqlite > "$ACC_DIR/logs/mlflow.log" 2>&1 < /dev/null &
MLFLOW_PID=$!
# the repo's two-node local cluster (token auth, loopback); 3 logical CPUs in all: two
# single-thread trial workers plus their 0.01-CPU coordinators
STATE_DIR=$RAY_STATE PORT_BASE=$RAY_PORT HEAD_CPUS=2 WORKER_CPUS=1 cluster/local_cluster.sh start \
  > "$ACC_DIR/logs/ray.log" 2>&1
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_STATE/token
for _ in $(seq 60); do curl -sf "$MLFLOW_TRACKING_URI/health" > /dev/null && break; sleep 1; done

tune() {  # variant, fold
  "$BIN/matxfer" tune "$CONFIG" --variant "$1" --folds "$2" --address "127.0.0.1:$RAY_PORT"
}
stamp() { echo "[$(date -u +%FT%TZ)] $*" | tee -a "$LOG"; }

stamp "campaign $CONFIG folds ${FOLDS[*]} on $(nproc) cores"
for fold in "${FOLDS[@]}"; do
  start=$SECONDS
  tune main "$fold" >> "$LOG" 2>&1 || stamp "fold $fold main FAILED (see $LOG)"
  stamp "fold $fold main done ($((SECONDS - start)) s)"
  start=$SECONDS
  tune no-reg "$fold" >> "$LOG.no-reg" 2>&1 & a=$!
  tune random-init "$fold" >> "$LOG.random-init" 2>&1 & b=$!
  wait "$a" || stamp "fold $fold no-reg FAILED (see $LOG.no-reg)"
  wait "$b" || stamp "fold $fold random-init FAILED (see $LOG.random-init)"
  stamp "fold $fold no-reg + random-init done ($((SECONDS - start)) s)"
done
# all five folds finished: these reruns only read result.json and write the 5-fold summary,
# the Matbench record and the MLflow summary
if [ "${#FOLDS[@]}" -eq 5 ] || [ "${ALL_FOLDS:-0}" = 1 ]; then
  for variant in main no-reg random-init; do
    "$BIN/matxfer" tune "$CONFIG" --variant "$variant" --address "127.0.0.1:$RAY_PORT" >> "$LOG" 2>&1
  done
  task=$(basename "$CONFIG" .yaml)
  "$BIN/matxfer" report --experiment "$task" --tasks "$task" --out "$ACC_DIR/report-$task" >> "$LOG" 2>&1
  stamp "summaries and report written to $ACC_DIR/report-$task"
fi
