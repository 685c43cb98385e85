r"""Throughput of the offline degrade job and of the Grain loaders, on the embedded CIFAR-10.

  python benchmarks/bench_loader.py                        # degrade: demo specs, 1 vs 2 workers; loaders
  python benchmarks/bench_loader.py --images=100 --skip-degrade

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
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


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


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=200, help="images per split for the degrade benchmark")
  p.add_argument("--loader-images", type=int, default=4096, help="clean records for the loader benchmark")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--skip-degrade", action="store_true")
  p.add_argument("--out", default=str(REPO / "benchmarks/results/loader.json"))
  args = p.parse_args()
  root = pathlib.Path(tempfile.mkdtemp(prefix="msnet-bench-"))
  results = {}
  try:
    if not args.skip_degrade:
      results["degrade"] = bench_degrade(args.images, root)
    results["loaders"] = bench_loaders(args.loader_images, root, args.batch, args.steps)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  write_results(args.out, results)


if __name__ == "__main__":
  main()
