"""`msnet study`: the trunk-depth study, the trade-off a user of the method chooses on.

Where the shared trunk ends decides what a branch can relearn for its degradation and what each branch
costs. Trunk and branches are one network cut at `model.trunk_layers`, so one trained baseline serves every
depth (re-split, `msnet.models.resplit_params`), and so does one master (it never sees the slave).

  W/                    degrade once, baseline and master trained once (the study config's own trunk depth)
  W/depth-<d>/          data -> ../data and train/master -> ../../train/master (symlinks), train/baseline
                        shared from W cut at d (`msnet.train.stages.share_stage`: a ckpt symlink, no
                        copy), its own branch_<bin> stages, eval/ over the study config's sweeps and methods
  W/study/depth.md      the table and figure; depth.csv, depth.png; each depth against study.reference
                        (paired % change difference): depth_vs_reference.csv

Every part is skipped when complete (shards, DONE.json, evaluation cells), like `msnet run`. The study's
knobs are the config's `study` section (configs/depth_study.py).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from msnet import config as config_lib, degradations, errors, models, pipeline
from msnet.report import sections, stats, tables
from msnet.train import stages

TABLE_METHODS = ("baseline", "ms", "ams", "oracle")  # what the table can show: the K=1 network and the rules


def depth_dir(workdir: pathlib.Path, trunk_layers: int) -> pathlib.Path:
  return workdir / f"depth-{trunk_layers}"


def check_study(config: ml_collections.ConfigDict) -> None:
  """Refuse a study section the run cannot finish, naming the field (before anything is degraded)."""
  if "study" not in config:
    raise config_lib.ConfigError("config.study: missing; `msnet study` needs a study config such as "
                                 "configs/depth_study.py")
  s = config.study
  depths = list(s.trunk_layers)
  cuts = len(models.registry.cut_layers(models.model_table(config.model, int(config.data.num_classes))))
  unit = models.registry.get(config.model.arch).unit
  _require(bool(depths) and len(set(depths)) == len(depths), "study.trunk_layers",
           f"needs distinct depths, got {tuple(depths)}")
  for d in depths:
    _require(1 <= d <= cuts, "study.trunk_layers", f"{d} is not in [1, {cuts}] ({config.model.arch} {unit})")
  evaluated = {str(degradations.parse(x)) for name in config.evaluate.sweeps for x in config.sweeps[name]}
  for field in ("specs", "clean", "degraded"):
    for spec in ((s[field],) if isinstance(s[field], str) else s[field]):
      _require(str(degradations.parse(spec)) in evaluated, f"study.{field}",
               f"{spec!r} is in no sweep of config.evaluate.sweeps {list(config.evaluate.sweeps)}; add it to one")
  methods = config_lib.evaluated_methods(config)
  for field in ("accuracy_methods", "change_methods"):
    for m in s[field]:
      _require(m in TABLE_METHODS, f"study.{field}", f"{m!r} is not one of {list(TABLE_METHODS)}")
      _require(m in methods, f"study.{field}", f"{m!r} is not in config.evaluate.methods")
  ref = reference_depth(config)
  _require(ref in depths, "study.reference", f"{ref} is not one of study.trunk_layers {tuple(depths)}"
           + ("" if s.reference is not None else " (None: config.model.trunk_layers)"))
  _require("baseline" in methods, "evaluate.methods", "the % change needs 'baseline'")
  _require(len(config.bins) >= 2, "bins", "the study trains a branch per bin after the first; give >= 2 bins")


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise config_lib.ConfigError(f"config.{field}: {message}")


def reference_depth(config: ml_collections.ConfigDict) -> int:
  """study.reference, or the config's own trunk depth where it is None (so it follows model.trunk_layers)."""
  ref = config.study.reference
  return int(config.model.trunk_layers if ref is None else ref)


def depth_config(config: ml_collections.ConfigDict, trunk_layers: int) -> ml_collections.ConfigDict:
  """The study config with the trunk cut at `trunk_layers`: nothing else differs between depths."""
  c = config.copy_and_resolve_references()
  c.model.trunk_layers = int(trunk_layers)
  return c


