"""Does master-slave beat AugMix on a ResNet at equal cost, and do the two add up? The pooled table of the runs.

  msnet run --config=configs/cifar10_resnet.py --workdir=W_s --config.seed=s                 # for s = 0, 1, 2
  msnet run --config=configs/cifar10_resnet.py:on_augmix --workdir=V_s --config.shared.workdir=W_s --config.seed=s
  msnet evaluate --workdir=W_s --external=C10C --layout=cifar10-c --name=cifar10c-pillow-2k  # and --workdir=V_s
  python benchmarks/resnet_vs_augmix.py --runs W_0,W_1,W_2 --on-augmix V_0,V_1,V_2 [--out benchmarks/results/resnet]

W_s trains the baseline, DA (fc), AugMix, the branches and the master; V_s grows its branches from W_s's AugMix
network (its baseline is that network, its master W_s's, its shards W_s's), so its MS and MAP are "MS + AugMix".
Every number is over the same test images, so every difference is paired image by image, and the seeds are
pooled as `msnet report --runs` pools them (an image's results in every run resampled together). The check that
the pairing holds: V_s's baseline must get exactly W_s's AugMix results on every image.

Written to --out: report.md (the tables and verdicts), results.json (every number), per_seed.csv.
% change is the paper's, against W's baseline: (d' - d) / (c - d) at JPEG-10. The external set's mean top-1 is
over its corruptions and severities; its mCE is the mean over corruptions of CE_c = sum_s err_m / sum_s
err_baseline (normalised by the baseline, so not comparable with published mCE). Training cost: forward FLOPs
per image x 3 for a trained layer (forward and backward), x 1 for a frozen one, times images seen (DONE.json's
steps x global batch); AugMix's step sees each image three times (clean and two AugMix copies). "train s" is the
mean over seeds of the stages' wall time beyond the baseline's on the machine that ran them (AugMix's operations
themselves cost no FLOPs in the model but take time on the CPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from msnet import config as config_lib
from msnet.report import stats, tables

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[1]
CLEAN, JPEG10 = "clean", "jpeg:10"
OWN = ("baseline", "da_fc8", "augmix", "ms", "map", "oracle")  # from W
GROWN = {"ms": "ms+augmix", "map": "map+augmix", "oracle": "oracle+augmix"}  # V's rules, renamed
METHODS = (*OWN, *GROWN.values())
# (label, a, b): the differences each verdict is read from, a - b
COMPARISONS = (("MS vs AugMix", "ms", "augmix"), ("MAP vs AugMix", "map", "augmix"),
               ("MS + AugMix vs AugMix", "ms+augmix", "augmix"), ("MS + AugMix vs MS", "ms+augmix", "ms"),
               ("AugMix vs baseline", "augmix", "baseline"), ("MS vs baseline", "ms", "baseline"),
               ("DA (fc) vs baseline", "da_fc8", "baseline"))
RESAMPLES, SEED = 2000, 0


def merged(own: Mapping[stats.Key, np.ndarray], grown: Mapping[stats.Key, np.ndarray], where: str
           ) -> dict[stats.Key, np.ndarray]:
  """W's cells of OWN and V's rules renamed by GROWN; V's baseline must be W's AugMix image for image."""
  cells = {k: v for k, v in own.items() if k[0] in OWN}
  for (m, s), v in grown.items():
    if m == "baseline":
      if ("augmix", s) not in own or not np.array_equal(own[("augmix", s)], v):
        raise SystemExit(f"{where}: the grown run's baseline differs from the AugMix network on {s}: it is not "
                         "grown from this run (check --config.shared.workdir)")
    elif m in GROWN:
      cells[(GROWN[m], s)] = v
  return cells


def load(runs: Sequence[pathlib.Path], grown: Sequence[pathlib.Path], sub: str) -> list[dict[stats.Key, np.ndarray]]:
  """Each pair's per-image results of every method, from W/<sub> and V/<sub> (eval/ or an external set)."""
  return [merged(stats.load_correct(w / sub), stats.load_correct(v / sub), f"{v / sub}") for w, v in zip(runs, grown)]


