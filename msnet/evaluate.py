"""`msnet evaluate`: every method over every spec of the configured sweeps, as masked sums on the mesh.

A method is a function from (params, batch) to [B, C] class probabilities. They run in two model groups,
each one jitted function with explicit shardings, compiled once for the whole sweep (the eval batch shape
is fixed; padding rows are masked):
  shared: everything computed from the baseline's trunk, which runs once per batch: the heads of the K=1
          methods whose trunk is bitwise the baseline's (baseline, da_fc8/67/678) and the assembled slave's
          K branches, stacked into one vmapped call; every branch alone (`branch_<bin>`), AMS, the oracle
          and bitstream routings and, with the master (run once too), MS and MAP all come from the same
          [K, B, C] slave logits; DeepCloak is the baseline head on the masked trunk features. It also
          counts the master's and the bitstream's bin confusion.
  single: K=1 networks with a trunk of their own (stability trains every layer; the AlexNet baseline),
          one jitted step per architecture, one call per method.
Methods whose training stages are not complete are skipped, printed and listed in the meta as "missing".
Sums are global arrays reduced by jit across devices and processes and fetched once per spec.

Outputs (process 0 writes):
  W/eval/cells.jsonl   one line per finished spec (the resume log; a rerun skips specs whose line has
                       the same set of methods).
  W/eval/results.json  {"rows": [...], "meta": {...}}: a row per (method, spec) with ROW_FIELDS:
                         method, spec (canonical), sweeps (names of the sweeps holding the spec),
                         kind, level (the last op: "jpeg" 10.0, "noise" 20.0, "clean" null),
                         codec, codec_level (the chain's last codec, "" / null without one),
                         pre (canonical chain before the last op, "" for a single op),
                         top1, top5 (fractions), n, correct1, correct5 (counts),
                         ci95_low, ci95_high (Wilson 95% interval of top1),
                         psnr (mean over images with finite PSNR, null if all identical), bpp (mean or null).
                       meta: methods, missing ({method: why}), bins, sweeps ({name: canonical specs}),
                         specs, evaluated_now, global_batch, devices, processes, traces (compiles per
                         group in this call), flops (per image: slave, master, baseline), wall_s.
  W/eval/results.csv   the same rows (sweeps joined with ';', null as empty).
  W/eval/master.json   {"bins": [...], "specs": {spec: {n, true_bin, master_accuracy, master_confusion,
                       bitstream_accuracy, bitstream_confusion}}}; confusion rows = true bin.
  W/eval/receptive_fields.json  [{arch, variant, layers: [{layer, rf, stride}]}] for the report's Fig. 1c
                       (the report imports no model code).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from msnet import config as config_lib, decision, degradations, models, parallel
from msnet import train as train_lib
from msnet.data import loader, shards

ROW_FIELDS = ("method", "spec", "sweeps", "kind", "level", "codec", "codec_level", "pre", "top1", "top5", "n",
              "correct1", "correct5", "ci95_low", "ci95_high", "psnr", "bpp")
BATCH_KEYS = ("image", "label", "bin", "bitstream_bin", "mask")
ROUTED = ("branches", "ms", "ams", "map", "oracle", "bitstream")
TOP_K = 5
Z95 = 1.959963984540054


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[msnet] evaluate: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Which methods can run: every method needs its training stages complete; nothing falls back silently.


@dataclasses.dataclass
class Plan:
  """The methods of config.evaluate.methods whose stages are complete, and the others with the reason."""
  single: list[str] = dataclasses.field(default_factory=list)   # K=1 networks: baseline, da_*, stability, deepcloak
  branches: bool = False        # report each branch of the slave alone
  slave: bool = False           # the assembled slave is needed (branches or a decision rule)
  master: bool = False          # the master is needed (ms, map)
  routed: list[str] = dataclasses.field(default_factory=list)   # decision rules: ms, ams, map, oracle, bitstream
  missing: dict[str, str] = dataclasses.field(default_factory=dict)


def stage_done(workdir: pathlib.Path, stage: str) -> bool:
  return (workdir / "train" / stage / "DONE.json").exists()


def make_plan(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Plan:
  """Resolve config.evaluate.methods against the completed training stages."""
  plan = Plan()
  branch_stages = ["baseline", *(f"branch_{b.name}" for b in config.bins[1:])]
  absent = lambda stages: [s for s in stages if not stage_done(workdir, s)]  # noqa: E731
  for method in config.evaluate.methods:
    if method in ROUTED:
      need = branch_stages + (["master"] if method in ("ms", "map") else [])
    elif method == "deepcloak":
      need = ["baseline", "deepcloak"]
    else:
      need = [method]
    if lack := absent(need):
      plan.missing[method] = "stage(s) not trained: " + ", ".join(lack)
      continue
    if method in ROUTED:
      plan.slave = True
      plan.master |= method in ("ms", "map")
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
  return names + plan.routed


# ---------------------------------------------------------------------------------------------------------
# The jitted groups.


def _counts(probs: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked top-1 and top-5 correct counts of probs [M, B, C] -> ([M], [M]) int32.

  Top-1 is argmax (first index on ties, as NumPy); top-k counts the label when fewer than k classes have a
  strictly higher probability, which never depends on how ties are broken among the others. A NaN row
  (the oracle rules give one for a bin outside the branches) counts as wrong.
  """
  k = min(TOP_K, probs.shape[-1])
  p_label = jnp.take_along_axis(probs, labels[None, :, None], axis=-1)
  top1 = jnp.argmax(probs, axis=-1) == labels[None, :]
  topk = jnp.sum(probs > p_label, axis=-1) < k
  m = (mask[None, :] & ~jnp.any(jnp.isnan(probs), axis=-1)).astype(jnp.int32)
  return jnp.sum(top1 * m, axis=1, dtype=jnp.int32), jnp.sum(topk * m, axis=1, dtype=jnp.int32)


