"""The report from synthetic result files: every file written, Table 1's % change by hand, valid PNGs."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from msnet import config as config_lib
from msnet import report
from msnet.evaluate import results as eval_results
from msnet.report import claims, figures, sections, tables
from msnet.report import run as report_run

SWEEPS = {
    "clean": ["clean"],
    "jpeg": ["jpeg:5", "jpeg:10", "jpeg:50"],
    "jp2k": ["jp2k:20", "jp2k:100", "jp2k:200"],
    "noise": ["noise:10", "noise:20", "noise:40"],
    "blur": ["blur:1", "blur:2"],
    "noise_jpeg": ["noise:10+jpeg:5", "noise:10+jpeg:10", "noise:10+jpeg:50"],
    "blur_jpeg": ["blur:1+jpeg:5", "blur:1+jpeg:10", "blur:1+jpeg:50"],
}
# Hand-picked baseline top-1 per spec; other methods are offsets from it.
BASE = {"clean": 0.80, "jpeg:5": 0.30, "jpeg:10": 0.40, "jpeg:50": 0.75, "jp2k:20": 0.70, "jp2k:100": 0.45,
        "jp2k:200": 0.30, "noise:10": 0.70, "noise:20": 0.60, "noise:40": 0.40, "blur:1": 0.65, "blur:2": 0.40,
        "noise:10+jpeg:5": 0.28, "noise:10+jpeg:10": 0.38, "noise:10+jpeg:50": 0.66,
        "blur:1+jpeg:5": 0.15, "blur:1+jpeg:10": 0.25, "blur:1+jpeg:50": 0.60}
OFFSET = {"baseline": 0.0, "ms": 0.10, "ams": 0.08, "map": 0.11, "oracle": 0.12, "bitstream": 0.12,
          "branch_clean": 0.0, "branch_jpeg": 0.05, "da_fc8": 0.02, "da_fc678": 0.04, "stability": 0.03,
          "augmix": 0.06}
PSNR = {"jpeg": {5: 24.0, 10: 27.0, 50: 33.0}, "jp2k": {20: 31.0, 100: 26.0, 200: 23.0},
        "noise": {10: 28.0, 20: 22.0, 40: 16.0}, "blur": {1: 29.0, 2: 25.0}}


def _fields(spec: str) -> dict:
  """The spec-derived fields evaluate writes (test-local, for plain specs of this file)."""
  parts = spec.split("+")
  kind, _, level = parts[-1].partition(":")
  codecs = [p for p in parts if p.split(":")[0] in ("jpeg", "jp2k")]
  codec, _, codec_level = codecs[-1].partition(":") if codecs else ("", "", None)
  lvl = float(level) if level else None
  return dict(kind=kind, level=lvl, codec=codec, codec_level=float(codec_level) if codec_level else None,
              pre="+".join(parts[:-1]), psnr=PSNR.get(kind, {}).get(lvl) if not parts[:-1] else 20.0,
              bpp=0.5 if codec else None)


def _rows() -> list[dict]:
  rows = []
  for method, off in OFFSET.items():
    for spec, acc in BASE.items():
      # Clean accuracy changes little for the robust methods (MS loses 1 point on clean).
      top1 = acc - 0.01 if (spec == "clean" and method == "ms") else min(acc + (0 if spec == "clean" else off), 1.0)
      n = 200
      rows.append(dict(method=method, spec=spec, sweeps=[s for s, v in SWEEPS.items() if spec in v],
                       top1=top1, top5=min(top1 + 0.1, 1.0), n=n, correct1=round(top1 * n),
                       correct5=round(min(top1 + 0.1, 1.0) * n), ci95_low=top1 - 0.05, ci95_high=top1 + 0.05,
                       **_fields(spec)))
  return rows


def _correct(rows: list[dict], nested: bool) -> dict[tuple[str, str], np.ndarray]:
  """Per-image top-1 matching each row's count. nested: per spec, a method with more correct images is right on
  a superset of the images another gets right (as for related networks: hard images are hard for all), so
  differences are decided at n = 200; else every method's correct images are drawn independently."""
  rng = np.random.default_rng(0)
  order = {spec: rng.permutation(200) for spec in BASE}
  out = {}
  for r in rows:
    bits = np.zeros(r["n"], bool)
    bits[(order[r["spec"]] if nested else rng.permutation(r["n"]))[:r["correct1"]]] = True
    out[(r["method"], r["spec"])] = bits
  return out


