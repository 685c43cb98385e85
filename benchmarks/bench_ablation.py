"""Each CPU speed-up of msnet.models.layers measured on its own, beside PyTorch, interleaved in one process.

  python benchmarks/bench_ablation.py                 # CIFAR VGG-16 bs128 forward + train, 5 rounds (~4 min)
  python benchmarks/bench_ablation.py --with224       # also the 224x224 VGG-16 forward at bs8 (~+3 min)
  python benchmarks/bench_ablation.py --reps 3 --out PATH

Issue 6 asks, for each change, the prediction and the measured effect. The variants add one change at a time:
  v0 "previous":  XLA's default (YNNPACK) convs; XLA forward/input-gradient convs (im2col on <= 2x2 maps),
                  chunked-im2col kernel gradient, nn.max_pool: the CPU path before this change set;
  v1 "+pool":     v0 with the block max pool (reshape + max, elementwise first-max gradient);
  v2 "+eigen":    v1 compiled with msnet's compiler_options() (Eigen convs instead of YNNPACK);
  v3 "+xla_dw":   v2 with XLA's own kernel gradient everywhere;
  v4 "+dot_bias": v3 with conv bias gradients as a ones-vector dot: the current CPU_POLICY.
Same model, data and timing as bench_vs_torch.py (float32, 2 torch threads); figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import model_steps  # noqa: E402
from common import write_results  # noqa: E402
from bench_vs_torch import TORCH_THREADS, forward_gflop, timed, torch_steps  # noqa: E402

from msnet.models import CPU_POLICY, compiler_options  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ablation.json")
PREVIOUS = dataclasses.replace(CPU_POLICY, fwd=((2, "im2col"), (1 << 30, "xla")), dx=((2, "im2col"), (1 << 30, "xla")),
                               dw=((1 << 30, "im2col"),), block_pool=False, dot_bias_grad=False)
POOL = dataclasses.replace(PREVIOUS, block_pool=True)
XLA_DW = dataclasses.replace(CPU_POLICY, dot_bias_grad=False)
# name -> (conv policy, XLA compiler options)
VARIANTS = {"v0_previous": (PREVIOUS, {}), "v1_pool": (POOL, {}), "v2_eigen": (POOL, compiler_options()),
            "v3_xla_dw": (XLA_DW, compiler_options()), "v4_dot_bias": (CPU_POLICY, compiler_options())}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--reps", type=int, default=5, help="interleaved rounds")
  ap.add_argument("--with224", action="store_true", help="also the 224x224 forward at batch 8")
  ap.add_argument("--out", default=RESULTS)
  a = ap.parse_args()

  import torch
  torch.set_num_threads(TORCH_THREADS)
  cases = [("cifar32_bs128", dict(variant="cifar", size=32, batch=128, classes=10, fc=512), ("forward", "train"))]
  if a.with224:
    cases.append(("imagenet224_bs8", dict(variant="imagenet", size=224, batch=8, classes=1000, fc=4096),
                  ("forward",)))
  runs: dict[tuple[str, str], dict] = {}
  gflop = {}
  for key, c, modes in cases:
    for name, (policy, opts) in VARIANTS.items():
      fwd, train = model_steps(1.0, c["batch"], 1, policy, variant=c["variant"], size=c["size"],
                               classes=c["classes"], fc_width=c["fc"], xla_options=opts)
      for mode, fn in (("forward", fwd), ("train", train)):
        if mode in modes:
          runs.setdefault((key, mode), {})[name] = fn
    tfwd, ttrain = torch_steps(c["size"], c["batch"], c["classes"], c["fc"])
    tfwd()
    runs[(key, "forward")]["torch"] = tfwd
    if "train" in modes:
      ttrain()
      runs[(key, "train")]["torch"] = ttrain
    gflop[key] = forward_gflop(c["variant"], c["size"], c["classes"], c["fc"])
    print(f"built {key}", flush=True)

  times = {(k, m, n): [] for (k, m), fns in runs.items() for n in fns}
  for r in range(a.reps):
    for (key, mode), fns in runs.items():
      names = list(fns) if r % 2 == 0 else list(fns)[::-1]
      for name in names:
        times[(key, mode, name)].append(timed(fns[name], name != "torch"))
    print(f"round {r + 1}/{a.reps} done", flush=True)

  rows = []
  batch = {key: c["batch"] for key, c, _ in cases}
  print(f"\n{'case':<16}{'mode':<9}{'variant':<13}{'img/s':>8}{'GFLOP/s':>9}{'vs torch':>9}{'vs prev':>9}")
  for (key, mode), fns in runs.items():
    torch_t = statistics.median(times[(key, mode, "torch")])
    prev_t = None
    for name in fns:
      t = statistics.median(times[(key, mode, name)])
      g = gflop[key] * (3 if mode == "train" else 1)
      row = dict(case=key, mode=mode, variant=name, img_s=batch[key] / t, gflop_s=batch[key] * g / t,
                 ratio_vs_torch=torch_t / t, speedup_vs_previous_variant=(prev_t / t) if prev_t and name != "torch" else None,
                 times_s=times[(key, mode, name)])
      rows.append(row)
      step = f"{row['speedup_vs_previous_variant']:.2f}x" if row["speedup_vs_previous_variant"] else ""
      print(f"{key:<16}{mode:<9}{name:<13}{row['img_s']:>8.1f}{row['gflop_s']:>9.0f}"
            f"{row['ratio_vs_torch']:>8.2f}x{step:>9}")
      prev_t = t if name != "torch" else prev_t
  write_results(a.out, dict(reps=a.reps, jax=jax.__version__, torch=torch.__version__,
                            variants={n: repr(v) for n, v in VARIANTS.items()}, rows=rows,
                            time="median over interleaved rounds"))


if __name__ == "__main__":
  main()
