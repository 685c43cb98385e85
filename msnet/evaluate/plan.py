"""Which methods can run and which specs: every method needs its training stages complete; nothing falls back
silently, and a spec shared by several sweeps is evaluated once."""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections

from msnet import config as config_lib, degradations

ROUTED = ("branches", "ms", "ams", "map", "oracle", "bitstream", "hybrid", "ams_cal", "map_cal", "gate")
MASTER_RULES = ("ms", "map", "hybrid", "map_cal")  # the routed rules that read the master


@dataclasses.dataclass
class Plan:
  """The methods of config.evaluate.methods whose stages are complete, and the others with the reason."""
  single: list[str] = dataclasses.field(default_factory=list)   # K=1 networks: baseline, da_*, stability, deepcloak
  branches: bool = False        # report each branch of the slave alone
  slave: bool = False           # the assembled slave is needed (branches or a decision rule)
  master: bool = False          # the master is needed (MASTER_RULES)
  calibrated: bool = False      # the calibrate stage's temperatures are needed (ams_cal, map_cal)
  gate: bool = False            # the learned gate is needed
  routed: list[str] = dataclasses.field(default_factory=list)   # decision rules: ms, ams, map, oracle, ..., hybrid
  missing: dict[str, str] = dataclasses.field(default_factory=dict)


def stage_done(workdir: pathlib.Path, stage: str) -> bool:
  return (workdir / "train" / stage / "DONE.json").exists()


def make_plan(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Plan:
  """Resolve config.evaluate.methods ("comparisons": config.comparisons) against the completed training stages."""
  plan = Plan()
  branch_stages = ["baseline", *(f"branch_{b.name}" for b in config.bins[1:])]
  absent = lambda stages: [s for s in stages if not stage_done(workdir, s)]  # noqa: E731
  for method in config_lib.evaluated_methods(config):
    if method in ROUTED:
      need = branch_stages + (["master"] if method in MASTER_RULES else [])
      if method in config_lib.EXTENSION_METHODS:
        need.append(config_lib.EXTENSION_METHODS[method])
    elif method == "deepcloak":
      need = ["baseline", "deepcloak"]
    else:
      need = [method]
    if lack := absent(need):
      plan.missing[method] = "stage(s) not trained: " + ", ".join(lack)
      continue
    if method in ROUTED:
      plan.slave = True
      plan.master |= method in MASTER_RULES
      plan.calibrated |= config_lib.EXTENSION_METHODS.get(method) == "calibrate"
      plan.gate |= method == "gate"
      if method == "branches":
        plan.branches = True
      else:
        plan.routed.append(method)
    else:
      plan.single.append(method)
  return plan


def method_names(config: ml_collections.ConfigDict, plan: Plan) -> list[str]:
  """Result names in output order: the K=1 networks (baseline first by default), branches, decision rules."""
  names = list(plan.single)
  if plan.branches:
    names += [f"branch_{b.name}" for b in config.bins]
    if plan.calibrated:
      names += [f"branch_{b.name}_cal" for b in config.bins]
  return names + plan.routed


def spec_plan(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """Canonical spec -> the sweeps it belongs to, in first-appearance order (each spec evaluated once)."""
  specs: dict[str, list[str]] = {}
  for name in config.evaluate.sweeps:
    for s in config.sweeps[name]:
      specs.setdefault(str(degradations.parse(s)), []).append(name)
  return specs
