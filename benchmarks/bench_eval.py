r"""`msnet evaluate`'s images/s on the demo's networks, records streamed from the host vs device-resident.

  python benchmarks/bench_eval.py                      # 6 specs x 1,000 images, both paths, 2 rounds each
  python benchmarks/bench_eval.py --specs=4 --images=500 --rounds=1

A workdir of `--specs` eval specs of `--images` random 32x32 records each (the pixels' content costs nothing
here: the records hold raw pixels) and every stage of the demo config (configs/demo.py) with random params
(the branches, DA heads and DeepCloak share the baseline's trunk, as trained), so every method of the demo's
evaluation runs. `run_evaluate` then runs with config.evaluate.device_data="off" (loader.eval_batches, one
jitted call per batch) and with "on" (each spec's records put on the devices, one scanned call per group),
alternating for `--rounds` rounds (a shared machine's load drifts), each from an empty W/eval. img/s counts
evaluated records (every method on each); "steady" excludes the first spec (its compile), from cells.jsonl's
per-spec wall_s; "whole" is the call's wall time, compile and setup included; "per CPU second" divides by
the process's CPU time over the call (every thread), which other programs on a shared machine disturb less
than wall time; the summary takes each path's median over the rounds. Both paths must write the same
per-image bits (checked).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SPECS = ("clean", "jpeg:2", "jpeg:5", "jpeg:10", "jpeg:20", "jpeg:50", "jp2k:12", "jp2k:24", "noise:10",
         "noise:20", "blur:1", "blur:2")


def demo_config(specs: list[str]) -> Any:
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(None)
  c.sweeps = {"bench": tuple(specs)}
  c.evaluate.sweeps = ("bench",)
  return c


def write_workdir(c: Any, workdir: pathlib.Path, specs: list[str], images: int) -> None:
  """Random records of every spec, and a DONE.json for every stage the demo's evaluation needs."""
  from msnet.data import shards

  rng = np.random.default_rng(0)
  size = c.data.image_size
  for spec in specs:
    pixels = rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    records = [shards.encode_record(pixels[i], dict(
        label=int(rng.integers(0, c.data.num_classes)), spec=spec, bin=int(rng.integers(0, len(c.bins))),
        bitstream_bin=int(rng.integers(0, len(c.bins))), index=i, psnr=30.0, bpp=1.0, level=None,
        ratio=None, codec=None)) for i in range(images)]
    out = shards.spec_dir(workdir, c.data.eval_split, spec)
    out.mkdir(parents=True)
    shards.write_shard(out / shards.shard_name(0, 1), records)
  for stage in ("baseline", *(f"branch_{b.name}" for b in c.bins[1:]), "master", *c.comparisons):
    (workdir / "train" / stage).mkdir(parents=True)
    (workdir / "train" / stage / "DONE.json").write_text("{}")


