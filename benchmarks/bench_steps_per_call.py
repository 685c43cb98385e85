r"""Train steps/s of the demo's network at K = 1, 4, 16 steps per call, on both data paths.

  python benchmarks/bench_steps_per_call.py                     # the demo config, batch 128, 48 timed steps
  python benchmarks/bench_steps_per_call.py --steps=32 --ks=1,16
  python benchmarks/bench_steps_per_call.py --steps=32 --rolled=4   # also K=4 with the scan kept as a loop

The demo config's slave (configs/demo.py: width 1/4 VGG-16, GroupNorm, batch 128, SGD) on clean shards of
`--images` smooth random 32x32 images, its baseline optimizer and step; per data path ("host":
loader.TrainLoader, "device": resident.ResidentLoader) and K, one call to compile and warm up, then
`--steps` steps dispatched as the loop does (K steps per call, the host's batches drawn per step), timed
to the last call's `block_until_ready`. One run, whatever devices JAX sees (the demo uses one CPU device).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _shards(workdir: pathlib.Path, n: int, size: int) -> None:
  from msnet.data import shards
  rng = np.random.RandomState(0)
  base = rng.randint(0, 256, (n, size // 4, size // 4, 3)).repeat(4, 1).repeat(4, 2).astype(np.uint8)
  d = shards.spec_dir(workdir, "train", "clean")
  d.mkdir(parents=True, exist_ok=True)
  records = [shards.encode_record(base[i], {"label": int(i % 10), "spec": "clean", "bin": 0, "bitstream_bin": 0,
                                            "index": i, "psnr": float("inf"), "bpp": None, "level": None,
                                            "ratio": None, "codec": None}) for i in range(n)]
  shards.write_shard(d / shards.shard_name(0, 1), records)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=48, help="timed steps per (path, K); a multiple of every K")
  parser.add_argument("--ks", default="1,4,16")
  parser.add_argument("--rolled", default="", help="K values to run also with the scan kept as a loop (host path)")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "steps_per_call.json"))
  args = parser.parse_args()

  from configs import demo
  from msnet import models, parallel
  from msnet.data import loader as loader_lib, resident
  from msnet.train import optim, state as state_lib, step as step_lib

  config = demo.get_config()
  gb = int(config.train.global_batch)
  ks = [int(k) for k in args.ks.split(",")]
  mesh = parallel.make_mesh(config.mesh)
  model = models.build_slave(config.model, config.data.num_classes, 1)
  init = lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8))["params"]  # noqa: E731
  abstract = jax.eval_shape(init)
  tx, schedule = optim.make_optimizer(config.stages.baseline, 10_000, abstract)
  shardings = state_lib.state_shardings(state_lib.abstract_state(abstract, tx), mesh, config.sharding_rules)
  step_args = (step_lib.slave_apply(model), tx, schedule, optim.trainable_mask(abstract, [".*"]), mesh, shardings,
               jax.random.key(1))

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp)
    _shards(workdir, args.images, config.data.image_size)
    runs = [(path, k, None) for path in ("host", "device") for k in ks]
    runs += [("host", int(k), False) for k in filter(None, args.rolled.split(","))]  # the loop the CPU avoids
    for path, k, unroll in runs:
      if path == "host":
        ld = loader_lib.TrainLoader(workdir, "train", ["clean"], None, gb, 0, mesh, True, 0)
        feed = step_lib.host_feed(mesh)
      else:
        ld = resident.ResidentLoader(workdir, "train", ["clean"], None, gb, 0, mesh, True)
        repl = parallel.replicated(mesh)
        feed = step_lib.Feed(ld.batch, repl, repl, repl, data=ld.data)
      if k == 1 and path == "host":
        single = step_lib.make_train_step(*step_args)
        call = lambda state, data, items: single(state, items[0])  # noqa: E731
      else:
        call = step_lib.make_train_call(*step_args, steps=k, feed=feed, unroll=unroll)
      state = state_lib.init_state(init, tx, shardings)
      t = time.perf_counter()
      state, m = call(state, feed.data, [next(ld) for _ in range(k)])
      jax.block_until_ready(m)
      compile_s = time.perf_counter() - t
      t = time.perf_counter()
      for _ in range(args.steps // k):
        state, m = call(state, feed.data, [next(ld) for _ in range(k)])
      jax.block_until_ready((state, m))
      seconds = time.perf_counter() - t
      rows.append({"path": path, "steps_per_call": k, "scan": "rolled" if unroll is False else "default",
                   "steps": args.steps // k * k, "seconds": seconds,
                   "steps_per_s": args.steps // k * k / seconds, "images_per_s": args.steps // k * k * gb / seconds,
                   "first_call_s": compile_s})
      r = rows[-1]
      print(f"{path:6s} K={k:<3d} {r['scan']:7s} {r['steps_per_s']:7.2f} steps/s {r['images_per_s']:8.0f} img/s "
            f"(first call {compile_s:.1f} s)", flush=True)

  print("\n| data path | K | scan | steps/s | img/s | first call (s) |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['path']} | {r['steps_per_call']} | {r['scan']} | {r['steps_per_s']:.2f} | {r['images_per_s']:.0f} | "
          f"{r['first_call_s']:.1f} |")
  write_results(args.out, {"devices": [str(d) for d in jax.devices()], "global_batch": gb, "images": args.images,
                           "rows": rows})


if __name__ == "__main__":
  main()
