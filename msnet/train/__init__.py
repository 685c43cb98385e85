"""Training: every stage of the paper and its comparison table, resumable and sharded.

  run_stage(config, workdir, stage) -> dict      train (or resume) one stage; returns its DONE.json
  stage_names(config) -> list[str]               pipeline order: baseline, branch_*, master, extensions,
                                                 comparisons
  load_params(workdir, stage)                    final params of a completed stage (host NumPy)
  load_baseline(workdir, config)                 the baseline cut at config.model.trunk_layers (re-split)
  load_slave_params(workdir, config)             the K-branch slave assembled from baseline + branch stages
  load_variables / load_baseline_variables / load_slave_variables
                                                 the same as variables: {"params", "batch_stats" (BatchNorm)}
  load_feature_mask(workdir)                     DeepCloak's channel mask
  load_gate_params(workdir)                      the learned gate's network (a master's params)
  calibrate.load_temperatures(workdir, K)        the calibrate stage's temperatures

Modules: state (TrainState, init into shardings), optim (optax from the stage config), losses, step (the
one jitted train step), loop (orbax checkpoints, metrics, validation, NaN guard), stages (definitions).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from msnet import errors
from msnet.train import loop
from msnet.train.loop import NonFiniteLossError, Preempted
from msnet.train.stages import (known_stages, load_baseline, load_baseline_variables, load_feature_mask,
                                load_gate_params, load_params, load_slave_params, load_slave_variables, load_variables,
                                make_job, run_deepcloak, stage_names)

__all__ = ["run_stage", "stage_names", "load_params", "load_baseline", "load_slave_params", "load_variables",
           "load_baseline_variables", "load_slave_variables", "load_feature_mask", "load_gate_params",
           "NonFiniteLossError", "Preempted"]


def run_stage(config: ml_collections.ConfigDict, workdir: Any, stage: str) -> dict[str, Any]:
  """Train one stage into W/train/<stage>/ and return its final metrics; a completed stage is not retrained.

  Raises NonFiniteLossError if the loss becomes NaN/Inf (the last good checkpoint stays) and Preempted
  after saving on SIGTERM; rerunning the same call resumes from the latest checkpoint.
  """
  if stage not in known_stages(config):
    raise errors.InvalidInputError(f"unknown stage {stage!r}; this config's stages are {known_stages(config)}")
  done = loop.read_done(workdir, stage)
  if done is not None:
    return done
  if stage == "deepcloak":
    return run_deepcloak(config, workdir)
  if stage == "calibrate":
    from msnet.train.calibrate import run_calibrate  # noqa: PLC0415
    return run_calibrate(config, workdir)
  return loop.train(config, workdir, make_job(config, workdir, stage))
