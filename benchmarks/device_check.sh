#!/bin/bash
# Issue 20's device check, in one call of the device tool (an NVIDIA H200 with no network), within 8 minutes:
#   (device tool) run: bash benchmarks/device_check.sh   carry: [".whl"]   timeout_s: 600
# .whl/ holds the wheels the device image lacks (benchmarks/device_wheels.sh builds it). Writes $OUT/ (copy it to
# benchmarks/results/device/):
#   (c) run_gpu.log.gz, workdir.tgz: the whole `msnet run` of configs/cifar10_repro.py:gpu (degrade included),
#       its per-stage wall times, the compilations JAX logged (JAX_LOG_COMPILES) and its report (Table 1);
#   (a) vgg16_224.json: the 224x224 VGG-16 slave's bf16 train step at batches 64, 128, 256 (img/s, MFU from the
#       analytic count and from XLA's cost analysis), benchmarks/bench_device.py;
#   (b) the CIFAR baseline stage for 2 epochs at batch 128 (configs/cifar10_repro.py as it was), on the host path
#       and on the device-resident path, on (c)'s shards; the accelerator config's rate comes from (c);
#   summary.json, summary.md: benchmarks/device_summary.py over all of it, against the targets;
#   eight files in all, the most the device tool returns (each part's exit status is in summary.md);
#   (d) resnet50_224.json: the same as (a) for the 224x224 ResNet-50 slave (configs/imagenet_resnet50.py, issue 21),
#       last, after (a)-(c) are summarised and packed: if it runs past the call's limit, only (d) is lost.
# JAX's persistent compilation cache is on (JAX_COMPILATION_CACHE_DIR): a stage's second program of the same shape
# (e.g. the branches, the DA heads) is read from it instead of compiled again.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0 JAX_LOG_COMPILES=1
python3 -c "import jax; print('jax', jax.__version__, jax.devices(), 'cpus', __import__('os').cpu_count())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
w=$PWD/.device_w/gpu
w128=$PWD/.device_w/b128
rcfile=/tmp/device_check_rc.txt  # each part's exit status, read into summary.md

start=$(date +%s.%N)
timeout 240 python3 -m msnet.cli run --config=configs/cifar10_repro.py:gpu --workdir="$w" > "$OUT/run_gpu.log" 2>&1
echo "run_gpu rc=$? wall_s=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")" | tee "$rcfile"

timeout 150 python3 benchmarks/bench_device.py --peak-tflops 989 --batches 64,128,256 --reps 10 \
  --out "$OUT/vgg16_224.json" 2>&1 | gzip > "$OUT/vgg16_224.log.gz"

for path in off on; do
  d=$w128-$path
  mkdir -p "$d" && ln -sfn "$w/data" "$d/data"
  timeout 90 python3 -m msnet.cli train --config=configs/cifar10_repro.py --workdir="$d" --stage=baseline \
    --config.stages.baseline.epochs=2 --config.train.device_data=$path --config.train.eval_every_epoch=False \
    >> "$OUT/run_gpu.log" 2>&1
  echo "baseline batch 128 device_data=$path rc=$?" | tee -a "$rcfile"
done

python3 benchmarks/device_summary.py --run "$w" --b128 "$w128-off" --b128 "$w128-on" --bench "$OUT/vgg16_224.json" \
  --rc "$rcfile" --out "$OUT" 2>&1 | tail -n 60
tar czf "$OUT/workdir.tgz" -C "$w" --exclude=./data --exclude=ckpt . && gzip -f "$OUT/run_gpu.log"

timeout 80 python3 benchmarks/bench_device.py --arch resnet50 --peak-tflops 989 --batches 128,256 --reps 10 \
  --out "$OUT/resnet50_224.json" 2>&1 | gzip > "$OUT/resnet50_224.log.gz"
python3 benchmarks/device_summary.py --run "$w" --b128 "$w128-off" --b128 "$w128-on" --bench "$OUT/vgg16_224.json" \
  --bench "$OUT/resnet50_224.json" --rc "$rcfile" --out "$OUT" > /dev/null 2>&1
ls -la "$OUT"
