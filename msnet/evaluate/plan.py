"""Which methods can run and which specs: every method needs its training stages complete; nothing falls back
silently, and a spec shared by several sweeps is evaluated once."""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections

from msnet import config as config_lib, degradations, methods

ROUTED = methods.names(methods.BRANCHES, methods.RULE)  # what the assembled slave computes


@dataclasses.dataclass
class Plan:
  """The methods of config.evaluate.methods whose stages are complete, and the others with the reason."""
  single: list[str] = dataclasses.field(default_factory=list)   # K=1 networks: baseline, da_*, stability, deepcloak
  branches: bool = False        # report each branch of the slave alone
  slave: bool = False           # the assembled slave is needed (branches or a decision rule)
  master: bool = False          # the master is needed (ms, map, hybrid, map_cal)
  calibrated: bool = False      # the calibrate stage's temperatures are needed (ams_cal, map_cal)
  gate: bool = False            # the learned gate is needed
  routed: list[str] = dataclasses.field(default_factory=list)   # decision rules: ms, ams, map, oracle, ..., hybrid
  missing: dict[str, str] = dataclasses.field(default_factory=dict)


def stage_done(workdir: pathlib.Path, stage: str) -> bool:
  return (workdir / "train" / stage / "DONE.json").exists()


def make_plan(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Plan:
  """Resolve config.evaluate.methods ("comparisons": config.comparisons) against the completed training stages
  that each method's entry in `msnet.methods` names."""
  plan = Plan()
  bin_names = [b.name for b in config.bins]
  for name in config_lib.evaluated_methods(config):
    method = methods.get(name)
    if lack := [s for s in methods.stages_of(method, bin_names) if not stage_done(workdir, s)]:
      plan.missing[name] = "stage(s) not trained: " + ", ".join(lack)
      continue
    if method.kind == methods.NETWORK:
      plan.single.append(name)
      continue
    plan.slave = True
    plan.master |= "master" in method.stages
    plan.calibrated |= "calibrate" in method.stages
    plan.gate |= "gate" in method.stages
    if method.kind == methods.BRANCHES:
      plan.branches = True
    else:
      plan.routed.append(name)
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
