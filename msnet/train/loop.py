"""The training loop shared by every gradient stage: resume, step, log, validate, checkpoint, stop.

A stage directory W/train/<stage>/ holds `ckpt/` (checkpoint.py: the train state and every process's
iterator state, saved every config.train.checkpoint_every_steps, at the end and on SIGTERM),
`metrics.jsonl` (metrics.py) and, once complete, `DONE.json` (which records the data path and the steps
per call). Rerunning the same command resumes from the latest checkpoint, data order included; a stage
with DONE.json is not trained again.

The loop runs calls: each of config.train.steps_per_call steps (one jitted lax.scan), or single steps up to
a checkpoint step or an epoch end, so saves, validation, preemption and the NaN guard all happen between
calls (_CallPlan). Its loader is either the host's (loader.TrainLoader: each item a global batch) or the
device-resident one (resident.ResidentLoader: each item a stream position, the batch gathered inside the
call); the loop only needs `__next__`, `get_state`, `set_state` and `num_records`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from msnet import parallel
from msnet.data import loader as loader_lib, resident, shards
from msnet.train import checkpoint, metrics as metrics_lib, optim, state as state_lib, step as step_lib
from msnet.train.checkpoint import CKPT
from msnet.train.metrics import METRICS

DONE = "DONE.json"


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/Inf; the bad state was not saved."""


class Preempted(RuntimeError):
  """SIGTERM (or a preemption notice) arrived; the state was saved, rerun the same command to resume."""


@dataclasses.dataclass(frozen=True)
class Job:
  """What one gradient stage trains: stages.py builds it, `train` runs it."""
  name: str
  stage: ml_collections.ConfigDict           # config.stages.<kind>: duration, optimizer, schedule
  apply_fn: step_lib.ApplyFn
  train_specs: Sequence[str]
  init_fn: Callable[[], Any] | None = None   # traceable: variables from scratch (model.init)
  init_variables: Callable[[], Any] | None = None  # host variables (another stage's result), loaded lazily
  trainable: Sequence[str] = (".*",)         # path regexes of the params that train
  loss: str = "ce"                           # "ce", "stability" or "augmix"
  mixing: Any = None                         # augmix.Settings of the "augmix" loss
  weights: Sequence[float] | None = None     # mixture weights of train_specs (None: the loader's default)
  label_key: str = "label"                   # "bin" for the master
  eval_specs: Sequence[str] = ("clean",)     # validation specs on the eval split (skipped if absent)


def stage_dir(workdir: Any, stage: str) -> epath.Path:
  return epath.Path(workdir) / "train" / stage


def read_done(workdir: Any, stage: str) -> dict[str, Any] | None:
  path = stage_dir(workdir, stage) / DONE
  return json.loads(path.read_text()) if path.exists() else None


def write_done(workdir: Any, stage: str, result: dict[str, Any]) -> None:
  """Process 0 writes DONE.json; every process waits for it so no process races ahead."""
  if jax.process_index() == 0:
    out = stage_dir(workdir, stage)
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"msnet-done-{stage}")


def stage_rng(seed: int, stage: str) -> jax.Array:
  """A key per (seed, stage), so stages draw independent dropout and noise."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(stage.encode()) & 0x7FFFFFFF)


def num_steps(stage: ml_collections.ConfigDict, num_records: int, global_batch: int) -> int:
  """stage.steps when > 0, else ceil(epochs * records / global batch): the loop only ever sees steps."""
  if stage.steps > 0:
    return int(stage.steps)
  if stage.epochs <= 0:
    return 0  # nothing to train: the imported pretrained baseline (config.validate allows no other case)
  return max(1, math.ceil(stage.epochs * num_records / global_batch))


class _PreemptionWatch:
  """SIGTERM sets a flag (one process); with several processes JAX's preemption sync point decides,
  so that every process saves at the same step."""

  def __init__(self) -> None:
    self.flag = False
    self._old = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.flag
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service in this runtime
      return False

  def close(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _eval_accuracy(config: ml_collections.ConfigDict, workdir: Any, mesh: Any, eval_step: Callable,
                   state: state_lib.TrainState, specs: Sequence[str]) -> tuple[float | None, list[str]]:
  """(accuracy, specs used) over the eval split's shards of those `specs` that exist; None if none do."""
  correct = count = 0
  present = [s for s in specs if shards.spec_dir(workdir, config.data.eval_split, s).exists()]
  for spec in present:
    for batch in loader_lib.eval_batches(workdir, config.data.eval_split, spec, config.evaluate.global_batch, mesh):
      c, n = eval_step(state.params, state.model_state, batch)
      correct, count = correct + int(c), count + int(n)
  return (correct / count if count else None), present