def _confusion(true: jax.Array, pred: jax.Array, mask: jax.Array, k: int) -> jax.Array:
  """[k, k] masked counts, rows = true bin (a reduction, not a matmul, so the batch axis may stay sharded)."""
  t = jax.nn.one_hot(true, k, dtype=jnp.int32) * mask[:, None].astype(jnp.int32)
  p = jax.nn.one_hot(pred, k, dtype=jnp.int32)
  return jnp.sum(t[:, :, None] * p[:, None, :], axis=0)


def _zeros(num_outputs: int, num_bins: int = 0) -> dict[str, jax.Array]:
  acc = {"correct1": jnp.zeros((num_outputs,), jnp.int32), "correct5": jnp.zeros((num_outputs,), jnp.int32),
         "n": jnp.zeros((), jnp.int32)}
  if num_bins:
    acc["master_confusion"] = jnp.zeros((num_bins, num_bins), jnp.int32)
    acc["bitstream_confusion"] = jnp.zeros((num_bins, num_bins), jnp.int32)
  return acc


def _heads(module: Any, features: jax.Array) -> jax.Array:
  """The slave's vmapped branches alone, on given trunk features -> [K, B, C] float32 logits."""
  return module.branches(features, False).astype(jnp.float32)


@dataclasses.dataclass
class Layout:
  """How the shared-trunk step lays out its outputs (fixed when it is built, so it compiles once).

  heads: names of the K=1 methods whose branch is stacked first in the params (baseline, da_*);
  slave: K when the assembled slave's branches follow them, else 0; branch_names: the `branch_<bin>`
  names reported for those branches ([] when "branches" is not evaluated); deepcloak: the baseline head
  on masked features; master: MS/MAP need it; routed: the rules computed from the slave's logits.
  """
  heads: list[str]
  slave: int
  branch_names: list[str]
  deepcloak: bool
  master: bool
  routed: list[str]

  @property
  def outputs(self) -> list[str]:
    return [*self.heads, *self.branch_names, *(["deepcloak"] if self.deepcloak else []), *self.routed]


