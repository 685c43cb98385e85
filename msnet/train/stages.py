"""The paper's training stages and its comparison methods, as config-driven jobs for the one loop.

  baseline          slave with K=1 on bin 0's specs (clean), every param trains (from scratch, or from
                    config.model.pretrained).
  branch_<bin>      for bins[1:]: from the baseline, trunk frozen, trains "branches/*" on that bin's specs.
  master            the quality-bin classifier on every bin's specs, labels = bins, bins equally weighted.
  calibrate         (config.extensions) no gradient step: per-branch temperatures fitted on the hold-out
                    slice of the training split (train/calibrate.py).
  gate              (config.extensions) the learned gate: the master's network, from the trained master,
                    trained with the branches frozen to minimise the NLL of the gated mixture of the
                    branches' probabilities, on the master's data (every bin's specs, bins equally weighted).
  da_fc8/67/678     from the baseline, only fc8 / fc6+fc7 / fc6+fc7+fc8 train, on clean + every bin's specs
                    (the layers are the arch's registry entry: a ResNet's da_fc8 trains its classifier `fc`).
  stability         from the baseline, everything trains, clean data, CE + alpha * KL(clean || noisy).
  augmix            (AugMix, Hendrycks et al. 2020) from the baseline, everything trains, clean data, CE +
                    js_lambda * JS(clean, two AugMix copies made in the step: train/augmix.py). Its paper
                    trains from scratch; here it fine-tunes the shared baseline for the comparison stages'
                    budget (config.stages.augmix: stability's epochs; a step is three passes, clean and two
                    copies, against stability's two), so that the comparison methods train for a like budget
                    and start from the network the branches start from: a difference between them is the
                    method's, not more training or another initialisation.
  alexnet_baseline  AlexNet (config.alexnet_model) from scratch on clean data, for the VGG-vs-AlexNet figure.
  deepcloak         no gradient step: ranks trunk-output channels by their mean |f(clean) - f(degraded)|
                    over record pairs and masks the top mask_ratio of them (feature_mask.npy).

A stage's own `train_specs` (config.stages.<stage>.train_specs) replaces its default data.

BatchNorm (model.norm="batch"): a stage loads and trains whole variables ({"params", "batch_stats"}), and a
part of the slave (trunk, branches) runs in training mode, normalising with the batch's statistics and
updating its running ones, only when the stage trains all of it (its trainable patterns include ".*" or
"<part>/.*": `norm_train_parts`). So the baseline, stability and augmix update every statistic; a branch stage
only its branch's, the frozen trunk running on (and keeping) the baseline's; da_fc8, which trains only `fc`,
runs the whole network in inference mode; the gate runs the frozen slave on its running statistics. Every
loader below moves each layer's statistics with its layer (re-split, shared trunk, stacked branches).

Trunk depth: the stages that start from the baseline load it re-split to config.model.trunk_layers
(`load_baseline`), so a baseline trained at one depth serves branches at any other. `share_stage` gives
another workdir a completed stage (a baseline, or another run's AugMix network as its baseline: config.shared)
without copying it: a ckpt symlink and a DONE.json whose `trunk` lists the layers the trunk holds there, which
`load_params` applies.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from msnet import config as config_lib, errors, models
from msnet.data import shards
from msnet.train import augmix, loop, step as step_lib

DA_STAGES = ("da_fc8", "da_fc67", "da_fc678")  # which layers each trains: the arch's registry entry
FEATURE_MASK = "feature_mask.npy"
SHARED_TRUNK = "trunk"  # DONE.json of a shared baseline: the weight layers its trunk holds in this workdir


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
  """Pipeline order: baseline, the branches, the master, config.extensions, then config.comparisons."""
  return ["baseline", *(f"branch_{b.name}" for b in config.bins[1:]), "master", *config.get("extensions", ()),
          *config.comparisons]


def known_stages(config: ml_collections.ConfigDict) -> list[str]:
  """Every stage `run_stage` accepts for this config (comparisons not listed in config.comparisons too)."""
  names = stage_names(config)
  return names + [s for s in (*config_lib.EXTENSION_STAGES, *config_lib.COMPARISON_STAGES) if s not in names]


def _unique(specs: Any) -> list[str]:
  return list(dict.fromkeys(specs))


def load_variables(workdir: Any, stage: str) -> Any:
  """Final variables ({"params": ..., "batch_stats": ... with BatchNorm}) of a completed stage, as host NumPy
  arrays (put them into shardings yourself); a shared baseline comes cut where its DONE.json's `trunk` says."""
  done = loop.read_done(workdir, stage)
  if done is None:
    done_file = loop.stage_dir(workdir, stage) / loop.DONE
    raise errors.MissingInputError(f"stage {stage!r} is not complete (no {done_file}); "
                                   f"run `msnet train --stage={stage}` first")
  variables = restore_variables(loop.stage_dir(workdir, stage) / loop.CKPT)
  return models.move_to_trunk(variables, done[SHARED_TRUNK]) if SHARED_TRUNK in done else variables


