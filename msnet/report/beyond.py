"""The report's section beyond the paper: calibrated branches (`ams_cal`, `map_cal`) and the learned gate.

Reads, per run, W/train/calibrate/DONE.json (the temperatures, fitted on the hold-out slice of the training
split), W/eval/reliability.json (every shared-group method's 15-bin confidence histogram per spec) and
W/eval/master.json (each spec's true bin). Several runs are pooled image by image: their histograms add up.

- Expected calibration error of each branch before and after its temperature, on its own bin's specs of the
  test split (two scopes: the bin's training specs, and every evaluated spec whose true bin it is), against
  the target ECE <= 0.03, with a bootstrap interval over the images (each image's confidence taken at its
  confidence bin's mean: the histograms keep no per-image confidences); and reliability diagrams.
- The paper's claim 3 ("AMS comes close to MS") re-tested with the calibrated branches, and ams_cal / map_cal
  against ams / map, from the paired bootstrap of the per-image results.
- The learned gate against MAP and MS: JPEG-10 top-1 and mCE over the sweeps, with intervals, and the added
  FLOPs per image of each router (the gate is a network of the master's architecture).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from msnet import calibration
from msnet.report import figures, stats, tables
from msnet.report.sections import figure, write_csv

Row = dict[str, Any]
TARGET_ECE = 0.03
ECE_RESAMPLES = 2000
ECE_FIELDS = ("branch", "scope", "specs", "n", "ece_raw", "ece_raw_lo", "ece_raw_hi", "ece_calibrated",
              "ece_calibrated_lo", "ece_calibrated_hi", "meets_target")
RULE_ECE_METHODS = ("ms", "ams", "ams_cal", "map", "map_cal", "gate", "oracle")


def _read(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.exists() else None


def load_runs(runs: Sequence[pathlib.Path]) -> list[dict[str, Any]]:
  """Each run's calibrate DONE.json, reliability histograms, master.json, config and evaluation meta (None
  where a file is missing)."""
  out = []
  for r in runs:
    results = _read(r / "eval" / "results.json") or {}
    out.append(dict(dir=r, calibrate=_read(r / "train" / "calibrate" / "DONE.json"),
                    reliability=_read(r / "eval" / "reliability.json"), master=_read(r / "eval" / "master.json"),
                    config=_read(r / "config.json"), meta=results.get("meta", {})))
  return out


def ece_interval(hist: Mapping[str, Sequence[float]], resamples: int = ECE_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> dict[str, float]:
  """ECE of a histogram and a bootstrap interval over its images: each image is (its bin, right or wrong) with
  the bin's mean confidence; B multinomial redraws of the n images give B ECEs."""
  count = np.asarray(hist["count"], np.float64)
  n = int(round(count.sum()))
  point = calibration.ece(hist)
  if n == 0:
    return dict(point=math.nan, lo=math.nan, hi=math.nan)
  correct = np.asarray(hist["correct"], np.float64)
  mean_conf = np.divide(np.asarray(hist["confidence"], np.float64), count, out=np.zeros_like(count),
                        where=count > 0)
  cells = np.concatenate([correct, count - correct]) / n          # P(bin, right) then P(bin, wrong)
  draws = np.random.default_rng(seed).multinomial(n, np.clip(cells, 0.0, None) / cells.sum(), size=resamples)
  k = len(count)
  right, wrong = draws[:, :k], draws[:, k:]
  eces = np.abs(right - (right + wrong) * mean_conf).sum(axis=1) / n
  alpha = (1.0 - level) / 2.0
  return dict(point=point, lo=float(np.quantile(eces, alpha)), hi=float(np.quantile(eces, 1.0 - alpha)))


def _merged(loaded: Sequence[Mapping[str, Any]], method: str, specs: Sequence[str]) -> dict[str, list[float]] | None:
  hists = []
  for run in loaded:
    rel = (run["reliability"] or {}).get("specs", {})
    for s in specs:
      if method not in rel.get(s, {}):
        return None
      hists.append(rel[s][method])
  return calibration.merge(hists) if hists else None


def _bin_specs(run: Mapping[str, Any]) -> list[tuple[str, list[str], list[str]]]:
  """Per bin of the run's config: its name, its training specs that were evaluated, and every evaluated spec
  whose true bin it is (W/eval/master.json); [] without those files."""
  if not run["config"] or not run["master"]:
    return []
  cells = run["master"]["specs"]
  return [(b["name"], [s for s in b["train_specs"] if s in cells],
           [s for s, c in cells.items() if c.get("true_bin") == k]) for k, b in enumerate(run["config"]["bins"])]


