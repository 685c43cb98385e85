"""`msnet evaluate` on tiny random-init models and tiny hand-written eval shards, on 8 fake CPU devices.

Proves: every record is counted exactly once (n = records, padding masked), every method's top-1/top-5
equal a NumPy recomputation from the same logits and so does every record's top-1 kept for the report's
bootstrap, each spec is evaluated once even when two sweeps share it, untrained methods are skipped and
listed, one compile per model group for the whole sweep, and a rerun skips the specs already in
cells.jsonl that have their per-image file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msnet import calibration, config as config_lib
from msnet import evaluate, models, parallel
from msnet import train as train_lib
from msnet.data import shards
from msnet.evaluate import resident, run as evaluate_run
from msnet.report import stats

RECORDS = 37            # not a multiple of the global batch: the last batch is padded
GLOBAL_BATCH = 16       # 2 per fake device
SPECS = ("clean", "jpeg:10", "jpeg:50", "blur:1@4", "jp2k:100")
DONE_STAGES = ("baseline", "branch_jpeg", "branch_jp2k", "master", "da_fc8", "stability", "deepcloak",
               "alexnet_baseline", "gate")
TEMPERATURES = (0.7, 1.9, 3.1)  # the calibrate stage's, per branch, fitted on every bin (ams_cal)
OWN_BIN_TEMPERATURES = (1.3, 0.9, 2.2)  # each on its own bin (map_cal, branch_<bin>_cal)
MASTER_TEMPERATURE = 2.5


def _config() -> Any:
  c = config_lib.base_config()
  c.data.image_size = 32
  c.model.width = 0.0625
  c.model.fc_width = 16
  c.master.conv_features = (4, 4, 4)
  c.master.fc_features = (8, 8)
  c.sweeps = {"clean": ["clean"], "jpeg": ["jpeg:10", "jpeg:50"], "blur": ["blur:1"],
              "mixed": ["jpeg:10", "jp2k:100"]}  # jpeg:10 in two sweeps: evaluated once
  c.evaluate.sweeps = ["clean", "jpeg", "blur", "mixed"]
  c.evaluate.global_batch = GLOBAL_BATCH
  c.evaluate.methods = (*c.evaluate.methods, "ams_cal", "map_cal", "gate")
  return c


def _write_shards(workdir: pathlib.Path, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
  """Random records per spec (two shard files for jpeg:10); returns what was written, for the reference."""
  data = {}
  for spec in SPECS:
    images = rng.integers(0, 256, (RECORDS, 32, 32, 3), dtype=np.uint8)
    d = dict(image=images, label=rng.integers(0, 10, RECORDS), bin=rng.integers(0, 3, RECORDS),
             bitstream_bin=rng.integers(0, 3, RECORDS), psnr=rng.uniform(20, 40, RECORDS))
    if spec == "clean":
      d["psnr"][:] = math.inf
    data[spec] = d
    records = [shards.encode_record(images[i], dict(
        label=int(d["label"][i]), spec=spec, bin=int(d["bin"][i]), bitstream_bin=int(d["bitstream_bin"][i]),
        index=i, psnr=float(d["psnr"][i]), bpp=None if spec == "clean" else 1.0, level=None, ratio=None,
        codec=None)) for i in range(RECORDS)]
    out = shards.spec_dir(workdir, "test", spec)
    out.mkdir(parents=True)
    cuts = [0, 20, RECORDS] if spec == "jpeg:10" else [0, RECORDS]
    for k in range(len(cuts) - 1):
      shards.write_shard(out / shards.shard_name(k, len(cuts) - 1), records[cuts[k]:cuts[k + 1]])
  return data


def _random_params(module: Any, rng: np.random.Generator) -> Any:
  """He-scaled random params from the module's shapes (eval_shape: no slow init compile on 2 CPUs)."""
  x = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]

  def one(path: tuple[Any, ...], leaf: Any) -> np.ndarray:
    shape = leaf.shape[1:] if path[0].key == "branches" else leaf.shape  # vmapped: leading axis K
    std = math.sqrt(2.0 / math.prod(shape[:-1])) if path[-1].key == "kernel" else 0.1
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(one, shapes)


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _counts(probs: np.ndarray, labels: np.ndarray) -> tuple[int, int, np.ndarray]:
  """Top-1 and top-5 counts and top-1 per record."""
  top1 = np.argmax(probs, -1) == labels
  p_label = np.take_along_axis(probs, labels[:, None], -1)
  top5 = int(np.sum(np.sum(probs > p_label, -1) < 5))
  return int(top1.sum()), top5, top1


