"""`msnet.methods` is the one list of methods and rules: every entry is accepted by config validation, planned by
evaluation with the training stages written out below (today's requirements, spelt by hand), and served by the
predictor with the same stages; an unknown name is refused by each in the same words. What each rule computes
is checked against NumPy on both paths by test_evaluate.py and test_predict.py.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from msnet import config as config_lib, errors, files, methods, predict
from msnet.evaluate import plan as plan_lib

SLAVE = ["baseline", "branch_jpeg", "branch_jp2k"]  # the default bins: clean, jpeg, jp2k
NEEDS = {"baseline": ["baseline"], "branches": SLAVE, "ms": [*SLAVE, "master"], "ams": SLAVE,
         "map": [*SLAVE, "master"], "oracle": SLAVE, "bitstream": SLAVE, "hybrid": [*SLAVE, "master"],
         "ams_cal": [*SLAVE, "calibrate"], "map_cal": [*SLAVE, "master", "calibrate"], "gate": [*SLAVE, "gate"],
         "da_fc8": ["da_fc8"], "da_fc67": ["da_fc67"], "da_fc678": ["da_fc678"], "stability": ["stability"],
         "deepcloak": ["baseline", "deepcloak"], "alexnet_baseline": ["alexnet_baseline"], "augmix": ["augmix"]}
GIVEN_BINS = {"oracle": "true", "bitstream": "bitstream", "hybrid": "bitstream"}
TEMPERATURES = {"ams_cal": ("branch",), "map_cal": ("own_bin", "master")}  # the calibrate stage's, branches' first
UNKNOWN = "'nope' is not one of"


def _config() -> Any:
  c = config_lib.base_config()
  c.model.width = 0.0625
  c.model.fc_width = 16
  c.master.conv_features = (4, 4, 4)
  c.master.fc_features = (8, 8)
  return c


def _done(workdir: pathlib.Path, stages: list[str]) -> None:
  for s in stages:
    (workdir / "train" / s).mkdir(parents=True, exist_ok=True)
    (workdir / "train" / s / "DONE.json").write_text("{}")


def test_the_table_holds_every_method_with_its_stages() -> None:
  assert set(methods.METHODS) == set(NEEDS)
  for name, method in methods.METHODS.items():
    assert methods.stages_of(method, ["clean", "jpeg", "jp2k"]) == NEEDS[name], name
    assert method.bins == GIVEN_BINS.get(name), name
    assert method.temperatures == TEMPERATURES.get(name, ()), name
    assert (method.fn is not None) == (method.kind == methods.RULE), name


def test_validation_accepts_every_entry_and_refuses_an_unknown_name() -> None:
  for name in methods.METHODS:
    c = _config()
    c.evaluate.methods = (name,)
    config_lib.validate(c)
  c.evaluate.methods = ("baseline", "nope")
  with pytest.raises(config_lib.ConfigError, match="config.evaluate.methods: ") as e:
    config_lib.validate(c)
  assert UNKNOWN in str(e.value) and all(repr(n) in str(e.value) for n in [*NEEDS, "comparisons"])


def test_plan_evaluates_every_entry_once_its_stages_are_trained(tmp_path: pathlib.Path) -> None:
  c = _config()
  c.evaluate.methods = tuple(NEEDS)
  plan = plan_lib.make_plan(c, tmp_path)
  assert plan.missing == {n: "stage(s) not trained: " + ", ".join(s) for n, s in NEEDS.items()}
  _done(tmp_path, sorted({s for stages in NEEDS.values() for s in stages}))
  plan = plan_lib.make_plan(c, tmp_path)
  assert plan.missing == {} and plan.slave and plan.master and plan.calibrated and plan.gate and plan.branches
  assert plan_lib.method_names(c, plan) == [
      "baseline", "da_fc8", "da_fc67", "da_fc678", "stability", "deepcloak", "alexnet_baseline", "augmix",
      "branch_clean", "branch_jpeg", "branch_jp2k", "branch_clean_cal", "branch_jpeg_cal", "branch_jp2k_cal",
      "ms", "ams", "map", "oracle", "bitstream", "hybrid", "ams_cal", "map_cal", "gate"]
  c.evaluate.methods = ("nope",)  # validation refuses it first; the plan refuses it too
  with pytest.raises(ValueError, match=UNKNOWN):
    plan_lib.make_plan(c, tmp_path)


def test_predict_serves_every_entry_with_the_same_stages(tmp_path: pathlib.Path) -> None:
  c = _config()
  branch_rules = {"branch_clean": "branches", "branch_jpeg": "branches", "branch_jp2k": "branches",
                  "branch_clean_cal": "ams_cal", "branch_jpeg_cal": "ams_cal", "branch_jp2k_cal": "ams_cal"}
  rules = predict.rule_functions(c)
  assert set(rules) == {*(set(NEEDS) - {"branches"}), *branch_rules}
  assert {r for r, spec in rules.items() if spec.bins} == set(GIVEN_BINS)
  assert {r: spec.temperatures for r, spec in rules.items() if spec.temperatures} == {
      **TEMPERATURES, **{r: ("own_bin",) for r in branch_rules if r.endswith("_cal")}}
  assert set(files.BITSTREAM_RULES) == {"bitstream", "hybrid"}
  predictor = predict.Predictor(tmp_path, c, [str(i) for i in range(10)], 16)
  assert predictor.rules == []
  for rule in rules:
    with pytest.raises(errors.MissingInputError) as e:
      predictor.check_rule(rule)
    stages = " ".join(f"--stage={s}" for s in NEEDS[branch_rules.get(rule, rule)])
    assert f"msnet train --workdir={tmp_path} {stages}`" in str(e.value), rule
  with pytest.raises(errors.InvalidInputError, match="unknown rule " + UNKNOWN):
    predictor.check_rule("nope")
  _done(tmp_path, sorted({s for stages in NEEDS.values() for s in stages}))
  assert set(predict.Predictor(tmp_path, c, [str(i) for i in range(10)], 16).rules) == set(rules)
