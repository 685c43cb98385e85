"""Decision-rule cost: baseline vs AMS vs MS vs MAP, and two formulations of MS, on this machine (CPU).

  python benchmarks/bench_decision.py            # full run (~6 min): width 1.0 batch 32-256, 0.25 batch 32-512; K=3, 5
  python benchmarks/bench_decision.py --quick    # smoke run: width 0.25, batch 32 and 64, 1 round
  python benchmarks/bench_decision.py --widths 1.0 --batches 64,128 --reps 5 [--out PATH]

Issue 6 asks what the master-slave rules cost over the single network, and whether MS should compute all K
branches and select (what msnet does: the slave's vmapped branches, then decision.ms) or dispatch each
example only to the branch its master picks. Every jitted function maps uint8 images [B,32,32,3] to class
probabilities and top-1 labels on the CIFAR VGG-16 (norm none, trunk conv1_1-conv4_3, branch conv5 + head):
  baseline     slave K=1, softmax, argmax
  ams          slave K, decision.ams
  ms_all       slave K + master, decision.ms (all K branches computed, one selected)
  ms_disp_full dispatch: trunk once, master bins, examples sorted by bin and scattered into [K, cap=B]
               padded groups, each branch run (vmap) on its own group, logits gathered back. Exact for any
               bins; computes the same K*B branch rows as ms_all, plus the shuffling.
  ms_disp_bal  the same with cap=ceil(B/K): exact only while no bin gets more than B/K examples (else the
               overflow rows come back NaN); the best case dispatch could reach with balanced bins.
  map          slave K + master, decision.map_rule
  master       the master alone (for the target MS/MAP <= AMS + master)
Both dispatch variants are checked equal (to float tolerance) to decision.oracle on the computed-all
branches before timing (batch <= 128), with random bins (cap=B) and balanced bins (cap=B/K). The machine
is shared and noisy (../shared/reference/cpu-performance.md): all functions of a width are compiled first
and then timed in interleaved rounds; figures are medians.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from common import write_results  # noqa: E402
from msnet import config, decision  # noqa: E402
from msnet.models import (CPU_POLICY, Slave, build_master, build_slave, compiler_options,  # noqa: E402
                          flops_per_image)
from msnet.models.layers import Stack  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decision.json")
Array = jax.Array
MIN_CALL_S = 0.05  # a timed sample repeats fast calls until it lasts about this long (timer noise)
CHECK_MAX_BATCH = 128  # dispatch == compute-all is checked up to this batch (the check runs K full slaves)
# Default batches per width: batch 512 at width 1.0 doubles the run (~2 s a call) and is left to --batches.
DEFAULT_BATCHES = {1.0: [32, 64, 128, 256], 0.25: [32, 64, 128, 256, 512]}


def build(width: float, k: int, key: int) -> tuple[Slave, dict, float]:
  """A CIFAR VGG-16 slave with k distinct branches (own init), its params, forward GFLOP/image."""
  cfg = config.base_config().model
  cfg.width, cfg.norm = width, "none"
  model = build_slave(cfg, 10, k, policy=CPU_POLICY)
  x = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  params = jax.jit(model.init)(jax.random.key(key, impl="rbg"), x)["params"]
  return model, params, flops_per_image(model, params, 32) / 1e9


def dispatch_logits(model: Slave, params: dict, x: Array, bins: Array, cap: int) -> Array:
  """Branch logits [B, C] of each example's own bin, computing each branch only on its (padded) group.

  Sort by bin, place example i of bin k at row k*cap + i of a [K*cap, ...] buffer (rows past cap are
  dropped), run branch k on rows k*cap:(k+1)*cap via vmap over the stacked branch params, gather back.
  """
  k = model.num_branches
  feats = model.apply({"params": params}, x, method=Slave.trunk_features)
  b = feats.shape[0]
  bins = bins.astype(jnp.int32)
  order = jnp.argsort(bins, stable=True)
  sorted_bins = bins[order]
  counts = jnp.bincount(bins, length=k)
  pos = jnp.arange(b) - (jnp.cumsum(counts) - counts)[sorted_bins]
  slot = jnp.where(pos < cap, sorted_bins * cap + pos, k * cap)  # k*cap: out of range -> dropped / NaN
  groups = jnp.zeros((k * cap, *feats.shape[1:]), feats.dtype).at[slot].set(feats[order], mode="drop")
  branch = Stack(model.table[model.trunk_size:], norm=model.norm, dtype=model.dtype, policy=model.policy)
  logits = jax.vmap(lambda p, f: branch.apply({"params": p}, f))(
      params["branches"], groups.reshape(k, cap, *feats.shape[1:])).astype(jnp.float32)
  picked = logits.reshape(k * cap, -1).at[slot].get(mode="fill", fill_value=jnp.nan)
  return jnp.zeros_like(picked).at[order].set(picked)


def rule_fns(k: int, width: float, batch: int, base: tuple, slave: tuple, master: tuple
             ) -> dict[str, Callable[[Array], tuple[Array, Array]]]:
  """name -> jitted f(x) = (probs [B, C], labels [B]) for the rules at this K (params closed over)."""
  base_model, base_params, _ = base
  model, params, _ = slave
  mmodel, mparams = master
  cap_bal = math.ceil(batch / k)

  def out(probs: Array) -> tuple[Array, Array]:
    return probs, jnp.argmax(probs, axis=-1)

  def bins(x: Array) -> Array:
    return jnp.argmax(mmodel.apply({"params": mparams}, x), axis=-1)

  fns = {
      "ams": lambda x: out(decision.ams(model.apply({"params": params}, x))),
      "ms_all": lambda x: out(decision.ms(model.apply({"params": params}, x), mmodel.apply({"params": mparams}, x))),
      "ms_disp_full": lambda x: out(jax.nn.softmax(dispatch_logits(model, params, x, bins(x), batch), axis=-1)),
      "ms_disp_bal": lambda x: out(jax.nn.softmax(dispatch_logits(model, params, x, bins(x), cap_bal), axis=-1)),
      "master": lambda x: (mmodel.apply({"params": mparams}, x), bins(x)),
  }
  if k == 3:
    fns["baseline"] = lambda x: out(jax.nn.softmax(base_model.apply({"params": base_params}, x)[0], axis=-1))
    fns["map"] = lambda x: out(decision.map_rule(model.apply({"params": params}, x),
                                                 mmodel.apply({"params": mparams}, x)))
  return {name: jax.jit(f, compiler_options=compiler_options()) for name, f in fns.items()}


def check_dispatch(slave: tuple, batch: int, x: Array) -> float:
  """Max |dispatch - oracle(all branches)| over random bins (cap=B) and balanced bins (cap=B/K)."""
  model, params, _ = slave
  k = model.num_branches
  rng = np.random.default_rng(batch)
  all_logits = jax.jit(lambda x: model.apply({"params": params}, x))(x)
  err = 0.0
  for bins, cap in ((rng.integers(0, k, batch), batch), (rng.permutation(np.arange(batch) % k), math.ceil(batch / k))):
    bins = jnp.asarray(bins, jnp.int32)
    got = jax.nn.softmax(jax.jit(lambda x, b, c=cap: dispatch_logits(model, params, x, b, c))(x, bins), axis=-1)
    want = decision.oracle(all_logits, bins)
    if not bool(jnp.all(jnp.isfinite(got))):
      raise AssertionError(f"dispatch K={k} cap={cap} left NaN rows")
    err = max(err, float(jnp.max(jnp.abs(got - want))))
  if err > 1e-5:
    raise AssertionError(f"dispatch differs from computing all branches by {err:.2e} (K={k}, batch {batch})")
  return err


def bench_width(width: float, batches: list[int], ks: list[int], reps: int) -> list[dict]:
  """All rules of one width compiled and checked first, then timed in interleaved rounds."""
  base = build(width, 1, 0)
  slaves = {k: build(width, k, k) for k in ks}
  masters = {}
  for k in ks:
    mmodel = build_master(config.base_config().master, k, policy=CPU_POLICY)
    mparams = jax.jit(mmodel.init)(jax.random.key(100 + k, impl="rbg"), jnp.zeros((1, 32, 32, 3), jnp.uint8))
    masters[k] = (mmodel, mparams["params"], flops_per_image(mmodel, mparams["params"], 32) / 1e9)
  rng = np.random.default_rng(0)
  cases: dict[tuple[int, int, str], tuple[Callable, Array, int]] = {}
  extra: dict[tuple[int, int], dict] = {}
  for batch in batches:
    x = jnp.asarray(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
    for k in ks:
      t = time.perf_counter()
      fns = rule_fns(k, width, batch, base, slaves[k], masters[k][:2])
      for name, f in fns.items():
        f = f.lower(x).compile()  # compiled ahead: one warm call below, not two
        t1 = time.perf_counter()
        jax.block_until_ready(f(x))  # warms, and sizes the repeat count
        calls = max(1, math.ceil(MIN_CALL_S / max(time.perf_counter() - t1, 1e-6)))
        cases[(batch, k, name)] = (f, x, calls)
      bins = np.asarray(cases[(batch, k, "master")][0](x)[1])
      extra[(batch, k)] = dict(
          dispatch_max_abs_err=check_dispatch(slaves[k], batch, x) if batch <= CHECK_MAX_BATCH else None,
          master_bin_counts=np.bincount(bins, minlength=k).tolist(),
          ms_disp_bal_overflow=int(np.maximum(np.bincount(bins, minlength=k) - math.ceil(batch / k), 0).sum()),
          compile_s=time.perf_counter() - t)
      print(f"width {width} batch {batch} K={k}: compiled+checked in {extra[(batch, k)]['compile_s']:.1f} s "
            f"(dispatch max err {extra[(batch, k)]['dispatch_max_abs_err']})", flush=True)

  samples: dict[tuple[int, int, str], list[float]] = {key: [] for key in cases}
  for r in range(reps):
    for key, (f, x, n) in cases.items():
      t = time.perf_counter()
      for _ in range(n):
        jax.block_until_ready(f(x))
      samples[key].append((time.perf_counter() - t) / n)
    print(f"width {width}: round {r + 1}/{reps} done", flush=True)

  rows = []
  f1 = base[2]
  for batch in batches:
    for k in ks:
      fk, fm = slaves[k][2], masters[k][2]
      t = {name: statistics.median(samples[(batch, kk, name)]) for (b, kk, name) in cases if b == batch and kk == k}
      row = dict(width=width, batch=batch, K=k, img_s={n: batch / s for n, s in t.items()},
                 ms_per_batch={n: 1e3 * s for n, s in t.items()}, samples_s={n: samples[(batch, k, n)] for n in t},
                 gflop_per_image=dict(baseline=f1, slave=fk, master=fm), **extra[(batch, k)])
      base_t = statistics.median(samples[(batch, 3, "baseline")]) if 3 in ks else float("nan")
      row["ams_time_ratio"] = t["ams"] / base_t
      row["ams_flop_ratio"] = fk / f1
      row["ms_all_over_ams_plus_master"] = t["ms_all"] / (t["ams"] + t["master"])
      if "map" in t:
        row["map_over_ams_plus_master"] = t["map"] / (t["ams"] + t["master"])
      row["ms_winner"] = min(("ms_all", "ms_disp_full"), key=lambda n: t[n])
      rows.append(row)
  return rows


def print_table(rows: list[dict]) -> None:
  names = ["baseline", "ams", "ms_all", "ms_disp_full", "ms_disp_bal", "map", "master"]
  print("\n# images/s (median of rounds); AMS/baseline time vs FLOP ratio; MS, MAP time / (AMS + master)")
  print(f"{'width':>5}{'bs':>5}{'K':>3}" + "".join(f"{n:>13}" for n in names)
        + f"{'ams t/b':>9}{'ams F/b':>9}{'ms/(a+m)':>9}{'map/(a+m)':>10}  MS winner (exact forms)")
  for r in rows:
    cells = "".join(f"{r['img_s'][n]:>13.1f}" if n in r["img_s"] else f"{'-':>13}" for n in names)
    mp = f"{r['map_over_ams_plus_master']:>10.2f}" if "map_over_ams_plus_master" in r else f"{'-':>10}"
    print(f"{r['width']:>5}{r['batch']:>5}{r['K']:>3}{cells}{r['ams_time_ratio']:>9.2f}{r['ams_flop_ratio']:>9.3f}"
          f"{r['ms_all_over_ams_plus_master']:>9.2f}{mp}  {r['ms_winner']}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--widths", help="comma-separated (default 1.0,0.25; 0.25 with --quick)")
  ap.add_argument("--batches", help="comma-separated, every width (default 32-256 at width 1.0, 32-512 at 0.25)")
  ap.add_argument("--reps", type=int, help="interleaved rounds (default 5; 1 with --quick)")
  ap.add_argument("--out", default=RESULTS)
  a = ap.parse_args()
  widths = [float(w) for w in (a.widths or ("0.25" if a.quick else "1.0,0.25")).split(",")]
  batches = {w: [int(b) for b in a.batches.split(",")] if a.batches else
             [32, 64] if a.quick else DEFAULT_BATCHES.get(w, DEFAULT_BATCHES[0.25]) for w in widths}
  reps = a.reps or (1 if a.quick else 5)
  ks = [3, 5]
  print(f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs; batches per width {batches}, "
        f"K {ks}, {reps} rounds", flush=True)
  rows = []
  for width in widths:
    rows += bench_width(width, batches[width], ks, reps)
  print_table(rows)
  write_results(a.out, dict(jax=jax.__version__, cpus=os.cpu_count(), reps=reps, widths=widths, batches=batches,
                            ks=ks, rows=rows,
                            time="median over interleaved rounds; each sample repeats a call to last >= 50 ms"))


if __name__ == "__main__":
  main()