def make_shared_step(module: Any, dc_module: Any, master: Any, layout: Layout, num_bins: int, mesh: Any,
                     shardings: tuple[Any, Any, Any], traces: dict[str, int]) -> Callable[..., dict[str, jax.Array]]:
  """acc, params, dc_params, master_params, feature_mask, batch -> acc plus this batch's sums.

  The trunk runs once; every stacked head (K=1 methods sharing the baseline's trunk, then the slave's K
  branches) runs on its features in one vmapped call; DeepCloak's head on the masked features; the master
  once. Unused arguments are None.
  """
  n_heads = len(layout.heads)

  def step(acc, params, dc_params, master_params, feature_mask, batch):
    traces["shared"] = traces.get("shared", 0) + 1
    mask = batch["mask"]
    out = dict(acc, n=acc["n"] + jnp.sum(mask, dtype=jnp.int32))
    out["bitstream_confusion"] = acc["bitstream_confusion"] + _confusion(batch["bin"], batch["bitstream_bin"],
                                                                         mask, num_bins)
    master_logits = None
    if layout.master:
      master_logits = master.apply({"params": master_params}, batch["image"]).astype(jnp.float32)
      out["master_confusion"] = acc["master_confusion"] + _confusion(
          batch["bin"], jnp.argmax(master_logits, axis=-1), mask, num_bins)
    if module is None:  # no method needs the trunk
      return out
    features = module.apply({"params": params}, batch["image"], method="trunk_features")
    probs = []
    if n_heads or layout.slave:
      logits = module.apply({"params": params}, features, method=_heads)   # [heads + slave K, B, C]
      probs.append(jax.nn.softmax(logits[:n_heads + (layout.slave if layout.branch_names else 0)], axis=-1))
      slave = logits[n_heads:]
    if layout.deepcloak:
      masked = features * feature_mask.astype(features.dtype)
      probs.append(jax.nn.softmax(dc_module.apply({"params": dc_params}, masked, method=_heads), axis=-1))
    rules = {"ms": lambda: decision.ms(slave, master_logits), "ams": lambda: decision.ams(slave),
             "map": lambda: decision.map_rule(slave, master_logits),
             "oracle": lambda: decision.oracle(slave, batch["bin"]),
             "bitstream": lambda: decision.oracle(slave, batch["bitstream_bin"])}
    probs += [rules[r]()[None] for r in layout.routed]
    c1, c5 = _counts(jnp.concatenate(probs, axis=0), batch["label"], mask)
    out["correct1"], out["correct5"] = acc["correct1"] + c1, acc["correct5"] + c5
    return out

  repl = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(repl, *shardings, repl, parallel.data_sharding(mesh)), out_shardings=repl,
                 compiler_options=models.compiler_options())


def make_single_step(model: Any, mesh: Any, param_shardings: Any, traces: dict[str, int], name: str = "single"
                     ) -> Callable[..., dict[str, jax.Array]]:
  """acc, params, batch -> acc: one whole K=1 network (a method with its own trunk, e.g. stability)."""
  def step(acc, params, batch):
    traces[name] = traces.get(name, 0) + 1
    logits = model.apply({"params": params}, batch["image"], train=False)
    c1, c5 = _counts(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), batch["label"], batch["mask"])
    return {"correct1": acc["correct1"] + c1, "correct5": acc["correct5"] + c5,
            "n": acc["n"] + jnp.sum(batch["mask"], dtype=jnp.int32)}

  repl = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(repl, param_shardings, parallel.data_sharding(mesh)), out_shardings=repl,
                 compiler_options=models.compiler_options())


