"""`msnet report` over one workdir: reads the result files, writes report.md beside its tables and figures."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Sequence

import ml_collections

from msnet import errors
from msnet.report import figures, stats, tables
from msnet.report.claims import claims_section
from msnet.report.sections import (ce_section, figure, master_section, n_text, pct, plural, sweep_tables,
                                   table1_section, table1_with_intervals, wall_section)

Row = dict[str, Any]
RESAMPLES = 2000  # paired bootstrap resamples for every interval of the report
SEED = 0
LEVEL = 0.95


def _read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.exists() else None


def bootstrap_of(rows: Sequence[Row], correct: dict[stats.Key, Any], runs: int = 1) -> stats.Bootstrap:
  """The paired bootstrap over every cell of the rows; without per-image results for all of them (an
  evaluation from before they were kept), point estimates only, which decide nothing."""
  keys = [(r["method"], r["spec"]) for r in rows]
  if not keys or any(k not in correct for k in keys):
    return stats.Bootstrap(point={k: r["top1"] for k, r in zip(keys, rows)}, samples={}, n=0, resamples=0,
                           seed=SEED, level=LEVEL)
  return stats.paired_bootstrap({k: correct[k] for k in keys}, resamples=RESAMPLES, seed=SEED, level=LEVEL,
                                runs=runs)


def run_report(config: ml_collections.ConfigDict, workdir: Any) -> pathlib.Path:
  """Write W/report/report.md with its figures and tables; returns the report's path."""
  workdir = pathlib.Path(workdir)
  results = _read_json(workdir / "eval" / "results.json")
  if results is None:
    raise errors.MissingInputError(f"{workdir / 'eval' / 'results.json'} not found: run `msnet evaluate` first")
  # A spec without records has no accuracy (null); it cannot be drawn or tabulated.
  rows = [r for r in results["rows"] if r["top1"] is not None]
  meta = results["meta"]
  out = workdir / "report"
  out.mkdir(parents=True, exist_ok=True)
  sweeps = meta.get("sweeps") or {name: list(config.sweeps[name]) for name in config.evaluate.sweeps}
  boot = bootstrap_of(rows, stats.load_correct(workdir / "eval"))
  t1 = table1_with_intervals(rows, boot)
  n = n_text(rows, meta.get("skipped"))

  lines = ["# msnet report", "",
           f"Model: {config.model.arch} ({config.model.variant}), {config.data.num_classes} classes, "
           f"data source {config.data.source}. Evaluated {len(meta.get('specs', sweeps))} specs x "
           f"{len(tables.methods_in(rows))} methods on {plural(meta.get('devices', 0), 'device')} "
           f"in {meta.get('wall_s', math.nan):.0f} s (that call of `msnet evaluate`); {n}.", ""]
  missing = meta.get("missing") or {}
  if missing:
    lines += ["Methods not evaluated (their training stage is not complete):", ""]
    lines += [f"- `{m}`: {why}" for m, why in missing.items()] + [""]
  flops = meta.get("flops") or {}
  if flops.get("slave") and flops.get("master"):
    lines += [f"The master costs {100 * flops['master'] / flops['slave']:.2f}% of the slave's FLOPs per image "
              f"({flops['master'] / 1e6:.2f} vs {flops['slave'] / 1e6:.2f} MFLOP).", ""]

  lines += table1_section(t1, out, n)
  lines += ["## Figures", ""]
  idx = tables.index(rows)
  clean = idx.get(("baseline", tables.CLEAN_SPEC))
  figure(lines, "fig1a", figures.fig1a(rows, out / "fig1a.png"),
          "Fig. 1a analog: the baseline over JPEG, JPEG 2000, noise and blur against the input's PSNR"
          + (f" (clean top-1 {pct(clean['top1'])}, dashed)." if clean else "."))
  figure(lines, "fig1b", figures.fig1b(rows, out / "fig1b.png"),
          "Fig. 1b analog: VGG-16 vs AlexNet over JPEG quality and JPEG 2000 ratio.")
  rf = _read_json(workdir / "eval" / "receptive_fields.json")
  figure(lines, "fig1c", figures.fig1c(rf, out / "fig1c.png"), _rf_caption(rf))
  figure(lines, "fig3", figures.fig3(rows, out / "fig3.png"),
          "Fig. 3 analog: baseline, MS, AMS, MAP, and the oracle and bitstream routings over compression.")
  figure(lines, "fig4", figures.fig4(rows, out / "fig4.png"),
          "Fig. 4 analog: combined degradations (solid) against the codec alone (dashed) and the first "
          "degradation alone (dotted), baseline and MS.")

  lines += claims_section(rows, t1, boot)
  lines += ce_section(rows, sweeps, out)
  lines += master_section(_read_json(workdir / "eval" / "master.json"), out)
  lines += sweep_tables(rows, sweeps)
  lines += wall_section(workdir / "train")
  path = out / "report.md"
  path.write_text("\n".join(lines).rstrip() + "\n")
  return path


def _rf_caption(rf: Sequence[dict[str, Any]] | None) -> str:
  """Fig. 1c's caption: where each network's receptive field first spans more than one JPEG block."""
  parts = []
  for net in rf or []:
    first = next((l for l in net["layers"] if l["rf"] > figures.JPEG_BLOCK), None)
    pool = next((l for l in net["layers"] if "pool" in l["layer"]), None)
    if first is not None:
      parts.append(f"{net['arch']} ({net['variant']}) exceeds 8 pixels at `{first['layer']}` (RF {first['rf']})"
                   + (f", RF {pool['rf']} after its first pooling layer `{pool['layer']}`" if pool else ""))
  return ("Fig. 1c analog: receptive field per layer against the 8x8 JPEG block"
          + (": " + "; ".join(parts) + "." if parts else "."))
