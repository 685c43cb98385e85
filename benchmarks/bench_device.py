"""One short prepared run for an accelerator: the ImageNet VGG-16 slave's bf16 train step and AMS evaluation.

  python benchmarks/bench_device.py --peak-tflops 989     # on a GPU/TPU (H100/H200 dense bf16: 989)
  python benchmarks/bench_device.py --smoke                # a CPU check that the script runs (batch 2)

The model is configs/imagenet_vgg16.py's (224x224, trunk conv1_1..conv5_1, K=3 branches, bfloat16 compute
with float32 params), data-parallel over every local device. It reports images/s of the jitted train step
(softmax CE over all branches, SGD momentum) and of AMS evaluation (slave forward + decision.ams), and model
FLOP utilisation: analytic FLOPs (msnet.models.flops_per_image; train = 3 x forward) per second over
--peak-tflops x device count. Writes JSON next to the table (--out).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
import imagenet_vgg16  # noqa: E402

from common import write_results  # noqa: E402

from msnet import decision  # noqa: E402
from msnet.models import build_slave, compiler_options, flops_per_image  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "device.json")


def timed(fn, reps: int) -> list[float]:
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=256, help="global batch (a multiple of the device count)")
  ap.add_argument("--reps", type=int, default=10, help="timed calls of each step after 2 warm-up calls")
  ap.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 dense peak per device (0: no MFU)")
  ap.add_argument("--smoke", action="store_true", help="batch 2 per device, 1 timed call (CPU check)")
  ap.add_argument("--out", default=RESULTS)
  a = ap.parse_args()
  devices = jax.devices()
  batch = 2 * len(devices) if a.smoke else a.batch
  reps = 1 if a.smoke else a.reps
  if batch % len(devices):
    raise SystemExit(f"--batch {batch} is not a multiple of the {len(devices)} devices")

  cfg = imagenet_vgg16.get_config()
  model = build_slave(cfg.model, 1000, 3)
  mesh = Mesh(np.array(devices), ("data",))
  data = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8), data)
  y = jax.device_put(rng.integers(0, 1000, batch).astype(np.int32), data)
  params = jax.jit(model.init, out_shardings=repl)(jax.random.key(0), x[:1])["params"]
  tx = optax.sgd(0.01, momentum=0.9)
  state = [params, jax.jit(tx.init, out_shardings=repl)(params)]

  def loss(p, x, y):
    logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)}).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(y, logits.shape[:2])).mean()

  @functools.partial(jax.jit, in_shardings=(repl, repl, data, data), out_shardings=(repl, repl, repl),
                     donate_argnums=(0, 1), compiler_options=compiler_options())
  def train_step(p, o, x, y):
    value, grads = jax.value_and_grad(loss)(p, x, y)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  @functools.partial(jax.jit, in_shardings=(repl, data), out_shardings=data, compiler_options=compiler_options())
  def ams_eval(p, x):
    return jnp.argmax(decision.ams(model.apply({"params": p}, x)), axis=-1)

  def train():
    p, o, value = train_step(*state, x, y)
    state[:] = [p, o]
    return value

  gflop = flops_per_image(model, params, 224) / 1e9
  t0 = time.perf_counter()
  for _ in range(2):
    jax.block_until_ready(train())
    jax.block_until_ready(ams_eval(state[0], x))
  warm_s = time.perf_counter() - t0
  rows = {}
  for name, fn, flop in (("train_step_bf16", train, 3 * gflop), ("ams_eval_bf16", lambda: ams_eval(state[0], x), gflop)):
    t = statistics.median(timed(fn, reps))
    tflops = batch * flop / t / 1e3
    rows[name] = dict(img_s=batch / t, tflop_s=tflops, seconds=t,
                      mfu=tflops / (a.peak_tflops * len(devices)) if a.peak_tflops else None)
  print(f"{len(devices)} x {devices[0].device_kind}, global batch {batch}, slave forward {gflop:.1f} GFLOP/img, "
        f"compile+warm-up {warm_s:.1f} s")
  for name, r in rows.items():
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    print(f"{name:<16} {r['img_s']:9.1f} img/s {r['tflop_s']:8.2f} TFLOP/s  MFU {mfu}")
  write_results(a.out, dict(device=devices[0].device_kind, devices=len(devices), batch=batch,
                            gflop_per_image=gflop, peak_tflops=a.peak_tflops, rows=rows))


if __name__ == "__main__":
  main()