def _write_workdir(w: pathlib.Path, correct: str | None = "nested") -> None:
  """The result files of a run; correct: per-image results "nested", "independent" or None (none kept)."""
  (w / "eval").mkdir(parents=True)
  meta = dict(methods=list(OFFSET), missing={"deepcloak": "stage deepcloak not trained"}, sweeps=SWEEPS,
              specs=list(BASE), skipped=3, devices=8, wall_s=12.0, flops=dict(slave=4.0e7, master=1.0e6))
  (w / "eval" / "results.json").write_text(json.dumps(dict(rows=_rows(), meta=meta)))
  if correct is not None:
    bits = _correct(_rows(), nested=correct == "nested")
    for spec in BASE:
      eval_results.write_correct(w / "eval", spec, {m: bits[(m, spec)] for m in OFFSET})
  bins = ["clean", "jpeg", "jp2k"]
  specs = {}
  for spec in BASE:
    true = 1 if spec in ("jpeg:5", "jpeg:10") else 2 if spec in ("jp2k:100", "jp2k:200") else 0
    conf = [[0] * 3 for _ in range(3)]
    conf[true][true], conf[true][(true + 1) % 3] = 180, 20
    specs[spec] = dict(n=200, true_bin=true, master_accuracy=0.9, master_confusion=conf,
                       bitstream_accuracy=1.0, bitstream_confusion=[[200 if i == j == true else 0 for j in range(3)]
                                                                    for i in range(3)])
  (w / "eval" / "master.json").write_text(json.dumps(dict(bins=bins, specs=specs)))
  rf = [dict(arch="vgg16", variant="imagenet", layers=[dict(layer="conv1_1", rf=3, stride=1),
                                                      dict(layer="conv1_2", rf=5, stride=1),
                                                      dict(layer="pool1", rf=6, stride=2),
                                                      dict(layer="conv2_1", rf=10, stride=2)]),
        dict(arch="alexnet", variant="imagenet", layers=[dict(layer="conv1", rf=11, stride=4),
                                                        dict(layer="pool1", rf=19, stride=8)])]
  (w / "eval" / "receptive_fields.json").write_text(json.dumps(rf))
  for stage, wall in (("baseline", 100.0), ("branch_jpeg", 20.5), ("master", 7.25)):
    (w / "train" / stage).mkdir(parents=True)
    done = dict(stage=stage, wall_time_s=wall, steps=10, val_accuracy=0.5, loss=1.0)
    (w / "train" / stage / "DONE.json").write_text(json.dumps(done))


def _is_png(path: pathlib.Path) -> bool:
  with Image.open(path) as im:
    im.verify()
    return im.format == "PNG"


def test_report_writes_all_files(tmp_path: pathlib.Path) -> None:
  _write_workdir(tmp_path)
  cfg = config_lib.base_config()
  path = report.run_report(cfg, tmp_path)
  out = tmp_path / "report"
  assert path == out / "report.md"
  for name in ("fig1a", "fig1c", "fig3", "fig4", "master_confusion", "bitstream_confusion"):
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _is_png(out / f"{name}.png")
  assert not (out / "fig1b.png").exists()  # no AlexNet rows: said in words instead
  text = path.read_text()
  assert "fig1b is not in this report" in text and "add 'alexnet_baseline' to config.comparisons" in text
  assert "paper's numbers, not this run's" in text
  assert "`deepcloak`: stage deepcloak not trained" in text
  assert "stored as JPEG q75" in text  # the default source, embedded CIFAR-10, is said to be compressed already
  cfg.data.source = "folder"
  assert "stored as JPEG q75" not in report.run_report(cfg, tmp_path).read_text()
  for fig in ("fig1a.png", "fig1c.png", "fig3.png", "fig4.png"):
    assert f"]({fig})" in text
  # Facts computed from the files: the wall-time total and the master's FLOP share.
  assert f"{(100.0 + 20.5 + 7.25) / 60:.1f} min" in text
  assert "2.50% of the slave's FLOPs" in text
  assert "90.0%" in text  # the master's summed bin accuracy
  with (out / "ce.csv").open() as f:
    ce = {(r["method"], r["sweep"]): r for r in csv.DictReader(f)}
  assert float(ce[("baseline", "jpeg")]["ce"]) == pytest.approx(1.0)
  # MS: every jpeg spec +10 points -> CE = sum(err - 0.1) / sum(err).
  errs = [1 - BASE[s] for s in SWEEPS["jpeg"]]
  assert float(ce[("ms", "jpeg")]["ce"]) == pytest.approx(sum(e - 0.1 for e in errs) / sum(errs))
  # Relative CE subtracts each network's own clean error (MS clean is 1 point lower).
  rce = sum(e - 0.1 - (1 - 0.79) for e in errs) / sum(e - 0.2 for e in errs)
  assert float(ce[("ms", "jpeg")]["rce"]) == pytest.approx(rce)


