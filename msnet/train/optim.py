"""The optimizer of a stage: schedule, SGD-Nesterov or AdamW, kernel-only weight decay, frozen params.

Frozen params go through `optax.set_to_zero` under `optax.multi_transform`, so they get neither updates
nor optimizer state (momentum, Adam moments) nor weight decay; the train step additionally stops their
gradients so XLA never computes them (a branch stage does no backward pass through the trunk).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import ml_collections
import optax


def path_name(path: tuple[Any, ...]) -> str:
  """'branches/fc8/kernel' for a key path of a param pytree (the names sharding rules match too)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def trainable_mask(params: Any, patterns: Sequence[str]) -> Any:
  """A bool pytree like params: True where the param's path fully matches one of the regexes."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(c.fullmatch(path_name(path)) for c in compiled), params)


def kernel_mask(params: Any) -> Any:
  """Weight decay applies to weight matrices/filters ('kernel'), never to biases or norm scales."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path).endswith("kernel"), params)


def make_schedule(stage: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to stage.lr over warmup_steps, then cosine decay to 0 or constant."""
  warmup = min(int(stage.warmup_steps), max(total_steps - 1, 0))
  if stage.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(float(stage.lr))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, float(stage.lr), warmup), optax.constant_schedule(float(stage.lr))],
        [warmup])
  if stage.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, float(stage.lr), warmup, max(total_steps, warmup + 1))
  raise ValueError(f"schedule {stage.schedule!r}: must be 'cosine' or 'constant'")


def make_optimizer(stage: ml_collections.ConfigDict, total_steps: int, params: Any,
                   trainable: Sequence[str] = (".*",)) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule) for a stage; `params` may be abstract (only its structure and names are read).

  SGD: Nesterov momentum, then decoupled weight decay (not fed through the momentum), then -lr, the
  same order optax's AdamW uses. `trainable` are path regexes (optim.path_name) of the params to train.
  """
  schedule = make_schedule(stage, total_steps)
  wd_mask = kernel_mask  # a callable: under multi_transform it sees only the trainable subtree
  if stage.optimizer == "sgd":
    tx = optax.chain(
        optax.trace(decay=float(stage.momentum), nesterov=True),
        optax.add_decayed_weights(float(stage.weight_decay), mask=wd_mask),
        optax.scale_by_learning_rate(schedule))
  elif stage.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=float(stage.weight_decay), mask=wd_mask)
  else:
    raise ValueError(f"optimizer {stage.optimizer!r}: must be 'sgd' or 'adamw'")
  mask = trainable_mask(params, trainable)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"no parameter matches the trainable patterns {list(trainable)}")
  if all(jax.tree.leaves(mask)):
    return tx, schedule
  labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels), schedule