def _models(cfg: Any) -> tuple[Any, Any, Any, Any]:
  """The slave (K=3), the K=1 network, the master and the AlexNet of the config."""
  return (models.build_slave(cfg.model, 10, 3), models.build_slave(cfg.model, 10, 1),
          models.build_master(cfg.master, 3), models.build_slave(config_lib.alexnet_model(cfg), 10, 1))


def _stage_params(cfg: Any) -> tuple[dict[str, Any], np.ndarray]:
  """Every stage's random params (the same in any process: seeded) and DeepCloak's feature mask."""
  slave, single, master, alexnet = _models(cfg)
  rng = np.random.default_rng(1)
  base = _random_params(single, rng)
  # As trained: the branches and DA fc8 keep the baseline's trunk; stability retrains everything.
  params = dict(baseline=base, slave=dict(_random_params(slave, rng), trunk=base["trunk"]),
                da_fc8=dict(_random_params(single, rng), trunk=base["trunk"]),
                stability=_random_params(single, rng), master=_random_params(master, rng),
                gate=_random_params(master, rng),
                alexnet_baseline=_random_params(alexnet, rng))
  mask = np.ones(params["baseline"]["trunk"]["conv4_3"]["bias"].shape, np.float32)
  mask[::3] = 0.0
  return params, mask


def stand_in_networks(monkeypatch: Any, params: dict[str, Any]) -> None:
  """Random-init params stand in for the completed stages' networks (as variables: these have no BatchNorm)."""
  monkeypatch.setattr(train_lib, "load_params", lambda workdir, stage: params[stage])
  monkeypatch.setattr(train_lib, "load_variables", lambda workdir, stage: {"params": params[stage]})
  monkeypatch.setattr(train_lib, "load_baseline_variables", lambda workdir, config: {"params": params["baseline"]})
  monkeypatch.setattr(train_lib, "load_slave_variables", lambda workdir, config: {"params": params["slave"]})


