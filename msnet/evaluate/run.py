"""The run: every spec not yet in the resume log, all methods at once, then the result files."""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import ml_collections
import numpy as np
import tqdm

from msnet import degradations, errors, models, parallel
from msnet.data import loader
from msnet.evaluate import resident
from msnet.evaluate.groups import Groups, build_groups
from msnet.evaluate.plan import make_plan, method_names, spec_plan
from msnet.evaluate.results import (append_cell, correct_path, read_cells, rows_of, skipped_records, spec_fields,
                                   spec_stats, write_correct, write_results)
from msnet.evaluate.steps import fetch, gather_rows, local_rows, zeros

BATCH_KEYS = ("image", "label", "bin", "bitstream_bin", "mask")


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[msnet] evaluate: {message}", file=sys.stderr, flush=True)


def receptive_fields(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Per-layer receptive fields of VGG-16 and AlexNet (the run's variant and the paper's ImageNet one)."""
  nets = []
  for variant in dict.fromkeys((config.model.variant, "imagenet")):
    for arch in ("vgg16", "alexnet"):
      try:
        nets.append(dict(arch=arch, variant=variant, layers=list(models.receptive_fields(arch, variant))))
      except ValueError as e:
        _log(f"no receptive fields for {arch}/{variant}: {e}")
  return nets


def evaluate_spec(config: ml_collections.ConfigDict, workdir: pathlib.Path, spec: str, groups: Groups,
                  mesh: Any, total_batches: int | None, local: dict[str, np.ndarray] | None = None
                  ) -> dict[str, Any]:
  """All methods on one spec's eval shards -> the spec's cell: counts per method, the bin confusions and, under
  "correct", each method's top-1 per record in record order (bool [n]; the counts' per-image form).

  `local`: the spec's records as resident.read_local gave them, evaluated from the devices in one scanned
  call; None streams them from the shards batch by batch.
  """
  if local is None:
    batches = loader.eval_batches(workdir, config.data.eval_split, spec, config.evaluate.global_batch, mesh)
    out = evaluate_batches(config, groups, mesh, batches, total_batches, spec)
  else:
    out = evaluate_resident(config, groups, mesh, resident.place(local, mesh, config.evaluate.global_batch))
  n, bit_conf, conf = out["n"], out["bitstream_confusion"], out["master_confusion"]
  master: dict[str, Any] = dict(
      n=n, true_bin=degradations.bin_of(spec, [list(b.match) for b in config.bins]),
      master_accuracy=None, master_confusion=None,
      bitstream_accuracy=float(np.trace(bit_conf)) / n if n else None, bitstream_confusion=bit_conf.tolist())
  if conf is not None:
    master.update(master_accuracy=float(np.trace(conf)) / n if n else None, master_confusion=conf.tolist())
  return dict(spec=spec, counts=out["counts"], master=master, correct=out["correct"], reliability=out["reliability"])


def evaluate_batches(config: ml_collections.ConfigDict, groups: Groups, mesh: Any,
                     batches: Iterable[dict[str, jax.Array]], total_batches: int | None, desc: str) -> dict[str, Any]:
  """All methods on a stream of global batches (`loader.eval_batches`' keys) -> "counts" per method, "n", the
  master's and the bitstream's bin confusions (int [K, K], rows = the batches' "bin"; the master's None without
  it), "correct": each method's top-1 per unmasked record, in order, and "reliability": per method of the
  shared group, its confidence histogram (msnet.calibration.histogram's form)."""
  acc, acc_single = _zeros(config, groups, mesh)
  per_batch: list[tuple[list[jax.Array], jax.Array]] = []  # fetched once at the end: the loop never waits on the device
  bar = tqdm.tqdm(total=total_batches, desc=desc, unit="batch", leave=False, disable=jax.process_index() != 0)
  for batch in batches:
    batch = {k: batch[k] for k in BATCH_KEYS}
    acc, top1 = groups.shared_step(acc, *groups.shared_args, batch)
    per_image = [top1]
    for m, (single_step, _, params) in groups.single.items():
      acc_single[m], top1 = single_step(acc_single[m], params, batch)
      per_image.append(top1)
    per_batch.append((per_image, batch["mask"]))
    bar.update(1)
  bar.close()
  return _summary(groups, acc, acc_single, _per_image(per_batch, [*groups.layout.outputs, *groups.single], mesh))


def evaluate_resident(config: ml_collections.ConfigDict, groups: Groups, mesh: Any, data: dict[str, jax.Array]
                      ) -> dict[str, Any]:
  """`evaluate_batches` on one spec's device-resident batches (resident.place: [N, B, ...]), each group's step
  scanned over all N in one call: the same sums and per-image rows."""
  acc, acc_single = _zeros(config, groups, mesh)
  batches = {k: data[k] for k in BATCH_KEYS}
  acc, top1 = groups.shared_scan(acc, *groups.shared_args, batches)
  per_image = [top1]
  for m, (_, single_scan, params) in groups.single.items():
    acc_single[m], top1 = single_scan(acc_single[m], params, batches)
    per_image.append(top1)
  return _summary(groups, acc, acc_single,
                  _per_image([(per_image, batches["mask"])], [*groups.layout.outputs, *groups.single], mesh, True))


def _zeros(config: ml_collections.ConfigDict, groups: Groups, mesh: Any
           ) -> tuple[dict[str, jax.Array], dict[str, dict[str, jax.Array]]]:
  """Empty sums of the shared group and of each single method, replicated."""
  repl = parallel.replicated(mesh)
  acc = jax.device_put(zeros(max(len(groups.layout.outputs), 1), len(config.bins), groups.layout.ece_bins), repl)
  return acc, {m: jax.device_put(zeros(1), repl) for m in groups.single}


def _summary(groups: Groups, acc: dict[str, jax.Array], acc_single: dict[str, dict[str, jax.Array]],
             correct: dict[str, np.ndarray]) -> dict[str, Any]:
  """The sums fetched and named: `evaluate_batches`' result."""
  outputs = groups.layout.outputs
  shared, own = fetch(acc), fetch(acc_single)
  n = int(shared["n"])
  counts = {m: dict(correct1=int(shared["correct1"][i]), correct5=int(shared["correct5"][i]), n=n)
            for i, m in enumerate(outputs)}
  counts.update({m: dict(correct1=int(v["correct1"][0]), correct5=int(v["correct5"][0]), n=int(v["n"]))
                 for m, v in own.items()})
  reliability = {m: dict(zip(("count", "correct", "confidence"), shared["reliability"][i].astype(float).tolist()))
                 for i, m in enumerate(outputs)}
  return dict(counts=counts, n=n, correct=correct, reliability=reliability,
              bitstream_confusion=shared["bitstream_confusion"].astype(int),
              master_confusion=shared["master_confusion"].astype(int) if groups.layout.master else None)


def _per_image(per_batch: list[tuple[list[jax.Array], jax.Array]], names: list[str], mesh: Any,
               stacked: bool = False) -> dict[str, np.ndarray]:
  """Per batch: the groups' [B, outputs] top-1 arrays and the mask -> method -> bool [n] over all processes,
  in record order; `stacked`: one entry of [N, B, outputs] arrays and the [N, B] mask."""
  if not per_batch:
    return {m: np.zeros(0, bool) for m in names}
  mine = lambda x: local_rows(x, mesh, stacked)  # noqa: E731
  local = np.concatenate([np.concatenate([*(mine(x) for x in top1), mine(mask)[:, None]], axis=1)
                          for top1, mask in per_batch])
  rows = gather_rows(local)
  rows = rows[rows[:, -1]]
  return {m: rows[:, i].copy() for i, m in enumerate(names)}


def _read_ahead(specs: list[str], read: Callable[[str], Any]) -> Iterator[Any]:
  """read(spec) for each spec in order, the next one read on a thread while the caller evaluates this one (at
  most two specs in memory)."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    ahead = [pool.submit(read, s) for s in specs[:1]]
    for following in [*specs[1:], None]:
      this = ahead.pop()
      ahead += [] if following is None else [pool.submit(read, following)]
      yield this.result()


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
  if not names:
    raise errors.MissingInputError("evaluate: no method can run (no training stage is complete); run `msnet train` "
                                   "first")
  if plan.missing:
    _log("WARNING: skipping methods whose training stages are not complete: "
         + "; ".join(f"{m} ({why})" for m, why in plan.missing.items()))

  spec_sweeps = spec_plan(config)
  cells = read_cells(out / "cells.jsonl")
  done = np.array([s in cells and cells[s]["methods"] == sorted(names) and correct_path(out, s).exists()
                   for s in spec_sweeps], np.int32)
  if jax.process_count() > 1:  # every process must skip the same specs, whatever its view of the filesystem
    from jax.experimental import multihost_utils  # noqa: PLC0415
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  todo = [s for s, d in zip(spec_sweeps, done) if not d]
  _log(f"{len(names)} methods x {len(spec_sweeps)} specs ({len(spec_sweeps) - len(todo)} already done)")

  groups = build_groups(config, workdir, plan, mesh)
  if is_writer:
    (out / "receptive_fields.json").write_text(json.dumps(receptive_fields(config), indent=1) + "\n")
  gb, split = config.evaluate.global_batch, config.data.eval_split
  quality = {s: spec_stats(workdir, split, s) for s in todo}
  on_device = resident.choose(config, mesh, [quality[s]["records"] for s in todo])
  if todo:
    _log(f"{sum(on_device)} of {len(todo)} specs from device-resident records (evaluate.device_data="
         f"{config.evaluate.device_data!r}), the others streamed from the host")
  reads = _read_ahead([s for s, d in zip(todo, on_device) if d],
                      lambda s: resident.read_local(workdir, split, s, gb))
  for spec, device in zip(tqdm.tqdm(todo, desc="evaluate", unit="spec", disable=not is_writer), on_device):
    t0 = time.perf_counter()
    local = next(reads) if device else None
    cell = evaluate_spec(config, workdir, spec, groups, mesh, -(-quality[spec]["records"] // gb), local)
    del local
    correct = cell.pop("correct")
    cell.update(methods=sorted(names), counts={m: cell["counts"][m] for m in names},
                reliability={m: h for m, h in cell["reliability"].items() if m in names}, fields=spec_fields(spec),
                quality=quality[spec], wall_s=round(time.perf_counter() - t0, 3))
    if is_writer:
      write_correct(out, spec, {m: correct[m] for m in names})
      append_cell(out / "cells.jsonl", cell)
    cells[spec] = cell

  rows = [r for s, sw in spec_sweeps.items() for r in rows_of(cells[s], sw)]
  skipped = skipped_records(workdir, config.data.eval_split)
  n = sorted({r["n"] for r in rows})
  _log(f"n = {', '.join(map(str, n))} records per spec"
       + ("" if skipped is None else f" ({len(skipped)} source records skipped as unreadable)"))
  meta = dict(methods=names, missing=plan.missing, bins=[b.name for b in config.bins],
              sweeps={name: [str(degradations.parse(s)) for s in config.sweeps[name]]
                      for name in config.evaluate.sweeps},
              specs=list(spec_sweeps), skipped=None if skipped is None else len(skipped), evaluated_now=todo,
              device_data=[s for s, d in zip(todo, on_device) if d], global_batch=gb, devices=jax.device_count(),
              processes=jax.process_count(), traces=dict(groups.traces), flops=groups.flops,
              groups={"shared": groups.layout.outputs, "single": list(groups.single)},
              wall_s=round(time.perf_counter() - start, 3))
  if is_writer:
    write_results(out, rows, meta)
    master = dict(bins=meta["bins"], specs={s: cells[s]["master"] for s in spec_sweeps})
    (out / "master.json").write_text(json.dumps(master, indent=1) + "\n")
    reliability = {s: cells[s].get("reliability", {}) for s in spec_sweeps}
    (out / "reliability.json").write_text(json.dumps(dict(ece_bins=groups.layout.ece_bins, specs=reliability)) + "\n")
  return rows