class _CallPlan:
  """How many steps the call starting at a step runs: `steps` (config.train.steps_per_call) unless that
  would cross the stage's end or a boundary (a multiple of a checkpoint interval or of the epoch, where the
  loop saves and validates); then single steps up to it, so only two programs are ever compiled."""

  def __init__(self, steps: int, total: int, boundaries: Sequence[int]) -> None:
    self.steps, self.total, self.boundaries = steps, total, list(boundaries)

  def length(self, step: int) -> int:
    end = min([step + self.steps, self.total] + [(step // b + 1) * b for b in self.boundaries])
    return self.steps if end - step == self.steps else 1


def _loader_and_feed(config: ml_collections.ConfigDict, workdir: Any, job: Job, mesh: Any
                     ) -> tuple[Any, step_lib.Feed, str]:
  """The stage's train loader, how its items become batches in the step, and the data path's name
  ("device": resident.ResidentLoader, "host": loader.TrainLoader), by config.train.device_data."""
  specs, weights = list(job.train_specs), list(job.weights) if job.weights else None
  gb, split = int(config.train.global_batch), config.data.train_split
  nbytes = resident.spec_bytes(workdir, split, specs)
  if resident.use_device_data(config.train.device_data, nbytes, jax.local_devices()[0]):
    loader = resident.ResidentLoader(workdir, split, specs, weights, gb, config.seed, mesh, bool(config.train.hflip),
                                     label_key=job.label_key)
    repl = parallel.replicated(mesh)
    return loader, step_lib.Feed(loader.batch, repl, repl, repl, data=loader.data), "device"
  loader = loader_lib.TrainLoader(workdir, split, specs, weights, gb, config.seed, mesh, bool(config.train.hflip),
                                  int(config.train.num_workers), label_key=job.label_key,
                                  host_cache=config.train.host_cache)
  return loader, step_lib.host_feed(mesh), "host"


def train(config: ml_collections.ConfigDict, workdir: Any, job: Job) -> dict[str, Any]:
  """Train one stage to completion (or resume it); returns the DONE.json dict."""
  wall_start = time.perf_counter()
  out = stage_dir(workdir, job.name)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh)
  gb = int(config.train.global_batch)
  loader, feed, data_path = _loader_and_feed(config, workdir, job, mesh)
  total = num_steps(job.stage, loader.num_records, gb)
  steps_per_epoch = max(1, math.ceil(loader.num_records / gb))

  # Optimizer and state shapes first: a resumed run restores straight into the shardings.
  if job.init_fn is not None:
    abstract_vars = jax.eval_shape(job.init_fn)
  else:
    host_vars = job.init_variables()
    abstract_vars = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), host_vars)
  abstract_params, abstract_model_state = state_lib.split_variables(abstract_vars)
  tx, schedule = optim.make_optimizer(job.stage, total, abstract_params, job.trainable)
  abstract = state_lib.abstract_state(abstract_params, tx, abstract_model_state)
  shardings = state_lib.state_shardings(abstract, mesh, config.sharding_rules)

  ckpts = checkpoint.Checkpoints(out / CKPT, config.train)
  start = ckpts.latest_step() or 0
  if start:
    state = ckpts.restore(start, state_lib.abstract_like(shardings, abstract), loader)
  elif job.init_fn is not None:
    state = state_lib.init_state(job.init_fn, tx, shardings)
  else:
    host_params, host_model_state = state_lib.split_variables(host_vars)
    state = state_lib.state_from_params(host_params, tx, shardings, host_model_state)

  mask = optim.trainable_mask(abstract_params, job.trainable)
  step_args = (job.apply_fn, tx, schedule, mask, mesh, shardings, stage_rng(config.seed, job.name))
  step_kw = dict(loss=job.loss, alpha=float(config.stability.alpha), noise_sigma=float(config.stability.noise_sigma),
                 mixing=job.mixing, crop_pad=int(job.stage.crop_pad))
  programs: dict[int, step_lib.CallFn] = {}

  def program(n: int) -> step_lib.CallFn:
    """The compiled call of n steps (n is steps_per_call or 1); host batches' single step is today's."""
    if n not in programs:
      if n == 1 and data_path == "host":
        single = step_lib.make_train_step(*step_args, **step_kw)
        programs[n] = lambda state, data, items: single(state, items[0])
      else:
        programs[n] = step_lib.make_train_call(*step_args, steps=n, feed=feed, **step_kw)
    return programs[n]

  eval_step = step_lib.make_eval_step(job.apply_fn, mesh, shardings, job.label_key)

  bar = tqdm(total=total, initial=start, desc=job.name, unit="step", disable=jax.process_index() != 0,
             dynamic_ncols=True)
  log = metrics_lib.Log(out / METRICS, bar if jax.process_index() == 0 else None)
  if start:
    log({"step": start, "event": "resumed"}, f"[{job.name}] resumed from step {start} ({out / CKPT})")
  watch = _PreemptionWatch()

  def stop_non_finite(step: int, m: dict[str, float]) -> None:
    ckpts.wait()
    good = ckpts.latest_step()
    message = (f"[{job.name}] loss {m['loss']} / grad_norm {m['grad_norm']} at step {step}: stopping without "
               f"saving this state; last good checkpoint: "
               f"{f'step {good} in {out / CKPT}' if good is not None else 'none'}. Lower stages.*.lr or check "
               f"the data, then rerun to resume from that checkpoint.")
    log({"step": step, "event": "non_finite", "loss": m["loss"], "grad_norm": m["grad_norm"]}, message)
    raise NonFiniteLossError(message)

  metrics = metrics_lib.Metrics(log, job.name, total, steps_per_epoch, gb, int(config.train.log_every_steps), start,
                                stop_non_finite)

  def validate(done: int, what: str) -> float | None:
    t = time.perf_counter()
    acc, specs = _eval_accuracy(config, workdir, mesh, eval_step, state, job.eval_specs)
    metrics.clock.exclude(time.perf_counter() - t)
    if acc is not None:
      log({"step": done, "epoch": done / steps_per_epoch, "val_accuracy": acc, "val_specs": specs},
          f"[{job.name}] {what} validation accuracy {acc:.4f} ({', '.join(specs)})")
    return acc

  validating = bool(config.train.eval_every_epoch)
  calls = _CallPlan(int(config.train.steps_per_call), total,
                    [int(config.train.checkpoint_every_steps)] + ([steps_per_epoch] if validating else []))
  val_acc: float | None = None
  try:
    if total == 0:  # imported weights as they are: step 0 is the stage's result
      ckpts.save(0, state, loader)
    step = start
    while step < total:
      n = calls.length(step)
      items = [next(loader) for _ in range(n)]
      # A second program's first call compiles it (the first's is before the clock's first tick): not training.
      compiling, t = n not in programs and bool(programs), time.perf_counter()
      state, m = program(n)(state, feed.data, items)
      if compiling:
        metrics.clock.exclude(time.perf_counter() - t)
      done = step + n
      metrics.push(done, m)
      preempted = watch.reached(done)
      save = ckpts.should_save(done) or done == total or preempted
      epoch_end = done % steps_per_epoch == 0
      if save or epoch_end:
        metrics.flush()
      if save:
        ckpts.save(done, state, loader)
      if preempted:
        ckpts.wait()
        log({"step": done, "event": "preempted"}, f"[{job.name}] preempted: saved step {done}; rerun to resume")
        raise Preempted(f"stage {job.name} preempted at step {done}; checkpoint saved in {out / CKPT}")
      if validating and epoch_end and done != total:
        val_acc = validate(done, f"epoch {done // steps_per_epoch}")
      bar.update(n)
      step = done
    metrics.flush()
    train_rate = metrics.clock.rate(gb)
    if validating:
      val_acc = validate(total, "final")
  finally:  # also on NaN / preemption / errors: finish pending saves, restore the SIGTERM handler
    ckpts.close()
    watch.close()
    bar.close()

  result = {
      "stage": job.name, "steps": total, "epochs": total * gb / loader.num_records,
      "num_records": loader.num_records, "global_batch": gb, "resumed_from_step": start,
      "loss": metrics.last.get("loss"), "accuracy": metrics.last.get("accuracy"), "val_accuracy": val_acc,
      "wall_time_s": time.perf_counter() - wall_start, "images_per_s": train_rate,
      "devices": jax.device_count(), "processes": jax.process_count(),
      "data_path": data_path, "steps_per_call": calls.steps,
  }
  log({"step": total, "event": "done", **result}, f"[{job.name}] done: {json.dumps(result)}")
  write_done(workdir, job.name, result)
  return result
