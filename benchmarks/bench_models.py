"""Per-layer conv formulations and whole-model speed on this machine (CPU).

  python benchmarks/bench_models.py            # layers at bs128 (width 1.0) + models at width 1.0 and 0.25
  python benchmarks/bench_models.py --quick    # a ~1-minute smoke run: bs32, width 0.25, 2 reps
  python benchmarks/bench_models.py --only layers|models [--batch N] [--reps N] [--xla]

Layers: each 3x3 SAME conv of the CIFAR VGG-16 (32x32 input), the forward pass, the input gradient (dx)
and the kernel gradient (dw), in every formulation of msnet.models.layers ("xla" = lax.conv_general_dilated
and, for dx/dw, XLA's own backward convs via jax.vjp; "im2col"/"shift" as documented there), best of
--reps, milliseconds. Models: forward and train-step (softmax CE, SGD momentum) images/s of the slave,
K=1 (the baseline) and K=3, with the measured CPU policy (and XLA's convs with --xla; slow: the 2x2 layers).

Interleave comparisons inside one run: the machine is shared and noisy (see cpu-performance.md).
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from msnet import config
from msnet.models import CPU_POLICY, XLA_POLICY, build_slave, compiler_options
from msnet.models import layers as L

VGG_CONVS = [(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256), (8, 256, 256),
             (4, 256, 512), (4, 512, 512), (2, 512, 512)]


def best_ms(f, *args, reps: int) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * min(times)


def bench_layers(batch: int, width: float, reps: int, image: int = 32, ynn: bool = False) -> None:
  rng = np.random.default_rng(0)
  jit = functools.partial(jax.jit, compiler_options={} if ynn else compiler_options())
  print(f"\n# per-layer ms, {image}x{image} input, batch {batch}, width {width} (best of {reps}), "
        f"{'YNNPACK' if ynn else 'Eigen'} convs; * = the CPU policy's choice")
  for size, cin, cout in VGG_CONVS:
    size = size * image // 32
    cin = cin if cin == 3 else L.scaled(cin, width)
    cout = L.scaled(cout, width)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) * 0.1, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(batch, size, size, cout)), jnp.float32)
    k_t = jnp.flip(k, (0, 1)).swapaxes(2, 3)
    chosen = {p: CPU_POLICY.pick(getattr(CPU_POLICY, p), size) for p in ("fwd", "dx", "dw")}
    cells = []
    for impl in L.IMPLS:
      t = best_ms(jit(lambda x, k, i=impl: L._fwd_impl(i, x, k)), x, k, reps=reps)
      cells.append(f"fwd_{impl}={t:.1f}{'*' if chosen['fwd'] == impl else ''}")
    if cin > 3:  # the first layer needs no input gradient
      for impl in L.IMPLS:
        if impl == "xla":
          f = jit(lambda x, k, d: jax.vjp(lambda x: L._fwd_impl("xla", x, k), x)[1](d)[0])
          t = best_ms(f, x, k, dy, reps=reps)
        else:
          t = best_ms(jit(lambda d, kt, i=impl: L._fwd_impl(i, d, kt)), dy, k_t, reps=reps)
        cells.append(f"dx_{impl}={t:.1f}{'*' if chosen['dx'] == impl else ''}")
    for impl in L.IMPLS:
      f = jit(lambda x, d, i=impl: L._dw_impl(i, x, d, k.shape, CPU_POLICY.dw_rows))
      cells.append(f"dw_{impl}={best_ms(f, x, dy, reps=reps):.1f}{'*' if chosen['dw'] == impl else ''}")
    gflop = 2 * batch * size * size * 9 * cin * cout / 1e9
    print(f"{size:2d}x{size:<2d} {cin:3d}->{cout:3d} ({gflop:.2f} GFLOP): " + " ".join(cells), flush=True)
  print("\n# 2x2/2 max pool backward ms (nn.max_pool's select-and-scatter vs msnet's block max)")
  for size, _, cout in VGG_CONVS[1::2] + VGG_CONVS[-1:]:
    size, cout = size * image // 32, L.scaled(cout, width)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cout)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(batch, size // 2, size // 2, cout)), jnp.float32)
    cells = []
    for name, pool in (("nn", lambda x: nn.max_pool(x, (2, 2), (2, 2))), ("msnet", lambda x: L.max_pool(x, 2, 2))):
      f = jit(lambda x, d, p=pool: jax.vjp(p, x)[1](d)[0])
      cells.append(f"{name}={best_ms(f, x, dy, reps=reps):.1f}")
    print(f"{size:2d}x{size:<2d} {cout:3d}: " + " ".join(cells), flush=True)
  print("\n# conv bias gradient ms (XLA's sum over batch and pixels vs msnet's ones-vector dot)")
  for size, _, cout in VGG_CONVS[::2]:
    size, cout = size * image // 32, L.scaled(cout, width)
    y = jnp.asarray(rng.normal(size=(batch, size, size, cout)), jnp.float32)
    b = jnp.zeros((cout,), jnp.float32)
    cells = []
    for name, add in (("sum", lambda y, b: y + b), ("dot", L._bias_add_dot_grad)):
      f = jit(lambda y, b, a=add: jax.vjp(a, y, b)[1](y)[1])
      cells.append(f"{name}={best_ms(f, y, b, reps=reps):.1f}")
    print(f"{size:2d}x{size:<2d} {cout:3d}: " + " ".join(cells), flush=True)


def model_steps(width: float, batch: int, k: int, policy: L.ConvPolicy, *, variant: str = "cifar",
                size: int = 32, classes: int = 10, fc_width: int | None = None,
                xla_options: dict[str, str] | None = None, model_cfg=None):
  """(forward, train step) zero-argument closures for a VGG-16 slave (default: CIFAR, 32x32), compiled and
  warmed up; `xla_options` defaults to msnet's `compiler_options()` ({} = XLA's defaults); `model_cfg`
  (a config's `model`, e.g. the demo's) is the base the width, variant and fc_width are set on."""
  opts = compiler_options() if xla_options is None else xla_options
  cfg = (config.base_config().model if model_cfg is None else model_cfg).copy_and_resolve_references()
  cfg.width, cfg.variant = width, variant
  if fc_width is not None:
    cfg.fc_width = fc_width
  model = build_slave(cfg, classes, k, policy=policy)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
  y = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)["params"]
  tx = optax.sgd(0.01, momentum=0.9)

  def loss(p):
    logits = model.apply({"params": p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.broadcast_to(y, logits.shape[:2])).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=opts)
  def step(p, o):
    value, grads = jax.value_and_grad(loss)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  forward = jax.jit(lambda p, x: model.apply({"params": p}, x), compiler_options=opts)
  state = [params, tx.init(params)]

  def train():
    state[:] = step(*state)[:2]
    return state

  jax.block_until_ready(forward(params, x))
  jax.block_until_ready(train())
  return (lambda: forward(state[0], x)), train


def bench_models(widths: list[float], batch: int, reps: int, with_xla: bool) -> None:
  """All configurations compiled first, then timed in interleaved rounds (the machine is shared)."""
  print(f"\n# CIFAR VGG-16 slave, 32x32, batch {batch}: forward / train-step images/s "
        f"(best of {reps} interleaved rounds)")
  policies = [("cpu", CPU_POLICY)] + ([("xla", XLA_POLICY)] if with_xla else [])
  runs = {(w, k, n): model_steps(w, batch, k, p) for w in widths for k in (1, 3) for n, p in policies}
  best = {key: [float("inf"), float("inf")] for key in runs}
  for _ in range(reps):
    for key, fns in runs.items():
      for i, f in enumerate(fns):
        t = time.perf_counter()
        jax.block_until_ready(f())
        best[key][i] = min(best[key][i], time.perf_counter() - t)
  for (w, k, n), (fwd, train) in best.items():
    print(f"width {w:<4} K={k} {n}: forward {batch / fwd:7.1f} img/s   train step {batch / train:6.1f} img/s")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--only", choices=["layers", "models"])
  ap.add_argument("--batch", type=int)
  ap.add_argument("--image", type=int, default=32, help="layers: input size (224: the ImageNet VGG-16's layers)")
  ap.add_argument("--ynn", action="store_true", help="layers: XLA's default YNNPACK convs instead of Eigen")
  ap.add_argument("--reps", type=int)
  ap.add_argument("--xla", action="store_true", help="also time the models with plain XLA convs")
  a = ap.parse_args()
  batch = a.batch or (32 if a.quick else 128)
  reps = a.reps or (2 if a.quick else 3)
  widths = [0.25] if a.quick else [1.0, 0.25]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
  if a.only in (None, "layers"):
    bench_layers(batch, widths[0], reps, a.image, a.ynn)
  if a.only in (None, "models"):
    bench_models(widths, batch, reps, a.xla)


if __name__ == "__main__":
  main()
