"""Configs are the interface: every config file builds, runlocal shrinks, and bad fields are refused early."""

import math
import pathlib
import re
import subprocess
import sys

import pytest

from msnet import config as config_lib, degradations

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _load(path: pathlib.Path, arg: str | None):
  import importlib.util
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_config_validates(path, arg):
  c = _load(path, arg)
  config_lib.validate(c)
  if arg == "runlocal":
    assert 0 < c.data.max_train_examples <= 1024
    assert all(c.stages[s].steps <= 10 for s in ("baseline", "branch", "master"))


@pytest.mark.parametrize("field,value,message", [
    ("model.trunk_layers", 20, "config.model.trunk_layers"),
    ("data.source", "imagenet", "config.data.source"),
    ("stages.branch.lr", -1.0, "config.stages.branch.lr"),
    ("degrade.on_corrupt", "ignore", "config.degrade.on_corrupt"),
    ("train.global_batch", 0, "config.train.global_batch"),
    ("extensions", ("calibrate", "temperature"), "config.extensions: 'temperature' is not one of"),
    ("extensions", ("calibrate",), "config.data.holdout_examples: the calibrate stage fits"),
    ("stages.calibrate.ece_bins", 0, "config.stages.calibrate.ece_bins"),
    ("shared.stages", ("master",), "config.shared.workdir: required when shared.data or shared.stages"),
    ("shared.data", True, "config.shared.workdir: required"),
])
def test_impossible_values_name_the_field(field, value, message):
  c = _load(ROOT / "configs" / "demo.py", None)
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


@pytest.mark.parametrize("stages,message", [
    (("branch",), "'branch' is not a trained stage of this config"),
    (("baseline=deepcloak",), "'deepcloak' is not a trained stage"),
    (("baseline=master",), "a master network and a slave network do not stand in for each other"),
    (("master", "master=gate"), "a stage is shared twice"),
])
def test_bad_shared_stages_are_refused(stages, message):
  c = _load(ROOT / "configs" / "demo.py", None)
  c.shared.workdir, c.shared.stages = "/elsewhere", stages
  with pytest.raises(config_lib.ConfigError, match=f"config.shared.stages: .*{re.escape(message)}"):
    config_lib.validate(c)


def test_resnet_pair_grows_its_branches_from_the_other_runs_augmix():
  c = _load(ROOT / "configs" / "cifar10_resnet.py", "on_augmix")
  with pytest.raises(config_lib.ConfigError, match="config.shared.workdir: required"):
    config_lib.validate(c)  # the run it grows from is named on the command line
  c.shared.workdir = "runs/resnet-s0"
  config_lib.validate(c)
  assert c.shared.data and set(c.shared.stages) == {"master", "baseline=augmix"} and c.comparisons == ()


