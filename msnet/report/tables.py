"""The numbers of the report, computed from result rows only: Table 1, corruption errors, the master, claims.

Everything here is plain Python over the rows of W/eval/results.json (see msnet/evaluate/__init__.py for their
fields), so a report can be rebuilt on a laptop without JAX or the models.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

Row = dict[str, Any]

CLEAN_SPEC = "clean"
JPEG10_SPEC = "jpeg:10"

# The paper's Table 1 (Ghosh et al. 2018, ImageNet val, 50,000 images, top-1 %). Reference values only:
# ST used Inception and DC its own base network, so their c, d differ from VGG-16's.
PAPER_TABLE1 = (
    # method, c, d, c', d', % change
    ("DA, fc8", 70.2, 61.2, 70.3, 63.0, 19.8),
    ("DA, fc6-7", 70.2, 61.2, 70.5, 63.5, 25.3),
    ("DA, fc6-8", 70.2, 61.2, 69.3, 64.4, 35.7),
    ("Stability training", 77.8, 61.1, 77.9, 67.9, 40.0),
    ("MS", 70.2, 61.2, 70.3, 66.7, 60.5),
    ("AMS", 70.2, 61.2, 70.2, 66.0, 52.5),
    ("DeepCloak", 58.2, 54.0, 54.8, 52.2, None),
)

# Our method names next to the paper's, for the side-by-side table.
PAPER_NAMES = {"da_fc8": "DA, fc8", "da_fc67": "DA, fc6-7", "da_fc678": "DA, fc6-8",
               "stability": "Stability training", "ms": "MS", "ams": "AMS", "deepcloak": "DeepCloak"}

DA_METHODS = ("da_fc8", "da_fc67", "da_fc678")
# Fig. 1b's comparison network, not a robustness method: not in Table 1 nor in the claims.
NOT_IN_TABLE1 = ("alexnet_baseline",)


def index(rows: Iterable[Row]) -> dict[tuple[str, str], Row]:
  """(method, spec) -> row."""
  return {(r["method"], r["spec"]): r for r in rows}


def methods_in(rows: Sequence[Row]) -> list[str]:
  """Methods in order of first appearance."""
  return list(dict.fromkeys(r["method"] for r in rows))


def pct_change(c: float, d: float, d_prime: float) -> float:
  """The paper's % change (d' - d) / (c - d), in percent; NaN when the baseline does not degrade (c <= d)."""
  return 100.0 * (d_prime - d) / (c - d) if c > d else math.nan


def table1(rows: Sequence[Row]) -> list[dict[str, Any]]:
  """Clean and JPEG-10 top-1 (percent) of every robustness method against the baseline's; [] without the
  baseline."""
  idx = index(rows)
  base_c, base_d = idx.get(("baseline", CLEAN_SPEC)), idx.get(("baseline", JPEG10_SPEC))
  if base_c is None or base_d is None:
    return []
  c, d = 100.0 * base_c["top1"], 100.0 * base_d["top1"]
  out = []
  for m in methods_in(rows):
    rc, rd = idx.get((m, CLEAN_SPEC)), idx.get((m, JPEG10_SPEC))
    if m in NOT_IN_TABLE1:
      continue
    if rc is None or rd is None:
      continue
    c_prime, d_prime = 100.0 * rc["top1"], 100.0 * rd["top1"]
    out.append(dict(method=m, c=c, d=d, c_prime=c_prime, d_prime=d_prime, pct_change=pct_change(c, d, d_prime)))
  return out


def single_rows(rows: Sequence[Row], method: str, kind: str) -> list[Row]:
  """The method's rows of one single degradation kind (no earlier op in the chain), ordered by level."""
  return sorted((r for r in rows if r["method"] == method and r["kind"] == kind and not r["pre"]), key=x_of)


def x_of(row: Row) -> float:
  """A row's position on its sweep's axis: the codec level for compressed specs, else the last op's level."""
  v = row["codec_level"] if row["codec"] else row["level"]
  return -math.inf if v is None else float(v)


