#!/usr/bin/env bash
# The accuracy campaign: per fold, the searched MACE-MP-0 study, then MACE-MP-0 without
# regularisers and MACE-RI side by side, all with the same epoch budget, on one local Ray head
# and one MLflow server; then the 5-fold summaries, Matbench records and `matxfer report`.
#
#   bash benchmarks/accuracy.sh CONFIG [FOLD ...]      # default folds 0 1 2 3 4
#   e.g. bash benchmarks/accuracy.sh tune_configs/cpu/matbench_jdft2d.yaml
#   PHASES="llrd,freeze lp-ft" bash benchmarks/accuracy.sh CONFIG   # the strategy comparison
#
# PHASES (default "main,no-reg random-init"): comma-separated phases run one after the other
# per fold; the variants of one phase (space-separated) run side by side.
#
# Finished folds are skipped (their result.json exists), so rerunning continues a campaign.
# Run it alone: a second Ray instance on the same machine (a test's local Ray) makes Ray's own
# helper processes fail with "Found multiple active Ray instances" and trials wait forever.
# Environment: ACC_DIR (runs/accuracy: MLflow store, Ray results, logs), RAY_PORT (26500),
# MLFLOW_PORT (5077), TUNE_ARGS (extra `matxfer tune` flags for every study).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: benchmarks/accuracy.sh CONFIG [FOLD ...]}; shift
if [ $# -gt 0 ]; then FOLDS=("$@"); else FOLDS=(0 1 2 3 4); fi
ACC_DIR=${ACC_DIR:-runs/accuracy}; RAY_PORT=${RAY_PORT:-26500}; MLFLOW_PORT=${MLFLOW_PORT:-5077}
BIN=.venv/bin; RAY_STATE=/tmp/mxacc-$RAY_PORT
mkdir -p "$ACC_DIR/logs"
ACC_DIR=$(cd "$ACC_DIR" && pwd)  # absolute: the MLflow server gets it as DATA_DIR
LOG=$ACC_DIR/logs/$(basename "$CONFIG" .yaml).log
# Ray results and study summaries follow ACC_DIR (not the YAML's storage_path), so a campaign
# in a fresh ACC_DIR never restores an interrupted study of another campaign
STORE_ARGS=(--storage-path "$ACC_DIR/ray" --output-dir "$ACC_DIR/studies")
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

tune() {  # variant, fold; TUNE_ARGS (e.g. "--pooling max") go to every study
  # shellcheck disable=SC2086
  "$BIN/matxfer" tune "$CONFIG" --variant "$1" --folds "$2" --address "127.0.0.1:$RAY_PORT" \
    "${STORE_ARGS[@]}" ${TUNE_ARGS:-}
}
stamp() { echo "[$(date -u +%FT%TZ)] $*" | tee -a "$LOG"; }

PHASES=${PHASES:-main,no-reg random-init}
IFS=, read -r -a PHASE_LIST <<< "$PHASES"
stamp "campaign $CONFIG folds ${FOLDS[*]} phases [$PHASES] on $(nproc) cores"
for fold in "${FOLDS[@]}"; do
  for phase in "${PHASE_LIST[@]}"; do
    start=$SECONDS; pids=(); names=()
    for variant in $phase; do
      tune "$variant" "$fold" >> "$LOG.$variant" 2>&1 & pids+=($!); names+=("$variant")
    done
    for i in "${!pids[@]}"; do
      wait "${pids[$i]}" || stamp "fold $fold ${names[$i]} FAILED (see $LOG.${names[$i]})"
    done
    stamp "fold $fold $phase done ($((SECONDS - start)) s)"
  done
done
# all five folds finished: these reruns only read result.json and write the 5-fold summary,
# the Matbench record and the MLflow summary
if [ "${#FOLDS[@]}" -eq 5 ] || [ "${ALL_FOLDS:-0}" = 1 ]; then
  for variant in ${PHASES//,/ }; do
    # shellcheck disable=SC2086
    "$BIN/matxfer" tune "$CONFIG" --variant "$variant" --address "127.0.0.1:$RAY_PORT" \
      "${STORE_ARGS[@]}" ${TUNE_ARGS:-} >> "$LOG" 2>&1
  done
  task=$("$BIN/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["run"]["data"]["task"])' "$CONFIG")
  "$BIN/matxfer" report --experiment "$task" --tasks "$task" --out "$ACC_DIR/report-$task" >> "$LOG" 2>&1
  stamp "summaries and report written to $ACC_DIR/report-$task"
fi
