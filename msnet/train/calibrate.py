"""The `calibrate` stage: temperatures for the branches of the slave, and one for the master, fitted by NLL
on the hold-out slice of the training split (`config.data.holdout_examples`), never on the test split.

Why: AMS takes per class the max over branches of their softmax, and MAP weights the branches by the
master's posterior; both assume that a probability of one network means what it means in another. The
branches are fine-tuned from the baseline for a few thousand steps each and come out with their own
over- or under-confidence. Two temperatures per branch, because the two rules use a branch on different
inputs:
- `temperatures` (for `ams_cal`): fitted on every bin's specs, bins weighted equally, since AMS applies every
  branch to every input;
- `own_bin_temperatures` (for `map_cal` and the calibrated branches `branch_<bin>_cal`): fitted on the branch's
  own bin's specs, since MAP weights branch k by p(bin k | x), which is near 0 outside bin k.

W/train/calibrate/DONE.json holds them and, per branch, the ECE and NLL on the hold-out images before and
after, on its own bin's specs and on all of them.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from msnet import calibration, degradations, errors, models, parallel
from msnet.train import loop
from msnet.train.stages import load_params, load_slave_variables

STAGE = "calibrate"


def holdout_logits(config: ml_collections.ConfigDict, workdir: Any) -> dict[str, dict[str, np.ndarray]]:
  """spec -> {"branch": [N, K, C], "master": [N, K] float32 logits, "label", "bin": [N]} on the hold-out
  records of every hold-out spec (at most stages.calibrate.max_examples_per_spec of each)."""
  from msnet.data import degrade, loader  # noqa: PLC0415
  from msnet.evaluate.steps import gather_rows, local_rows  # noqa: PLC0415 (evaluate imports train)
  num_bins, num_classes = len(config.bins), int(config.data.num_classes)
  mesh = parallel.make_mesh(config.mesh)
  slave = models.build_slave(config.model, num_classes, num_bins)
  master = models.build_master(config.master, num_bins)
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  slave_vars = jax.device_put(load_slave_variables(workdir, config), repl)
  master_params = jax.device_put(load_params(workdir, "master"), repl)

  @functools.partial(jax.jit, in_shardings=(repl, repl, data), out_shardings=(data, data),
                     compiler_options=models.compiler_options())
  def forward(sv: Any, mp: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    branch = slave.apply(sv, images, train=False).astype(jnp.float32)      # [K, B, C]
    return jnp.transpose(branch, (1, 0, 2)), master.apply({"params": mp}, images).astype(jnp.float32)

  cap = int(config.stages.calibrate.max_examples_per_spec)
  out = {}
  for spec in tqdm.tqdm(degrade.holdout_specs(config), desc="calibrate", unit="spec",
                        disable=jax.process_index() != 0):
    source = loader.holdout_source(workdir, spec)
    if cap > 0:
      source = _Prefix(source, cap)
    rows = []
    for batch in loader.source_eval_batches(source, int(config.evaluate.global_batch), mesh):
      branch, master_logits = forward(slave_vars, master_params, batch["image"])
      rows.append([local_rows(x, mesh) for x in (branch, master_logits, batch["label"], batch["bin"],
                                                  batch["mask"])])
    if not rows:
      raise errors.MissingInputError(f"calibrate: the hold-out shards of {spec!r} hold no records")
    flat = [np.concatenate([r[i].reshape(len(r[i]), -1) for r in rows]) for i in range(5)]
    widths = np.cumsum([f.shape[1] for f in flat])
    table = gather_rows(np.concatenate([f.astype(np.float32) for f in flat], axis=1))
    table = table[table[:, -1] > 0]
    parts = np.split(table, widths[:-1], axis=1)
    out[spec] = {"branch": parts[0].reshape(len(table), num_bins, num_classes), "master": parts[1],
                 "label": parts[2][:, 0].astype(np.int64), "bin": parts[3][:, 0].astype(np.int64)}
  return out


class _Prefix:
  """The first n records of a random-access source."""

  def __init__(self, source: Any, n: int):
    self._source, self._n = source, min(n, len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> Any:
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source[i]

  def read(self, i: int) -> Any:
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source.read(i)


def fit(config: ml_collections.ConfigDict, logits: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
  """Temperatures and their before/after ECE and NLL from `holdout_logits`' output (host NumPy only)."""
  rules = [list(b.match) for b in config.bins]
  names = [b.name for b in config.bins]
  spec_bin = {spec: degradations.bin_of(spec, rules) for spec in logits}
  specs_in_bin = [sum(1 for s in logits if spec_bin[s] == k) for k in range(len(names))]
  # Bins count equally, and so do the specs of a bin, however many records each has.
  weights = np.concatenate([np.full(len(v["label"]), 1.0 / (specs_in_bin[spec_bin[s]] * len(v["label"])))
                            for s, v in logits.items()])
  labels = np.concatenate([v["label"] for v in logits.values()])
  bins = np.concatenate([v["bin"] for v in logits.values()])
  branch = np.concatenate([v["branch"] for v in logits.values()]).astype(np.float64)
  master = np.concatenate([v["master"] for v in logits.values()]).astype(np.float64)
  num_ece = int(config.stages.calibrate.ece_bins)
  own = [np.concatenate([np.full(len(v["label"]), spec_bin[s] == k) for s, v in logits.items()])
         for k in range(len(names))]

  branches = []
  for k, name in enumerate(names):
    if not own[k].any():
      raise errors.MissingInputError(f"calibrate: no hold-out spec falls in bin {name!r}; the hold-out holds every "
                                     "bin's train_specs: rerun `msnet degrade`")
    t = calibration.fit_temperature(branch[:, k], labels, weights)
    t_own = calibration.fit_temperature(branch[own[k], k], labels[own[k]], weights[own[k]])
    entry = {"bin": name, "temperature": t, "own_bin_temperature": t_own}
    for scope, sel in (("own_bin", own[k]), ("all_bins", np.ones(len(labels), bool))):
      for tag, z in (("raw", branch[sel, k]), ("calibrated", branch[sel, k] / t), ("own_bin_t", branch[sel, k] / t_own)):
        entry[f"ece_{scope}_{tag}"] = calibration.ece(calibration.histogram(calibration.softmax(z), labels[sel], num_ece))
        entry[f"nll_{scope}_{tag}"] = calibration.nll(z, labels[sel], weights[sel])
    branches.append(entry)
  t_master = calibration.fit_temperature(master, bins, weights)
  return {"branches": branches, "temperatures": [b["temperature"] for b in branches],
          "own_bin_temperatures": [b["own_bin_temperature"] for b in branches],
          "master_temperature": t_master,
          "master_nll_raw": calibration.nll(master, bins, weights),
          "master_nll_calibrated": calibration.nll(master / t_master, bins, weights),
          "records": {s: int(len(v["label"])) for s, v in logits.items()}, "ece_bins": num_ece}


