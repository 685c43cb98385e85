"""The measurement the web codecs' bins are chosen from (configs/cifar10_web.py).

  msnet degrade  --config=configs/cifar10_web.py:measure --workdir=W
  msnet evaluate --config=configs/cifar10_web.py:measure --workdir=W     # the baseline alone, every sweep
  python benchmarks/web_bins.py --workdir=W [--out benchmarks/results/web/bins.json]

Per single-codec spec of the test split: the baseline's top-1 with its 95% Wilson interval, its drop from
clean, the mean PSNR and the mean and median bits per pixel of the files (read from every record). The JPEG
bin's training range (JPEG 5-20) sets the target: a web codec's bin holds the levels whose drop lies within
[drop at jpeg:20, drop at jpeg:5] or beyond it (the codec's strong end), and its rate rule ends at the
geometric mean of the median bpp of its weakest level in the bin and of the strongest level outside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

import numpy as np

from msnet import degradations
from msnet.data import shards

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[1]
WEB = ("webp", "avif", "jxl")


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", type=pathlib.Path, required=True)
  ap.add_argument("--split", default="test")
  ap.add_argument("--out", type=pathlib.Path, default=_REPO / "benchmarks/results/web/bins.json")
  args = ap.parse_args(argv)
  results = json.loads((args.workdir / "eval" / "results.json").read_text())
  base = {r["spec"]: r for r in results["rows"] if r["method"] == "baseline" and r["top1"] is not None}
  clean = base["clean"]["top1"]
  rows = []
  for spec, r in base.items():
    codec = degradations.parse(spec).last_codec
    if codec is None or len(degradations.parse(spec).ops) != 1:
      continue
    source = shards.open_shards(shards.spec_dir(args.workdir, args.split, spec))
    bpp = np.array([source[i]["bpp"] for i in range(len(source))])
    rows.append(dict(spec=spec, codec=codec.codec, level=codec.level, top1=100 * r["top1"],
                     lo=100 * r["ci95_low"], hi=100 * r["ci95_high"], drop=100 * (clean - r["top1"]),
                     psnr=r["psnr"], mean_bpp=float(bpp.mean()), median_bpp=float(np.median(bpp))))
  rows.sort(key=lambda r: (r["codec"], r["level"]))
  by_spec = {r["spec"]: r for r in rows}
  target = (by_spec["jpeg:20"]["drop"], by_spec["jpeg:5"]["drop"])
  chosen = {}
  for codec in WEB:
    ours = [r for r in rows if r["codec"] == codec]
    inside = [r for r in ours if r["drop"] >= target[0]]
    outside = [r for r in ours if r["drop"] < target[0]]
    if inside and outside:
      weakest = max(inside, key=lambda r: r["median_bpp"])
      nearest = min(outside, key=lambda r: r["median_bpp"])
      edge = math.sqrt(weakest["median_bpp"] * nearest["median_bpp"])
      chosen[codec] = dict(levels=[r["spec"] for r in inside], weakest=weakest["spec"], next=nearest["spec"],
                           rate_rule=f"{codec}@bpp:0-{edge:.2f}")
  print(f"clean top-1 {100 * clean:.2f}%; JPEG 5-20 drop {target[0]:.1f} to {target[1]:.1f} points\n")
  print(f"{'spec':<10} {'top-1 % [95% CI]':>22} {'drop':>6} {'PSNR':>6} {'mean bpp':>9} {'median bpp':>11}")
  for r in rows:
    print(f"{r['spec']:<10} {r['top1']:>7.2f} [{r['lo']:5.2f}, {r['hi']:5.2f}] {r['drop']:>6.1f} {r['psnr']:>6.2f} "
          f"{r['mean_bpp']:>9.2f} {r['median_bpp']:>11.2f}")
  print("\nchosen:", json.dumps(chosen, indent=1))
  write_results(args.out, dict(clean_top1=100 * clean, jpeg_5_20_drop=list(target), rows=rows, chosen=chosen,
                               workdir=str(args.workdir), note="test split, baseline only; drops in points"))


if __name__ == "__main__":
  main()