def load_params(workdir: Any, stage: str) -> Any:
  """The params of `load_variables` (all there is to a network without BatchNorm)."""
  return load_variables(workdir, stage)["params"]


def load_baseline_variables(workdir: Any, config: ml_collections.ConfigDict) -> Any:
  """The baseline's variables cut at config.model.trunk_layers, whatever depth it was trained at."""
  table = models.model_table(config.model, int(config.data.num_classes))
  return models.resplit_params(load_variables(workdir, "baseline"), table, int(config.model.trunk_layers))


def load_baseline(workdir: Any, config: ml_collections.ConfigDict) -> Any:
  """The params of `load_baseline_variables`."""
  return load_baseline_variables(workdir, config)["params"]


def share_stage(source: Any, workdir: Any, config: ml_collections.ConfigDict, stage: str = "baseline",
                source_stage: str | None = None) -> dict[str, Any]:
  """Make `source`'s completed `source_stage` (default: `stage`) the `stage` of `workdir`, without copying it.

  W/train/<stage>/ckpt is a relative symlink to the source's checkpoints (local paths only) and DONE.json is the
  source's plus `shared_from`; a slave network (every stage but config_lib.MASTER_STAGES) also gets the trunk's
  layer names at config.model.trunk_layers, which `load_params` re-splits it to. So a baseline serves every trunk depth
  (the study), and another run's AugMix network can be this run's baseline, its branches grown from it.
  """
  source_stage = source_stage or stage
  if (stage in config_lib.MASTER_STAGES) != (source_stage in config_lib.MASTER_STAGES):
    raise errors.InvalidInputError(f"stage {source_stage!r} of {source} cannot be this run's {stage!r}: a master "
                                   "network and a slave network do not stand in for each other")
  src = pathlib.Path(os.fspath(loop.stage_dir(source, source_stage)))
  done = loop.read_done(source, source_stage)
  if done is None or not (src / loop.CKPT).is_dir():
    raise errors.MissingInputError(f"no {source_stage} to share: {src / loop.DONE} or {src / loop.CKPT} is missing; "
                                   f"train it first (msnet train --stage={source_stage} --workdir={source})")
  dst = pathlib.Path(os.fspath(loop.stage_dir(workdir, stage)))
  link = dst / loop.CKPT
  if link.exists() and not link.is_symlink():
    raise errors.InvalidInputError(f"{link} holds a {stage} trained in {workdir}; sharing another would hide "
                                   "it: give a fresh workdir")
  if jax.process_index() == 0:
    dst.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
      link.symlink_to(os.path.relpath(src / loop.CKPT, dst), target_is_directory=True)
  result = {**{k: v for k, v in done.items() if k != SHARED_TRUNK}, "shared_from": str(src)}
  if stage not in config_lib.MASTER_STAGES:
    table = models.model_table(config.model, int(config.data.num_classes))
    result.update(trunk_layers=int(config.model.trunk_layers),
                  **{SHARED_TRUNK: models.trunk_weight_layers(table, int(config.model.trunk_layers))})
  loop.write_done(workdir, stage, result)
  return result