def pct(m: str) -> Callable[[Mapping[stats.Key, Any]], Any]:
  return lambda a: stats.pct_change(a[("baseline", CLEAN)], a[("baseline", JPEG10)], a[(m, JPEG10)])


def external_stats(sweeps: Mapping[str, Sequence[str]]) -> dict[str, Callable[[str], Callable[..., Any]]]:
  """Mean top-1 (%) and mCE of a method over the external set's cells, as statistics of the accuracies."""
  specs = [s for cells in sweeps.values() for s in cells]

  def mean_top1(m: str) -> Callable[..., Any]:
    return lambda a: 100.0 * sum(a[(m, s)] for s in specs) / len(specs)

  def mce(m: str) -> Callable[..., Any]:
    return lambda a: sum(sum(1 - a[(m, s)] for s in cells) / sum(1 - a[("baseline", s)] for s in cells)
                         for cells in sweeps.values()) / len(sweeps)

  return {"mean_top1": mean_top1, "mce": mce}


def cost(workdir: pathlib.Path) -> dict[str, dict[str, float]]:
  """Per method: training GFLOPs beyond the baseline's, and inference MFLOPs per image (docstring's model)."""
  import jax  # noqa: PLC0415
  from msnet import models  # noqa: PLC0415
  config = config_lib.from_json((workdir / "config.json").read_text())
  size, k = int(config.data.image_size), len(config.bins)
  slave = models.build_slave(config.model, int(config.data.num_classes), 1)
  x = jax.ShapeDtypeStruct((1, size, size, 3), np.uint8)
  rows = models.layer_flops(slave, jax.eval_shape(slave.init, jax.random.key(0), x)["params"], size)
  trunk = {s.name for s in slave.table[:slave.trunk_size]}
  f = sum(r["flops"] for r in rows)
  f_trunk = sum(r["flops"] for r in rows if r["layer"] in trunk)
  f_fc = sum(r["flops"] for r in rows if r["layer"] == "fc")
  master = models.build_master(config.master, k)
  f_master = models.flops_per_image(master, jax.eval_shape(master.init, jax.random.key(0), x)["params"], size)

  def seen(stage: str, run: pathlib.Path = workdir) -> float:
    done = json.loads((run / "train" / stage / "DONE.json").read_text())
    return float(done["steps"]) * float(done["global_batch"])

  branches = sum(seen(f"branch_{b.name}") * (f_trunk + 3 * (f - f_trunk)) for b in config.bins[1:])
  master_cost = seen("master") * 3 * f_master
  augmix = seen("augmix") * 3 * 3 * f
  train = {"baseline": 0.0, "da_fc8": seen("da_fc8") * (f + 2 * f_fc), "augmix": augmix,
           "ms": branches + master_cost, "map": branches + master_cost, "oracle": branches}
  train.update({"ms+augmix": augmix + branches + master_cost, "map+augmix": augmix + branches + master_cost,
                "oracle+augmix": augmix + branches})
  one_branch = f + f_master  # MS / the oracle run the trunk, one branch and (MS) the master
  infer = {"baseline": f, "da_fc8": f, "augmix": f, "ms": one_branch, "map": f_trunk + k * (f - f_trunk) + f_master,
           "oracle": f}
  infer.update({g: infer[m] for m, g in GROWN.items()})
  epoch = float(json.loads((workdir / "train" / "baseline" / "DONE.json").read_text())["num_records"]) * 3 * f
  return {m: {"train_gflops": train[m] / 1e9, "train_baseline_epochs": train[m] / epoch,
              "infer_mflops": infer[m] / 1e6} for m in METHODS}


