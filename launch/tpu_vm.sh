#!/usr/bin/env bash
# A Cloud TPU VM slice: the same command on every worker; jax.distributed.initialize() auto-detects the slice.
#
#   launch/tpu_vm.sh my-tpu us-central2-b msnet run --config=configs/imagenet_vgg16.py --workdir=gs://bucket/run
#
# msnet must be installed on every worker (e.g. the same command with `pip install -e ~/msnet[tpu]` first).
set -euo pipefail
if [[ $# -lt 3 ]]; then echo "usage: launch/tpu_vm.sh TPU_NAME ZONE msnet <subcommand> <args>" >&2; exit 2; fi
tpu=$1; zone=$2; shift 2
printf -v cmd '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd ~/msnet && MSNET_DISTRIBUTED=auto ${cmd}"