def test_table1_pct_change_by_hand(tmp_path: pathlib.Path) -> None:
  _write_workdir(tmp_path)
  report.run_report(config_lib.base_config(), tmp_path)
  with (tmp_path / "report" / "table1.csv").open() as f:
    reader = csv.DictReader(f)
    assert reader.fieldnames == list(sections.TABLE1_FIELDS)
    t1 = {r["method"]: {k: float(v) for k, v in r.items() if k != "method"} for r in reader}
  assert set(t1) == set(OFFSET)
  # c = 80, d = 40 for every row; MS: c' = 79, d' = 50 -> (50 - 40) / (80 - 40) = 25 %.
  ms = t1["ms"]
  assert {k: ms[k] for k in ("c", "d", "c_prime", "d_prime", "d_gain", "pct_change")} == pytest.approx(
      dict(c=80.0, d=40.0, c_prime=79.0, d_prime=50.0, d_gain=10.0, pct_change=25.0))
  # Per-image results where MS is right on a superset of the baseline's JPEG-10 images: d' - d >= 0 in every
  # resample, and the 20 extra images of 200 make the interval exclude 0.
  assert 0.0 < ms["d_gain_lo"] < 10.0 < ms["d_gain_hi"] and 0.0 < ms["pct_change_lo"] < 25.0 < ms["pct_change_hi"]
  assert t1["ams"]["pct_change"] == pytest.approx(100 * (48 - 40) / (80 - 40))
  assert t1["baseline"]["pct_change"] == pytest.approx(0.0)
  assert t1["baseline"]["pct_change_lo"] == t1["baseline"]["pct_change_hi"] == 0.0
  assert tables.pct_change(70.2, 61.2, 66.7) == pytest.approx(61.1, abs=0.05)  # the paper's MS row (60.5 printed)
  text = (tmp_path / "report" / "report.md").read_text()
  assert "n = 200 test images per spec (3 source records skipped as unreadable)" in text


@pytest.mark.parametrize("correct, verdict_6", [("nested", "holds"), ("independent", "undecided"), (None, "undecided")])
def test_claims_decided_from_intervals(tmp_path: pathlib.Path, correct: str | None, verdict_6: str) -> None:
  # The same point estimates (MS 15 % change points above the best DA) in three workdirs: per-image results
  # where the methods agree image by image decide it; independent ones at n = 200 leave it undecided, and
  # without per-image results nothing is decided.
  _write_workdir(tmp_path, correct)
  report.run_report(config_lib.base_config(), tmp_path)
  text = (tmp_path / "report" / "report.md").read_text()
  claim6 = next(line for line in text.splitlines() if line.startswith("6. "))
  assert "MS - best DA 15.0 points" in claim6 and claim6.endswith(f"**{verdict_6}**.")
  # Beyond the paper, decided the same way: MS's % change 25 against AugMix's (46 - 40) / 40 = 15.
  claim7 = next(line for line in text.splitlines() if line.startswith("7. "))
  assert "MS - AugMix 10.0 points" in claim7 and claim7.endswith(f"**{verdict_6}**.")
  assert ("*No per-image results in W/eval/correct/" in text) == (correct is None)
  if correct is None:
    assert "**holds**." not in text and "**fails**." not in text


