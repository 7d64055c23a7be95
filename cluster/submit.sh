#!/usr/bin/env bash
# Submit a matxfer study to a Ray cluster with `ray job submit`, and follow it.
#
#   cluster/submit.sh CONFIG [matxfer tune flags...]   # submit; prints the job id; waits
#   cluster/submit.sh status JOB_ID | logs JOB_ID | stop JOB_ID
#
# Environment:
#   RAY_ADDRESS          dashboard address, e.g. http://127.0.0.1:8265 (a port-forward or SSH
#                        tunnel to the head; the dashboard stays bound to 127.0.0.1)
#   RAY_AUTH_MODE=token  plus RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token):
#                        the cluster's token; it is read by the ray CLI, never passed to the job
#   MLFLOW_TRACKING_URI  http:// tracking server every node reaches (passed to the job)
#   MATMINER_DATA, MATXFER_MODEL, MATXFER_CACHE   data, weights and graph cache on the cluster
#                        (passed to the job when set; otherwise the image's defaults)
#   NO_WAIT=1            return after submitting
#   JOB_PYTHON           interpreter of the job on the head (default: python of the image)
#   JOB_ID               submission id (default matxfer-<date>-<pid>)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RAY=${RAY:-$ROOT/.venv/bin/ray}
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of the cluster, e.g. http://127.0.0.1:8265}"
export RAY_ADDRESS RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

case "${1:-}" in
  status|logs|stop)
    [ -n "${2:-}" ] || { echo "usage: cluster/submit.sh $1 JOB_ID" >&2; exit 2; }
    exec "$RAY" job "$1" "$2"
    ;;
  ""|-h|--help)
    sed -n 2,19p "$0"; exit 2
    ;;
esac
CONFIG=$1; shift
[ -f "$ROOT/$CONFIG" ] || [ -f "$CONFIG" ] || { echo "no study config '$CONFIG'" >&2; exit 2; }

# the job's environment: tracking, data and weight locations; never the token
ENV_JSON=$("$ROOT/.venv/bin/python" -c '
import json, os
keys = ("MLFLOW_TRACKING_URI", "MATMINER_DATA", "MATXFER_MODEL", "MATXFER_CACHE", "RAY_AUTH_MODE")
print(json.dumps({"env_vars": {k: os.environ[k] for k in keys if os.environ.get(k)},
                  "working_dir": ".",
                  "excludes": [".venv", ".git", "runs", "mlruns", "mlflow.db", "benchmarks",
                               "docs", "mlflow_server/data", "*.pt"]}))')
JOB=${JOB_ID:-matxfer-$(date +%Y%m%d-%H%M%S)-$$}
cd "$ROOT"
"$RAY" job submit --no-wait --submission-id "$JOB" --runtime-env-json "$ENV_JSON" \
  -- "${JOB_PYTHON:-python}" -m matxfer.cli tune "$CONFIG" "$@"
echo "job: $JOB"
[ "${NO_WAIT:-0}" = 1 ] && exit 0
"$RAY" job logs --follow "$JOB" || true
STATUS=$("$RAY" job status "$JOB" 2>&1 | grep -o -i -E "succeeded|failed|stopped" | tail -1 | tr a-z A-Z || true)
echo "job $JOB: ${STATUS:-unknown}"
[ "$STATUS" = SUCCEEDED ]
