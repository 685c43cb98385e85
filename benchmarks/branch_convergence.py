"""Are the branches trained long enough? The oracle over runs that differ only in branch steps, paired.

Each run is a workdir (or a collected `benchmarks/results/...` folder) whose eval/correct/ holds the oracle,
MS and baseline per image on the same test records; the runs share the baseline, so every difference is
the branches'. Prints a markdown table: oracle and MS top-1 on the given specs, oracle % change at
JPEG-10, and each run minus the previous one with its 95% paired bootstrap interval.

  python benchmarks/branch_convergence.py --run 1500=benchmarks/results/reproduction/seed0-branch1500 \
      --run 3000=runs/branch3000 --run 6000=runs/branch6000 [--specs jpeg:10,jpeg:5,jp2k:24]
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Mapping

import numpy as np

from msnet.report import stats

RESAMPLES = 2000


def _fmt(ci: Mapping[str, float], scale: float = 100.0, sign: bool = False) -> str:
  f = "{:+.2f}" if sign else "{:.2f}"
  return f"{f.format(scale * ci['point'])} [{f.format(scale * ci['lo'])}, {f.format(scale * ci['hi'])}]"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                      help="a run's label (e.g. its branch steps) and its workdir; in training order")
  parser.add_argument("--specs", default="jpeg:10,jpeg:5,jp2k:24", help="specs to tabulate (comma-separated)")
  args = parser.parse_args()
  runs = dict(r.split("=", 1) for r in args.run)
  if len(runs) < 2:
    parser.error("give at least two --run LABEL=DIR")
  specs = args.specs.split(",")
  correct = {}
  for label, d in runs.items():
    per = stats.load_correct(pathlib.Path(d) / "eval")
    for method in ("oracle", "ms", "baseline"):
      for spec in ("clean", *specs):
        if (method, spec) not in per:
          raise SystemExit(f"{d}: no per-image results for {method} on {spec} (run msnet evaluate with it)")
        correct[(label, method, spec)] = per[(method, spec)]
  base = [correct[(label, "baseline", "jpeg:10")] for label in runs]
  if any(not np.array_equal(base[0], b) for b in base[1:]):
    raise SystemExit("the runs' baselines differ on jpeg:10: they are not the same baseline, so the "
                     "differences would not be the branches'")
  boot = stats.paired_bootstrap(correct, resamples=RESAMPLES, seed=0)
  labels = list(runs)
  first = labels[0]
  c, d = (first, "baseline", "clean"), (first, "baseline", "jpeg:10")

  def pct(label: str):
    return lambda a: stats.pct_change(a[c], a[d], a[(label, "oracle", "jpeg:10")])

  print(f"Paired over the same {boot.n:,} test images ({RESAMPLES:,} bootstrap resamples, 95%); top-1 %.\n")
  print("| branch steps | " + " | ".join(f"oracle / MS, {s}" for s in specs) + " | oracle % change, JPEG-10 |")
  print("|---" * (len(specs) + 2) + "|")
  for label in labels:
    cells = [f"{100 * boot.point[(label, 'oracle', s)]:.2f} / {100 * boot.point[(label, 'ms', s)]:.2f}"
             for s in specs]
    print(f"| {label} | " + " | ".join(cells) + f" | {_fmt(boot.interval(pct(label)), 1.0)} |")
  for prev, label in zip(labels, labels[1:]):
    diffs = [_fmt(boot.interval(lambda a, s=s: a[(label, "oracle", s)] - a[(prev, "oracle", s)]), sign=True)
             for s in specs]
    gain = boot.interval(lambda a: pct(label)(a) - pct(prev)(a))
    print(f"| {label} - {prev} (oracle) | " + " | ".join(diffs) + f" | {_fmt(gain, 1.0, sign=True)} |")


if __name__ == "__main__":
  main()
