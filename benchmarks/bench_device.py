"""One short prepared run for an accelerator: an ImageNet slave's bf16 train step and AMS evaluation.

  python benchmarks/bench_device.py --peak-tflops 989 --batches 64,128,256   # a GPU/TPU (H100/H200 dense bf16: 989)
  python benchmarks/bench_device.py --arch resnet50 --peak-tflops 989 --batches 128,256
  python benchmarks/bench_device.py --smoke [--arch resnet50]   # a CPU check that the script runs (batch 2)

The model is --arch's config's (ARCHS: configs/imagenet_vgg16.py, trunk conv1_1..conv5_1, or
configs/imagenet_resnet50.py, trunk = stem + stages 1-3, BatchNorm), 224x224, K=3 branches, bfloat16 compute
with float32 params, data-parallel over every local device. A BatchNorm network trains on the batch's
statistics and carries its running ones through the step, as msnet's train step does. It reports images/s of the jitted train step
(softmax CE over all branches, SGD momentum) and of AMS evaluation (slave forward + decision.ams), and model
FLOP utilisation two ways, over --peak-tflops x device count: analytic FLOPs (msnet.models.flops_per_image;
train = 3 x forward), and the FLOPs XLA counts in the compiled program (`compiled.cost_analysis()["flops"]`,
which includes what the analytic count leaves out: norms, activations, the optimizer). One row per batch of
--batches. Writes JSON next to the table (--out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from common import write_results  # noqa: E402

from msnet import config as config_lib, decision  # noqa: E402
from msnet.models import build_slave, compiler_options, flops_per_image  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "device.json")
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
ARCHS = {"vgg16": "imagenet_vgg16.py", "resnet50": "imagenet_resnet50.py"}  # --arch -> its ImageNet config


def timed(fn, reps: int) -> list[float]:
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batches", default="256", help="global batches, comma-separated (multiples of the device count)")
  ap.add_argument("--reps", type=int, default=10, help="timed calls of each step after 2 warm-up calls")
  ap.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 dense peak per device (0: no MFU)")
  ap.add_argument("--smoke", action="store_true", help="batch 2 per device, 1 timed call (CPU check)")
  ap.add_argument("--arch", choices=sorted(ARCHS), default="vgg16", help="the slave, by its ImageNet config")
  ap.add_argument("--out", default=RESULTS)
  a = ap.parse_args()
  devices = jax.devices()
  batches = [2 * len(devices)] if a.smoke else [int(b) for b in a.batches.split(",")]
  reps = 1 if a.smoke else a.reps
  bad = [b for b in batches if b % len(devices)]
  if bad:
    raise SystemExit(f"--batches {bad} are not multiples of the {len(devices)} devices")
  cfg = config_lib.config_file(os.path.join(CONFIGS, ARCHS[a.arch]))
  model = build_slave(cfg.model, 1000, 3)
  mesh = Mesh(np.array(devices), ("data",))
  results = [measure(model, mesh, batch, reps, a.peak_tflops) for batch in batches]
  write_results(a.out, dict(arch=a.arch, device=devices[0].device_kind, devices=len(devices), peak_tflops=a.peak_tflops,
                            gflop_per_image=results[0]["gflop_per_image"], batches=results))


def _compiled_flops(compiled) -> float | None:
  """The FLOPs XLA's cost analysis counts for one call (None where the backend gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def measure(model, mesh: Mesh, batch: int, reps: int, peak_tflops: float) -> dict:
  """img/s, TFLOP/s and MFU of the train step and of AMS evaluation at one global batch."""
  devices = mesh.devices.size
  data = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8), data)
  y = jax.device_put(rng.integers(0, 1000, batch).astype(np.int32), data)
  variables = jax.jit(model.init, out_shardings=repl)(jax.random.key(0), x[:1])
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}  # {"batch_stats": ...} or {}
  tx = optax.sgd(0.01, momentum=0.9)
  state = [params, jax.jit(tx.init, out_shardings=repl)(params), model_state]

  def loss(p, ms, x, y):
    out = model.apply({"params": p, **ms}, x, train=True, rngs={"dropout": jax.random.key(1)},
                      **({"mutable": list(ms)} if ms else {}))
    logits, ms = out if ms else (out, ms)
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(y, logits.shape[:2])).mean(), ms

  def step(p, o, ms, x, y):
    (value, ms), grads = jax.value_and_grad(loss, has_aux=True)(p, ms, x, y)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, ms, value

  t0 = time.perf_counter()
  train_step = jax.jit(step, in_shardings=(repl, repl, repl, data, data), out_shardings=(repl, repl, repl, repl),
                       donate_argnums=(0, 1, 2), compiler_options=compiler_options()).lower(*state, x, y).compile()
  ams_eval = jax.jit(lambda p, ms, x: jnp.argmax(decision.ams(model.apply({"params": p, **ms}, x)), axis=-1),
                     in_shardings=(repl, repl, data), out_shardings=data,
                     compiler_options=compiler_options()).lower(state[0], state[2], x).compile()
  compile_s = time.perf_counter() - t0
  compiled_gflop = {"train_step_bf16": _compiled_flops(train_step), "ams_eval_bf16": _compiled_flops(ams_eval)}

  def train():
    p, o, ms, value = train_step(*state, x, y)
    state[:] = [p, o, ms]
    return value

  gflop = flops_per_image(model, params, 224) / 1e9
  for _ in range(2):
    jax.block_until_ready(train())
    jax.block_until_ready(ams_eval(state[0], state[2], x))
  rows = {}
  for name, fn, flop in (("train_step_bf16", train, 3 * gflop), ("ams_eval_bf16", lambda: ams_eval(state[0], state[2], x), gflop)):
    t = statistics.median(timed(fn, reps))
    tflops = batch * flop / t / 1e3
    # cost_analysis counts the whole program over all devices' shards (SPMD: one device's program x devices)
    xla = compiled_gflop[name]
    xla_tflops = xla * devices / t / 1e12 if xla else None
    peak = peak_tflops * devices
    rows[name] = dict(img_s=batch / t, tflop_s=tflops, seconds=t, mfu=tflops / peak if peak else None,
                      xla_gflop_per_call=xla * devices / 1e9 if xla else None, xla_tflop_s=xla_tflops,
                      xla_mfu=xla_tflops / peak if peak and xla_tflops else None)
  print(f"{devices} x {mesh.devices.flat[0].device_kind}, global batch {batch}, slave forward {gflop:.1f} "
        f"GFLOP/img, compile {compile_s:.1f} s")
  for name, r in rows.items():
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    xla_mfu = f"{100 * r['xla_mfu']:.1f}%" if r["xla_mfu"] is not None else "-"
    print(f"{name:<16} {r['img_s']:9.1f} img/s {r['tflop_s']:8.2f} TFLOP/s  MFU {mfu} (analytic), "
          f"{xla_mfu} (XLA's count)")
  return dict(batch=batch, gflop_per_image=gflop, compile_s=compile_s, rows=rows)


if __name__ == "__main__":
  main()