def wall(runs: Sequence[pathlib.Path], grown: Sequence[pathlib.Path]) -> dict[str, float]:
  """Per method: the mean over seeds of its stages' wall seconds beyond the baseline (DONE.json), as measured,
  with whatever else shared the machine: a rough second cost, beside the FLOPs."""
  def seconds(run: pathlib.Path, *stage_names: str) -> float:
    return sum(float(json.loads((run / "train" / st / "DONE.json").read_text())["wall_time_s"]) for st in stage_names)

  out: dict[str, list[float]] = {m: [] for m in METHODS}
  for w, v in zip(runs, grown):
    bins = [b.name for b in config_lib.from_json((w / "config.json").read_text()).bins[1:]]
    own, grown_branches = (seconds(r, *(f"branch_{b}" for b in bins)) for r in (w, v))
    per = {"baseline": 0.0, "da_fc8": seconds(w, "da_fc8"), "augmix": seconds(w, "augmix"),
           "ms": own + seconds(w, "master"), "map": own + seconds(w, "master"), "oracle": own,
           "oracle+augmix": seconds(w, "augmix") + grown_branches}
    per["ms+augmix"] = per["map+augmix"] = per["oracle+augmix"] + seconds(w, "master")
    for m in METHODS:
      out[m].append(per[m])
  return {m: float(np.mean(v)) for m, v in out.items()}


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", required=True, help="comma-separated workdirs of configs/cifar10_resnet.py")
  ap.add_argument("--on-augmix", required=True, help="their :on_augmix workdirs, in the same order")
  ap.add_argument("--external", default="cifar10c-pillow-2k", help="the external set's --name")
  ap.add_argument("--out", type=pathlib.Path, default=_REPO / "benchmarks/results/resnet")
  args = ap.parse_args(argv)
  runs = [pathlib.Path(p) for p in args.runs.split(",")]
  grown = [pathlib.Path(p) for p in args.on_augmix.split(",")]
  if len(runs) != len(grown):
    raise SystemExit(f"--runs has {len(runs)} workdirs and --on-augmix {len(grown)}: give one grown run per run")
  ext_sub = f"eval/external/{args.external}"
  sweeps = json.loads((runs[0] / ext_sub / "results.json").read_text())["meta"]["sweeps"]
  names = [str(w) for w in runs]
  per_run = load(runs, grown, "eval")  # also the per-seed table's
  boot = stats.paired_bootstrap(stats.pool_runs(per_run, names), resamples=RESAMPLES, seed=SEED, runs=len(runs))
  ext = stats.paired_bootstrap(stats.pool_runs(load(runs, grown, ext_sub), names), resamples=RESAMPLES, seed=SEED,
                               runs=len(runs))
  ext_of = external_stats(sweeps)

  def top1(m: str, spec: str) -> Callable[..., Any]:
    return lambda a: 100.0 * a[(m, spec)]

  ext_specs = [s for cells in sweeps.values() for s in cells]
  table = {}
  for m in METHODS:
    table[m] = {"clean": boot.interval(top1(m, CLEAN)), "jpeg10": boot.interval(top1(m, JPEG10)),
                "pct_change": boot.interval(pct(m))}
    if all((m, s) in ext.point for s in ext_specs):  # the oracle has no external cells: no true bin there
      table[m].update(ext_mean_top1=ext.interval(ext_of["mean_top1"](m)), ext_mce=ext.interval(ext_of["mce"](m)))

  def diff(f: Callable[[str], Callable[..., Any]], a: str, b: str, bs: stats.Bootstrap) -> dict[str, float]:
    return bs.interval(lambda x: f(a)(x) - f(b)(x))

  comparisons = []
  for label, a, b in COMPARISONS:
    row = {"comparison": label, "a": a, "b": b,
           "pct_change": diff(pct, a, b, boot), "jpeg10": diff(lambda m: top1(m, JPEG10), a, b, boot),
           "clean": diff(lambda m: top1(m, CLEAN), a, b, boot),
           "ext_mean_top1": diff(ext_of["mean_top1"], a, b, ext), "ext_mce": diff(ext_of["mce"], a, b, ext)}
    row["verdicts"] = {k: stats.verdict(row[k], higher_better=k != "ext_mce")
                       for k in ("pct_change", "clean", "ext_mean_top1", "ext_mce")}
    comparisons.append(row)
  # Do they add up? The JPEG-10 gain of MS + AugMix against the sum of MS's and AugMix's gains.
  gain = lambda m: lambda a: 100.0 * (a[(m, JPEG10)] - a[("baseline", JPEG10)])  # noqa: E731
  additivity = boot.interval(lambda a: gain("ms+augmix")(a) - gain("ms")(a) - gain("augmix")(a))
  costs = cost(runs[0])
  for m, seconds in wall(runs, grown).items():
    costs[m]["train_wall_s"] = seconds
  per_seed = []
  for w, cells in zip(runs, per_run):
    acc = {k: float(np.mean(x)) for k, x in cells.items()}
    seed = json.loads((w / "config.json").read_text())["seed"]
    per_seed += [{"seed": seed, "method": m, "clean": 100 * acc[(m, CLEAN)], "jpeg10": 100 * acc[(m, JPEG10)],
                  "pct_change": float(pct(m)(acc))} for m in METHODS]
  args.out.mkdir(parents=True, exist_ok=True)
  with (args.out / "per_seed.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, ["seed", "method", "clean", "jpeg10", "pct_change"])
    writer.writeheader()
    writer.writerows(per_seed)
  result = {"runs": [str(w) for w in runs], "on_augmix": [str(v) for v in grown], "n": boot.n, "seeds": len(runs),
            "external": {"name": args.external, "n": ext.n, "sweeps": sweeps}, "resamples": RESAMPLES,
            "table": table, "comparisons": comparisons, "additivity_jpeg10": additivity, "cost": costs,
            "per_seed": per_seed}
  write_results(args.out / "results.json", result)
  (args.out / "report.md").write_text(render(result))
  print((args.out / "report.md").read_text())


def _ci(ci: Mapping[str, float] | None, digits: int = 1) -> str:
  return "-" if ci is None else f"{ci['point']:.{digits}f} {tables.ci_text(ci, digits)}"


def render(r: Mapping[str, Any]) -> str:
  """report.md of the results."""
  names = {"baseline": "baseline", "da_fc8": "DA (fc)", "augmix": "AugMix", "ms": "MS", "map": "MAP",
           "oracle": "oracle", "ms+augmix": "MS + AugMix", "map+augmix": "MAP + AugMix",
           "oracle+augmix": "oracle + AugMix"}
  t, c = r["table"], r["cost"]
  lines = ["# ResNet-18: master-slave against AugMix", "",
           f"{r['seeds']} seeds pooled image by image: n = {r['n']:,} test images per cell per seed, "
           f"{r['external']['n']:,} per cell of the external set `{r['external']['name']}`; 95% paired bootstrap "
           f"intervals ({r['resamples']:,} resamples). Made by `benchmarks/resnet_vs_augmix.py` (its docstring has "
           "the commands and the cost model).", "",
           tables.markdown(["method", "clean top-1", "JPEG-10 top-1", "% change", "external mean top-1",
                            "external mCE", "train GFLOPs beyond baseline", "baseline epochs", "train s", "MFLOPs / image"],
                           [[names[m], _ci(t[m]["clean"]), _ci(t[m]["jpeg10"]), _ci(t[m]["pct_change"]),
                             _ci(t[m].get("ext_mean_top1")), _ci(t[m].get("ext_mce"), 3), f"{c[m]['train_gflops']:,.0f}",
                             f"{c[m]['train_baseline_epochs']:.2f}", f"{c[m]['train_wall_s']:.0f}",
                             f"{c[m]['infer_mflops']:.1f}"]
                            for m in METHODS]), "",
           "Verdicts (a - b; better / worse when the whole interval is on one side of 0, else undecided; for mCE "
           "lower is better):", "",
           tables.markdown(["a vs b", "% change (points)", "clean top-1", "external mean top-1", "external mCE"],
                           [[x["comparison"], *(f"{_ci(x[k], 3 if k == 'ext_mce' else 1)}: {x['verdicts'][k]}"
                                                 for k in ("pct_change", "clean", "ext_mean_top1", "ext_mce"))]
                            for x in r["comparisons"]]), "",
           f"Do they add up? JPEG-10 gain of MS + AugMix minus the sum of MS's and AugMix's gains: "
           f"{_ci(r['additivity_jpeg10'])} points ("
           + {"better": "more than additive", "worse": "less than additive",
              "undecided": "undecided: additive lies inside the interval"}[stats.verdict(r["additivity_jpeg10"])] + ").", "",
           "Per seed (`per_seed.csv`):", "",
           tables.markdown(["seed", "method", "clean", "JPEG-10", "% change"],
                           [[p["seed"], names[p["method"]], p["clean"], p["jpeg10"], p["pct_change"]]
                            for p in r["per_seed"]]), ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