def corruption_errors(rows: Sequence[Row], sweeps: dict[str, list[str]],
                      reference: str = "baseline") -> list[dict[str, Any]]:
  """CE and relative CE per (method, sweep) with the baseline as normaliser (Hendrycks & Dietterich's form).

  CE = sum_s err_m(s) / sum_s err_ref(s); relative CE subtracts each network's own clean error from every
  term. Sweeps that are only the clean spec are not degradation families. Methods lacking a spec of a sweep
  get no entry for it.
  """
  idx = index(rows)
  out = []
  for m in methods_in(rows):
    clean_m, clean_r = idx.get((m, CLEAN_SPEC)), idx.get((reference, CLEAN_SPEC))
    for name, specs in sweeps.items():
      if all(s == CLEAN_SPEC for s in specs):
        continue
      pairs = [(idx.get((m, s)), idx.get((reference, s))) for s in specs]
      if any(a is None or b is None for a, b in pairs):
        continue
      err_m = [1.0 - a["top1"] for a, _ in pairs]
      err_r = [1.0 - b["top1"] for _, b in pairs]
      ce = sum(err_m) / sum(err_r) if sum(err_r) > 0 else math.nan
      rce = math.nan
      if clean_m is not None and clean_r is not None:
        num = sum(e - (1.0 - clean_m["top1"]) for e in err_m)
        den = sum(e - (1.0 - clean_r["top1"]) for e in err_r)
        rce = num / den if den > 0 else math.nan
      out.append(dict(method=m, sweep=name, ce=ce, rce=rce, mean_err=sum(err_m) / len(err_m)))
  return out