def test_baseline_training_curve(tmp_path: pathlib.Path) -> None:
  _write_workdir(tmp_path)
  metrics = tmp_path / "train" / "baseline" / "metrics.jsonl"
  metrics.parent.mkdir(parents=True, exist_ok=True)
  steps = [{"step": s, "epoch": s / 10, "loss": 2.3 / (1 + s / 10), "accuracy": 0.1} for s in range(1, 31)]
  vals = [{"step": 10 * e, "epoch": e, "val_accuracy": 0.5 + 0.1 * e, "val_specs": ["clean"]} for e in (1, 2, 3)]
  done = [{"step": 30, "event": "done", "stage": "baseline", "loss": 0.6, "accuracy": 0.1, "val_accuracy": 0.8}]
  metrics.write_text("".join(json.dumps(r) + "\n" for r in steps + vals + done))
  text = report.run_report(config_lib.base_config(), tmp_path).read_text()
  assert "](baseline_curve.png)" in text
  assert _is_png(tmp_path / "report" / "baseline_curve.png")
  metrics.write_text(json.dumps(done[0]) + "\n")  # a stage that logged no step: said, not drawn
  text = report.run_report(config_lib.base_config(), tmp_path).read_text()
  assert f"baseline_curve is not in this report: {metrics} holds no training steps" in text


def test_claims_and_combined_fit() -> None:
  rows = _rows()
  fits = {f["pre"]: f for f in tables.combined_fit(rows)}
  # noise:10 + jpeg:q: min(0.70, jpeg) vs combined 0.28/0.38/0.66 -> |.02|,|.02|,|.04| mean 2.67 points.
  assert fits["noise:10"]["mae_worse"] == pytest.approx(100 * (0.02 + 0.02 + 0.04) / 3)
  # blur:1 + jpeg:q: additive jpeg - (0.80 - 0.65) = .15/.25/.60, exactly the combined values.
  assert fits["blur:1"]["mae_additive"] == pytest.approx(0.0, abs=1e-9)
  eq = tables.accuracy_at_equal_psnr(rows, "baseline", "noise", "jpeg")
  assert eq["lo"] == 24.0 and eq["hi"] == 28.0


def test_report_imports_no_jax() -> None:
  code = "import sys, msnet.report; assert 'jax' not in sys.modules and 'flax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_fig1b_drawn_with_alexnet_rows(tmp_path: pathlib.Path) -> None:
  _write_workdir(tmp_path)
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  results["rows"] += [dict(r, method="alexnet_baseline", top1=r["top1"] * 0.9)
                      for r in results["rows"] if r["method"] == "baseline"]
  (tmp_path / "eval" / "results.json").write_text(json.dumps(results))
  report.run_report(config_lib.base_config(), tmp_path)
  assert _is_png(tmp_path / "report" / "fig1b.png")
  text = (tmp_path / "report" / "report.md").read_text()
  assert "](fig1b.png)" in text
  # Fig. 1b's comparison network is not a robustness method: not in Table 1 nor in the claims.
  claims_text = text[text.index("## The paper's claims"):text.index("## Corruption error")]
  assert "alexnet" not in claims_text
  with (tmp_path / "report" / "table1.csv").open() as f:
    assert "alexnet_baseline" not in {r["method"] for r in csv.DictReader(f)}


def test_pct_change_undefined_when_baseline_does_not_degrade() -> None:
  rows = [dict(r, top1=0.5, correct1=100) if r["method"] == "baseline" and r["spec"] in ("clean", "jpeg:10") else r
          for r in _rows()]
  boot = report_run.bootstrap_of(rows, _correct(rows, nested=True))
  t1 = sections.table1_with_intervals(rows, boot)
  assert all(math.isnan(r["pct_change"]) for r in t1)
  # Every resample has c = d too: the interval is unbounded, and the claims on % change say why.
  assert all((r["pct_change_lo"], r["pct_change_hi"]) == (-math.inf, math.inf) for r in t1)
  text = "\n".join(claims.claims_section(rows, t1, boot))
  assert text.count("% change is undefined") == 3 and "AMS -%" not in text  # claims 3, 6 and 7
  rows = [r for r in rows if r["method"] != "augmix"]  # a run without AugMix has no claim 7
  assert "\n7. " not in "\n".join(claims.claims_section(rows, sections.table1_with_intervals(rows, boot), boot))
  assert math.isnan(tables.pct_change(40.0, 50.0, 60.0))  # the baseline better on JPEG-10 than clean