def _fetch(tree: Any) -> Any:
  """Replicated global arrays -> NumPy (the local copy; valid on every process)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


# ---------------------------------------------------------------------------------------------------------
# Spec metadata and statistics.


def spec_fields(spec: str) -> dict[str, Any]:
  """Kind and level of the last op, the last codec and its level, and the chain before the last op."""
  s = degradations.parse(spec)
  last, codec = s.ops[-1], s.last_codec
  return dict(kind=last.name, level=_level(last), codec=codec.name if codec else "",
              codec_level=_level(codec) if codec else None,
              pre=str(degradations.Spec(s.ops[:-1])) if len(s.ops) > 1 else "")


def _level(op: Any) -> float | None:
  """The op's level: JPEG quality, JPEG 2000 ratio or PSNR target, noise or blur sigma; None for clean."""
  fields = dataclasses.fields(op)
  return float(getattr(op, fields[0].name)) if fields else None


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion k/n."""
  if n == 0:
    return math.nan, math.nan
  p = k / n
  denom = 1.0 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
  return max(0.0, center - half), min(1.0, center + half)


def spec_stats(workdir: pathlib.Path, split: str, spec: str) -> dict[str, Any]:
  """Record count, mean finite PSNR and mean bpp of a spec's eval shards, from W/data/manifest.json.

  Specs the manifest does not list (shards written by hand) are summarised from their records.
  """
  manifest = shards.read_json(workdir / "data" / "manifest.json") or {}
  entry = manifest.get("splits", {}).get(split, {}).get("specs", {}).get(spec)
  if entry is not None:
    return dict(records=int(entry["num_records"]), psnr=_finite_or_none(entry["mean_psnr"]),
                bpp=_finite_or_none(entry["mean_bpp"]))
  source = shards.open_shards(shards.spec_dir(workdir, split, spec))
  psnr = np.array([source[i]["psnr"] for i in range(len(source))], np.float64)
  bpp = np.array([source[i]["bpp"] for i in range(len(source))], np.float64)
  psnr, bpp = psnr[np.isfinite(psnr)], bpp[np.isfinite(bpp)]
  return dict(records=len(source), psnr=float(psnr.mean()) if psnr.size else None,
              bpp=float(bpp.mean()) if bpp.size else None)


def _finite_or_none(v: Any) -> float | None:
  return float(v) if v is not None and math.isfinite(float(v)) else None


# ---------------------------------------------------------------------------------------------------------
# Resume log and output files.


def read_cells(path: pathlib.Path) -> dict[str, dict[str, Any]]:
  """spec -> its latest finished cell; a torn last line (crash mid-write) is ignored."""
  cells: dict[str, dict[str, Any]] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        cell = json.loads(line)
      except json.JSONDecodeError:
        continue
      cells[cell["spec"]] = cell
  return cells


def _append_cell(path: pathlib.Path, cell: dict[str, Any]) -> None:
  """Append one line; a torn line left by a crash is first closed so the new one stays readable."""
  torn = False
  if path.exists() and path.stat().st_size > 0:
    with path.open("rb") as f:
      f.seek(-1, 2)
      torn = f.read(1) != b"\n"
  with path.open("a") as f:
    f.write(("\n" if torn else "") + json.dumps(cell) + "\n")
    f.flush()


def rows_of(cell: dict[str, Any], sweeps: list[str]) -> list[dict[str, Any]]:
  """One result row per method of a finished spec."""
  rows = []
  for method, c in cell["counts"].items():
    n, k1, k5 = c["n"], c["correct1"], c["correct5"]
    lo, hi = wilson(k1, n)
    rows.append(dict(method=method, spec=cell["spec"], sweeps=sweeps, **cell["fields"],
                     top1=k1 / n if n else math.nan, top5=k5 / n if n else math.nan, n=n, correct1=k1,
                     correct5=k5, ci95_low=lo, ci95_high=hi, psnr=cell["quality"]["psnr"],
                     bpp=cell["quality"]["bpp"]))
  return rows


def _json_safe(v: Any) -> Any:
  """NaN/inf -> None so results.json stays standard JSON."""
  if isinstance(v, float) and not math.isfinite(v):
    return None
  if isinstance(v, dict):
    return {k: _json_safe(x) for k, x in v.items()}
  if isinstance(v, list):
    return [_json_safe(x) for x in v]
  return v


def write_results(out: pathlib.Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
  (out / "results.json").write_text(json.dumps(_json_safe({"rows": rows, "meta": meta}), indent=1) + "\n")
  with (out / "results.csv").open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(ROW_FIELDS))
    w.writeheader()
    for r in _json_safe(rows):
      w.writerow({k: ";".join(v) if isinstance(v, list) else ("" if v is None else v) for k, v in r.items()})


def _receptive_fields(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Per-layer receptive fields of VGG-16 and AlexNet (the run's variant and the paper's ImageNet one)."""
  nets = []
  for variant in dict.fromkeys((config.model.variant, "imagenet")):
    for arch in ("vgg16", "alexnet"):
      try:
        nets.append(dict(arch=arch, variant=variant, layers=list(models.receptive_fields(arch, variant))))
      except ValueError as e:
        _log(f"no receptive fields for {arch}/{variant}: {e}")
  return nets


# ---------------------------------------------------------------------------------------------------------
# The run.


