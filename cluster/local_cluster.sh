#!/usr/bin/env bash
# A two-node Ray cluster on this machine (loopback only, token auth on), for trying
# `cluster/submit.sh` and for the CI test. Every Ray service gets its own port.
#
#   cluster/local_cluster.sh start   # head + one worker node; prints the dashboard address
#   cluster/local_cluster.sh stop    # stops both nodes by process group id
#
# Environment: STATE_DIR (/tmp/matxfer-cluster: pids, logs, the token file, Ray's temp dir;
# keep it short: Ray's socket paths under it must stay below 108 bytes),
# PORT_BASE (26000), HEAD_CPUS (1), WORKER_CPUS (1), RAY (ray executable, .venv/bin/ray).
# The token comes from RAY_AUTH_TOKEN or is generated into $STATE_DIR/token (mode 600); it is
# never printed. One CPU per node: trial coordinators take no CPU (they sit on the head's own
# resource), so two one-CPU trials run at once, one per node. Clients use:
# RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE_DIR/token.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE_DIR=${STATE_DIR:-/tmp/matxfer-cluster}
P=${PORT_BASE:-26000}
RAY=${RAY:-$ROOT/.venv/bin/ray}

start_node() {  # name, then ray start flags; runs in its own session so stop can kill the group
  local name=$1; shift
  # RAY_ADDRESS in the nodes' environment: Ray's helpers in the workers then query this
  # cluster's state API, not whichever other Ray instance runs on the machine
  RAY_ADDRESS=127.0.0.1:$P setsid "$RAY" start --block --node-ip-address 127.0.0.1 --disable-usage-stats "$@" \
    > "$STATE_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE_DIR/$name.pid"
}

wait_nodes() {  # until the cluster reports $1 alive nodes (or 120 s)
  for _ in $(seq 120); do
    n=$("$ROOT/.venv/bin/python" - "$P" <<'PY' 2>/dev/null || true
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
print(sum(n["Alive"] for n in ray.nodes()))
PY
)
    [ "${n:-0}" -ge "$1" ] && return 0
    for name in head worker; do  # a node that died will not come back: say so now
      if [ -s "$STATE_DIR/$name.pid" ] && ! kill -0 "$(cat "$STATE_DIR/$name.pid")" 2>/dev/null
      then echo "local_cluster.sh: the $name node exited; see $STATE_DIR/$name.log" >&2; return 1
      fi
    done
    sleep 1
  done
  echo "local_cluster.sh: the cluster did not reach $1 nodes; see $STATE_DIR/*.log" >&2
  return 1
}

case "${1:-}" in
  start)
    mkdir -p "$STATE_DIR"
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$STATE_DIR/token" ]; then
      (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE_DIR/token")
    fi
    export RAY_AUTH_MODE=token
    [ -n "${RAY_AUTH_TOKEN:-}" ] || export RAY_AUTH_TOKEN_PATH=$STATE_DIR/token
    start_node head --head --port "$P" --num-cpus "${HEAD_CPUS:-1}" \
      --temp-dir "$STATE_DIR/ray" --dashboard-host 127.0.0.1 --dashboard-port $((P + 1)) \
      --ray-client-server-port $((P + 2)) --node-manager-port $((P + 3)) \
      --object-manager-port $((P + 4)) --dashboard-agent-listen-port $((P + 5)) \
      --dashboard-agent-grpc-port $((P + 6)) --runtime-env-agent-port $((P + 7)) \
      --metrics-export-port $((P + 8)) --min-worker-port $((P + 100)) \
      --max-worker-port $((P + 199)) --resources '{"node_head": 1}'
    wait_nodes 1
    # its own temp dir: nodes sharing one would garbage-collect each other's job files
    start_node worker --address "127.0.0.1:$P" --num-cpus "${WORKER_CPUS:-1}" \
      --temp-dir "$STATE_DIR/ray-w" --node-manager-port $((P + 13)) \
      --object-manager-port $((P + 14)) --dashboard-agent-listen-port $((P + 15)) \
      --dashboard-agent-grpc-port $((P + 16)) --runtime-env-agent-port $((P + 17)) \
      --metrics-export-port $((P + 18)) --min-worker-port $((P + 200)) \
      --max-worker-port $((P + 299)) --resources '{"node_worker": 1}'
    wait_nodes 2
    echo "dashboard: http://127.0.0.1:$((P + 1))  (RAY_AUTH_MODE=token, token in $STATE_DIR/token)"
    ;;
  stop)
    for name in worker head; do
      [ -s "$STATE_DIR/$name.pid" ] || continue
      pid=$(cat "$STATE_DIR/$name.pid")
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 30); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      rm -f "$STATE_DIR/$name.pid"
    done
    ;;
  *)
    echo "usage: cluster/local_cluster.sh start|stop" >&2
    exit 2
    ;;
esac
