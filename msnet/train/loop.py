"""The training loop shared by every gradient stage: resume, step, log, validate, checkpoint, stop.

A stage directory W/train/<stage>/ holds `ckpt/` (orbax: the train state and every process's Grain
iterator state, saved every config.train.checkpoint_every_steps, at the end and on SIGTERM),
`metrics.jsonl` and, once complete, `DONE.json`. Rerunning the same command resumes from the latest
checkpoint, data order included; a stage with DONE.json is not trained again.
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
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from msnet import parallel
from msnet.data import loader as loader_lib, shards
from msnet.train import optim, state as state_lib, step as step_lib

CKPT = "ckpt"
DONE = "DONE.json"
METRICS = "metrics.jsonl"


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
  init_fn: Callable[[], Any] | None = None   # traceable: params from scratch (model.init)
  init_params: Callable[[], Any] | None = None  # host params (another stage's result), loaded lazily
  trainable: Sequence[str] = (".*",)         # path regexes of the params that train
  loss: str = "ce"                           # "ce" or "stability"
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


def checkpoint_manager(directory: epath.Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  cm = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=cm.FixedIntervalPolicy(int(config.train.checkpoint_every_steps)),
      preservation_policy=cm.LatestN(int(config.train.keep_checkpoints)),
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options)


def _gather_iterator_states(local: dict[str, Any]) -> dict[str, Any]:
  """Every process's iterator state in one JSON dict keyed by process index (process 0 writes it)."""
  if jax.process_count() == 1:
    return {"0": local}
  raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int64))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:raw.size] = raw
  everyone = multihost_utils.process_allgather(padded)
  return {str(i): json.loads(bytes(everyone[i][:int(sizes[i][0])]).decode()) for i in range(jax.process_count())}


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


class _Log:
  """metrics.jsonl + console, process 0 only."""

  def __init__(self, path: epath.Path, bar: Any) -> None:
    self.primary = jax.process_index() == 0
    self.path = path
    self.bar = bar

  def __call__(self, record: dict[str, Any], console: str | None = None) -> None:
    if not self.primary:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if console and self.bar is not None:
      self.bar.write(console)
    elif console:
      print(console, flush=True)


class _Clock:
  """Training images/s that leaves out compilation (everything up to the first finished step of a run)
  and validation; checkpoint saves count, they are part of training."""

  def __init__(self, start_step: int) -> None:
    self.excluded = 0.0
    self.first: tuple[float, int, float] | None = None   # (time, step, excluded seconds) marks
    self.last: tuple[float, int, float] | None = None
    self.window = (time.perf_counter(), start_step, 0.0)

  def exclude(self, seconds: float) -> None:
    self.excluded += seconds

  def tick(self, done: int) -> None:
    self.last = (time.perf_counter(), done, self.excluded)
    if self.first is None:
      self.first = self.window = self.last

  @staticmethod
  def _rate(a: tuple[float, int, float], b: tuple[float, int, float], gb: int) -> float | None:
    if b[1] == a[1]:
      return None
    return (b[1] - a[1]) * gb / max(b[0] - a[0] - (b[2] - a[2]), 1e-9)

  def window_rate(self, gb: int) -> float | None:
    """Since the previous call (or the first step); None right after the first step."""
    rate = self._rate(self.window, self.last, gb)
    self.window = self.last
    return rate

  def rate(self, gb: int) -> float | None:
    """Since the first step; None when the run did a single step (nothing but compilation to time)."""
    return None if self.first is None else self._rate(self.first, self.last, gb)


def _finite(m: dict[str, float]) -> bool:
  return math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])


def _eval_accuracy(config: ml_collections.ConfigDict, workdir: Any, mesh: Any, eval_step: Callable,
                   params: Any, specs: Sequence[str]) -> tuple[float | None, list[str]]:
  """(accuracy, specs used) over the eval split's shards of those `specs` that exist; None if none do."""
  correct = count = 0
  present = [s for s in specs if shards.spec_dir(workdir, config.data.eval_split, s).exists()]
  for spec in present:
    for batch in loader_lib.eval_batches(workdir, config.data.eval_split, spec, config.evaluate.global_batch, mesh):
      c, n = eval_step(params, batch)
      correct, count = correct + int(c), count + int(n)
  return (correct / count if count else None), present


