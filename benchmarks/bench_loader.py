r"""Throughput of the offline degrade job and of the loaders, on the embedded CIFAR-10.

  python benchmarks/bench_loader.py                        # degrade: demo specs, 1 vs 2 workers; loaders; host path
  python benchmarks/bench_loader.py --images=100 --skip-degrade
  python benchmarks/bench_loader.py --skip-degrade --skip-loaders   # the host path before / after only

Host path before / after (`--host-images`, `--host-seconds`, `--host-rounds`): images/s that `TrainLoader`
(threads, flips on) delivers as device arrays (`block_until_ready`), at 32x32 (CIFAR-10 training images) and at
224x224 (the same images upscaled, bilinear), by the loader of commit BEFORE (format-1 shards with a JSON header
per record, Grain's per-element pipeline, 2 read threads), extracted with `git archive`, and by this checkout
on both of its host paths: `train.host_cache="off"` (every batch read from the shards, as data over the
host-memory budget, 224x224 ImageNet, is) and "on" (the records read once into host memory, each batch
gathered there). Each in its own subprocess on the same images, the three alternated for `--host-rounds`
rounds in the same run (the machine's other load drifts), each timed over at least `--host-seconds` after 3
warm-up batches; the rows give the median round and every round. `open_s`: from opening the loader to its
first batch on the devices (the cache's bulk read included).

Degrade: `run_degrade` over the demo config's train and eval specs for `--images` images of each split,
with 1 and 2 worker processes, beside a plain single-process loop doing the same degradations (source
decode + `degradations.apply`, nothing written) and a plain Pillow loop for the JPEG specs (encode +
decode at the same quality). img/s counts degraded records written.

Loaders: images/s delivered as device arrays (`block_until_ready`) by `TrainLoader` (threads; 1 Grain
worker process) and `eval_batches`, over clean shards of `--loader-images` training images, on the
devices JAX sees (set XLA_FLAGS=--xla_force_host_platform_device_count=8 to shard over 8 fake CPUs),
beside the images/s of the demo config's train step (its model, batch `--batch`, SGD, synthetic batch):
the loader must keep ahead of it.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
BEFORE = "8604086"  # the last commit with record format 1 and the Grain per-element loader

# Run by this checkout and by BEFORE's: clean shards of the images (once per workdir), then TrainLoader's steady
# rate; host_cache "-" calls BEFORE's TrainLoader, which has no such argument.
_HOST_PATH = textwrap.dedent("""
    import json, sys, time
    import jax, numpy as np
    from msnet import parallel
    from msnet.data import loader, shards
    workdir, batch, seconds, cache = sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
    d = shards.spec_dir(workdir, "train", "clean")
    if not d.exists():
      images, labels = np.load(sys.argv[1]), np.load(sys.argv[2])
      d.mkdir(parents=True)
      k = 4
      for s in range(k):
        ids = range(s * len(images) // k, (s + 1) * len(images) // k)
        shards.write_shard(d / shards.shard_name(s, k), (shards.encode_record(images[i], dict(
            label=int(labels[i]), spec="clean", bin=0, bitstream_bin=0, index=i, psnr=float("inf"), bpp=None,
            level=None, ratio=None, codec=None)) for i in ids))
    mesh = parallel.make_mesh([("data", -1)])
    start = time.perf_counter()
    kw = {} if cache == "-" else {"host_cache": cache}
    it = loader.TrainLoader(workdir, "train", ["clean"], None, batch, 0, mesh, True, 0, **kw)
    jax.block_until_ready(next(it))
    open_s = time.perf_counter() - start
    for _ in range(2):
      jax.block_until_ready(next(it))
    steps, start = 0, time.perf_counter()
    while steps < 10 or time.perf_counter() - start < seconds:
      jax.block_until_ready(next(it))
      steps += 1
    print(json.dumps({"img_per_s": steps * batch / (time.perf_counter() - start), "steps": steps, "open_s": open_s,
                      "cached": getattr(it, "cached", None), "devices": jax.device_count()}))
""")
# The loaders the host path compares: (name, source tree (None: this checkout), train.host_cache).
_HOST_VARIANTS = (("before", "before", "-"), ("after_streamed", None, "off"), ("after_cached", None, "on"))


def demo_config():
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


def bench_degrade(images: int, root: pathlib.Path) -> dict:
  from msnet import degradations
  from msnet.data import degrade, sources

  c = demo_config()
  c.data.max_train_examples = images
  c.data.max_eval_examples = images
  c.degrade.records_per_shard = max(1, images // 4)
  work = [(c.data.train_split, s) for s in degrade.all_train_specs(c)]
  work += [(c.data.eval_split, s) for s in degrade.all_eval_specs(c)]
  total = images * len(work)
  print(f"degrade: {len(work)} (split, spec) pairs x {images} images = {total} records")
  out = {"images": images, "pairs": len(work), "records": total, "run_degrade_img_per_s": {}}

  for workers in (1, 2):
    c.degrade.num_workers = workers
    workdir = root / f"degrade_w{workers}"
    start = time.perf_counter()
    degrade.run_degrade(c, workdir)
    seconds = time.perf_counter() - start
    print(f"  run_degrade, {workers} worker(s): {seconds:6.1f} s  {total / seconds:7.0f} img/s  "
          f"({total / seconds / workers:.0f} img/s per worker, incl. start-up and source opening)")
    shutil.rmtree(workdir)
    out["run_degrade_img_per_s"][workers] = total / seconds
  out["scaling_2_over_1"] = out["run_degrade_img_per_s"][2] / out["run_degrade_img_per_s"][1]
  print(f"  2 workers / 1 worker: {out['scaling_2_over_1']:.2f}x")

  srcs = {split: sources.open_source(c.data, split) for split in {w[0] for w in work}}
  start = time.perf_counter()
  for split, spec in work:
    for i in range(images):
      degradations.apply(spec, srcs[split][i]["image"], seed=c.seed, index=i)
  seconds = time.perf_counter() - start
  print(f"  plain loop (decode + apply, no writing), 1 process: {seconds:6.1f} s  {total / seconds:7.0f} img/s")
  out["plain_apply_loop_img_per_s"] = total / seconds

  jpeg = [(split, op.quality) for split, s in work
          if len(ops := degradations.parse(s).ops) == 1 and isinstance(op := ops[0], degradations.Jpeg)]
  start = time.perf_counter()
  for split, q in jpeg:
    for i in range(images):
      buf = io.BytesIO()
      PIL.Image.fromarray(srcs[split][i]["image"]).save(buf, "JPEG", quality=q)
      np.asarray(PIL.Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
  pil = time.perf_counter() - start
  start = time.perf_counter()
  for split, q in jpeg:
    for i in range(images):
      degradations.apply(f"jpeg:{q}", srcs[split][i]["image"])
  ours = time.perf_counter() - start
  n = images * len(jpeg)
  print(f"  JPEG specs only ({len(jpeg)} x {images}): Pillow loop {n / pil:7.0f} img/s, "
        f"degradations.apply loop {n / ours:7.0f} img/s (incl. source decode both)")
  out["jpeg_only"] = {"pillow_img_per_s": n / pil, "apply_img_per_s": n / ours}
  return out


def demo_train_step_rate(model, batch: int, steps: int) -> float:
  """Images/s of a jitted train step of the demo config's baseline model (K=1), compiled and warm."""
  import jax
  from msnet.models import layers
  from bench_models import model_steps

  _, train = model_steps(model.width, batch, 1, layers.default_policy(), model_cfg=model)
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(train())
  return steps * batch / (time.perf_counter() - start)


def bench_loaders(images: int, root: pathlib.Path, batch: int, steps: int) -> dict:
  import jax
  from msnet import config as config_lib
  from msnet import parallel
  from msnet.data import degrade, loader

  c = config_lib.base_config()
  c.data.max_train_examples = images
  c.data.max_eval_examples = images
  c.degrade.num_workers = 2
  workdir = root / "loader"
  degrade.run_degrade(c, workdir, specs=["clean"])
  mesh = parallel.make_mesh([("data", -1)])
  print(f"loaders: {images} clean records, global batch {batch}, {jax.device_count()} device(s)")
  model = demo_config().model
  step_rate = demo_train_step_rate(model, batch, steps)
  print(f"  demo config train step (model width {model.width}, batch {batch}): {step_rate:7.0f} img/s")
  rates = []
  for workers in (0, 1):
    start = time.perf_counter()
    it = loader.TrainLoader(workdir, c.data.train_split, ["clean"], None, batch, 0, mesh, True, workers)
    jax.block_until_ready(next(it))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(next(it))
    seconds = time.perf_counter() - start
    rates.append(steps * batch / seconds)
    print(f"  TrainLoader, {workers} Grain worker(s): first batch {first * 1e3:5.0f} ms, "
          f"steady {rates[-1]:7.0f} img/s")
  print(f"  loader / demo train step: {rates[0] / step_rate:.1f}x (0 workers), {rates[1] / step_rate:.1f}x (1 worker)")
  start = time.perf_counter()
  n = 0
  for b in loader.eval_batches(workdir, c.data.eval_split, "clean", batch, mesh):
    jax.block_until_ready(b)
    n += int(np.asarray(b["mask"]).sum())
  seconds = time.perf_counter() - start
  print(f"  eval_batches: {n} records in {seconds:.2f} s, {n / seconds:7.0f} img/s")
  return {"records": images, "global_batch": batch, "devices": jax.device_count(),
          "demo_train_step_img_per_s": step_rate, "train_loader_img_per_s": {0: rates[0], 1: rates[1]},
          "loader_over_train_step": {0: rates[0] / step_rate, 1: rates[1] / step_rate},
          "eval_batches_img_per_s": n / seconds}


def bench_host_path(images: int, batch: int, seconds: float, rounds: int, root: pathlib.Path) -> dict:
  from msnet import config as config_lib
  from msnet.data import sources

  old = root / "before"
  old.mkdir()
  archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE, "msnet"], check=True, capture_output=True)
  subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
  src = sources.open_source(config_lib.base_config().data, "train")
  small = np.stack([src[i]["image"] for i in range(images)])
  labels = np.array([src[i]["label"] for i in range(images)], np.int32)
  rows, load = [], os.getloadavg()[0]
  print(f"host path: TrainLoader (flips on, 0 Grain workers), batch {batch}, >= {seconds} s after 3 warm-up "
        f"batches, {images} records in 4 shards, {rounds} alternated rounds; before = commit {BEFORE}")
  for size in (32, 224):
    data = small if size == 32 else np.stack(
        [np.asarray(PIL.Image.fromarray(x).resize((size, size), PIL.Image.Resampling.BILINEAR)) for x in small])
    np.save(root / "images.npy", data)
    np.save(root / "labels.npy", labels)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in _HOST_VARIANTS}
    for _ in range(rounds):
      for name, tree, cache in _HOST_VARIANTS:
        env = {**os.environ, "PYTHONPATH": str(old if tree else REPO)}
        workdir = root / f"host-{tree or 'after'}-{size}"  # shards written by the first run of each tree
        out = subprocess.run([sys.executable, "-c", _HOST_PATH, str(root / "images.npy"), str(root / "labels.npy"),
                              str(workdir), str(batch), str(seconds), cache], check=True, capture_output=True,
                             text=True, env=env, cwd=str(root))
        runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for name, tree, _ in _HOST_VARIANTS:
      shutil.rmtree(root / f"host-{tree or 'after'}-{size}", ignore_errors=True)
    row = {"size": size}
    for name, got in runs.items():
      rates = [r["img_per_s"] for r in got]
      row[name] = {"img_per_s": float(np.median(rates)), "rounds_img_per_s": rates,
                   "open_s": float(np.median([r["open_s"] for r in got])), "cached": got[0]["cached"]}
    for name in ("after_streamed", "after_cached"):
      row[f"{name}_speedup"] = row[name]["img_per_s"] / row["before"]["img_per_s"]
    rows.append(row)
  print(f"  {'size':>7}  {'before img/s':>12}  {'streamed img/s':>14}  {'cached img/s':>12}  "
        f"{'streamed':>8}  {'cached':>7}  {'cache open s':>12}")
  for r in rows:
    print(f"  {r['size']:>3}x{r['size']:<3}  {r['before']['img_per_s']:12.0f}  "
          f"{r['after_streamed']['img_per_s']:14.0f}  {r['after_cached']['img_per_s']:12.0f}  "
          f"{r['after_streamed_speedup']:7.1f}x  {r['after_cached_speedup']:6.1f}x  {r['after_cached']['open_s']:12.2f}")
  from msnet.data import shards
  return {"before_commit": BEFORE, "records": images, "global_batch": batch, "min_seconds": seconds,
          "rounds": rounds, "read_threads": shards.read_threads(), "load_average_1m": [load, os.getloadavg()[0]],
          "rows": rows}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=200, help="images per split for the degrade benchmark")
  p.add_argument("--loader-images", type=int, default=4096, help="clean records for the loader benchmark")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--skip-degrade", action="store_true")
  p.add_argument("--skip-loaders", action="store_true")
  p.add_argument("--host-images", type=int, default=2048, help="records of the host-path benchmark")
  p.add_argument("--host-seconds", type=float, default=2.0, help="least seconds timed per loader, size and round")
  p.add_argument("--host-rounds", type=int, default=2, help="alternated rounds of the host-path loaders")
  p.add_argument("--out", default=str(REPO / "benchmarks/results/loader.json"))
  args = p.parse_args()
  root = pathlib.Path(tempfile.mkdtemp(prefix="msnet-bench-"))
  results = {}
  try:
    if not args.skip_degrade:
      results["degrade"] = bench_degrade(args.images, root)
    if not args.skip_loaders:
      results["loaders"] = bench_loaders(args.loader_images, root, args.batch, args.steps)
    results["host_path"] = bench_host_path(args.host_images, args.batch, args.host_seconds, args.host_rounds, root)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  write_results(args.out, results)


if __name__ == "__main__":
  main()