def test_accelerator_config_keeps_every_stages_images_seen():
  cpu, gpu = (_load(ROOT / "configs" / "cifar10_repro.py", arg) for arg in (None, "gpu"))
  scale = gpu.train.global_batch // cpu.train.global_batch
  for name in ("branch", "master", "da_fc8", "da_fc67", "da_fc678", "stability", "augmix"):
    assert gpu.stages[name].steps == -(-cpu.stages[name].steps // scale), name
  assert gpu.stages.baseline.epochs == cpu.stages.baseline.epochs


def test_full_width_resnet_crops_only_the_clean_stages_and_calls_divide_its_epochs():
  full = _load(ROOT / "configs" / "cifar10_resnet.py", "full")
  config_lib.validate(full)
  assert full.model.width == 1.0 and full.model.norm == "batch"
  assert {n for n, s in full.stages.items() if s.get("crop_pad")} == {"baseline", "augmix"}
  steps_per_epoch = math.ceil(50_000 / full.train.global_batch)
  assert steps_per_epoch % full.train.steps_per_call == 0 == full.train.checkpoint_every_steps % steps_per_epoch
  paired = _load(ROOT / "configs" / "cifar10_resnet.py", "full,on_augmix")
  paired.shared.workdir = "runs/resnet-full-s0"
  config_lib.validate(paired)


def test_bad_spec_in_sweep_is_refused():
  c = _load(ROOT / "configs" / "demo.py", None)
  c.sweeps.jpeg = ["jpeg:10", "jpeg:500"]
  with pytest.raises(config_lib.ConfigError, match="config.sweeps.jpeg"):
    config_lib.validate(c)
  c.sweeps.jpeg = ["jpg:10"]
  with pytest.raises(config_lib.ConfigError, match="config.sweeps.jpeg"):
    config_lib.validate(c)


def test_parse_arg():
  known = ("runlocal", "trunk_layers")
  assert config_lib.parse_arg("runlocal,trunk_layers=11", known) == {"runlocal": True, "trunk_layers": "11"}
  assert config_lib.parse_arg(None) == {}
  with pytest.raises(config_lib.ConfigError, match="'runlocl' .* is not one of \\['runlocal'\\]"):
    config_lib.parse_arg("runlocl")


def test_cli_refuses_a_misspelled_config_argument_in_one_line(tmp_path):
  workdir = tmp_path / "w"
  result = _msnet("degrade", f"--config={ROOT / 'configs' / 'demo.py'}:runlocl", f"--workdir={workdir}", cwd=tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0 and "'runlocl'" in result.stderr and "Traceback" not in result.stderr
  assert not workdir.exists()


def _msnet(*args: str, cwd: pathlib.Path):
  return subprocess.run([sys.executable, "-m", "msnet.cli", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize("override,expected", [
    ("--config.data.max_train_exampels=3", "max_train_exampels"),  # misspelled field (locked config)
    ("--config.train.global_batch=abc", "global_batch"),           # wrong type
    ("--config.model.trunk_layers=0", "config.model.trunk_layers"),  # impossible value
])
def test_cli_refuses_bad_overrides_before_any_work(tmp_path, override, expected):
  workdir = tmp_path / "w"
  result = _msnet("degrade", f"--config={ROOT / 'configs' / 'demo.py'}:runlocal", f"--workdir={workdir}", override,
                  cwd=tmp_path)
  assert result.returncode != 0
  assert expected in result.stderr
  assert not workdir.exists()


def test_cli_rejects_unknown_subcommand(tmp_path):
  result = _msnet("fly", "--workdir=x", cwd=tmp_path)
  assert result.returncode != 0
  assert "usage: msnet" in result.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_json_round_trip(path):
  c = _load(path, None)
  back = config_lib.from_json(config_lib.to_json(c))
  config_lib.validate(back)
  assert back.bins[1].name == c.bins[1].name
  assert list(back.bins[1].train_specs) == list(c.bins[1].train_specs)
  assert config_lib.to_json(back) == config_lib.to_json(c)


def test_a_config_saved_before_a_field_existed_loads_with_its_default():
  """W/config.json of an older msnet lacks newer fields; they take their defaults, saved values stay, and a
  sweep mapping the config replaced whole gets no default sweeps back."""
  import json
  saved = json.loads(config_lib.to_json(_load(ROOT / "configs" / "depth_study.py", None)))
  del saved["extensions"], saved["stages"]["gate"], saved["stages"]["calibrate"], saved["data"]["holdout_examples"]
  saved["stages"]["branch"]["lr"] = 0.123
  back = config_lib.from_json(json.dumps(saved))
  config_lib.validate(back)
  assert back.extensions == () and back.data.holdout_examples == 0 and back.stages.calibrate.ece_bins == 15
  assert back.stages.branch.lr == 0.123
  assert list(back.sweeps) == list(saved["sweeps"])


def test_cli_degrade_split_over_two_machines_then_merge(tmp_path):
  """Two `msnet degrade` parts (num_shards=2) write disjoint shards; `--merge` checks them and writes the
  manifest, equal to the one the last part wrote."""
  import json
  workdir = tmp_path / "w"
  common = (f"--config={ROOT / 'configs' / 'demo.py'}:runlocal", f"--workdir={workdir}",
            "--config.data.max_train_examples=64", "--config.data.max_eval_examples=32",
            "--config.degrade.num_workers=0", "--config.degrade.num_shards=2")
  for part in (0, 1):
    result = _msnet("degrade", *common, f"--config.degrade.shard_index={part}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
  manifest = workdir / "data" / "manifest.json"
  merged_by_last_part = json.loads(manifest.read_text())
  manifest.unlink()
  result = _msnet("degrade", *common, "--merge", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(manifest.read_text()) == merged_by_last_part
  assert merged_by_last_part["num_parts"] == 2


# ---------------------------------------------------------------------------------------------- quality bins

SCALE_STRONG_END = {"jpeg": 1.0, "jp2k": math.inf}  # JPEG quality 1 is the strongest; JPEG 2000 ratios grow
QUALITY_SCALES = ("jpeg", "webp", "avif")  # lower is stronger; JPEG 2000 ratios and JPEG XL distances grow


def _expected_bin(spec: str, bins) -> int:
  """The bin of a spec, computed apart from msnet.degradations: each codec op's kind and level against each
  bin's range taken from the mild end of its rule (as written) to the strong end of the codec's scale; a chain
  that encodes twice takes its last codec in a bin other than 0 (a mild re-encode hides no strong encode)."""
  def codec_bin(kind: str, level: float) -> int:
    for i, b in enumerate(bins):
      for rule in b.match:
        if "@bpp" in rule:  # a rate rule bins files, never specs
          continue
        rule_kind, lo, hi = re.fullmatch(r"(\w+):([\d.]+)-([\d.]+|inf)", rule).groups()
        quality = rule_kind in QUALITY_SCALES
        mild_end = float(hi) if quality else float(lo)
        if rule_kind == kind and (level <= mild_end if quality else level >= mild_end):
          return i
    return 0

  codecs = [op.split(":") for op in spec.split("+") if op.split(":")[0] in ("jpeg", "jp2k", "webp", "avif", "jxl")]
  found = [codec_bin(kind, float(arg.split("@")[0])) for kind, arg in codecs]
  return next((b for b in reversed(found) if b), 0)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_sweep_spec_falls_in_its_codecs_bin_up_to_the_scale_end(path, arg):
  """No spec stronger than a bin's training range falls back to the clean bin (issue 11.4)."""
  c = _load(path, arg)
  rules = [list(b.match) for b in c.bins]
  specs = [s for sweep in c.sweeps.values() for s in sweep]
  assert any(s.startswith("jpeg:") for s in specs) and any(s.startswith("jp2k:") for s in specs)
  for spec in specs:
    assert degradations.bin_of(spec, rules) == _expected_bin(spec, c.bins), spec
  codec_bin = {kind: [i for i, b in enumerate(c.bins) if any(r.startswith(kind + ":") for r in b.match)]
               for kind in ("jpeg", "jp2k")}
  assert codec_bin == {"jpeg": [1], "jp2k": [2]}
  for spec, kind in (("jpeg:1", "jpeg"), ("jpeg:2", "jpeg"), ("jp2k:1000", "jp2k")):
    assert [degradations.bin_of(spec, rules)] == codec_bin[kind] == [_expected_bin(spec, c.bins)], spec
  full = _load(path, None)  # runlocal keeps one training spec per bin; the full list is the training range
  for i, b in enumerate(full.bins):
    assert all(_expected_bin(s, full.bins) == i for s in b.train_specs), b.train_specs


@pytest.mark.parametrize("match,message", [
    ((("jpeg:1-40",), ("jpeg:1-20",)), "'jpeg:1-20' of bin 2 overlaps 'jpeg:1-40' of bin 1"),
    ((("jpeg:1-20",), ("jp2k:80-inf", "jpeg:20-30")), "'jpeg:20-30' of bin 2 overlaps 'jpeg:1-20'"),
    ((("jpeg:1-20",), ("jp2k:12-30", "jp2k:31-inf")), None),  # one bin may hold several ranges of a codec
    ((("jp2k:12-inf",), ("jp2k:1000-2000",)), "'jp2k:1000-2000' of bin 2 overlaps 'jp2k:12-inf' of bin 1"),
])
def test_overlapping_bins_of_one_codec_are_refused(match, message):
  c = _load(ROOT / "configs" / "demo.py", None)
  c.bins[1].match, c.bins[2].match = match
  c.bins[1].train_specs, c.bins[2].train_specs = ("jpeg:10",), ("jp2k:40",)
  if message is None:
    config_lib.validate(c)
    return
  with pytest.raises(config_lib.ConfigError, match=re.escape("config.bins: bin rule " + message)):
    config_lib.validate(c)


def test_training_spec_outside_its_bin_is_refused():
  c = _load(ROOT / "configs" / "demo.py", None)
  c.bins[1].train_specs = ("jpeg:10", "jpeg:30")
  with pytest.raises(config_lib.ConfigError, match=r"config.bins\[1\].train_specs: 'jpeg:30' falls in bin 0"):
    config_lib.validate(c)


def test_bad_bin_rule_is_refused():
  c = _load(ROOT / "configs" / "demo.py", None)
  c.bins[2].match = ("jp2k:12-infinity",)
  with pytest.raises(config_lib.ConfigError, match=r"config.bins\[2\].match: bad bin rule 'jp2k:12-infinity'"):
    config_lib.validate(c)


# ------------------------------------------------------------------------------------- evaluated methods

def test_evaluated_methods_follow_comparisons_unless_named():
  c = _load(ROOT / "configs" / "imagenet_vgg16.py", None)
  assert "alexnet_baseline" not in c.comparisons
  assert config_lib.evaluated_methods(c) == ["baseline", "branches", "ms", "ams", "map", "oracle", "bitstream",
                                             *c.comparisons]
  c.comparisons = ("stability",)
  assert config_lib.evaluated_methods(c)[-2:] == ["bitstream", "stability"]
  c.evaluate.methods = ("baseline", "alexnet_baseline", "comparisons", "baseline")  # explicit names still count
  assert config_lib.evaluated_methods(c) == ["baseline", "alexnet_baseline", "stability"]
  c.comparisons = ()
  c.evaluate.methods = ("comparisons",)
  assert config_lib.evaluated_methods(c) == []
  c.evaluate.methods = ("baseline", "comparison")
  with pytest.raises(config_lib.ConfigError, match="config.evaluate.methods: 'comparison' is not one of"):
    config_lib.validate(c)
