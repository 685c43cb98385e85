"""The report's calibration-and-gate section on synthetic result files: ECE intervals against a brute-force
resampling of per-image confidences, the merged per-branch ECE against msnet.calibration, the mCE difference
against the CE section's own mCE, and the claim-3 re-test reading its verdict from the interval."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from msnet import calibration
from msnet.report import beyond, stats, tables

SPECS = {"clean": 0, "jpeg:10": 1, "jpeg:50": 0, "jp2k:16": 2}
SWEEPS = {"clean": ["clean"], "jpeg": ["jpeg:10", "jpeg:50"], "jp2k": ["jp2k:16"]}
N = 400
# Per-image top-1 probability of each method: ams_cal recovers most of MS's JPEG-10 gain, AMS little of it.
ACCURACY = {"baseline": {"clean": 0.8, "jpeg:10": 0.5, "jpeg:50": 0.7, "jp2k:16": 0.5},
            "ms": {"clean": 0.8, "jpeg:10": 0.7, "jpeg:50": 0.7, "jp2k:16": 0.6},
            "ams": {"clean": 0.8, "jpeg:10": 0.55, "jpeg:50": 0.7, "jp2k:16": 0.55},
            "ams_cal": {"clean": 0.8, "jpeg:10": 0.68, "jpeg:50": 0.7, "jp2k:16": 0.6},
            "map": {"clean": 0.8, "jpeg:10": 0.7, "jpeg:50": 0.7, "jp2k:16": 0.6},
            "map_cal": {"clean": 0.8, "jpeg:10": 0.7, "jpeg:50": 0.7, "jp2k:16": 0.6},
            "gate": {"clean": 0.8, "jpeg:10": 0.7, "jpeg:50": 0.69, "jp2k:16": 0.6}}
BINS = [{"name": "clean", "match": [], "train_specs": ["clean"]},
        {"name": "jpeg", "match": ["jpeg:1-20"], "train_specs": ["jpeg:10"]},
        {"name": "jp2k", "match": ["jp2k:12-inf"], "train_specs": ["jp2k:16"]}]


def _hist(rng: np.random.Generator, over: float) -> dict[str, list[float]]:
  """A histogram of N images whose accuracy is their confidence minus `over` (an over-confident network)."""
  conf = rng.uniform(0.3, 1.0, N)
  probs = np.full((N, 10), 0.0)
  probs[:, 0] = conf
  probs[:, 1:] = ((1 - conf) / 9)[:, None]
  labels = np.where(rng.uniform(size=N) < np.clip(conf - over, 0, 1), 0, 1)
  return calibration.histogram(probs, labels, 15)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
  rng = np.random.default_rng(0)
  dirs, correct = [], {}
  for seed in range(2):
    w = tmp_path_factory.mktemp(f"seed{seed}")
    (w / "eval").mkdir()
    (w / "train" / "calibrate").mkdir(parents=True)
    (w / "config.json").write_text(json.dumps({"seed": seed, "bins": BINS}))
    (w / "eval" / "master.json").write_text(json.dumps(
        {"bins": [b["name"] for b in BINS], "specs": {s: {"true_bin": k} for s, k in SPECS.items()}}))
    rel = {s: {f"branch_{b['name']}{suffix}": _hist(rng, 0.2 if not suffix else 0.0)
               for b in BINS for suffix in ("", "_cal")} for s in SPECS}
    for s in SPECS:
      rel[s].update({m: _hist(rng, 0.1) for m in ACCURACY if m != "baseline"})
    (w / "eval" / "reliability.json").write_text(json.dumps({"ece_bins": 15, "specs": rel}))
    (w / "eval" / "results.json").write_text(json.dumps({"rows": [], "meta": {
        "sweeps": SWEEPS, "flops": {"master": 2e6, "gate": 2e6, "slave": 9e7}}}))
    (w / "train" / "calibrate" / "DONE.json").write_text(json.dumps(
        {"temperatures": [2.0, 1.3, 1.2], "master_temperature": 0.9,
         "branches": [{"bin": b["name"]} for b in BINS]}))
    dirs.append(w)
  for m, acc in ACCURACY.items():
    for s, p in acc.items():
      correct[(m, s)] = rng.uniform(size=N) < p
  rows = [dict(method=m, spec=s, top1=float(correct[(m, s)].mean()), n=N) for m in ACCURACY for s in SPECS]
  boot = stats.paired_bootstrap(correct, resamples=1000, seed=0)
  return dict(dirs=dirs, rows=rows, boot=boot, rel=[json.loads((d / "eval" / "reliability.json").read_text())
                                                    for d in dirs])


def test_ece_interval_matches_a_brute_force_resampling() -> None:
  rng = np.random.default_rng(1)
  conf = rng.uniform(0.2, 1.0, 3000)
  correct = rng.uniform(size=3000) < conf - 0.05
  b = calibration.confidence_bin(conf, 15)
  hist = {"count": np.bincount(b, minlength=15).astype(float).tolist(),
          "correct": np.bincount(b, weights=correct, minlength=15).tolist(),
          "confidence": np.bincount(b, weights=conf, minlength=15).tolist()}
  ci = beyond.ece_interval(hist, resamples=1000, seed=0)
  assert ci["point"] == pytest.approx(calibration.ece(hist))
  # Reference: resample the images themselves, each with its bin's mean confidence.
  mean_conf = np.asarray(hist["confidence"]) / np.maximum(hist["count"], 1)
  ref = []
  draw = np.random.default_rng(7)
  for _ in range(1000):
    i = draw.integers(0, 3000, 3000)
    acc = np.bincount(b[i], weights=correct[i], minlength=15)
    cnt = np.bincount(b[i], minlength=15)
    ref.append(np.abs(acc - cnt * mean_conf).sum() / 3000)
  assert ci["lo"] == pytest.approx(np.quantile(ref, 0.025), abs=0.004)
  assert ci["hi"] == pytest.approx(np.quantile(ref, 0.975), abs=0.004)
  assert ci["lo"] < ci["point"] < ci["hi"]


def test_branch_ece_rows_merge_the_runs(runs: dict) -> None:
  loaded = beyond.load_runs(runs["dirs"])
  by = {(r["branch"], r["scope"]): r for r in beyond.branch_ece_rows(loaded)}
  every = [s for s, k in SPECS.items() if k == 0]
  want = calibration.ece(calibration.merge([rel["specs"][s]["branch_clean_cal"] for rel in runs["rel"] for s in every]))
  row = by[("clean", "every spec of the bin")]
  assert row["ece_calibrated"] == pytest.approx(want) and row["n"] == 2 * len(every) * N
  assert by[("jpeg", "the bin's training specs")]["specs"] == "jpeg:10"
  # Over-confident by 0.2 before, calibrated after: the raw ECE misses the target, the calibrated one is low.
  assert row["ece_raw"] > 0.1 and row["ece_calibrated"] < row["ece_raw"]


def test_section_decides_claim3_and_compares_the_gate(runs: dict, tmp_path: pathlib.Path) -> None:
  lines = beyond.beyond_section(runs["rows"], SWEEPS, runs["boot"], runs["dirs"], tmp_path)
  text = "\n".join(lines)
  assert "claim 3 with calibrated branches" in text and "![reliability](reliability.png)" in text
  diffs = {label: (ci, verdict) for label, ci, verdict in beyond.comparisons(runs["rows"], SWEEPS, runs["boot"])}
  ci, verdict = diffs["claim 3 with calibrated branches: ams_cal - 0.75 MS, % change"]
  point = runs["boot"].point
  pct = lambda m: stats.pct_change(point[("baseline", "clean")], point[("baseline", "jpeg:10")],  # noqa: E731
                                   point[(m, "jpeg:10")])
  assert ci["point"] == pytest.approx(pct("ams_cal") - 0.75 * pct("ms"))
  assert verdict == stats.decide(ci)
  # The mCE difference at the point is the CE section's own mCE difference.
  mce = {r["method"]: r["mce"] for r in tables.mean_ce(tables.corruption_errors(runs["rows"], SWEEPS))}
  ci, _ = diffs["100 x (map mCE - gate mCE), > 0: the gate is better"]
  assert ci["point"] == pytest.approx(100 * (mce["map"] - mce["gate"]))
  assert (tmp_path / "reliability.png").exists() and (tmp_path / "calibration.csv").exists()
  assert "the gate 2.00 MFLOP" in text


def test_section_is_empty_without_calibrated_or_gated_results(runs: dict, tmp_path: pathlib.Path) -> None:
  rows = [r for r in runs["rows"] if r["method"] not in ("ams_cal", "map_cal", "gate")]
  assert beyond.beyond_section(rows, SWEEPS, runs["boot"], runs["dirs"], tmp_path) == []