def mean_ce(ce_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """mCE and relative mCE per method: means over the sweeps the method has (NaN terms left out)."""
  out = []
  for m in dict.fromkeys(r["method"] for r in ce_rows):
    mine = [r for r in ce_rows if r["method"] == m]
    ce = [r["ce"] for r in mine if not math.isnan(r["ce"])]
    rce = [r["rce"] for r in mine if not math.isnan(r["rce"])]
    out.append(dict(method=m, mce=sum(ce) / len(ce) if ce else math.nan,
                    rmce=sum(rce) / len(rce) if rce else math.nan, sweeps=len(mine)))
  return out


def master_summary(master: dict[str, Any]) -> dict[str, Any]:
  """Per-spec bin accuracies and the confusion matrices summed over all specs."""
  bins = master["bins"]
  k = len(bins)
  total = {"master": [[0] * k for _ in range(k)], "bitstream": [[0] * k for _ in range(k)]}
  per_spec = []
  for spec, cell in master["specs"].items():
    per_spec.append(dict(spec=spec, n=cell["n"], true_bin=cell["true_bin"],
                         master=cell["master_accuracy"], bitstream=cell["bitstream_accuracy"]))
    for key in ("master", "bitstream"):
      conf = cell[f"{key}_confusion"]
      if conf is not None:
        for i in range(k):
          for j in range(k):
            total[key][i][j] += conf[i][j]
  acc = {}
  for key, conf in total.items():
    n = sum(map(sum, conf))
    acc[key] = sum(conf[i][i] for i in range(k)) / n if n else math.nan
  has_master = any(c["master_confusion"] is not None for c in master["specs"].values())
  return dict(bins=bins, per_spec=per_spec, confusion=total, accuracy=acc, has_master=has_master)


WALL_KEYS = ("wall_time_s", "wall_s")
# DONE.json fields shown beside the wall time when a stage has them.
DONE_COLUMNS = ("steps", "epochs", "images_per_s", "val_accuracy", "resumed_from_step")


def wall_times(train_dir: pathlib.Path) -> list[dict[str, Any]]:
  """Stage name, wall time and the other scalar fields of every W/train/<stage>/DONE.json."""
  out = []
  if not train_dir.is_dir():
    return out
  for done in sorted(train_dir.glob("*/DONE.json")):
    info = json.loads(done.read_text())
    wall = next((float(info[k]) for k in WALL_KEYS if isinstance(info.get(k), (int, float))), math.nan)
    extras = {k: info[k] for k in DONE_COLUMNS if isinstance(info.get(k), (int, float))}
    out.append(dict(stage=done.parent.name, wall_s=wall, **extras))
  return out


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
  """Piecewise-linear interpolation over increasing xs."""
  for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
    if x0 <= x <= x1:
      return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
  raise ValueError(f"{x} outside [{xs[0]}, {xs[-1]}]")


def top1(row: Row) -> float:
  return row["top1"]


def accuracy_at_equal_psnr(rows: Sequence[Row], method: str, kind_a: str, kind_b: str, points: int = 20,
                           acc: Callable[[Row], Any] = top1) -> dict[str, Any] | None:
  """Mean top-1 of two single degradations over the PSNR range both sweeps cover (interpolated).

  acc gives a row's accuracy: its top1, or a NumPy array of it over bootstrap resamples (the means are
  linear in it, so they come out as arrays too).
  """
  curves = []
  for kind in (kind_a, kind_b):
    pts = sorted(((r["psnr"], acc(r)) for r in single_rows(rows, method, kind)
                  if r["psnr"] is not None and math.isfinite(r["psnr"])), key=lambda p: p[0])
    if len(pts) < 2:
      return None
    curves.append(pts)
  lo = max(c[0][0] for c in curves)
  hi = min(c[-1][0] for c in curves)
  if lo >= hi:
    return None
  grid = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
  means = []
  for pts in curves:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    means.append(sum(_interp(xs, ys, g) for g in grid) / points)
  return dict(lo=lo, hi=hi, mean_a=means[0], mean_b=means[1])


def combined_fit(rows: Sequence[Row], method: str = "baseline", acc: Callable[[Row], Any] = top1
                 ) -> list[dict[str, Any]]:
  """For each combined chain (pre-degradation + codec): how well two models predict its accuracy.

  "worse-of-two": min(acc(pre alone), acc(codec alone)); "additive": acc(codec alone) - (acc(clean) -
  acc(pre alone)), i.e. the two drops add up. Mean absolute error in top-1 points over the levels whose
  codec-alone spec was evaluated. acc as in accuracy_at_equal_psnr.
  """
  idx = index(rows)
  clean = idx.get((method, CLEAN_SPEC))
  groups: dict[tuple[str, str], list[Row]] = {}
  for r in rows:
    if r["method"] == method and r["pre"] and r["codec"]:
      groups.setdefault((r["pre"], r["codec"]), []).append(r)
  out = []
  for (pre, codec), chain in sorted(groups.items()):
    alone_pre = idx.get((method, pre))
    alone = {(x_of(r)): r for r in single_rows(rows, method, chain[0]["kind"])}
    pairs = [(r, alone.get(x_of(r))) for r in chain]
    pairs = [(r, a) for r, a in pairs if a is not None]
    if alone_pre is None or clean is None or not pairs:
      continue
    worse, additive = [], []
    for r, a in pairs:
      worse.append(np.abs(acc(r) - np.minimum(acc(alone_pre), acc(a))))
      additive.append(np.abs(acc(r) - (acc(a) - (acc(clean) - acc(alone_pre)))))
    out.append(dict(pre=pre, codec=codec, levels=len(pairs),
                    mae_worse=100.0 * sum(worse) / len(worse), mae_additive=100.0 * sum(additive) / len(additive)))
  return out


def fmt(v: Any, digits: int = 1) -> str:
  """A number for a table: fixed digits, '-' for missing or NaN."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  if isinstance(v, float):
    return f"{v:.{digits}f}"
  return str(v)


def ci_text(ci: Mapping[str, float], digits: int = 1) -> str:
  """'[lo, hi]' of an interval; 'unbounded' when a side is infinite (e.g. % change undefined in resamples)."""
  if math.isnan(ci["lo"]) or math.isnan(ci["hi"]):
    return "-"
  if math.isinf(ci["lo"]) or math.isinf(ci["hi"]):
    return "unbounded"
  return f"[{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


def markdown(header: Sequence[str], body: Iterable[Sequence[Any]], digits: int = 1) -> str:
  """A GitHub markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for row in body:
    lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
  return "\n".join(lines)