def stand_in_params(c: Any) -> None:
  """Random params of the demo's networks in place of the stages' checkpoints."""
  import jax
  import jax.numpy as jnp
  from msnet import config as config_lib, models
  from msnet import train as train_lib

  rng = np.random.default_rng(1)
  x = jnp.zeros((1, c.data.image_size, c.data.image_size, 3), jnp.uint8)

  def random(module: Any) -> Any:
    def one(path: tuple[Any, ...], leaf: Any) -> np.ndarray:
      shape = leaf.shape[1:] if path[0].key == "branches" else leaf.shape
      std = math.sqrt(2.0 / math.prod(shape[:-1])) if path[-1].key == "kernel" else 0.1
      return (std * rng.standard_normal(leaf.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(module.init, jax.random.key(0), x)["params"])

  k, n = len(c.bins), c.data.num_classes
  single = models.build_slave(c.model, n, 1)
  base = random(single)
  params = {"master": random(models.build_master(c.master, k)), "stability": random(single),
            "alexnet_baseline": random(models.build_slave(config_lib.alexnet_model(c), n, 1)),
            **{m: dict(random(single), trunk=base["trunk"]) for m in ("da_fc8", "da_fc67", "da_fc678")}}
  slave = dict(random(models.build_slave(c.model, n, k)), trunk=base["trunk"])
  last_conv = [name for name in base["trunk"] if not name.endswith("_norm")][-1]   # the trunk's output channels
  mask = np.ones(base["trunk"][last_conv]["bias"].shape, np.float32)
  mask[::100] = 0.0
  params["baseline"] = base
  train_lib.load_params = lambda workdir, stage: params[stage]
  train_lib.load_variables = lambda workdir, stage: {"params": params[stage]}  # no BatchNorm: params only
  train_lib.load_baseline_variables = lambda workdir, config: {"params": base}
  train_lib.load_slave_variables = lambda workdir, config: {"params": slave}
  train_lib.load_feature_mask = lambda workdir: mask


def run(c: Any, workdir: pathlib.Path, mode: str) -> dict[str, Any]:
  from msnet import evaluate

  shutil.rmtree(workdir / "eval", ignore_errors=True)
  c.evaluate.device_data = mode
  start, cpu = time.perf_counter(), time.process_time()
  evaluate.run_evaluate(c, workdir)
  whole, cpu = time.perf_counter() - start, time.process_time() - cpu
  cells = [json.loads(line) for line in (workdir / "eval" / "cells.jsonl").read_text().splitlines()]
  meta = json.loads((workdir / "eval" / "results.json").read_text())["meta"]
  records = sum(cell["quality"]["records"] for cell in cells)
  steady = sum(cell["quality"]["records"] for cell in cells[1:]) / sum(cell["wall_s"] for cell in cells[1:])
  bits = {p.name: p.read_bytes() for p in sorted((workdir / "eval" / "correct").glob("*.npz"))}
  return dict(mode=mode, device_data=meta["device_data"], records=records, whole_s=round(whole, 2),
              whole_img_per_s=round(records / whole, 1), steady_img_per_s=round(steady, 1),
              cpu_s=round(cpu, 2), img_per_cpu_s=round(records / cpu, 1), load_average=os.getloadavg()[0],
              spec_wall_s=[cell["wall_s"] for cell in cells], methods=len(meta["methods"]), bits=bits)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--specs", type=int, default=6, help=f"how many of {SPECS}")
  parser.add_argument("--images", type=int, default=1000, help="records per spec (the demo evaluates 1,000)")
  parser.add_argument("--rounds", type=int, default=2, help="runs of each path, alternating")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval.json"))
  args = parser.parse_args()

  import jax

  specs = list(SPECS[:args.specs])
  c = demo_config(specs)
  stand_in_params(c)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp)
    write_workdir(c, workdir, specs, args.images)
    runs = [run(c, workdir, mode) for _ in range(args.rounds) for mode in ("off", "on")]
  if len({tuple(r.pop("bits").items()) for r in runs}) != 1:
    raise SystemExit("bench_eval: the two paths wrote different per-image bits")
  for r in runs:
    print(f"device_data={r['mode']:>3}: {r['records']} records, {r['methods']} methods: whole {r['whole_s']:6.1f} s "
          f"({r['whole_img_per_s']:7.1f} img/s), steady {r['steady_img_per_s']:7.1f} img/s, "
          f"{r['img_per_cpu_s']:6.1f} img per CPU second (load {r['load_average']:.1f})")
  median = {mode: {k: statistics.median(r[k] for r in runs if r["mode"] == mode)
                   for k in ("whole_img_per_s", "steady_img_per_s", "img_per_cpu_s")} for mode in ("off", "on")}
  ratio = {k: round(median["on"][k] / median["off"][k], 3) for k in median["on"]}
  print(f"medians: streamed {median['off']}, device-resident {median['on']}; on / off: {ratio}")
  write_results(args.out, dict(backend=jax.default_backend(), devices=jax.device_count(), specs=specs,
                               images_per_spec=args.images, global_batch=c.evaluate.global_batch,
                               runs=runs, median=median, on_over_off=ratio))


if __name__ == "__main__":
  main()