def prepare_depth(config: ml_collections.ConfigDict, workdir: pathlib.Path, trunk_layers: int) -> pathlib.Path:
  """W/depth-<d>/ sharing W's data, master and (re-split) baseline; returns it."""
  sub = depth_dir(workdir, trunk_layers)
  cfg = depth_config(config, trunk_layers)
  if jax.process_index() == 0:
    pipeline.link_dir(sub / "data", workdir / "data")
    pipeline.link_dir(sub / "train" / "master", workdir / "train" / "master")
    (sub / "config.json").write_text(config_lib.to_json(cfg) + "\n")  # `msnet evaluate --workdir=W/depth-d` works
  stages.share_stage(workdir, sub, cfg)  # every process waits for its DONE.json
  return sub


def branch_cost(config: ml_collections.ConfigDict, workdir: pathlib.Path, trunk_layers: int) -> dict[str, Any]:
  """What one more branch costs at this depth: its FLOPs per image, that as % of the baseline's, its params."""
  cfg = depth_config(config, trunk_layers)
  params = stages.load_baseline(workdir, cfg)
  model = models.build_slave(cfg.model, int(cfg.data.num_classes), 1)
  rows = models.layer_flops(model, params, int(cfg.data.image_size))
  branch_flops = sum(r["flops"] for r in rows if r["layer"] in params["branches"])
  total = sum(r["flops"] for r in rows)
  branch_params = _num_params(params["branches"])
  return dict(first_branch_layer=next(r["layer"] for r in rows if r["layer"] in params["branches"]),
              branch_mflops=branch_flops / 1e6, branch_flops_pct=100.0 * branch_flops / total,
              branch_params=branch_params, branch_params_pct=100.0 * branch_params / _num_params(params))