def restore_variables(ckpt_dir: Any, step: int | None = None) -> Any:
  """The variables ({"params": ..., **model_state}) of one checkpoint (default: the latest) of a stage's ckpt/,
  without its optimizer state; checkpoints written before the train state had a model state restore as
  {"params": ...}."""
  ckpt_dir = epath.Path(ckpt_dir)
  if step is None:  # finished orbax steps are plain integer dirs; unfinished ones carry a tmp suffix
    steps = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.exists() else []
    if not steps:
      raise FileNotFoundError(f"{ckpt_dir}: no checkpoint")
    step = max(steps)
  path = ckpt_dir / str(step) / "state"
  handler = ocp.PyTreeCheckpointHandler()
  metadata = handler.metadata(path)
  item = {key: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata[key])
          for key in ("params", "model_state") if key in metadata and jax.tree.leaves(metadata[key])}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = handler.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                partial_restore=True))
  return {"params": restored["params"], **restored.get("model_state", {})}


def restore_params(ckpt_dir: Any, step: int | None = None) -> Any:
  """The params of `restore_variables`."""
  return restore_variables(ckpt_dir, step)["params"]


def load_slave_variables(workdir: Any, config: ml_collections.ConfigDict) -> Any:
  """The K=len(bins) slave: the baseline's trunk, its branch as branch 0, branch_<bin> stages as 1..K-1, each
  branch with its own running statistics."""
  base = load_baseline_variables(workdir, config)
  branches = [models.part_of(base, "branches")] + [
      models.part_of(load_variables(workdir, f"branch_{b.name}"), "branches") for b in config.bins[1:]]
  return models.join_branches(models.part_of(base, "trunk"), branches)


def load_slave_params(workdir: Any, config: ml_collections.ConfigDict) -> Any:
  """The params of `load_slave_variables`."""
  return load_slave_variables(workdir, config)["params"]


def load_gate_params(workdir: Any) -> Any:
  """The learned gate's network (a master's params; its checkpoint also holds the frozen slave)."""
  return load_params(workdir, "gate")["gate"]


def load_feature_mask(workdir: Any) -> np.ndarray:
  """DeepCloak's mask over trunk-output channels: 1 keeps a channel, 0 removes it."""
  return np.load(loop.stage_dir(workdir, "deepcloak") / FEATURE_MASK)


def _slave(config: ml_collections.ConfigDict) -> Any:
  return models.build_slave(config.model, int(config.data.num_classes), 1)


def _dummy(config: ml_collections.ConfigDict) -> jax.Array:
  return jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.uint8)


def _from_baseline(workdir: Any, stage: str, config: ml_collections.ConfigDict) -> Any:
  if loop.read_done(workdir, "baseline") is None:
    raise errors.MissingInputError(f"stage {stage!r} starts from the baseline, which is not complete: run "
                                   "`msnet train --stage=baseline` first")
  return lambda: load_baseline_variables(workdir, config)


def norm_train_parts(trainable: tuple[str, ...]) -> tuple[str, ...]:
  """The slave's parts that run BatchNorm in training mode: those the trainable patterns cover whole."""
  return tuple(part for part in ("trunk", "branches") if any(t in (".*", f"{part}/.*") for t in trainable))


