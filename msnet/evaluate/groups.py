"""Every method's variables loaded, sorted into the shared-trunk group or a group of their own, placed and jitted.

A slave network travels as its variables ({"params"}, plus {"batch_stats"} with BatchNorm: each branch its own
running statistics, evaluated in inference mode); a method shares the baseline's trunk only when its trunk's
params and statistics are both the baseline's.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msnet import config as config_lib, models, parallel
from msnet import train as train_lib
from msnet.evaluate.plan import Plan, stage_done
from msnet.evaluate.steps import Layout, make_shared_step, make_single_step


@dataclasses.dataclass
class Groups:
  """The jitted steps and their placed arguments, built once per run; each step also scanned over a spec's
  device-resident batches (jit compiles only the form a run calls)."""
  shared_step: Callable[..., dict[str, jax.Array]]
  shared_scan: Callable[..., dict[str, jax.Array]]
  shared_args: tuple[Any, ...]   # variables, dc_variables, master_params, gate_params, temperatures, feature_mask
  layout: Layout
  single: dict[str, tuple[Callable[..., dict[str, jax.Array]], Callable[..., dict[str, jax.Array]], Any]]
  # ^ method -> (its arch's step, the same scanned, placed variables)
  traces: dict[str, int]
  flops: dict[str, float]


def _same(a: Any, b: Any) -> bool:
  """Bitwise-equal pytrees (a method whose trunk equals the baseline's can share its forward pass)."""
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def build_groups(config: ml_collections.ConfigDict, workdir: pathlib.Path, plan: Plan, mesh: Any) -> Groups:
  """Load every method's params, sort the methods into the two groups, place the params, jit the steps.

  A K=1 method joins the shared group when its trunk is bitwise the baseline's (the DA stages train fc
  layers only; the branches freeze the trunk; DeepCloak masks the baseline's features), so its result is
  exactly that of its own full forward pass; the others (stability trains everything) run on their own.
  """
  num_classes, num_bins, size = config.data.num_classes, len(config.bins), config.data.image_size
  rules = config.sharding_rules

  def shardings_of(tree: Any) -> Any:
    return parallel.param_shardings(tree, mesh, rules)

  def place(tree: Any, by_collection: bool = False) -> tuple[Any, Any]:
    """`tree` on the mesh by the sharding rules (`by_collection`: variables, each collection like params)."""
    shardings = {c: shardings_of(v) for c, v in tree.items()} if by_collection else shardings_of(tree)
    return jax.device_put(tree, shardings), shardings

  base = train_lib.load_baseline_variables(workdir, config) if stage_done(workdir, "baseline") else None
  single_model = models.build_slave(config.model, num_classes, 1)
  flops = {"baseline": float(models.flops_per_image(single_model, base["params"], size))} if base is not None else {}
  heads, own = {}, {}
  for m in plan.single:
    if m == "deepcloak":
      continue
    variables = base if m == "baseline" else train_lib.load_variables(workdir, m)
    if base is not None and _same(models.part_of(variables, "trunk"), models.part_of(base, "trunk")):
      heads[m] = models.part_of(variables, "branches")
    else:
      own[m] = variables
  branches = list(heads.values())
  slave_k = 0
  if plan.slave:
    slave = train_lib.load_slave_variables(workdir, config)
    if not _same(models.part_of(slave, "trunk"), models.part_of(base, "trunk")):
      raise ValueError("evaluate: the assembled slave's trunk differs from the baseline's (params or running "
                       "statistics); the branch stages must train with the trunk frozen")
    branches.append(models.part_of(slave, "branches"))
    slave_k = num_bins
    flops["slave"] = float(models.flops_per_image(models.build_slave(config.model, num_classes, num_bins),
                                                  slave["params"], size))
  layout = Layout(heads=list(heads), slave=slave_k,
                  branch_names=[f"branch_{b.name}" for b in config.bins] if plan.branches else [],
                  deepcloak="deepcloak" in plan.single, master=plan.master, routed=list(plan.routed),
                  gate=plan.gate, ece_bins=int(config.stages.calibrate.ece_bins),
                  calibrated_branch_names=([f"branch_{b.name}_cal" for b in config.bins]
                                           if plan.branches and plan.calibrated else []))

  traces: dict[str, int] = {}
  module = params = params_sh = None
  if branches or layout.deepcloak:
    module = models.build_slave(config.model, num_classes,
                                max(1, sum(jax.tree.leaves(b["params"])[0].shape[0] for b in branches)))
    params, params_sh = place(models.join_branches(models.part_of(base, "trunk"), branches), by_collection=True)
  dc_params = dc_sh = feature_mask = None
  if layout.deepcloak:
    dc_params, dc_sh = place(models.join_branches({}, [models.part_of(base, "branches")]), by_collection=True)
    feature_mask = jax.device_put(np.asarray(train_lib.load_feature_mask(workdir), np.float32),
                                  parallel.replicated(mesh))
  master = master_params = master_sh = gate_params = gate_sh = temperatures = None
  if plan.master or plan.gate:
    master = models.build_master(config.master, num_bins)  # the gate is a network of the master's architecture
  if plan.master:
    loaded = train_lib.load_params(workdir, "master")
    flops["master"] = float(models.flops_per_image(master, loaded, size))
    master_params, master_sh = place(loaded)
  if plan.gate:
    loaded = train_lib.load_gate_params(workdir)
    flops["gate"] = float(models.flops_per_image(master, loaded, size))
    gate_params, gate_sh = place(loaded)
  if plan.calibrated:
    from msnet.train.calibrate import load_temperatures  # noqa: PLC0415
    temperatures = jax.device_put(load_temperatures(workdir, num_bins), parallel.replicated(mesh))
  shared_step, shared_scan = (make_shared_step(module, single_model, master, layout, num_bins, mesh,
                                               (params_sh, dc_sh, master_sh, gate_sh), traces, stacked)
                              for stacked in (False, True))

  # Methods with a trunk of their own: one jitted step per architecture (VGG-16: stability; AlexNet).
  single, steps = {}, {}
  for m, p in own.items():
    if m == "alexnet_baseline":
      arch_cfg = config_lib.alexnet_model(config)
      model = models.build_slave(arch_cfg, num_classes, 1)
    else:
      arch_cfg, model = config.model, single_model
    expected = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                                 jnp.zeros((1, size, size, 3), jnp.uint8)))
    if jax.tree.structure(p) != jax.tree.structure(expected):
      raise ValueError(f"evaluate: variables of stage {m!r} do not match the {arch_cfg.arch} model of this config")
    shardings = {c: shardings_of(v) for c, v in p.items()}
    if arch_cfg.arch not in steps:
      steps[arch_cfg.arch] = tuple(make_single_step(model, mesh, shardings, traces, f"single_{arch_cfg.arch}",
                                                    stacked) for stacked in (False, True))
    single[m] = (*steps[arch_cfg.arch], jax.device_put(p, shardings))
  return Groups(shared_step, shared_scan,
                (params, dc_params, master_params, gate_params, temperatures, feature_mask), layout, single, traces,
                flops)