def _num_params(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def depth_row(config: ml_collections.ConfigDict, workdir: pathlib.Path, trunk_layers: int) -> dict[str, Any]:
  """One table row: accuracies (%) at study.specs, % change of study.change_methods, the branch's cost."""
  s = config.study
  results = json.loads((depth_dir(workdir, trunk_layers) / "eval" / "results.json").read_text())
  idx = tables.index(results["rows"])

  def acc(method: str, spec: str) -> float:
    row = idx.get((method, str(degradations.parse(spec))))
    return math.nan if row is None or row["top1"] is None else 100.0 * row["top1"]

  row: dict[str, Any] = dict(trunk_layers=trunk_layers, **branch_cost(config, workdir, trunk_layers),
                             n=idx[("baseline", str(degradations.parse(s.clean)))]["n"])
  for m in s.accuracy_methods:
    row.update({f"{m} {spec}": acc(m, spec) for spec in s.specs})
  correct = stats.load_correct(depth_dir(workdir, trunk_layers) / "eval")
  for m in s.change_methods:
    ci = stats.pct_change_ci(correct, m, clean=str(degradations.parse(s.clean)),
                             degraded=str(degradations.parse(s.degraded)), resamples=int(s.resamples),
                             seed=int(config.seed), level=float(s.level))
    # An interval end the resamples leave unbounded (the baseline not degrading in some) is left blank.
    row.update({f"{m} pct_change{suffix}": float(ci[key]) if math.isfinite(ci[key]) else math.nan
                for key, suffix in (("point", ""), ("lo", "_lo"), ("hi", "_hi"))})
  return row


def against_reference(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[dict[str, Any]]:
  """Per depth but study.reference, each change method's % change minus its own at the reference depth.

  Every depth evaluates the same test images with the same baseline (re-split, not retrained; checked image by
  image), so c and d are shared and one paired resample of the images serves all depths: the interval of the
  difference is far narrower than the two depths' intervals side by side suggest.
  """
  s = config.study
  clean, degraded = (str(degradations.parse(x)) for x in (s.clean, s.degraded))
  ref = reference_depth(config)
  per_depth = {d: stats.load_correct(depth_dir(workdir, d) / "eval") for d in s.trunk_layers}
  for d, correct in per_depth.items():
    for spec in (clean, degraded):
      if not np.array_equal(correct[("baseline", spec)], per_depth[ref][("baseline", spec)]):
        raise errors.InvalidInputError(f"study: the baseline at depth {d} differs from depth {ref}'s on {spec}; "
                                       "every depth must evaluate the one shared baseline on the same images")
  cells = {("baseline", spec): per_depth[ref][("baseline", spec)] for spec in (clean, degraded)}
  cells.update({(f"{m}@{d}", degraded): per_depth[d][(m, degraded)] for d in s.trunk_layers
                for m in s.change_methods})
  boot = stats.paired_bootstrap(cells, resamples=int(s.resamples), seed=int(config.seed), level=float(s.level))

  def change(m: str, d: int) -> Any:
    return lambda a: stats.pct_change(a[("baseline", clean)], a[("baseline", degraded)], a[(f"{m}@{d}", degraded)])

  rows = []
  for d in sorted(x for x in s.trunk_layers if x != ref):
    row: dict[str, Any] = dict(trunk_layers=d)
    for m in s.change_methods:
      ci = boot.interval(lambda a, m=m, d=d: change(m, d)(a) - change(m, ref)(a))
      row.update({f"{m} minus_ref{suffix}": float(ci[key]) if math.isfinite(ci[key]) else math.nan
                  for key, suffix in (("point", ""), ("lo", "_lo"), ("hi", "_hi"))})
      row[f"{m} verdict"] = stats.verdict(ci)
    rows.append(row)
  return rows


def reference_columns(config: ml_collections.ConfigDict) -> list[str]:
  return ["trunk_layers"] + [f"{m} {x}" for m in config.study.change_methods
                             for x in ("minus_ref", "minus_ref_lo", "minus_ref_hi", "verdict")]


def columns(config: ml_collections.ConfigDict) -> list[str]:
  s = config.study
  return (["trunk_layers", "first_branch_layer", "branch_mflops", "branch_flops_pct", "branch_params",
           "branch_params_pct"]
          + [f"{m} {spec}" for m in s.accuracy_methods for spec in s.specs]
          + [f"{m} pct_change{suffix}" for m in s.change_methods for suffix in ("", "_lo", "_hi")])


def depth_figure(config: ml_collections.ConfigDict, rows: list[dict[str, Any]], path: pathlib.Path) -> None:
  """Accuracy, % change and one branch's cost against trunk_layers, side by side."""
  s = config.study
  depths = [r["trunk_layers"] for r in rows]
  fig = Figure(figsize=(15, 4.2))
  ax = fig.add_subplot(1, 3, 1)
  for i, spec in enumerate(s.specs):
    for m in s.accuracy_methods:
      ax.plot(depths, [r[f"{m} {spec}"] for r in rows], color=f"C{i}", marker="o",
              linestyle="--" if m == "baseline" else "-", label=f"{m} {spec}")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.legend(fontsize=7)
  ax = fig.add_subplot(1, 3, 2)
  for i, m in enumerate(s.change_methods):
    point = np.array([r[f"{m} pct_change"] for r in rows])
    err = np.abs(np.array([[r[f"{m} pct_change_lo"] for r in rows], [r[f"{m} pct_change_hi"] for r in rows]]) - point)
    shift = 0.08 * (i - (len(s.change_methods) - 1) / 2)  # side by side, so the intervals do not overlap
    ax.errorbar(np.array(depths) + shift, point, yerr=np.nan_to_num(err), marker="o", capsize=3, label=m)
  ax.axhline(0.0, color="grey", linewidth=0.8)
  ax.set_ylabel(f"% change at {s.degraded}, {100 * s.level:g}% CI")
  ax.legend()
  ax = fig.add_subplot(1, 3, 3)
  ax.plot(depths, [r["branch_flops_pct"] for r in rows], marker="o", label="FLOPs per image")
  ax.plot(depths, [r["branch_params_pct"] for r in rows], marker="s", label="params")
  ax.set_ylabel("one more branch, % of the baseline network")
  ax.legend()
  for a in fig.axes:
    a.set_xticks(depths)
    a.set_xlabel(f"model.trunk_layers ({models.registry.get(config.model.arch).unit} in the shared trunk)")
    a.grid(alpha=0.3)
  fig.suptitle("Where the trunk ends: robustness against the cost of a branch")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write_outputs(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """W/study/depth.csv, depth.png and depth.md from the depths' result files; returns depth.md's path."""
  s = config.study
  rows = [depth_row(config, workdir, d) for d in sorted(s.trunk_layers)]
  out = workdir / "study"
  out.mkdir(parents=True, exist_ok=True)
  header = columns(config)
  sections.write_csv(out / "depth.csv", header, rows)
  depth_figure(config, rows, out / "depth.png")
  against = against_reference(config, workdir)
  sections.write_csv(out / "depth_vs_reference.csv", reference_columns(config), against)
  base_depth = json.loads((workdir / "train" / "baseline" / "DONE.json").read_text())
  ref = reference_depth(config)
  lines = [
      "# Trunk-depth study", "",
      f"One baseline ({config.model.arch}, {config.data.image_size}x{config.data.image_size}), trained once in "
      f"`{workdir.name}/train/baseline` ({base_depth['steps']} steps), re-split at every depth without retraining; "
      f"one master, trained once and shared by every depth (it does not depend on the trunk: same settings, same "
      f"params). At each depth the branches ({', '.join(b.name for b in config.bins[1:])}) are fine-tuned from the "
      f"baseline with the trunk frozen, {_duration(config.stages.branch)} each.", "",
      f"Top-1 % on {rows[0]['n']} {config.data.eval_split} images. % change = 100 (d' - d) / (c - d) with c, d "
      f"the baseline's at {s.clean} / {s.degraded} and d' the method's at {s.degraded}, with its "
      f"{100 * s.level:g}% paired bootstrap interval over the test images ({s.resamples} resamples, "
      f"msnet.report.stats; '-' where the baseline does not degrade). branch_mflops / branch_params: what one "
      f"more branch adds to the slave (FLOPs = 2 x MAC per image); branch_flops_pct / branch_params_pct: those as % of "
      f"the baseline network's. Every number is in depth.csv.", "",
      _markdown_table(config, rows), "",
      "![trunk depth](depth.png)", "",
      f"## Against depth {ref}", "",
      f"Each depth's % change at {s.degraded} minus depth {ref}'s (points), with its {100 * s.level:g}% "
      f"paired bootstrap interval: the same images and the same baseline at every depth, one resample for all. "
      f"better / worse: the whole interval above / below 0; undecided: it holds 0. In depth_vs_reference.csv.", "",
      _reference_table(config, against, ref), "",
  ]
  path = out / "depth.md"
  path.write_text("\n".join(lines))
  return path


def _markdown_table(config: ml_collections.ConfigDict, rows: list[dict[str, Any]]) -> str:
  """depth.csv's columns, each % change with its interval in one cell: "12.3 [4.1, 20.2]"."""
  changes = [f"{m} pct_change" for m in config.study.change_methods]
  plain = [h for h in columns(config) if not h.startswith(tuple(changes))]
  body = [[r[h] for h in plain] + [f"{tables.fmt(r[c])} [{tables.fmt(r[c + '_lo'])}, {tables.fmt(r[c + '_hi'])}]"
                                   for c in changes] for r in rows]
  return tables.markdown(plain + [f"{c.split()[0]} % change [CI]" for c in changes], body)


def _reference_table(config: ml_collections.ConfigDict, rows: list[dict[str, Any]], ref: int) -> str:
  """One row per depth: each change method's "3.1 [1.2, 5.0] better"."""
  methods = config.study.change_methods
  body = [[r["trunk_layers"]] + [f"{tables.fmt(r[m + ' minus_ref'])} [{tables.fmt(r[m + ' minus_ref_lo'])}, "
                                 f"{tables.fmt(r[m + ' minus_ref_hi'])}] {r[m + ' verdict']}" for m in methods]
          for r in rows]
  return tables.markdown(["trunk_layers"] + [f"{m} minus depth {ref} [CI]" for m in methods], body)


def _duration(stage: ml_collections.ConfigDict) -> str:
  return f"{stage.steps} steps" if stage.steps > 0 else f"{stage.epochs:g} epochs"


def run_study(config: ml_collections.ConfigDict, workdir: Any) -> pathlib.Path:
  """Degrade, baseline and master once in W; branches and evaluation per depth; the table and figure."""
  check_study(config)
  workdir = pathlib.Path(workdir)
  pipeline.degrade(config, workdir)
  pipeline.train(config, workdir, ["baseline", "master"])
  branch_stages = [f"branch_{b.name}" for b in config.bins[1:]]
  for d in config.study.trunk_layers:
    cfg = depth_config(config, d)
    sub = prepare_depth(config, workdir, d)
    pipeline.train(cfg, sub, branch_stages)
    pipeline.evaluate(cfg, sub)
  path = workdir / "study" / "depth.md"
  if jax.process_index() == 0:
    path = write_outputs(config, workdir)
    print(f"[msnet] study: {path}", flush=True)
  return path
