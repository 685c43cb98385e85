#!/bin/bash
# The whole `msnet run` of a config in one call of the device tool (an NVIDIA H200 lent to this workplace,
# with no network): installs the wheels carried in .whl/ (the packages its image lacks, pinned as in pyproject.toml,
# built by benchmarks/device_wheels.sh; its own jax stays), runs, and returns the workdir without shards and checkpoints.
#   (device tool) run: bash benchmarks/device_run.sh configs/cifar10_beyond.py [--config.x=y ...]   carry: [".whl"]
# Resumable: a second call on the same (still warm) machine continues the same workdir.
set -uo pipefail
export PYTHONUNBUFFERED=1
config=$1; shift
w=$PWD/.device_w
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import jax, flax, grain, imagecodecs, ml_collections; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'cpus', __import__('os').cpu_count())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
timeout "${LIMIT:-560}" python3 -c "import sys; from msnet.cli import main; sys.argv = ['msnet', 'run', *sys.argv[1:]]; main()" \
  --config="$config" --workdir="$w" --config.degrade.num_workers=14 "$@" > "$OUT/run.log" 2>&1
rc=$?
echo "rc=$rc wall_s=$(( $(date +%s) - start ))" | tee "$OUT/rc.txt"
grep -a "\[msnet\]\|done:\|Error\|error" "$OUT/run.log" | tail -n 40
tar czf "$OUT/workdir.tgz" -C "$w" --exclude=./data --exclude=ckpt . && gzip -f "$OUT/run.log"
ls -la "$OUT"