def _stand_in(monkeypatch: Any, params: dict[str, Any], mask: np.ndarray) -> None:
  """Random-init params stand in for the checkpoints of the completed stages."""
  stand_in_networks(monkeypatch, params)
  monkeypatch.setattr(train_lib, "load_feature_mask", lambda workdir: mask)
  monkeypatch.setattr(train_lib, "load_gate_params", lambda workdir: params["gate"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
  workdir = tmp_path_factory.mktemp("w")
  cfg = _config()
  data = _write_shards(workdir, np.random.default_rng(0))
  # Two unreadable source records skipped by degrade (the specs' shards are summarised from their records).
  (workdir / "data" / "manifest.json").write_text(json.dumps({"splits": {"test": {"skipped": [3, 7], "specs": {}}}}))
  for stage in DONE_STAGES:
    (workdir / "train" / stage).mkdir(parents=True)
    (workdir / "train" / stage / "DONE.json").write_text(json.dumps({"wall_time_s": 1.0}))
  (workdir / "train" / "calibrate").mkdir(parents=True)
  (workdir / "train" / "calibrate" / "DONE.json").write_text(json.dumps(
      {"temperatures": TEMPERATURES, "own_bin_temperatures": OWN_BIN_TEMPERATURES,
       "master_temperature": MASTER_TEMPERATURE}))
  slave, single, master, alexnet = _models(cfg)
  params, mask = _stage_params(cfg)
  # Unsharded reference forward passes, on one device.
  apply = dict(slave=jax.jit(lambda p, x: slave.apply({"params": p}, x)),
               single=jax.jit(lambda p, x, m=None: single.apply({"params": p}, x, feature_mask=m)),
               master=jax.jit(lambda p, x: master.apply({"params": p}, x)),
               alexnet=jax.jit(lambda p, x: alexnet.apply({"params": p}, x)))
  apply = {k: (lambda f: lambda *a: np.asarray(f(*a)))(f) for k, f in apply.items()}
  return dict(workdir=workdir, cfg=cfg, data=data, params=params, mask=mask, apply=apply)


@pytest.fixture
def trained(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
  """Random-init params stand in for the checkpoints of the completed stages."""
  _stand_in(monkeypatch, setup["params"], setup["mask"])
  return setup


def _reference_probs(setup: dict[str, Any], spec: str) -> dict[str, np.ndarray]:
  """Every method's class probabilities recomputed in NumPy from the models' logits on the raw records."""
  d, p, apply = setup["data"][spec], setup["params"], setup["apply"]
  x = jnp.asarray(d["image"])
  branch_logits = apply["slave"](p["slave"], x).astype(np.float64)
  branch = _softmax(branch_logits)                           # [K, B, C]
  master_logits = apply["master"](p["master"], x).astype(np.float64)
  pbin = _softmax(master_logits)                             # [B, K]
  tempered = _softmax(branch_logits / np.asarray(TEMPERATURES)[:, None, None])
  own = _softmax(branch_logits / np.asarray(OWN_BIN_TEMPERATURES)[:, None, None])
  rows = np.arange(RECORDS)
  probs = {
      "baseline": _softmax(apply["single"](p["baseline"], x))[0],
      "da_fc8": _softmax(apply["single"](p["da_fc8"], x))[0],
      "stability": _softmax(apply["single"](p["stability"], x))[0],
      "alexnet_baseline": _softmax(apply["alexnet"](p["alexnet_baseline"], x))[0],
      "deepcloak": _softmax(apply["single"](p["baseline"], x, setup["mask"]))[0],
      "branch_clean": branch[0], "branch_jpeg": branch[1], "branch_jp2k": branch[2],
      "ms": branch[np.argmax(pbin, -1), rows],
      "ams": branch.max(0),
      "map": np.einsum("bk,kbc->bc", pbin, branch),
      "oracle": branch[d["bin"], rows],
      "bitstream": branch[d["bitstream_bin"], rows],
      "branch_clean_cal": own[0], "branch_jpeg_cal": own[1], "branch_jp2k_cal": own[2],
      "ams_cal": tempered.max(0),
      "map_cal": np.einsum("bk,kbc->bc", _softmax(master_logits / MASTER_TEMPERATURE), own),
      "gate": np.einsum("bk,kbc->bc", _softmax(apply["master"](p["gate"], x)), branch),
  }
  assert not np.allclose(probs["deepcloak"], probs["baseline"])  # the mask matters, so the test can see it
  return probs


def _reference(setup: dict[str, Any], spec: str) -> dict[str, tuple[int, int, np.ndarray]]:
  """Every method's (top1, top5) counts and top-1 per record."""
  return {m: _counts(v, setup["data"][spec]["label"]) for m, v in _reference_probs(setup, spec).items()}


def test_counts_match_numpy_once_per_record(trained: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
  workdir, cfg = trained["workdir"], trained["cfg"]
  rows = evaluate.run_evaluate(cfg, workdir)
  results = json.loads((workdir / "eval" / "results.json").read_text())
  meta = results["meta"]
  correct = stats.load_correct(workdir / "eval")
  assert len(correct) == len(results["rows"])

  # Untrained stages are skipped, listed in the meta and printed.
  assert set(meta["missing"]) == {"da_fc67", "da_fc678"}
  err = capsys.readouterr().err
  assert "da_fc67" in err
  assert meta["skipped"] == 2 and f"n = {RECORDS} records per spec (2 source records skipped as unreadable)" in err
  methods = {"baseline", "da_fc8", "stability", "alexnet_baseline", "deepcloak", "branch_clean", "branch_jpeg", "branch_jp2k",
             "ms", "ams", "map", "oracle", "bitstream", "ams_cal", "map_cal", "gate", "branch_clean_cal",
             "branch_jpeg_cal", "branch_jp2k_cal"}
  assert set(meta["methods"]) == methods
  # Each spec once (jpeg:10 belongs to two sweeps), one row per (method, spec).
  assert meta["specs"] == ["clean", "jpeg:10", "jpeg:50", "blur:1@4", "jp2k:100"]
  assert len(rows) == len(results["rows"]) == len(methods) * len(SPECS)
  # Methods sharing the baseline's trunk run in one pass; stability (its own trunk) and the AlexNet alone.
  # One program per group and architecture for the whole sweep.
  assert set(meta["groups"]["shared"]) == methods - {"stability", "alexnet_baseline"}
  assert meta["groups"]["single"] == ["stability", "alexnet_baseline"]
  assert meta["traces"] == {"shared": 1, "single_vgg16": 1, "single_alexnet": 1}

  reliability = json.loads((workdir / "eval" / "reliability.json").read_text())
  assert reliability["ece_bins"] == 15
  for spec in SPECS:
    ref = _reference(trained, spec)
    mine = {r["method"]: r for r in results["rows"] if r["spec"] == spec}
    assert set(mine) == methods
    for m, (top1, top5, per_image) in ref.items():
      r = mine[m]
      assert r["n"] == RECORDS, (spec, m)
      assert (r["correct1"], r["correct5"]) == (top1, top5), (spec, m)
      # Per-image top-1 in record order (two shard files for jpeg:10, a padded last batch), summing to the count.
      assert np.array_equal(correct[(m, spec)], per_image), (spec, m)
      assert int(correct[(m, spec)].sum()) == r["correct1"]
      assert r["top1"] == pytest.approx(top1 / RECORDS) and r["top5"] == pytest.approx(top5 / RECORDS)
      assert r["ci95_low"] <= r["top1"] <= r["ci95_high"]
    # Expected calibration error (15 bins) of every shared-group method against the float64 reference; the
    # methods with a trunk of their own keep no histogram.
    probs = _reference_probs(trained, spec)
    for m in methods:
      if m in ("stability", "alexnet_baseline"):
        assert mine[m]["ece"] is None
      else:
        hist = calibration.histogram(probs[m], trained["data"][spec]["label"], 15)
        assert mine[m]["ece"] == pytest.approx(calibration.ece(hist), abs=1e-5), (spec, m)
        assert reliability["specs"][spec][m]["count"] == hist["count"], (spec, m)
    psnr = trained["data"][spec]["psnr"]
    assert mine["baseline"]["psnr"] == (None if spec == "clean" else pytest.approx(psnr.mean()))
  jpeg10 = next(r for r in results["rows"] if r["spec"] == "jpeg:10")
  assert jpeg10["sweeps"] == ["jpeg", "mixed"] and jpeg10["kind"] == "jpeg" and jpeg10["level"] == 10
  blur = next(r for r in results["rows"] if r["spec"] == "blur:1@4")
  assert (blur["kind"], blur["level"], blur["codec"], blur["pre"]) == ("blur", 1.0, "", "")

  # The master's and the bitstream's bin confusion, against the records.
  master = json.loads((workdir / "eval" / "master.json").read_text())
  assert master["bins"] == ["clean", "jpeg", "jp2k"]
  for spec in SPECS:
    d = trained["data"][spec]
    pred = np.argmax(trained["apply"]["master"](trained["params"]["master"], jnp.asarray(d["image"])), -1)
    conf = np.zeros((3, 3), int)
    np.add.at(conf, (d["bin"], pred), 1)
    cell = master["specs"][spec]
    assert cell["n"] == RECORDS and np.array_equal(cell["master_confusion"], conf)
    assert cell["master_accuracy"] == pytest.approx(np.trace(conf) / RECORDS)
    bconf = np.zeros((3, 3), int)
    np.add.at(bconf, (d["bin"], d["bitstream_bin"]), 1)
    assert np.array_equal(cell["bitstream_confusion"], bconf)
  assert master["specs"]["jpeg:10"]["true_bin"] == 1 and master["specs"]["clean"]["true_bin"] == 0

  with (workdir / "eval" / "results.csv").open() as f:
    csv_rows = list(csv.DictReader(f))
  assert len(csv_rows) == len(rows) and csv_rows[0].keys() == set(evaluate.ROW_FIELDS)
  rf = json.loads((workdir / "eval" / "receptive_fields.json").read_text())
  assert {(n["arch"], n["variant"]) for n in rf} >= {("vgg16", "imagenet"), ("alexnet", "imagenet")}


def test_resume_skips_finished_specs(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
  workdir, cfg = trained["workdir"], trained["cfg"]
  if not (workdir / "eval" / "cells.jsonl").exists():
    evaluate.run_evaluate(cfg, workdir)
  before = json.loads((workdir / "eval" / "results.json").read_text())["rows"]
  calls = []
  real = evaluate_run.evaluate_spec
  monkeypatch.setattr(evaluate_run, "evaluate_spec", lambda *a, **k: calls.append(a[2]) or real(*a, **k))

  assert evaluate.run_evaluate(cfg, workdir) == before
  assert calls == []

  # Interrupted while the last spec ran: its line is missing (and a torn line was left behind).
  cells = workdir / "eval" / "cells.jsonl"
  lines = cells.read_text().splitlines()
  assert len(lines) == len(SPECS)
  cells.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
  assert evaluate.run_evaluate(cfg, workdir) == before
  assert calls == ["jp2k:100"]

  # A logged spec without its per-image file (evaluated before they were kept, or deleted) is evaluated again.
  evaluate.correct_path(workdir / "eval", "blur:1@4").unlink()
  assert evaluate.run_evaluate(cfg, workdir) == before
  assert calls == ["jp2k:100", "blur:1@4"]

  # A different set of methods is a different cell: everything is evaluated again (here DeepCloak needs
  # the trunk without any stacked head, and stability runs alone).
  cfg = _config()
  cfg.evaluate.methods = ["deepcloak", "stability"]
  rows = evaluate.run_evaluate(cfg, workdir)
  assert len(calls) == 2 + len(SPECS) and {r["method"] for r in rows} == {"deepcloak", "stability"}
  key = lambda r: (r["spec"], r["method"], r["correct1"], r["correct5"])  # noqa: E731
  assert sorted(map(key, rows)) == sorted(key(r) for r in before if r["method"] in ("deepcloak", "stability"))


def _linked_workdir(setup: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """A workdir of its own (its own W/eval) over the fixture's shards and completed stages."""
  path.mkdir()
  for part in ("data", "train"):
    (path / part).symlink_to(setup["workdir"] / part)
  return path


def _eval_files(workdir: pathlib.Path) -> dict[str, Any]:
  """Everything an evaluation wrote: results rows and meta, the CSV, master.json, reliability.json and each
  spec's per-image top-1 bits."""
  out = workdir / "eval"
  results = json.loads((out / "results.json").read_text())
  correct = {}
  for f in sorted((out / "correct").glob("*.npz")):
    with np.load(f) as z:
      correct[f.name] = {k: z[k] for k in z.files}
  return dict(rows=results["rows"], meta=results["meta"], csv=(out / "results.csv").read_text().splitlines(),
              master=json.loads((out / "master.json").read_text()),
              reliability=json.loads((out / "reliability.json").read_text()), correct=correct)


def _assert_same_files(host: dict[str, Any], device: dict[str, Any]) -> None:
  """Bits, counts, confusions and histogram counts exactly; the float32 sums of confidences (and the ECE from
  them) to rounding: the two paths may fuse the per-batch additions differently."""
  assert device["correct"].keys() == host["correct"].keys() and len(host["correct"]) == len(SPECS)
  for name, arrays in host["correct"].items():
    assert device["correct"][name].keys() == arrays.keys()
    for k, v in arrays.items():
      assert np.array_equal(device["correct"][name][k], v), (name, k)
  assert device["master"] == host["master"]
  drop = lambda r: {k: v for k, v in r.items() if k != "ece"}  # noqa: E731
  assert [drop(r) for r in device["rows"]] == [drop(r) for r in host["rows"]]
  for a, b in zip(device["rows"], host["rows"]):
    assert a["ece"] == (None if b["ece"] is None else pytest.approx(b["ece"], abs=1e-6)), (a["method"], a["spec"])
  for spec, methods in host["reliability"]["specs"].items():
    for m, h in methods.items():
      d = device["reliability"]["specs"][spec][m]
      assert (d["count"], d["correct"]) == (h["count"], h["correct"]), (spec, m)
      assert d["confidence"] == pytest.approx(h["confidence"], rel=1e-6, abs=1e-6), (spec, m)
  assert len(device["csv"]) == len(host["csv"]) and device["csv"][0] == host["csv"][0]
  ignore = ("wall_s", "device_data")
  assert {k: v for k, v in device["meta"].items() if k not in ignore} == {
      k: v for k, v in host["meta"].items() if k not in ignore}


def test_device_resident_gives_the_host_files(trained: dict[str, Any], tmp_path: pathlib.Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
  """Every spec's records on the devices, one scanned call per group: the host path's files, on 8 devices and
  on a mesh of 1 (the padded last batch masked out in both)."""
  cfg = _config()
  cfg.evaluate.device_data = "off"
  evaluate.run_evaluate(cfg, _linked_workdir(trained, tmp_path / "host"))
  host = _eval_files(tmp_path / "host")
  assert host["meta"]["device_data"] == []

  cfg.evaluate.device_data = "on"
  streamed = []
  monkeypatch.setattr(evaluate_run, "evaluate_batches", lambda *a, **k: streamed.append(a) or {})
  evaluate.run_evaluate(cfg, _linked_workdir(trained, tmp_path / "device8"))
  device8 = _eval_files(tmp_path / "device8")
  assert streamed == [] and device8["meta"]["device_data"] == list(SPECS)
  assert device8["meta"]["traces"] == {"shared": 1, "single_vgg16": 1, "single_alexnet": 1}  # one scan each
  _assert_same_files(host, device8)

  one = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  monkeypatch.setattr(parallel, "make_mesh", lambda axes: one)
  evaluate.run_evaluate(cfg, _linked_workdir(trained, tmp_path / "device1"))
  _assert_same_files(host, _eval_files(tmp_path / "device1"))


def test_device_data_budget(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
  """The bytes a spec takes per device, as placed; the budget decides the path; the field is validated."""
  cfg, mesh = _config(), parallel.make_mesh(_config().mesh)
  local = resident.read_local(setup["workdir"], "test", "jpeg:10", GLOBAL_BATCH)   # two shard files
  placed = resident.place(local, mesh, GLOBAL_BATCH)
  batches = -(-RECORDS // GLOBAL_BATCH)
  assert placed["image"].shape == (batches, GLOBAL_BATCH, 32, 32, 3)
  flat = {k: np.asarray(v).reshape(batches * GLOBAL_BATCH, *v.shape[2:]) for k, v in placed.items()}
  d = setup["data"]["jpeg:10"]
  assert np.array_equal(flat["mask"], np.arange(batches * GLOBAL_BATCH) < RECORDS)
  for k in ("image", "label", "bin", "bitstream_bin"):
    assert np.array_equal(flat[k][:RECORDS], d[k]) and not flat[k][RECORDS:].any(), k
  per_device = sum(a.addressable_shards[0].data.nbytes for a in placed.values())
  assert {len(a.addressable_shards) for a in placed.values()} == {8}
  assert resident.bytes_per_device(RECORDS, (32, 32, 3), GLOBAL_BATCH, mesh) == per_device

  for setting, expected in (("on", True), ("off", False), ("auto", False),  # "auto": the host path on the CPU
                            (str(per_device), True), (str(per_device - 1), False), ("1e9", True)):
    cfg.evaluate.device_data = setting
    config_lib.validate(cfg)
    assert resident.choose(cfg, mesh, [RECORDS, 0]) == [expected, True], setting
  # "auto" on an accelerator: half its free memory.
  cfg.evaluate.device_data = "auto"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for free, expected in ((2 * per_device, True), (2 * per_device - 1, False)):
    monkeypatch.setattr(resident, "free_bytes_per_device", lambda free=free: free)
    assert resident.choose(cfg, mesh, [RECORDS]) == [expected]
  for bad in ("lots", "-1", ""):
    cfg.evaluate.device_data = bad
    with pytest.raises(config_lib.ConfigError, match="evaluate.device_data"):
      config_lib.validate(cfg)


_TWO_PROCESS_SCRIPT = """
import pathlib, sys
sys.path.insert(0, {tests!r})
import pytest
import test_evaluate as t
from msnet import evaluate, parallel
parallel.maybe_initialize_distributed()
cfg = t._config()
t._stand_in(pytest.MonkeyPatch(), *t._stage_params(cfg))
cfg.evaluate.device_data = "on"
evaluate.run_evaluate(cfg, pathlib.Path(sys.argv[1]))
"""


@pytest.mark.slow
def test_device_resident_two_processes(trained: dict[str, Any], tmp_path: pathlib.Path) -> None:
  """2 processes x 4 devices, each putting its half of every spec on its devices: the files of the host path
  on 1 process x 8 devices."""
  cfg = _config()
  cfg.evaluate.device_data = "off"
  evaluate.run_evaluate(cfg, _linked_workdir(trained, tmp_path / "host"))
  two = _linked_workdir(trained, tmp_path / "two")
  root = pathlib.Path(__file__).resolve().parent.parent
  env = {k: v for k, v in os.environ.items() if not k.startswith("MSNET_")}
  script = _TWO_PROCESS_SCRIPT.format(tests=str(root / "tests"))
  done = subprocess.run(["bash", str(root / "launch" / "local.sh"), "--processes", "2", "--devices-per-process", "4",
                         "--", sys.executable, "-c", script, str(two)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  files = _eval_files(two)
  assert files["meta"]["processes"] == 2 and files["meta"]["device_data"] == list(SPECS)
  host = _eval_files(tmp_path / "host")
  host["meta"]["processes"] = 2
  _assert_same_files(host, files)