def run_calibrate(config: ml_collections.ConfigDict, workdir: Any) -> dict[str, Any]:
  """Fit the temperatures and write W/train/calibrate/DONE.json (the stage's result)."""
  start = time.perf_counter()
  for stage in ["baseline", *(f"branch_{b.name}" for b in config.bins[1:]), "master"]:
    if loop.read_done(workdir, stage) is None:
      raise errors.MissingInputError(f"calibrate needs the trained slave and master: stage {stage!r} is not "
                                     f"complete; run `msnet train --stage={stage}` first")
  result = {"stage": STAGE, **fit(config, holdout_logits(config, workdir))}
  result["wall_time_s"] = time.perf_counter() - start
  if jax.process_index() == 0:
    names = [b.name for b in config.bins]
    print(f"[calibrate] temperatures (all bins, for ams_cal) {dict(zip(names, result['temperatures']))}; own bin "
          f"(map_cal, branch_<bin>_cal) {dict(zip(names, result['own_bin_temperatures']))}; master "
          f"{result['master_temperature']:.3f}", flush=True)
  loop.write_done(workdir, STAGE, json.loads(json.dumps(result)))
  return result


def load_temperatures(workdir: Any, num_bins: int) -> dict[str, Any]:
  """{"branch": [K] (all bins, ams_cal), "own_bin": [K] (map_cal, branch_<bin>_cal), "master": float} from a
  completed calibrate stage."""
  done = loop.read_done(workdir, STAGE)
  if done is None:
    raise errors.MissingInputError(f"stage 'calibrate' is not complete (no {loop.stage_dir(workdir, STAGE)}/"
                                   f"{loop.DONE}); run `msnet train --stage=calibrate` first")
  if "own_bin_temperatures" not in done:
    raise errors.MissingInputError(f"{loop.stage_dir(workdir, STAGE)}/{loop.DONE} has no own-bin temperatures (an "
                                   "older calibrate stage): delete W/train/calibrate and rerun `msnet train "
                                   "--stage=calibrate` (seconds: it fits on the hold-out shards)")
  out = {"branch": np.asarray(done["temperatures"], np.float32),
         "own_bin": np.asarray(done["own_bin_temperatures"], np.float32),
         "master": np.float32(done["master_temperature"])}
  if out["branch"].shape != (num_bins,) or out["own_bin"].shape != (num_bins,):
    raise errors.InvalidInputError(f"calibrate: {out['branch'].size} temperatures for {num_bins} bins; the stage was "
                                   "fitted for other bins: delete W/train/calibrate and rerun it")
  return out
