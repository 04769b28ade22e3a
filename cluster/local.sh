#!/usr/bin/env bash
# A two-node Ray cluster on this machine (head + one worker node, loopback), for trying
# multi-node behaviour without a cloud. The same thing as `we-dist cluster up|down|status`,
# written out as plain `ray start` commands.
#
#   cluster/local.sh up       # start; prints RAY_ADDRESS and the token path to export
#   cluster/local.sh status
#   cluster/local.sh down     # stops exactly the recorded processes (pids) and their children
#
# Settings (environment): STATE_DIR (default /tmp/we_dist_local_sh_$UID), GCS_PORT (6390),
# DASHBOARD_PORT (8275), NUM_CPUS per node (2), OBJECT_STORE_BYTES per node (200000000),
# AUTH=token|disabled (token). Ports differ from Ray's defaults (6379, 8265) so that a
# default `ray.init()` on the same machine does not collide.
set -euo pipefail

STATE_DIR=${STATE_DIR:-/tmp/we_dist_local_sh_$(id -u)}
GCS_PORT=${GCS_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8275}
NUM_CPUS=${NUM_CPUS:-2}
OBJECT_STORE_BYTES=${OBJECT_STORE_BYTES:-200000000}
AUTH=${AUTH:-token}
HOST=127.0.0.1
RAY=${RAY:-$(command -v ray || true)}

die() { echo "local.sh: $*" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

alive() { [[ -f "$STATE_DIR/$1.pid" ]] && kill -0 "$(cat "$STATE_DIR/$1.pid")" 2>/dev/null; }

# The pid and all its descendants (Ray starts workers and job entrypoints in sessions
# of their own, so a process-group kill would miss them).
tree() {
  local pid=$1 child
  echo "$pid"
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do tree "$child"; done
}

auth_header() { [[ -f "$STATE_DIR/auth_token" ]] && echo "Authorization: Bearer $(cat "$STATE_DIR/auth_token")" || echo "X-No-Auth: 1"; }

alive_nodes() {
  curl -s -m 3 -H "$(auth_header)" "http://$HOST:$DASHBOARD_PORT/api/v0/nodes?limit=100" 2>/dev/null \
    | grep -o '"state": "ALIVE"' | wc -l
}

wait_nodes() {  # wait_nodes N ROLE
  local i
  for i in $(seq 1 240); do
    alive "$2" || die "the $2 node exited during start-up; see $STATE_DIR/$2.log"
    [[ $(alive_nodes) -ge $1 ]] && return 0
    sleep 1
  done
  die "timed out waiting for the $2 node; see $STATE_DIR/$2.log"
}

start_node() {  # start_node ROLE ARGS...
  local role=$1; shift
  setsid "$RAY" start --block "$@" >"$STATE_DIR/$role.log" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/$role.pid"
}

up() {
  [[ -n "$RAY" ]] || die "the ray command is not on PATH: pip install 'ray[default]'"
  alive head || alive worker && die "already running from $STATE_DIR; run: $0 down"
  mkdir -p "$STATE_DIR"
  export RAY_USAGE_STATS_ENABLED=0
  unset RAY_AUTH_TOKEN
  # Ray processes that look for "the local cluster" (address "auto") would otherwise
  # find every Ray running on this machine.
  export RAY_ADDRESS=$HOST:$GCS_PORT
  if [[ "$AUTH" == token ]]; then
    (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' >"$STATE_DIR/auth_token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE_DIR/auth_token"
  else
    rm -f "$STATE_DIR/auth_token"
    export RAY_AUTH_MODE=disabled
  fi
  local common=(--node-ip-address=$HOST --num-cpus="$NUM_CPUS" --num-gpus=0
                --object-store-memory="$OBJECT_STORE_BYTES" --min-worker-port=0 --max-worker-port=0
                --disable-usage-stats)
  start_node head --head --port="$GCS_PORT" --dashboard-host=$HOST --dashboard-port="$DASHBOARD_PORT" \
    --include-dashboard=true --ray-client-server-port="$(free_port)" \
    --dashboard-agent-listen-port="$(free_port)" --temp-dir="$STATE_DIR/ray" "${common[@]}"
  wait_nodes 1 head
  # Its own temp dir: sharing the head's would share runtime_resources/, and one node's
  # runtime-env agent would delete a job's working directory from under the other.
  start_node worker --address="$HOST:$GCS_PORT" --dashboard-agent-listen-port="$(free_port)" \
    --temp-dir="$STATE_DIR/rayw" "${common[@]}"
  wait_nodes 2 worker
  echo "local Ray cluster up: 2 nodes x $NUM_CPUS CPUs (pids: head $(cat "$STATE_DIR/head.pid"), worker $(cat "$STATE_DIR/worker.pid"))"
  echo "  export RAY_ADDRESS=http://$HOST:$DASHBOARD_PORT${RAY_AUTH_TOKEN_PATH:+ RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH}"
  echo "  GCS address for ray.init(): $HOST:$GCS_PORT"
}

down() {
  local role pids=() pid
  for role in worker head; do
    [[ -f "$STATE_DIR/$role.pid" ]] || continue
    alive "$role" && pids+=($(tree "$(cat "$STATE_DIR/$role.pid")"))
    rm -f "$STATE_DIR/$role.pid"
  done
  [[ ${#pids[@]} -gt 0 ]] || { echo "no local cluster running from $STATE_DIR"; return 0; }
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 10); do
    local left=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
    [[ ${#left[@]} -eq 0 ]] && break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true; done
  echo "stopped ${#pids[@]} process(es): ${pids[*]}"
}

status() {
  local role ok=0
  for role in head worker; do
    if alive "$role"; then echo "$role: running (pid $(cat "$STATE_DIR/$role.pid"))"; else echo "$role: not running"; ok=1; fi
  done
  echo "nodes alive in Ray: $(alive_nodes)"
  return $ok
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