def test_report_over_runs_with_different_seeds(tmp_path: pathlib.Path) -> None:
  # Three runs: MS right on 100, 102, 104 of the 200 JPEG-10 images (% change 25, 27.5, 30).
  runs = []
  for i in range(3):
    w = tmp_path / f"w{i}"
    rows = [dict(r, top1=(100 + 2 * i) / 200, correct1=100 + 2 * i) if (r["method"], r["spec"]) == ("ms", "jpeg:10")
            else r for r in _rows()]
    _write_workdir(w)
    (w / "eval" / "results.json").write_text(json.dumps(dict(
        rows=rows, meta=json.loads((w / "eval" / "results.json").read_text())["meta"])))
    bits = _correct(rows, nested=True)
    for spec in BASE:
      eval_results.write_correct(w / "eval", spec, {m: bits[(m, spec)] for m in OFFSET})
    (w / "config.json").write_text(json.dumps({"seed": 10 + i}))
    runs.append(w)
  out = tmp_path / "out"
  subprocess.run([sys.executable, "-m", "msnet.cli", "report", f"--workdir={out}",
                  f"--runs={','.join(map(str, runs))}"], check=True, capture_output=True)
  text = (out / "report" / "report.md").read_text()
  assert "(seed 10)" in text and "(seed 12)" in text
  assert "n = 600 test images per spec (3 source records skipped as unreadable)" in text
  with (out / "report" / "table1_per_seed.csv").open() as f:
    per_seed = [r for r in csv.DictReader(f) if r["method"] == "ms"]
  assert [float(r["pct_change"]) for r in per_seed] == pytest.approx([25.0, 27.5, 30.0])
  assert [r["seed"] for r in per_seed] == ["10", "11", "12"]
  # mean +- sd (sample sd) across seeds, by hand: d' = 50, 51, 52 -> 51.0 +- 1.0; % change 27.5 +- 2.5.
  assert "| ms | 80.0 +- 0.0 | 40.0 +- 0.0 | 79.0 +- 0.0 | 51.0 +- 1.0 | 27.5 +- 2.5 |" in text
  with (out / "report" / "table1.csv").open() as f:
    pooled = {r["method"]: r for r in csv.DictReader(f)}
  # Pooled over the 600 image results: d' = 306 / 600 = 51 %, % change (51 - 40) / 40 = 27.5 %, inside its CI.
  assert float(pooled["ms"]["pct_change"]) == pytest.approx(27.5)
  assert float(pooled["ms"]["pct_change_lo"]) < 27.5 < float(pooled["ms"]["pct_change_hi"])
  assert "MS - best DA" in text and "alexnet" not in text


def test_report_over_runs_rejects_one_run_and_other_test_sets(tmp_path: pathlib.Path) -> None:
  a, b = tmp_path / "a", tmp_path / "b"
  _write_workdir(a)
  _write_workdir(b)
  with pytest.raises(ValueError, match="two or more workdirs"):
    report.run_runs_report([a], tmp_path / "out")
  for spec in BASE:  # b's per-image results cover 150 test images, a's 200
    eval_results.write_correct(b / "eval", spec, {m: np.ones(150, bool) for m in OFFSET})
  with pytest.raises(ValueError, match=r"different test sets \(.*a n=200, .*b n=150\)"):
    report.run_runs_report([a, b], tmp_path / "out")


def test_fig4_leaves_transcode_chains_out(tmp_path: pathlib.Path) -> None:
  """Fig. 4 is noise/blur before a codec: a re-encode or a resize before the last codec is not drawn there."""
  transcoded = [dict(method="baseline", spec=spec, pre=pre, codec="jpeg", kind="jpeg", level=90.0, top1=0.5)
                for spec, pre in (("jpeg:10+jpeg:90", "jpeg:10"), ("jpeg:10+resize:0.5+jpeg:90", "jpeg:10+resize:0.5"))]
  assert figures.fig4(transcoded, tmp_path / "fig4.png").startswith("no combined-degradation rows")
  assert not (tmp_path / "fig4.png").exists()
