#!/usr/bin/env bash
# One host, all its devices (GPUs, TPU chips or CPU): jit shards over every local device.
#
#   launch/single_host.sh msnet run --config=configs/cifar10_paper.py --workdir=runs/c10
set -euo pipefail
if [[ $# -eq 0 ]]; then echo "usage: launch/single_host.sh msnet <subcommand> <args>" >&2; exit 2; fi
exec "$@"