def _spec_plan(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """Canonical spec -> the sweeps it belongs to, in first-appearance order (each spec evaluated once)."""
  specs: dict[str, list[str]] = {}
  for name in config.evaluate.sweeps:
    for s in config.sweeps[name]:
      specs.setdefault(str(degradations.parse(s)), []).append(name)
  return specs


@dataclasses.dataclass
class Groups:
  """The two jitted steps and their placed arguments, built once per run."""
  shared_step: Callable[..., dict[str, jax.Array]]
  shared_args: tuple[Any, Any, Any, Any]        # params, dc_params, master_params, feature_mask
  layout: Layout
  single: dict[str, tuple[Callable[..., dict[str, jax.Array]], Any]]  # method -> (its arch's step, placed params)
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

  def place(params: Any) -> tuple[Any, Any]:
    shardings = parallel.param_shardings(params, mesh, rules)
    return jax.device_put(params, shardings), shardings

  base = train_lib.load_params(workdir, "baseline") if stage_done(workdir, "baseline") else None
  single_model = models.build_slave(config.model, num_classes, 1)
  flops = {"baseline": float(models.flops_per_image(single_model, base, size))} if base is not None else {}
  heads, own = {}, {}
  for m in plan.single:
    if m == "deepcloak":
      continue
    params = base if m == "baseline" else train_lib.load_params(workdir, m)
    if base is not None and _same(params["trunk"], base["trunk"]):
      heads[m] = params["branches"]
    else:
      own[m] = params
  branches = list(heads.values())
  slave_k = 0
  if plan.slave:
    slave = train_lib.load_slave_params(workdir, config)
    if not _same(slave["trunk"], base["trunk"]):
      raise ValueError("evaluate: the assembled slave's trunk differs from the baseline's; the branch stages "
                       "must train with the trunk frozen")
    branches.append(slave["branches"])
    slave_k = num_bins
    flops["slave"] = float(models.flops_per_image(models.build_slave(config.model, num_classes, num_bins),
                                                  slave, size))
  layout = Layout(heads=list(heads), slave=slave_k,
                  branch_names=[f"branch_{b.name}" for b in config.bins] if plan.branches else [],
                  deepcloak="deepcloak" in plan.single, master=plan.master, routed=list(plan.routed))

  traces: dict[str, int] = {}
  module = params = params_sh = None
  if branches or layout.deepcloak:
    module = models.build_slave(config.model, num_classes,
                                max(1, sum(jax.tree.leaves(b)[0].shape[0] for b in branches)))
    stacked = {"trunk": base["trunk"]}
    if branches:
      stacked["branches"] = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *branches)
    params, params_sh = place(stacked)
  dc_params = dc_sh = feature_mask = None
  if layout.deepcloak:
    dc_params, dc_sh = place({"branches": base["branches"]})
    feature_mask = jax.device_put(np.asarray(train_lib.load_feature_mask(workdir), np.float32),
                                  parallel.replicated(mesh))
  master = master_params = master_sh = None
  if plan.master:
    master = models.build_master(config.master, num_bins)
    loaded = train_lib.load_params(workdir, "master")
    flops["master"] = float(models.flops_per_image(master, loaded, size))
    master_params, master_sh = place(loaded)
  shared_step = make_shared_step(module, single_model, master, layout, num_bins, mesh,
                                 (params_sh, dc_sh, master_sh), traces)

  # Methods with a trunk of their own: one jitted step per architecture (VGG-16: stability; AlexNet).
  single, steps = {}, {}
  for m, p in own.items():
    if m == "alexnet_baseline":
      arch_cfg = config_lib.alexnet_model(config)
      model = models.build_slave(arch_cfg, num_classes, 1)
    else:
      arch_cfg, model = config.model, single_model
    expected = jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                                                 jnp.zeros((1, size, size, 3), jnp.uint8))["params"])
    if jax.tree.structure(p) != jax.tree.structure(expected):
      raise ValueError(f"evaluate: params of stage {m!r} do not match the {arch_cfg.arch} model of this config")
    shardings = parallel.param_shardings(p, mesh, rules)
    if arch_cfg.arch not in steps:
      steps[arch_cfg.arch] = make_single_step(model, mesh, shardings, traces, name=f"single_{arch_cfg.arch}")
    single[m] = (steps[arch_cfg.arch], jax.device_put(p, shardings))
  return Groups(shared_step, (params, dc_params, master_params, feature_mask), layout, single, traces, flops)


