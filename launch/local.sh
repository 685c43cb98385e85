#!/usr/bin/env bash
# N JAX processes on this machine (CPU collectives over gloo), for testing and debugging multi-host code.
#
#   launch/local.sh --processes 2 --devices-per-process 4 -- msnet train --config=configs/demo.py:runlocal --workdir=/tmp/w
#
# Each process gets D fake CPU devices and joins the job through jax.distributed.initialize on localhost
# (msnet reads MSNET_COORDINATOR / MSNET_NUM_PROCESSES / MSNET_PROCESS_ID). Output of process i is prefixed
# with [i]. When one process fails, the others cannot finish their collectives: they are stopped (TERM, then
# KILL after 10 s) and the exit code is the first failure's.
set -uo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
  echo "launch/local.sh: needs bash >= 5.1 (wait -n -p), this is ${BASH_VERSION}" >&2; exit 2
fi
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
stop_all() {
  kill -TERM "${pids[@]}" 2>/dev/null
  for _ in $(seq 100); do kill -0 "${pids[@]}" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "${pids[@]}" 2>/dev/null
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < processes; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
  MSNET_COORDINATOR="localhost:${port}" MSNET_NUM_PROCESSES="${processes}" MSNET_PROCESS_ID="${i}" \
    "$@" > >(sed -u "s/^/[${i}] /") 2>&1 &
  pids+=($!)
done
# Wait for each process once: `wait -n -p` names the one that ended, which leaves the list (waiting
# again on a reaped pid makes bash print "wait: N: no such job"). After a failure the others are stopped
# and the plain `wait` below collects them with the output prefixers.
status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 && $status -eq 0 ]]; do
  wait -n -p ended "${running[@]}"; rc=$?
  left=()
  for pid in "${running[@]}"; do [[ $pid != "$ended" ]] && left+=("$pid"); done
  running=("${left[@]}")
  if [[ $rc -ne 0 ]]; then status=$rc; stop_all; fi
done
wait
exit "$status"
