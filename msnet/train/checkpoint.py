"""A stage's checkpoints: the train state and every process's data-iterator state, saved and restored together.

W/train/<stage>/ckpt/<step>/ (orbax) holds `state` (the TrainState: params, optimizer state and the model
state, e.g. BatchNorm running statistics; restored straight into its shardings) and `data` (JSON: {process
index: that process's loader state}). A resumed loader yields the batch the interrupted run would have yielded
next, so a resumed stage ends with the params (and statistics) of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

CKPT = "ckpt"


class Resumable(Protocol):
  """A data iterator whose position is a JSON-serialisable state."""

  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


def gather_iterator_states(local: dict[str, Any]) -> dict[str, Any]:
  """Every process's iterator state in one JSON dict keyed by process index (process 0 writes it)."""
  if jax.process_count() == 1:
    return {"0": local}
  raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int64))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:raw.size] = raw
  everyone = multihost_utils.process_allgather(padded)
  return {str(i): json.loads(bytes(everyone[i][:int(sizes[i][0])]).decode()) for i in range(jax.process_count())}


class Checkpoints:
  """The orbax manager of one stage directory: periodic saves (train.checkpoint_every_steps), the latest
  train.keep_checkpoints kept, saves forced at the end and on preemption."""

  def __init__(self, directory: epath.Path, train_config: ml_collections.ConfigDict) -> None:
    cm = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=cm.FixedIntervalPolicy(int(train_config.checkpoint_every_steps)),
        preservation_policy=cm.LatestN(int(train_config.keep_checkpoints)),
        cleanup_tmp_directories=True)
    self.directory = directory
    self._mngr = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def should_save(self, step: int) -> bool:
    return self._mngr.should_save(step)

  def restore(self, step: int, target: Any, loader: Resumable) -> Any:
    """The state of `step` (into `target`'s shardings); `loader` is set to this process's saved position.

    A state saved before the train state had a model state (no "model_state" on disk; only GroupNorm and
    norm-free networks existed then) restores with the target's, {}.
    """
    saved = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / "state")
    legacy = "model_state" not in saved
    item = {f.name: getattr(target, f.name) for f in dataclasses.fields(target) if f.name != "model_state"} \
        if legacy else target
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(item), data=ocp.args.JsonRestore()))
    iterator_states = restored.data
    if str(jax.process_index()) not in iterator_states or len(iterator_states) != jax.process_count():
      raise RuntimeError(f"{self.directory}: checkpoint of step {step} holds iterator states of "
                         f"{len(iterator_states)} processes, this run has {jax.process_count()}")
    loader.set_state(iterator_states[str(jax.process_index())])
    return target.replace(**restored.state) if legacy else restored.state

  def save(self, step: int, state: Any, loader: Resumable) -> None:
    """Saves asynchronously; the loader's state is taken now, i.e. after the batches of `step` were drawn."""
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(gather_iterator_states(loader.get_state()))),
        force=True)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