def evaluate_spec(config: ml_collections.ConfigDict, workdir: pathlib.Path, spec: str, groups: Groups,
                  mesh: Any, total_batches: int | None) -> dict[str, Any]:
  """All methods on one spec's eval shards -> the spec's cell: counts per method and the bin confusions."""
  num_bins = len(config.bins)
  repl = parallel.replicated(mesh)
  outputs = groups.layout.outputs
  acc = jax.device_put(_zeros(max(len(outputs), 1), num_bins), repl)
  acc_single = {m: jax.device_put(_zeros(1), repl) for m in groups.single}
  bar = tqdm.tqdm(total=total_batches, desc=spec, unit="batch", leave=False, disable=jax.process_index() != 0)
  for batch in loader.eval_batches(workdir, config.data.eval_split, spec, config.evaluate.global_batch, mesh):
    batch = {k: batch[k] for k in BATCH_KEYS}
    acc = groups.shared_step(acc, *groups.shared_args, batch)
    for m, (single_step, params) in groups.single.items():
      acc_single[m] = single_step(acc_single[m], params, batch)
    bar.update(1)
  bar.close()
  shared, own = _fetch(acc), _fetch(acc_single)
  n = int(shared["n"])
  counts = {m: dict(correct1=int(shared["correct1"][i]), correct5=int(shared["correct5"][i]), n=n)
            for i, m in enumerate(outputs)}
  counts.update({m: dict(correct1=int(v["correct1"][0]), correct5=int(v["correct5"][0]), n=int(v["n"]))
                 for m, v in own.items()})
  bit_conf = shared["bitstream_confusion"].astype(int)
  master: dict[str, Any] = dict(
      n=n, true_bin=degradations.bin_of(spec, [list(b.match) for b in config.bins]),
      master_accuracy=None, master_confusion=None,
      bitstream_accuracy=float(np.trace(bit_conf)) / n if n else None, bitstream_confusion=bit_conf.tolist())
  if groups.layout.master:
    conf = shared["master_confusion"].astype(int)
    master.update(master_accuracy=float(np.trace(conf)) / n if n else None, master_confusion=conf.tolist())
  return dict(spec=spec, counts=counts, master=master)


def run_evaluate(config: ml_collections.ConfigDict, workdir: Any) -> list[dict[str, Any]]:
  """Evaluate every method over the configured sweeps; returns the result rows (also written to W/eval)."""
  start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  out = workdir / "eval"
  is_writer = jax.process_index() == 0
  if is_writer:
    out.mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh)
  plan = make_plan(config, workdir)
  names = method_names(config, plan)
  if plan.missing:
    _log("WARNING: skipping methods whose training stages are not complete: "
         + "; ".join(f"{m} ({why})" for m, why in plan.missing.items()))
  if not names:
    raise RuntimeError("evaluate: no method can run (no training stage is complete); run `msnet train` first")

  spec_sweeps = _spec_plan(config)
  cells = read_cells(out / "cells.jsonl")
  done = np.array([s in cells and cells[s]["methods"] == sorted(names) for s in spec_sweeps], np.int32)
  if jax.process_count() > 1:  # every process must skip the same specs, whatever its view of the filesystem
    from jax.experimental import multihost_utils  # noqa: PLC0415
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  todo = [s for s, d in zip(spec_sweeps, done) if not d]
  _log(f"{len(names)} methods x {len(spec_sweeps)} specs ({len(spec_sweeps) - len(todo)} already done)")

  groups = build_groups(config, workdir, plan, mesh)
  if is_writer:
    (out / "receptive_fields.json").write_text(json.dumps(_receptive_fields(config), indent=1) + "\n")
  gb = config.evaluate.global_batch
  for spec in tqdm.tqdm(todo, desc="evaluate", unit="spec", disable=not is_writer):
    t0 = time.perf_counter()
    quality = spec_stats(workdir, config.data.eval_split, spec)
    cell = evaluate_spec(config, workdir, spec, groups, mesh, -(-quality["records"] // gb))
    cell.update(methods=sorted(names), counts={m: cell["counts"][m] for m in names}, fields=spec_fields(spec),
                quality=quality, wall_s=round(time.perf_counter() - t0, 3))
    if is_writer:
      _append_cell(out / "cells.jsonl", cell)
    cells[spec] = cell

  rows = [r for s, sw in spec_sweeps.items() for r in rows_of(cells[s], sw)]
  meta = dict(methods=names, missing=plan.missing, bins=[b.name for b in config.bins],
              sweeps={name: [str(degradations.parse(s)) for s in config.sweeps[name]]
                      for name in config.evaluate.sweeps},
              specs=list(spec_sweeps), evaluated_now=todo, global_batch=gb, devices=jax.device_count(),
              processes=jax.process_count(), traces=dict(groups.traces), flops=groups.flops,
              groups={"shared": groups.layout.outputs, "single": list(groups.single)},
              wall_s=round(time.perf_counter() - start, 3))
  if is_writer:
    write_results(out, rows, meta)
    master = dict(bins=meta["bins"], specs={s: cells[s]["master"] for s in spec_sweeps})
    (out / "master.json").write_text(json.dumps(master, indent=1) + "\n")
  return rows