def _gate_variables(workdir: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The gate stage's start: params {"gate": the master's, "slave": the slave's}, the slave's other collections
  under "slave" too."""
  slave = load_slave_variables(workdir, config)
  return {"params": {"gate": load_params(workdir, "master"), "slave": slave["params"]},
          **{c: {"slave": v} for c, v in slave.items() if c != "params"}}


def make_job(config: ml_collections.ConfigDict, workdir: Any, stage: str) -> loop.Job:
  """The Job of a gradient stage (all but deepcloak)."""
  bins = config.bins
  clean = list(bins[0].train_specs)
  every_bin = _unique(s for b in bins for s in b.train_specs)
  key = loop.stage_rng(config.seed, stage + "/init")  # the train step draws from stage_rng(seed, stage)

  def bin_mixture(stage_cfg: ml_collections.ConfigDict) -> tuple[list[str], list[float] | None]:
    """The stage's own train_specs, else every bin's specs with the bins equally likely in a batch."""
    if stage_cfg.train_specs:
      return list(stage_cfg.train_specs), None
    specs = [s for b in bins for s in b.train_specs]
    if len(set(specs)) != len(specs):  # a spec listed in two bins: leave the mixture to the loader
      return every_bin, None
    return specs, [1.0 / (len(bins) * len(b.train_specs)) for b in bins for _ in b.train_specs]

  if stage == "master":
    model = models.build_master(config.master, len(bins))
    specs, weights = bin_mixture(config.stages.master)
    return loop.Job(
        name=stage, stage=config.stages.master, apply_fn=step_lib.master_apply(model), train_specs=specs,
        weights=weights, label_key="bin", eval_specs=every_bin,
        init_fn=lambda: model.init({"params": key}, _dummy(config)))
  if stage == "gate":
    for needed in ["baseline", *(f"branch_{b.name}" for b in bins[1:]), "master"]:
      if loop.read_done(workdir, needed) is None:
        raise errors.MissingInputError(f"stage 'gate' starts from the master and gates the trained branches: "
                                       f"stage {needed!r} is not complete; run `msnet train --stage={needed}` first")
    gate = models.build_master(config.master, len(bins))
    slave = models.build_slave(config.model, int(config.data.num_classes), len(bins))
    specs, weights = bin_mixture(config.stages.gate)
    return loop.Job(
        name=stage, stage=config.stages.gate, apply_fn=step_lib.gate_apply(gate, slave), train_specs=specs,
        weights=weights, trainable=("gate/.*",), eval_specs=clean,
        init_variables=lambda: _gate_variables(workdir, config))

  model = _slave(config)
  apply_fn = step_lib.slave_apply(model)
  if stage == "baseline":
    if config.model.pretrained:
      init = dict(init_variables=lambda: models.load_pretrained(
          config.model.pretrained, config.model, num_classes=int(config.data.num_classes),
          image_size=int(config.data.image_size)))
    else:
      init = dict(init_fn=lambda: model.init({"params": key, "dropout": key}, _dummy(config), train=False))
    s = config.stages.baseline
    return loop.Job(name=stage, stage=s, apply_fn=apply_fn, train_specs=list(s.train_specs) or clean,
                    eval_specs=clean, **init)
  if stage.startswith("branch_"):
    names = [b.name for b in bins[1:]]
    if stage[len("branch_"):] not in names:
      raise errors.InvalidInputError(f"stage {stage!r}: branch stages of this config are "
                                     f"{[f'branch_{n}' for n in names]}")
    b = bins[1 + names.index(stage[len("branch_"):])]
    s, trainable = config.stages.branch, ("branches/.*",)
    return loop.Job(name=stage, stage=s, apply_fn=step_lib.slave_apply(model, norm_train_parts(trainable)),
                    train_specs=list(s.train_specs) or list(b.train_specs),
                    init_variables=_from_baseline(workdir, stage, config), trainable=trainable, eval_specs=clean)
  if stage in DA_STAGES:
    s = config.stages[stage]
    da_layers = models.registry.get(config.model.arch).da_layers
    if stage not in da_layers:
      raise errors.InvalidInputError(f"stage {stage!r}: {config.model.arch} has no such layers; its DA stages are "
                                     f"{sorted(da_layers)}")
    trainable = tuple(f"branches/{layer}/.*" for layer in da_layers[stage])
    return loop.Job(name=stage, stage=s, apply_fn=step_lib.slave_apply(model, norm_train_parts(trainable)),
                    train_specs=list(s.train_specs) or every_bin, init_variables=_from_baseline(workdir, stage, config),
                    trainable=trainable, eval_specs=clean)
  if stage == "alexnet_baseline":
    alexnet = models.build_slave(config_lib.alexnet_model(config), int(config.data.num_classes), 1)
    s = config.stages.alexnet_baseline
    return loop.Job(name=stage, stage=s, apply_fn=step_lib.slave_apply(alexnet),
                    train_specs=list(s.train_specs) or clean, eval_specs=clean,
                    init_fn=lambda: alexnet.init({"params": key, "dropout": key}, _dummy(config), train=False))
  if stage in ("stability", "augmix"):  # the whole baseline fine-tuned on clean data, with its own loss
    s = config.stages[stage]
    mixing = augmix.Settings.from_config(s) if stage == "augmix" else None
    return loop.Job(name=stage, stage=s, apply_fn=apply_fn, train_specs=list(s.train_specs) or clean,
                    init_variables=_from_baseline(workdir, stage, config), loss=stage, mixing=mixing,
                    eval_specs=clean)
  raise errors.InvalidInputError(f"unknown stage {stage!r}; this config's stages are {known_stages(config)}")


def run_deepcloak(config: ml_collections.ConfigDict, workdir: Any, batch_size: int = 64) -> dict[str, Any]:
  """Mask the trunk-output channels most sensitive to the degradation (DeepCloak, Gao et al. 2017).

  Sensitivity of channel c: mean over record pairs (clean record i, degraded record i of each spec of
  stages.deepcloak.train_specs) of the spatial mean of |f_c(clean) - f_c(degraded)|, f = the baseline
  trunk's output. The top mask_ratio of channels (at least one) get mask 0. Every process computes the
  same mask on its own devices; process 0 writes it.
  """
  start_t = time.perf_counter()
  dc = config.stages.deepcloak
  variables = jax.device_put(_from_baseline(workdir, "deepcloak", config)())
  model = _slave(config)

  @functools.partial(jax.jit, compiler_options=models.compiler_options())
  def channel_diff(v: Any, x_clean: jax.Array, x_deg: jax.Array) -> jax.Array:
    def features(x: jax.Array) -> jax.Array:
      return model.apply(v, x, method="trunk_features").astype(jnp.float32)
    return jnp.mean(jnp.abs(features(x_clean) - features(x_deg)), axis=(1, 2))  # [B, C]

  split = config.data.train_split
  clean = shards.open_shards(shards.spec_dir(workdir, split, "clean"))
  total, pairs = None, 0
  for spec in dc.train_specs:
    degraded = shards.open_shards(shards.spec_dir(workdir, split, spec))
    n = min(int(dc.num_examples), len(clean), len(degraded))
    bs = min(batch_size, n)
    for lo in range(0, n, bs):
      idx = list(range(lo, min(lo + bs, n)))
      a, b = [clean[i] for i in idx], [degraded[i] for i in idx]
      if any(x["index"] != y["index"] for x, y in zip(a, b)):
        raise RuntimeError(f"deepcloak: records of 'clean' and {spec!r} are not aligned by source index")
      pad = [idx[-1]] * (bs - len(idx))  # one batch shape: no recompiles
      xa = np.stack([r["image"] for r in a] + [clean[i]["image"] for i in pad])
      xb = np.stack([r["image"] for r in b] + [degraded[i]["image"] for i in pad])
      d = np.asarray(channel_diff(variables, xa, xb))[:len(idx)].sum(axis=0)
      total = d if total is None else total + d
      pairs += len(idx)
  sensitivity = total / pairs
  channels = sensitivity.shape[0]
  n_mask = max(1, int(round(float(dc.mask_ratio) * channels)))
  mask = np.ones(channels, np.float32)
  mask[np.argsort(-sensitivity, kind="stable")[:n_mask]] = 0.0
  out = loop.stage_dir(workdir, "deepcloak")
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    with (out / FEATURE_MASK).open("wb") as f:
      np.save(f, mask)
    with (out / "sensitivity.npy").open("wb") as f:
      np.save(f, sensitivity)
  result = {"stage": "deepcloak", "channels": channels, "masked": n_mask, "mask_ratio": float(dc.mask_ratio),
            "pairs": pairs, "train_specs": list(dc.train_specs),
            "masked_channels": sorted(int(i) for i in np.flatnonzero(mask == 0)),
            "wall_time_s": time.perf_counter() - start_t}
  if jax.process_index() == 0:
    print(f"[deepcloak] {json.dumps(result)}", flush=True)
  loop.write_done(workdir, "deepcloak", result)
  return result
