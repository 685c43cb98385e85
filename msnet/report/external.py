"""The report's tables of the external benchmark sets (`msnet evaluate --external`, W/eval/external/<name>/).

Per set: top-1 per method and corruption (the mean over its severities), CE per corruption and mCE as Hendrycks &
Dietterich define them, CE_c = sum_s err_method(c, s) / sum_s err_normaliser(c, s), normalised by this workdir's
AlexNet baseline when that stage was evaluated on the set (their normaliser), otherwise by the baseline (said
so: such a CE is not comparable with published numbers). mCE averages the CE of the 15 standard corruptions; the
extra ones (speckle_noise, gaussian_blur, spatter, saturate) are tabulated but left out of it, as the paper
does, unless the set has nothing else. Plain Python over the result rows, like the rest of the report.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Sequence

from msnet.report import tables
from msnet.report.sections import plural, write_csv

Row = dict[str, Any]
EXTERNAL_DIR = "external"  # W/eval/external/<name>/results.json, written by msnet.evaluate.external
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
NORMALISERS = ("alexnet_baseline", "baseline")  # in order of preference
CSV_FIELDS = ("method", "corruption", "top1", "ce", "severities", "normaliser")
MEAN = "mean"  # the CSV's corruption for a method's mean top-1 over corruptions and its mCE


def normaliser(rows: Sequence[Row], sweeps: dict[str, list[str]]) -> str | None:
  """The AlexNet baseline when it has every cell of the set, else the baseline, else None."""
  have = {(r["method"], r["spec"]) for r in rows}
  specs = [s for cells in sweeps.values() for s in cells]
  return next((m for m in NORMALISERS if all((m, s) in have for s in specs)), None)


def external_table(rows: Sequence[Row], sweeps: dict[str, list[str]]) -> tuple[list[dict[str, Any]], str | None]:
  """CSV rows (CSV_FIELDS) per (method, corruption) and a `MEAN` row per method (mean top-1, mCE), and the
  normaliser used (None: no CE)."""
  norm = normaliser(rows, sweeps)
  ce = {(r["method"], r["sweep"]): r["ce"] for r in tables.corruption_errors(rows, sweeps, norm)} if norm else {}
  standard = [c for c in sweeps if c not in EXTRA_CORRUPTIONS] or list(sweeps)
  idx = tables.index(rows)
  out = []
  for m in tables.methods_in(rows):
    top1 = {c: [idx[(m, s)]["top1"] for s in specs if (m, s) in idx] for c, specs in sweeps.items()}
    mine = [dict(method=m, corruption=c, top1=sum(v) / len(v), ce=ce.get((m, c), math.nan), severities=len(v),
                 normaliser=norm or "") for c, v in top1.items() if len(v) == len(sweeps[c])]
    if not mine:
      continue
    mce = [r["ce"] for r in mine if r["corruption"] in standard and not math.isnan(r["ce"])]
    out += mine + [dict(method=m, corruption=MEAN, top1=sum(r["top1"] for r in mine) / len(mine),
                        ce=sum(mce) / len(mce) if mce else math.nan, severities=sum(r["severities"] for r in mine),
                        normaliser=norm or "")]
  return out, norm


def external_sections(eval_dir: pathlib.Path, out: pathlib.Path) -> list[str]:
  """A section per W/eval/external/<name>/results.json; writes W/report/external_<name>.csv for each."""
  lines: list[str] = []
  for path in sorted((eval_dir / EXTERNAL_DIR).glob("*/results.json")):
    results = json.loads(path.read_text())
    lines += _section(results["rows"], results["meta"], out)
  return lines


def _section(rows: Sequence[Row], meta: dict[str, Any], out: pathlib.Path) -> list[str]:
  rows = [r for r in rows if r["top1"] is not None]
  sweeps, name = meta["sweeps"], meta["name"]
  table, norm = external_table(rows, sweeps)
  csv_name = f"external_{name}.csv"
  write_csv(out / csv_name, CSV_FIELDS, table)
  sizes = sorted({int(r["n"]) for r in rows})
  skipped = sum((meta.get("skipped") or {}).values())
  lines = [f"## External set `{name}`", "",
           f"`msnet evaluate --external={meta['source']}` ({meta['layout']} layout): "
           f"{plural(len(sweeps), 'corruption')}, "
           f"{plural(len(meta['specs']), 'cell')}, n = {' / '.join(f'{s:,}' for s in sizes)} images per cell"
           + (f" ({plural(skipped, 'unreadable file')} skipped)" if skipped else "") + ". Images of another size "
           "were resized and cropped as this workdir's data config says; the bitstream rule read each file's own "
           "quantisation tables (PNG and .npy pixels: the clean bin).", ""]
  missing = meta.get("missing") or {}
  if missing:
    lines += ["Not evaluated on this set: " + "; ".join(f"`{m}` ({why})" for m, why in missing.items()) + ".", ""]
  if norm == "alexnet_baseline":
    lines += ["CE is normalised by this workdir's AlexNet baseline (`alexnet_baseline`), as Hendrycks & Dietterich "
              "normalise by AlexNet's errors; CE_c = sum over severities of the method's top-1 error / AlexNet's.", ""]
  elif norm == "baseline":
    lines += ["CE is normalised by this run's `baseline`, not by AlexNet (no `alexnet_baseline` was evaluated on "
              "this set): below 1 is better than the baseline; the numbers are not comparable with published mCE.",
              ""]
  else:
    lines += ["*No CE: neither `alexnet_baseline` nor `baseline` has every cell of this set.*", ""]
  extra = [c for c in sweeps if c in EXTRA_CORRUPTIONS]
  if extra and len(extra) < len(sweeps):
    lines += [f"mCE leaves out the extra corruptions {', '.join(extra)}, as the paper's does.", ""]
  by = {(r["method"], r["corruption"]): r for r in table}
  methods = list(dict.fromkeys(r["method"] for r in table))
  corruptions = list(sweeps)
  lines += [f"Top-1 % per corruption, mean over its severities (also in `{csv_name}`):", "",
            tables.markdown(["method", "mean", *corruptions],
                            [[m, *(_pct(by.get((m, c))) for c in [MEAN, *corruptions])] for m in methods]), ""]
  if norm:
    lines += ["CE per corruption and mCE:", "",
              tables.markdown(["method", "mCE", *corruptions],
                              [[m, *(by[(m, c)]["ce"] if (m, c) in by else None for c in [MEAN, *corruptions])]
                               for m in methods], digits=3), ""]
  return lines


def _pct(row: dict[str, Any] | None) -> float | None:
  return None if row is None else 100.0 * row["top1"]