def branch_ece_rows(loaded: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per branch and scope: ECE raw and calibrated with intervals, on the pooled images of every run."""
  out = []
  for name, train_specs, every_spec in _bin_specs(loaded[0]):
    for scope, specs in (("the bin's training specs", train_specs), ("every spec of the bin", every_spec)):
      raw, cal = _merged(loaded, f"branch_{name}", specs), _merged(loaded, f"branch_{name}_cal", specs)
      if not specs or raw is None or cal is None:
        continue
      r, c = ece_interval(raw), ece_interval(cal)
      out.append(dict(branch=name, scope=scope, specs=" ".join(specs), n=int(sum(cal["count"])),
                      ece_raw=r["point"], ece_raw_lo=r["lo"], ece_raw_hi=r["hi"], ece_calibrated=c["point"],
                      ece_calibrated_lo=c["lo"], ece_calibrated_hi=c["hi"],
                      meets_target=_target(c)))
  return out


def _target(ci: Mapping[str, float]) -> str:
  """ECE <= TARGET_ECE read from the interval: holds, fails or undecided."""
  if ci["hi"] <= TARGET_ECE:
    return "holds"
  return "fails" if ci["lo"] > TARGET_ECE else "undecided"


def reliability_figure(loaded: Sequence[Mapping[str, Any]], path: pathlib.Path) -> str | None:
  """Per branch: accuracy against mean confidence per confidence bin, raw and calibrated, on every spec of its
  bin (the pooled images)."""
  bins = _bin_specs(loaded[0])
  if not bins:
    return "the runs lack config.json or W/eval/master.json"
  panels = []
  for name, _, specs in bins:
    raw, cal = _merged(loaded, f"branch_{name}", specs), _merged(loaded, f"branch_{name}_cal", specs)
    if raw is not None and cal is not None:
      panels.append((name, raw, cal))
  if not panels:
    return "no branch_<bin>_cal results (evaluate ams_cal or map_cal with `branches`)"
  fig = Figure(figsize=(3.6 * len(panels), 3.6))
  for i, (name, raw, cal) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for label, h, style in (("raw", raw, dict(color="tab:gray", marker="o")),
                            ("calibrated", cal, dict(color="tab:red", marker="s"))):
      count = np.asarray(h["count"], np.float64)
      keep = count > 0
      conf = np.asarray(h["confidence"])[keep] / count[keep]
      acc = np.asarray(h["correct"])[keep] / count[keep]
      ax.plot(conf, acc, label=f"{label}, ECE {calibration.ece(h):.3f}", **style)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"branch {name}: its bin's specs", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
  figures._save(fig, path)
  return None


def _mce(a: Mapping[Any, Any], method: str, sweeps: Mapping[str, Sequence[str]]) -> Any:
  """Mean over the degradation sweeps of sum_s err(method, s) / sum_s err(baseline, s) (ce_section's mCE)."""
  terms = []
  for specs in sweeps.values():
    if all(s == tables.CLEAN_SPEC for s in specs):
      continue
    terms.append(sum(1.0 - a[(method, s)] for s in specs) / sum(1.0 - a[("baseline", s)] for s in specs))
  return sum(terms) / len(terms)


def _have(rows: Sequence[Row], methods: Sequence[str], specs: Sequence[str]) -> bool:
  cells = {(r["method"], r["spec"]) for r in rows}
  return all((m, s) in cells for m in methods for s in specs)


def _pct(a: Mapping[Any, Any], method: str) -> Any:
  return stats.pct_change(a[("baseline", tables.CLEAN_SPEC)], a[("baseline", tables.JPEG10_SPEC)],
                          a[(method, tables.JPEG10_SPEC)])


def comparisons(rows: Sequence[Row], sweeps: Mapping[str, Sequence[str]], boot: stats.Bootstrap
                ) -> list[tuple[str, dict[str, float], str]]:
  """(label, interval, verdict) of each difference this section rests on, for the methods present."""
  key_specs = [tables.CLEAN_SPEC, tables.JPEG10_SPEC]
  every_spec = [s for specs in sweeps.values() for s in specs]
  out = []
  if _have(rows, ["baseline", "ms", "ams_cal"], key_specs):
    ci = boot.interval(lambda a: _pct(a, "ams_cal") - 0.75 * _pct(a, "ms"))
    out.append(("claim 3 with calibrated branches: ams_cal - 0.75 MS, % change", ci, stats.decide(ci)))
  for cal, raw in (("ams_cal", "ams"), ("map_cal", "map")):
    if _have(rows, ["baseline", cal, raw], key_specs):
      ci = boot.interval(lambda a, c=cal, r=raw: _pct(a, c) - _pct(a, r))
      out.append((f"{cal} - {raw}, % change", ci, stats.decide(ci)))
  for other in ("map", "ms"):
    if _have(rows, ["gate", other], [tables.JPEG10_SPEC]):
      ci = boot.interval(lambda a, o=other: 100.0 * (a[("gate", tables.JPEG10_SPEC)] - a[(o, tables.JPEG10_SPEC)]))
      out.append((f"gate - {other}, JPEG-10 top-1 (points)", ci, stats.decide(ci)))
    if _have(rows, ["baseline", "gate", other], every_spec):
      # Lower mCE is better: the gate wins when other - gate > 0.
      ci = boot.interval(lambda a, o=other: 100.0 * (_mce(a, o, sweeps) - _mce(a, "gate", sweeps)))
      out.append((f"100 x ({other} mCE - gate mCE), > 0: the gate is better", ci, stats.decide(ci)))
  return out


def beyond_section(rows: Sequence[Row], sweeps: Mapping[str, Sequence[str]], boot: stats.Bootstrap,
                   runs: Sequence[pathlib.Path], out: pathlib.Path) -> list[str]:
  """The section's lines, `calibration.csv` and `reliability.png`; [] when no run has calibrated or gated
  results."""
  methods = {r["method"] for r in rows}
  if not methods & {"ams_cal", "map_cal", "gate"}:
    return []
  loaded = load_runs(runs)
  lines = ["## Beyond the paper: calibrated branches and a learned gate", ""]
  temps = [(run["dir"], run["calibrate"]) for run in loaded if run["calibrate"]]
  own_bin = bool(temps) and all("own_bin_temperatures" in c for _, c in temps)
  if temps:
    names = [b["bin"] for b in temps[0][1]["branches"]]
    own_cols = [f"T {n}, own bin" for n in names] if own_bin else []
    lines += ["Temperatures fitted by NLL on the hold-out slice of the training split (W/train/calibrate/"
              "DONE.json): per branch on every bin's training specs, bins weighted equally (ams_cal)"
              + (", and on its own bin's specs alone (map_cal and the calibrated branches)" if own_bin else "")
              + "; a temperature above 1 softens an over-confident network.", "",
              tables.markdown(["run", *[f"T {n}" for n in names], *own_cols, "T master"],
                              [[f"`{d.name}`", *c["temperatures"], *(c["own_bin_temperatures"] if own_bin else []),
                                c["master_temperature"]] for d, c in temps], digits=3), ""]
  ece_rows = branch_ece_rows(loaded)
  if ece_rows:
    write_csv(out / "calibration.csv", ECE_FIELDS, ece_rows)
    at = "its own-bin temperature" if own_bin else "its temperature (fitted on every bin: these runs have no own-bin one)"
    lines += [f"Expected calibration error (15 confidence bins) of each branch on the test images of its own "
              f"bin, before and after {at}; target <= {TARGET_ECE}, read from the interval "
              "(bootstrap over the images, confidences at their bin's mean). Also in `calibration.csv`.", "",
              tables.markdown(["branch", "scope", "n", "ECE raw", "95% CI", "ECE calibrated", "95% CI",
                               f"<= {TARGET_ECE}"],
                              [[r["branch"], r["scope"], f"{r['n']:,}", r["ece_raw"],
                                tables.ci_text(dict(lo=r["ece_raw_lo"], hi=r["ece_raw_hi"]), digits=4),
                                r["ece_calibrated"],
                                tables.ci_text(dict(lo=r["ece_calibrated_lo"], hi=r["ece_calibrated_hi"]), digits=4),
                                r["meets_target"]] for r in ece_rows], digits=4), ""]
  rule_rows = []
  every_spec = list(dict.fromkeys(s for specs in sweeps.values() for s in specs))
  for m in RULE_ECE_METHODS:
    h = _merged(loaded, m, every_spec)
    if h is not None:
      ci = ece_interval(h)
      rule_rows.append([m, ci["point"], tables.ci_text(ci, digits=4)])
  if rule_rows:
    lines += ["ECE of each decision rule over every evaluated spec (pooled):", "",
              tables.markdown(["rule", "ECE", "95% CI"], rule_rows, digits=4), ""]
  figure(lines, "reliability", reliability_figure(loaded, out / "reliability.png"),
         "Reliability diagrams: per branch, accuracy against mean confidence per confidence bin on every test "
         "spec of its bin, before (grey) and after (red) its temperature; the diagonal is perfect calibration.")
  diffs = comparisons(rows, sweeps, boot)
  if diffs:
    lines += ["Differences (paired bootstrap over the test images; a verdict holds when the whole interval is "
              "above 0):", "",
              tables.markdown(["difference", "estimate", "95% CI", "verdict"],
                              [[label, ci["point"], tables.ci_text(ci), verdict] for label, ci, verdict in diffs]),
              ""]
  flops = loaded[0]["meta"].get("flops") or {}
  if flops.get("gate") and flops.get("master"):
    lines += [f"Added FLOPs per image: the master {flops['master'] / 1e6:.2f} MFLOP (MS, MAP, map_cal), the gate "
              f"{flops['gate'] / 1e6:.2f} MFLOP (the same network, trained on the mixture's NLL); the slave "
              f"{flops.get('slave', math.nan) / 1e6:.2f} MFLOP. ams_cal adds none.", ""]
  return lines
