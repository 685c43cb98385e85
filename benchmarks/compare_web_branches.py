"""One branch per web codec, or one shared by WebP, AVIF and JPEG XL: which gets more back per training FLOP.

  msnet run --config=configs/cifar10_web.py --workdir=W               # a branch each (3 x stages.branch.steps)
  msnet run --config=configs/cifar10_web.py:shared --workdir=W2       # one branch (1 x), the same baseline
  python benchmarks/compare_web_branches.py --per-codec W --shared W2 [--out benchmarks/results/web/branches.json]

Both runs evaluate the same 10,000 test images with the same baseline, so each difference is paired over the
images: per spec of the web bins, oracle and MS top-1 (per-codec minus shared) with a 95% paired bootstrap
interval, and the same over the mean of all those specs. The branches' training FLOPs are in the ratio 3:1
(each branch trains `stages.branch.steps` steps of the same size); at inference MS runs one branch per image in
both. A difference whose interval holds 0 is undecided; the baseline's difference is 0 when the two runs share
their baseline and test records, a check.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from msnet import config as config_lib, degradations
from msnet.report import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[1]
WEB = ("webp", "avif", "jxl")
METHODS = ("oracle", "ms", "baseline")


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--per-codec", type=pathlib.Path, required=True)
  ap.add_argument("--shared", type=pathlib.Path, required=True)
  ap.add_argument("--out", type=pathlib.Path, default=_REPO / "benchmarks/results/web/branches.json")
  args = ap.parse_args(argv)
  config = config_lib.config_file(_REPO / "configs/cifar10_web.py")
  rules = [list(b.match) for b in config.bins]
  runs = {"per_codec": stats.load_correct(args.per_codec / "eval"), "shared": stats.load_correct(args.shared / "eval")}
  specs = sorted({s for (m, s) in runs["shared"] if m == "oracle" and (m, s) in runs["per_codec"]
                  and (op := degradations.parse(s).last_codec) is not None and op.codec in WEB
                  and len(degradations.parse(s).ops) == 1 and degradations.bin_of(s, rules) != 0})
  cells = {(f"{m}@{run}", s): runs[run][(m, s)] for run in runs for m in METHODS for s in specs}
  boot = stats.paired_bootstrap(cells, resamples=2000, seed=0)
  rows = []
  for s in [*specs, "mean"]:
    row = {"spec": s}
    for m in METHODS:
      def diff(a, m=m, s=s):
        use = specs if s == "mean" else [s]
        return 100.0 * sum(a[(f"{m}@per_codec", x)] - a[(f"{m}@shared", x)] for x in use) / len(use)
      ci = boot.interval(diff)
      verdict = "per-codec better" if ci["lo"] > 0 else "shared better" if ci["hi"] < 0 else "undecided"
      row[m] = dict(point=ci["point"], lo=ci["lo"], hi=ci["hi"], verdict=verdict)
      if s != "mean":
        row[f"{m}_top1"] = {run: 100.0 * boot.point[(f"{m}@{run}", s)] for run in runs}
    rows.append(row)
  print(f"{'spec':<10} " + " ".join(f"{m + ' per-codec - shared':>36}" for m in METHODS))
  for r in rows:
    print(f"{r['spec']:<10} " + " ".join(f"{r[m]['point']:+6.2f} [{r[m]['lo']:+6.2f}, {r[m]['hi']:+6.2f}] "
                                         f"{r[m]['verdict']:>14}" for m in METHODS))
  write_results(args.out, dict(rows=rows, specs=specs, training_flops_ratio="3:1 (per-codec : shared)",
                               per_codec=str(args.per_codec), shared=str(args.shared)))


if __name__ == "__main__":
  main()
