#!/usr/bin/env bash
# N JAX processes on this machine (CPU collectives over gloo), for testing and debugging multi-host code.
#
#   launch/local.sh --processes 2 --devices-per-process 4 -- msnet train --config=configs/demo.py:runlocal --workdir=/tmp/w
#
# Each process gets D fake CPU devices and joins the job through jax.distributed.initialize on localhost
# (msnet reads MSNET_COORDINATOR / MSNET_NUM_PROCESSES / MSNET_PROCESS_ID). Logs of process i go to
# stdout prefixed with [i]. If one process fails, the others are stopped and the exit code is the failure's.
set -euo pipefail
processes=2
devices=1
port=${MSNET_PORT:-$((20000 + RANDOM % 20000))}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes=$2; shift 2 ;;
    --devices-per-process) devices=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "launch/local.sh: unknown option $1 (usage: --processes N --devices-per-process D -- CMD...)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then echo "launch/local.sh: no command after --" >&2; exit 2; fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < processes; i++)); do
  (
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="--xla_force_host_platform_device_count=${devices}"
    export MSNET_COORDINATOR="localhost:${port}" MSNET_NUM_PROCESSES="${processes}" MSNET_PROCESS_ID="${i}"
    exec "$@" 2>&1 | sed -u "s/^/[${i}] /"
  ) &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  wait "$p" || { rc=$?; [[ $status -eq 0 ]] && status=$rc; cleanup; }
done
exit "$status"
