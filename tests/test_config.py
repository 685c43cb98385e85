"""Configs are the interface: every config file builds, runlocal shrinks, and bad fields are refused early."""

import pathlib
import subprocess
import sys

import pytest

from msnet import config as config_lib

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


def test_bad_spec_in_sweep_is_refused():
  c = _load(ROOT / "configs" / "demo.py", None)
  c.sweeps.jpeg = ["jpeg:10", "jpeg:500"]
  with pytest.raises(config_lib.ConfigError, match="config.sweeps.jpeg"):
    config_lib.validate(c)
  c.sweeps.jpeg = ["jpg:10"]
  with pytest.raises(config_lib.ConfigError, match="config.sweeps.jpeg"):
    config_lib.validate(c)


def test_parse_arg():
  assert config_lib.parse_arg("runlocal,trunk_layers=11") == {"runlocal": True, "trunk_layers": "11"}
  assert config_lib.parse_arg(None) == {}


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
