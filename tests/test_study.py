"""`msnet study`: the trunk-depth study end to end on its runlocal config (2 depths, 2-step stages), checked
against the models' own FLOP/param analysis; one baseline and one master for every depth; bad study fields
refused before any work. (The re-split's logits test is tests/test_models.py.)"""

from __future__ import annotations

import csv
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msnet import config as config_lib, errors, models, study
from msnet.train import stages

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "depth_study.py"
FAST = ("--config.train.eval_every_epoch=False", "--config.train.checkpoint_every_steps=100",
        "--config.stages.baseline.steps=2", "--config.stages.master.steps=2", "--config.stages.branch.steps=2")


def study_config(arg: str | None = "runlocal"):
  spec = importlib.util.spec_from_file_location("depth_study", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def num_params(shapes) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("study") / "w"
  result = subprocess.run([sys.executable, "-m", "msnet.cli", "study", f"--config={CONFIG}:runlocal",
                           f"--workdir={workdir}", *FAST], capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_table_has_a_row_per_depth_and_the_cost_of_a_branch_from_the_models(studied):
  c = study_config()
  with (studied / "study" / "depth.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert [int(r["trunk_layers"]) for r in rows] == sorted(c.study.trunk_layers) == [4, 10]
  assert list(rows[0]) == study.columns(c)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8)
  for r in rows:
    # One more branch, by the analysis of two whole slaves (K=2 minus K=1), not of a branch's layers.
    cfg = study.depth_config(c, int(r["trunk_layers"]))
    one, two = (models.build_slave(cfg.model, 10, k) for k in (1, 2))
    p1, p2 = (jax.eval_shape(m.init, jax.random.key(0), x) for m in (one, two))
    extra = models.flops_per_image(two, p2, 32) - models.flops_per_image(one, p1, 32)
    assert float(r["branch_mflops"]) * 1e6 == pytest.approx(extra, rel=1e-9)
    assert float(r["branch_flops_pct"]) == pytest.approx(100 * extra / models.flops_per_image(one, p1, 32))
    assert int(r["branch_params"]) == num_params(p2) - num_params(p1)
    assert float(r["branch_params_pct"]) == pytest.approx(100 * (num_params(p2) - num_params(p1)) / num_params(p1))
    assert r["first_branch_layer"] == {4: "conv3_1", 10: "conv5_1"}[int(r["trunk_layers"])]
    # Accuracies and % change from the depth's own results.json counts; the interval brackets its point.
    res = {(x["method"], x["spec"]): x for x in json.loads((studied / f"depth-{r['trunk_layers']}" / "eval" /
                                                           "results.json").read_text())["rows"]}

    def top1(m, spec):
      return 100.0 * res[(m, spec)]["correct1"] / res[(m, spec)]["n"]

    for col in ("baseline clean", "ms jpeg:10", "ms jp2k:24"):
      assert float(r[col]) == pytest.approx(top1(*col.split()))
    base_c, base_d = top1("baseline", "clean"), top1("baseline", "jpeg:10")
    for m in ("oracle", "ms", "ams"):
      point, lo, hi = (r[f"{m} pct_change{x}"] for x in ("", "_lo", "_hi"))
      if base_c > base_d:
        assert float(point) == pytest.approx(100 * (top1(m, "jpeg:10") - base_d) / (base_c - base_d))
      else:  # the baseline does not degrade: no loss to recover, no % change
        assert point == ""
      if lo and hi:
        assert float(lo) <= float(point) <= float(hi)
  shallow, deep = rows
  assert float(shallow["branch_mflops"]) > float(deep["branch_mflops"])
  assert int(shallow["branch_params"]) > int(deep["branch_params"])
  md = (studied / "study" / "depth.md").read_text()
  assert "| 4 | conv3_1 |" in md and "| 10 | conv5_1 |" in md
  assert (studied / "study" / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_depth_against_the_reference_is_the_paired_difference_of_its_pct_change(studied):
  c = study_config()
  assert c.study.reference is None and study.reference_depth(c) == c.model.trunk_layers == 10
  with (studied / "study" / "depth_vs_reference.csv").open() as f:
    against = list(csv.DictReader(f))
  with (studied / "study" / "depth.csv").open() as f:
    rows = {int(r["trunk_layers"]): r for r in csv.DictReader(f)}
  assert [int(r["trunk_layers"]) for r in against] == [4] and list(against[0]) == study.reference_columns(c)
  for m in c.study.change_methods:
    diff, lo, hi, verdict = (against[0][f"{m} {x}"] for x in ("minus_ref", "minus_ref_lo", "minus_ref_hi", "verdict"))
    if rows[4][f"{m} pct_change"] == "":  # the 2-step baseline does not degrade: no % change at either depth
      assert diff == "" and verdict == "undecided"
      continue
    assert float(diff) == pytest.approx(float(rows[4][f"{m} pct_change"]) - float(rows[10][f"{m} pct_change"]))
    assert verdict == ("better" if lo and float(lo) > 0 else "worse" if hi and float(hi) < 0 else "undecided")
  assert "## Against depth 10" in (studied / "study" / "depth.md").read_text()


def _synthetic_depths(monkeypatch, per_depth: dict) -> None:
  """stats.load_correct answers each W/depth-<d>/eval from per_depth[d]: per-image results a test chooses."""
  monkeypatch.setattr(study.stats, "load_correct", lambda eval_dir: per_depth[int(eval_dir.parent.name[6:])])


def test_the_depth_comparison_against_numpy_on_chosen_per_image_results(monkeypatch, tmp_path):
  # 400 images: the baseline right on all clean ones and on 200 of the JPEG-10 ones, so c - d = 50 points.
  # MS at depth 4 recovers 100 of the 200 losses (50% change), at depth 10 only 40 of them (20%).
  n = 400
  base_d = np.arange(n) < 200
  ms = {4: np.arange(n) < 300, 10: np.arange(n) < 240}
  per_depth = {d: {("baseline", "clean"): np.ones(n, bool), ("baseline", "jpeg:10"): base_d,
                   ("ms", "jpeg:10"): ms[d], ("oracle", "jpeg:10"): ms[10], ("ams", "jpeg:10"): base_d}
               for d in (4, 10)}
  _synthetic_depths(monkeypatch, per_depth)
  c = study_config()
  (row,) = study.against_reference(c, tmp_path)
  assert row["ms minus_ref"] == pytest.approx(100 * (300 - 240) / 200)  # 50% - 20%
  assert row["ms verdict"] == "better" and 0 < row["ms minus_ref_lo"] < 30 < row["ms minus_ref_hi"]
  # The paired resamples, redone in NumPy float64: the same draws of images, the statistic per draw.
  rng = np.random.default_rng(int(c.seed))
  idx = rng.integers(0, n, (int(c.study.resamples), n))
  d, c4, c10 = base_d[idx].mean(1), ms[4][idx].mean(1), ms[10][idx].mean(1)
  want = 100 * (c4 - c10) / (1 - d)
  alpha = (1 - c.study.level) / 2
  assert row["ms minus_ref_lo"] == pytest.approx(np.quantile(want, alpha, method="lower"))
  assert row["ms minus_ref_hi"] == pytest.approx(np.quantile(want, 1 - alpha, method="higher"))
  # The same network at both depths: exactly 0 in every resample, so 0 [0, 0] and undecided.
  assert (row["oracle minus_ref"], row["oracle minus_ref_lo"], row["oracle minus_ref_hi"]) == (0.0, 0.0, 0.0)
  assert row["oracle verdict"] == row["ams verdict"] == "undecided"
  # A depth whose baseline is not the shared one breaks the pairing: refused, naming the depth.
  per_depth[4][("baseline", "jpeg:10")] = ms[10]
  with pytest.raises(errors.InvalidInputError, match="baseline at depth 4 differs from depth 10's on jpeg:10"):
    study.against_reference(c, tmp_path)


def test_one_baseline_and_one_master_serve_every_depth(studied):
  trained = sorted(str(p.relative_to(studied)) for p in studied.rglob("metrics.jsonl"))
  assert trained == ["depth-10/train/branch_jp2k/metrics.jsonl", "depth-10/train/branch_jpeg/metrics.jsonl",
                     "depth-4/train/branch_jp2k/metrics.jsonl", "depth-4/train/branch_jpeg/metrics.jsonl",
                     "train/baseline/metrics.jsonl", "train/master/metrics.jsonl"]
  ckpts = [p for p in studied.rglob("ckpt") if "baseline" in p.parts]
  assert [p for p in ckpts if not p.is_symlink()] == [studied / "train" / "baseline" / "ckpt"]
  for d in (4, 10):
    sub = studied / f"depth-{d}"
    assert (sub / "train" / "baseline" / "ckpt").resolve() == (studied / "train" / "baseline" / "ckpt").resolve()
    assert (sub / "train" / "master").is_symlink() and (sub / "data").is_symlink()
    done = json.loads((sub / "train" / "baseline" / "DONE.json").read_text())
    assert done["trunk_layers"] == d and len(done["trunk"]) == d
    # The shared baseline loads cut at d and is the trained one, relabelled.
    cut, trained_params = stages.load_params(sub, "baseline"), stages.load_params(studied, "baseline")
    assert sorted(cut["trunk"]) == sorted(n + s for n in done["trunk"] for s in ("", "_norm"))
    np.testing.assert_array_equal(cut["branches"]["fc8"]["kernel"][0], trained_params["branches"]["fc8"]["kernel"][0])
    # In W itself, the stages that start from the baseline load it cut at the config's depth, the same way.
    in_place = stages.load_baseline(studied, study.depth_config(study_config(), d))
    assert jax.tree.structure(in_place) == jax.tree.structure(cut)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(in_place), jax.tree.leaves(cut)))
    # The branches were trained on that cut: their trunk is the shared baseline's trunk at d.
    branch = stages.load_params(sub, "branch_jpeg")
    assert sorted(branch["trunk"]) == sorted(cut["trunk"])
    np.testing.assert_array_equal(branch["trunk"]["conv1_1"]["kernel"], cut["trunk"]["conv1_1"]["kernel"])
    results = json.loads((sub / "eval" / "results.json").read_text())
    assert set(results["meta"]["methods"]) == {"baseline", "branch_clean", "branch_jpeg", "branch_jp2k", "ms", "ams",
                                               "oracle"}


def test_a_workdir_with_its_own_baseline_is_not_overwritten(studied, tmp_path):
  own = tmp_path / "train" / "baseline" / "ckpt"
  own.mkdir(parents=True)
  with pytest.raises(errors.InvalidInputError, match="holds a baseline trained in"):
    stages.share_stage(studied, tmp_path, study_config())
  with pytest.raises(errors.MissingInputError, match="no baseline to share"):
    stages.share_stage(tmp_path / "empty", tmp_path / "other", study_config())


@pytest.mark.parametrize("field,value,message", [
    ("study.trunk_layers", (4, 14), "config.study.trunk_layers: 14 is not in"),
    ("study.trunk_layers", (4, 4), "config.study.trunk_layers: needs distinct depths"),
    ("study.specs", ("clean", "jpeg:30"), "config.study.specs: 'jpeg:30' is in no sweep"),
    ("study.degraded", "jpeg:5", "config.study.degraded: 'jpeg:5' is in no sweep"),
    ("study.change_methods", ("map",), "config.study.change_methods: 'map' is not one of"),
    ("study.reference", 7, "config.study.reference: 7 is not one of study.trunk_layers"),
    ("model.trunk_layers", 7, r"config.study.reference: 7 is not one of study.trunk_layers \(4, 10\) \(None: config"),
])
def test_bad_study_fields_are_refused_naming_the_field(field, value, message):
  c = study_config()
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    study.check_study(c)
  study.check_study(study_config(None))  # the full study is valid


def test_cli_refuses_a_config_without_a_study_section(tmp_path):
  result = subprocess.run([sys.executable, "-m", "msnet.cli", "study",
                           f"--config={ROOT / 'configs' / 'demo.py'}:runlocal", f"--workdir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT)
  assert result.returncode != 0
  assert "config.study: missing" in result.stderr
  assert not (tmp_path / "data").exists()  # refused before degrading anything


def test_evaluate_in_a_workdir_whose_baseline_has_another_depth(studied, tmp_path):
  """Branches trained at depth 4 beside a baseline trained at 10 in one workdir: evaluation re-splits the
  baseline too, and gives the depth-4 study folder's own results."""
  (tmp_path / "train").mkdir()
  (tmp_path / "data").symlink_to(studied / "data")
  for stage in ("baseline", "master"):
    (tmp_path / "train" / stage).symlink_to(studied / "train" / stage)
  for stage in ("branch_jpeg", "branch_jp2k"):
    (tmp_path / "train" / stage).symlink_to(studied / "depth-4" / "train" / stage)
  (tmp_path / "config.json").write_text((studied / "depth-4" / "config.json").read_text())
  result = subprocess.run([sys.executable, "-m", "msnet.cli", "evaluate", f"--workdir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]

  def rows(w):
    return {(r["method"], r["spec"]): r["correct1"] for r in json.loads((w / "eval" / "results.json").read_text())["rows"]}

  assert rows(tmp_path) == rows(studied / "depth-4")


def test_another_stage_stands_in_for_the_baseline_through_config_shared(studied, tmp_path):
  # config.shared as the ResNet pair uses it ("baseline=augmix"): here depth 4's branch_jpeg network (a K=1 slave
  # too) becomes the baseline of a new run, cut at that run's depth; the master and the shards are linked, not copied.
  from msnet import pipeline  # noqa: PLC0415
  source = studied / "depth-4"
  cfg = study_config()
  cfg.shared.workdir, cfg.shared.data, cfg.shared.stages = str(source), True, ("master", "baseline=branch_jpeg")
  cfg.model.trunk_layers = 2
  pipeline.share(cfg, tmp_path)
  pipeline.share(cfg, tmp_path)  # once made, the links are kept
  assert (tmp_path / "data").resolve() == (studied / "data").resolve()
  table = models.model_table(cfg.model, int(cfg.data.num_classes))
  want = models.resplit_params(stages.load_params(source, "branch_jpeg"), table, 2)
  got = stages.load_params(tmp_path, "baseline")
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  master = json.loads((tmp_path / "train" / "master" / "DONE.json").read_text())
  assert "trunk" not in master and master["shared_from"].endswith("train/master")
  assert jax.tree.leaves(stages.load_params(tmp_path, "master"))[0].tolist() == \
      jax.tree.leaves(stages.load_params(studied, "master"))[0].tolist()
  with pytest.raises(errors.InvalidInputError, match="do not stand in for each other"):
    stages.share_stage(source, tmp_path / "x", cfg, "baseline", "master")
  with pytest.raises(errors.MissingInputError, match="no augmix to share"):
    stages.share_stage(source, tmp_path / "x", cfg, "baseline", "augmix")
