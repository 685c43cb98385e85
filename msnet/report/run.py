"""`msnet report` over one workdir: reads the result files, writes report.md beside its tables and figures."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Sequence

import ml_collections
import numpy as np

from msnet import errors
from msnet.report import figures, stats, tables
from msnet.report.beyond import beyond_section
from msnet.report.claims import claims_section
from msnet.report.codecs import codec_section
from msnet.report.external import external_sections
from msnet.report.sections import (TABLE1_FIELDS, ce_section, figure, master_section, n_text, pct, plural,
                                   sweep_tables, table1_section, table1_with_intervals, wall_section, write_csv)
from msnet.report.transcode import transcode_section

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
  if config.data.source == "embedded_cifar10":
    lines += ["The embedded CIFAR-10 is itself stored as JPEG q75: every \"clean\" image has been compressed once "
              "already, which lowers c and so shrinks c - d against a lossless source.", ""]
  missing = meta.get("missing") or {}
  if missing:
    lines += ["Methods not evaluated (their training stage is not complete):", ""]
    lines += [f"- `{m}`: {why}" for m, why in missing.items()] + [""]
  flops = meta.get("flops") or {}
  if flops.get("slave") and flops.get("master"):
    lines += [f"The master costs {100 * flops['master'] / flops['slave']:.2f}% of the slave's FLOPs per image "
              f"({flops['master'] / 1e6:.2f} vs {flops['slave'] / 1e6:.2f} MFLOP).", ""]

  lines += table1_section(t1, out, f"This run, {n}")
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
  master = _read_json(workdir / "eval" / "master.json")
  lines += transcode_section(rows, sweeps, master, boot, out)
  lines += codec_section(rows, list(config.bins), boot, out)
  lines += beyond_section(rows, sweeps, boot, [workdir], out)
  lines += external_sections(workdir / "eval", out)
  lines += master_section(master, out)
  lines += sweep_tables(rows, sweeps)
  lines += wall_section(workdir / "train")
  figure(lines, "baseline_curve", figures.training_curve(workdir / "train" / "baseline" / "metrics.jsonl",
                                                         out / "baseline_curve.png"),
         "The baseline's training loss and validation top-1 per epoch: a flat validation curve at the end "
         "means more epochs would not change the baseline the methods start from.")
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


def run_runs_report(runs: Sequence[Any], workdir: Any) -> pathlib.Path:
  """One report over several runs of one config with different seeds, written to W/report/: Table 1 per seed,
  mean +- sd across seeds, and Table 1 and the claims with intervals over the pooled images (an image's
  results in every run resampled together). Reads each run's W/eval and W/config.json only."""
  runs = [pathlib.Path(r) for r in runs]
  if len(runs) < 2:
    raise errors.InvalidInputError(f"--runs needs two or more workdirs (runs of one config with different seeds), "
                                   f"got {len(runs)}")
  loaded = []
  for r in runs:
    results = _read_json(r / "eval" / "results.json")
    if results is None:
      raise errors.MissingInputError(f"{r / 'eval' / 'results.json'} not found: run `msnet evaluate --workdir={r}` "
                                     "first")
    rows = [x for x in results["rows"] if x["top1"] is not None]
    seed = (_read_json(r / "config.json") or {}).get("seed")
    loaded.append(dict(dir=r, rows=rows, meta=results["meta"], seed=seed, correct=stats.load_correct(r / "eval")))
  per_seed = [table1_with_intervals(x["rows"], bootstrap_of(x["rows"], x["correct"])) for x in loaded]
  rows = _pooled_rows([x["rows"] for x in loaded])
  correct = stats.pool_runs([x["correct"] for x in loaded], names=[str(r) for r in runs])
  boot = bootstrap_of(rows, correct, runs=len(runs))
  t1 = table1_with_intervals(rows, boot)
  out = pathlib.Path(workdir) / "report"
  out.mkdir(parents=True, exist_ok=True)
  seeds = [x["seed"] for x in loaded]
  skipped = {x["meta"].get("skipped") for x in loaded}

  lines = ["# msnet report over several runs", "",
           f"{len(runs)} runs of one config: " + "; ".join(f"`{x['dir']}` (seed {x['seed']})" for x in loaded)
           + ". Pooled over the runs, " + n_text(rows, skipped.pop() if len(skipped) == 1 else None)
           + " (each test image once per run).", ""]
  if len(set(seeds)) < len(seeds):
    lines += [f"*The runs do not all have different seeds ({seeds}): the spread across them is not a seed "
              "spread.*", ""]
  header = ["method", "seed", "c", "d", "c'", "d'", "% change"]
  write_csv(out / "table1_per_seed.csv", ["seed", *TABLE1_FIELDS],
            [dict(r, seed=x["seed"]) for x, t in zip(loaded, per_seed) for r in t])
  lines += ["## Table 1 per seed", "", "Top-1 % of each run (also in `table1_per_seed.csv`).", "",
            tables.markdown(header, [[r["method"], x["seed"], r["c"], r["d"], r["c_prime"], r["d_prime"],
                                      r["pct_change"]] for x, t in zip(loaded, per_seed) for r in t]), ""]
  lines += ["## Across seeds: mean +- sd", "", "Mean and sample standard deviation over the runs.", "",
            tables.markdown(["method", "c", "d", "c'", "d'", "% change"], _mean_sd(per_seed)), ""]
  lines += table1_section(t1, out, "All runs pooled image by image")
  lines += claims_section(rows, t1, boot)
  lines += beyond_section(rows, loaded[0]["meta"].get("sweeps") or {}, boot, runs, out)
  path = out / "report.md"
  path.write_text("\n".join(lines).rstrip() + "\n")
  return path


def _pooled_rows(runs: Sequence[Sequence[Row]]) -> list[Row]:
  """Rows of the cells every run has: top1 the mean over runs (equal n, so the pooled accuracy), n summed, PSNR
  and bpp averaged; the spec fields from the first run."""
  index = [tables.index(rows) for rows in runs]
  out = []
  for key, first in index[0].items():
    cells = [ix.get(key) for ix in index]
    if any(c is None for c in cells):
      continue
    mean = lambda f: (None if any(c[f] is None for c in cells)  # noqa: E731
                      else sum(c[f] for c in cells) / len(cells))
    out.append(dict(first, top1=mean("top1"), psnr=mean("psnr"), bpp=mean("bpp"), n=sum(c["n"] for c in cells),
                    correct1=sum(c["correct1"] for c in cells)))
  return out


def _mean_sd(per_seed: Sequence[Sequence[dict[str, Any]]]) -> list[list[str]]:
  """Per method (in every run's Table 1): 'mean +- sd' of c, d, c', d' and % change across the runs."""
  by_method = [{r["method"]: r for r in t} for t in per_seed]
  table = []
  for m in by_method[0]:
    if not all(m in b for b in by_method):
      continue
    cols = []
    for field in ("c", "d", "c_prime", "d_prime", "pct_change"):
      v = np.array([b[m][field] for b in by_method], np.float64)
      cols.append("-" if np.isnan(v).any() else f"{v.mean():.1f} +- {v.std(ddof=1):.1f}")
    table.append([m, *cols])
  return table