def train(config: ml_collections.ConfigDict, workdir: Any, job: Job) -> dict[str, Any]:
  """Train one stage to completion (or resume it); returns the DONE.json dict."""
  wall_start = time.perf_counter()
  out = stage_dir(workdir, job.name)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh)
  gb = int(config.train.global_batch)
  loader = loader_lib.TrainLoader(
      workdir, config.data.train_split, list(job.train_specs), list(job.weights) if job.weights else None, gb,
      config.seed, mesh, bool(config.train.hflip), int(config.train.num_workers), label_key=job.label_key)
  total = num_steps(job.stage, loader.num_records, gb)
  steps_per_epoch = max(1, math.ceil(loader.num_records / gb))

  # Optimizer and state shapes first: a resumed run restores straight into the shardings.
  if job.init_fn is not None:
    abstract_params = jax.eval_shape(job.init_fn)
  else:
    host_params = job.init_params()
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), host_params)
  tx, schedule = optim.make_optimizer(job.stage, total, abstract_params, job.trainable)
  abstract = state_lib.abstract_state(abstract_params, tx)
  shardings = state_lib.state_shardings(abstract, mesh, config.sharding_rules)

  mngr = checkpoint_manager(out / CKPT, config)
  start = mngr.latest_step() or 0
  if start:
    restored = mngr.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state_lib.abstract_like(shardings, abstract)),
        data=ocp.args.JsonRestore()))
    state = restored.state
    iterator_states = restored.data
    if str(jax.process_index()) not in iterator_states or len(iterator_states) != jax.process_count():
      raise RuntimeError(f"{out / CKPT}: checkpoint of step {start} holds iterator states of "
                         f"{len(iterator_states)} processes, this run has {jax.process_count()}")
    loader.set_state(iterator_states[str(jax.process_index())])
  elif job.init_fn is not None:
    state = state_lib.init_state(job.init_fn, tx, shardings)
  else:
    state = state_lib.state_from_params(host_params, tx, shardings)

  mask = optim.trainable_mask(abstract_params, job.trainable)
  train_step = step_lib.make_train_step(
      job.apply_fn, tx, schedule, mask, mesh, shardings, stage_rng(config.seed, job.name),
      loss=job.loss, alpha=float(config.stability.alpha), noise_sigma=float(config.stability.noise_sigma))
  eval_step = step_lib.make_eval_step(job.apply_fn, mesh, shardings.params, job.label_key)

  bar = tqdm(total=total, initial=start, desc=job.name, unit="step", disable=jax.process_index() != 0,
             dynamic_ncols=True)
  log = _Log(out / METRICS, bar if jax.process_index() == 0 else None)
  if start:
    log({"step": start, "event": "resumed"}, f"[{job.name}] resumed from step {start} ({out / CKPT})")
  watch = _PreemptionWatch()

  def stop_non_finite(step: int, m: dict[str, float]) -> None:
    mngr.wait_until_finished()
    good = mngr.latest_step()
    message = (f"[{job.name}] loss {m['loss']} / grad_norm {m['grad_norm']} at step {step}: stopping without "
               f"saving this state; last good checkpoint: "
               f"{f'step {good} in {out / CKPT}' if good is not None else 'none'}. Lower stages.*.lr or check "
               f"the data, then rerun to resume from that checkpoint.")
    log({"step": step, "event": "non_finite", "loss": m["loss"], "grad_norm": m["grad_norm"]}, message)
    raise NonFiniteLossError(message)

  # Metrics are fetched one step late so the host never waits on the step it just dispatched, except
  # before a save: a state is saved only after its own step's loss was seen to be finite.
  last: dict[str, float] = {}
  val_acc: float | None = None
  pending: tuple[int, dict[str, jax.Array]] | None = None
  clock = _Clock(start)

  def resolve(done: int, metrics: dict[str, jax.Array]) -> None:
    nonlocal last
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not _finite(m):
      stop_non_finite(done, m)
    last = m
    clock.tick(done)
    if done % int(config.train.log_every_steps) == 0 or done == total:
      ips = clock.window_rate(gb)
      log({"step": done, "epoch": done / steps_per_epoch, **m, "images_per_s": ips},
          f"[{job.name}] step {done}/{total} loss {m['loss']:.4f} acc {m['accuracy']:.3f} "
          f"lr {m['lr']:.3g} |g| {m['grad_norm']:.3g}" + (f" {ips:.0f} img/s" if ips else ""))

  def validate(done: int, what: str) -> float | None:
    t = time.perf_counter()
    acc, specs = _eval_accuracy(config, workdir, mesh, eval_step, state.params, job.eval_specs)
    clock.exclude(time.perf_counter() - t)
    if acc is not None:
      log({"step": done, "epoch": done / steps_per_epoch, "val_accuracy": acc, "val_specs": specs},
          f"[{job.name}] {what} validation accuracy {acc:.4f} ({', '.join(specs)})")
    return acc

  validating = bool(config.train.eval_every_epoch)
  try:
    if total == 0:  # imported weights as they are: step 0 is the stage's result
      mngr.save(0, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(_gather_iterator_states(loader.get_state()))),
          force=True)
    for step in range(start, total):
      batch = next(loader)
      state, metrics = train_step(state, batch)
      done = step + 1
      if pending is not None:
        resolve(*pending)
      pending = (done, metrics)
      preempted = watch.reached(done)
      save = mngr.should_save(done) or done == total or preempted
      if save or done % steps_per_epoch == 0:
        resolve(*pending)
        pending = None
      if save:
        mngr.save(done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(_gather_iterator_states(loader.get_state()))),
            force=True)
      if preempted:
        mngr.wait_until_finished()
        log({"step": done, "event": "preempted"}, f"[{job.name}] preempted: saved step {done}; rerun to resume")
        raise Preempted(f"stage {job.name} preempted at step {done}; checkpoint saved in {out / CKPT}")
      if validating and done % steps_per_epoch == 0 and done != total:
        val_acc = validate(done, f"epoch {done // steps_per_epoch}")
      bar.update(1)
    if pending is not None:
      resolve(*pending)
    train_rate = clock.rate(gb)
    if validating:
      val_acc = validate(total, "final")
  finally:  # also on NaN / preemption / errors: finish pending saves, restore the SIGTERM handler
    mngr.wait_until_finished()
    mngr.close()
    watch.close()
    bar.close()

  result = {
      "stage": job.name, "steps": total, "epochs": total * gb / loader.num_records,
      "num_records": loader.num_records, "global_batch": gb, "resumed_from_step": start,
      "loss": last.get("loss"), "accuracy": last.get("accuracy"), "val_accuracy": val_acc,
      "wall_time_s": time.perf_counter() - wall_start, "images_per_s": train_rate,
      "devices": jax.device_count(), "processes": jax.process_count(),
  }
  log({"step": total, "event": "done", **result}, f"[{job.name}] done: {json.dumps(result)}")
  write_done(workdir, job.name, result)
  return result
