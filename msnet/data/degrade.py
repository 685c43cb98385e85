"""`msnet degrade`: pre-degrade the source splits offline into ArrayRecord shards and a manifest.

Work is cut into units (split, spec, shard); shard k of every spec covers the same source records, and
each record is degraded with `degradations.apply(spec, image, seed=config.seed, index=source_index)`, so
the bytes written do not depend on how many workers or machines ran them. Units run in a pool of spawned
worker processes (JAX is never imported there) or inline when `config.degrade.num_workers == 0`.

Resumable: a unit is complete when its shard file has its final name (written under a temporary name
of its own writer, then named) and its sidecar .json records the unit's fingerprint and the file's size;
a rerun skips complete units and redoes the rest. After `kill -9` a file with a final name is complete;
a lost sidecar only costs a redo. Writers never share a temporary file, and a unit that another writer
completed meanwhile is taken as it is, so two jobs started on one workdir at once write the same bytes.

Several JAX processes (launch/*.sh): process i of P runs every P-th unit and writes
`W/data/manifest.part-<i>-of-<P>.json`; process 0 merges the parts once every process has said it is done
(through the coordinator's key-value store, which waits as long as the slowest part takes), and all return
the merged manifest. Several independent machines: `config.degrade.num_shards = N, shard_index = i` does
the same by hand; `merge_manifests` checks the parts against each other and the files and writes
`W/data/manifest.json` (done by the last part to finish). A single process is the case N = 1.

`config.data.holdout_examples = h > 0` holds the last h of the n training records in use out of training:
the train split's shards hold source records [0, n - h) and a third split, `HOLDOUT`, holds [n - h, n) of
the same source split (manifest `splits["holdout"]`, with its `source_split` and `first_source_record`), in
the specs `holdout_specs`. Records keep their source index, so a held-out record has the bytes the train
split would give it. With h = 0 the manifest is that of a degrade without the field.

Source files that cannot be used (undecodable, or smaller than `data.image_size` without
`resize_shorter`) are skipped in every spec with `config.degrade.on_corrupt = "skip"`; the manifest lists
them per split: `skipped` (record indices) and `skipped_names` (paths relative to the source), aligned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import pathlib
import re
import sys
import time
from typing import Any, Iterator, Sequence

from etils import epath
import ml_collections
import numpy as np
import tqdm

from msnet import config as config_lib
from msnet.data import shards, sources

HOLDOUT = "holdout"  # split (directory, manifest entry and role) of the held-out training records
_SOURCE_KEYS = ("source", "path", "tfds_name", "tfds_data_dir", "image_size", "resize_shorter")


class PartsMissingError(ValueError):
  """Some parts of a job split across machines have not written their manifest part yet."""


class PeerFailedError(RuntimeError):
  """Another JAX process of the job failed its part of the degrade; its own output says why."""


@dataclasses.dataclass(frozen=True)
class Unit:
  """One shard of one spec of one split: records [start, stop) of its source split."""
  split: str         # directory and manifest name: a source split, or HOLDOUT
  source_split: str  # the source split its records are read from
  spec: str          # canonical spec string
  shard: int
  num_shards: int
  start: int
  stop: int
  file: str          # path relative to W/data
  fingerprint: str   # everything the shard's bytes depend on, hashed


def all_train_specs(config: ml_collections.ConfigDict) -> list[str]:
  """Specs of the training split: clean, every bin's train_specs, every stage's train_specs."""
  specs = ["clean"] + [s for b in config.bins for s in b.train_specs]
  specs += [s for _, stage in sorted(config.stages.items()) for s in stage.get("train_specs", [])]
  return _canonical_unique(specs)


def holdout_specs(config: ml_collections.ConfigDict) -> list[str]:
  """Specs of the held-out training records: clean and every bin's train_specs (what branches learn)."""
  return _canonical_unique(["clean"] + [s for b in config.bins for s in b.train_specs])


def all_eval_specs(config: ml_collections.ConfigDict) -> list[str]:
  """Specs of the evaluation split: clean (validation) and every spec of config.evaluate.sweeps."""
  return _canonical_unique(["clean"] + [s for name in config.evaluate.sweeps for s in config.sweeps[name]])


def _canonical_unique(specs: Sequence[str]) -> list[str]:
  from msnet import degradations  # noqa: PLC0415
  out: list[str] = []
  for s in specs:
    c = str(degradations.parse(s))
    if c not in out:
      out.append(c)
  return out


def run_degrade(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *,
                specs: Sequence[str] | None = None) -> dict[str, Any]:
  """Write this process's shards of every split and its manifest part; returns the manifest (or part).

  `specs` (optional) replaces the config's spec lists of every split, e.g. to add one spec for
  `msnet show`; the manifest keeps the entries of earlier runs with the same source and seed.
  Under several JAX processes every process returns the merged manifest.
  """
  data_dir = epath.Path(workdir) / "data"
  part, num_parts, by_jax = _part(config.degrade)
  header, units = plan(config, specs)
  manifest = shards.read_json(data_dir / "manifest.json")
  if manifest and _manifest_covers(manifest, header, units, data_dir):
    print(f"[degrade] {data_dir / 'manifest.json'} is complete for these specs; nothing to do")
    return manifest
  if by_jax and num_parts > 1:
    return _run_jax_part(config, data_dir, header, units, part, num_parts)
  part_manifest = _write_part(config, data_dir, header, units, part, num_parts)
  # Hashes were computed while writing (this part); other parts' are checked by size here and by
  # sha256 in an explicit merge_manifests(workdir).
  try:
    return merge_manifests(workdir, verify=False, reference=part_manifest)
  except PartsMissingError as e:
    print(f"[degrade] part {part} of {num_parts} written; {e}. The last part to finish merges them "
          "(or call msnet.data.degrade.merge_manifests)")
    return part_manifest


_jax_jobs = itertools.count()  # numbers the JAX-split degrades of this process; every process counts alike


def _run_jax_part(config: ml_collections.ConfigDict, data_dir: epath.Path, header: dict[str, Any],
                  units: Sequence[Unit], part: int, num_parts: int) -> dict[str, Any]:
  """Process `part`'s units; process 0 merges once every process reported; all return the manifest.

  Processes report through the coordinator's key-value store, not a collective: gloo gives up on a peer
  that reaches a collective 30 s after the others, and parts of a degrade may finish minutes apart.
  """
  from msnet import parallel  # noqa: PLC0415 (imports JAX; only the JAX-split degrade needs it)
  key = f"msnet/degrade/{next(_jax_jobs)}"
  try:
    part_manifest = _write_part(config, data_dir, header, units, part, num_parts)
  except BaseException as e:
    parallel.announce(f"{key}/part-{part}", f"{type(e).__name__}: {e}")
    raise
  parallel.announce(f"{key}/part-{part}", "ok")
  if part == 0:
    reports = {p: parallel.await_key(f"{key}/part-{p}") for p in range(num_parts)}
    failed = "; ".join(f"process {p}: {r}" for p, r in reports.items() if r != "ok")
    if not failed:
      try:
        merge_manifests(data_dir.parent, verify=False, reference=part_manifest)
      except BaseException as e:
        parallel.announce(f"{key}/merged", f"merging the manifest parts on process 0: {type(e).__name__}: {e}")
        raise
    parallel.announce(f"{key}/merged", failed or "ok")
  merged = parallel.await_key(f"{key}/merged")
  if merged != "ok":
    raise PeerFailedError(f"msnet degrade failed on another process ({merged}); see that process's output")
  return shards.read_json(data_dir / "manifest.json")


def _write_part(config: ml_collections.ConfigDict, data_dir: epath.Path, header: dict[str, Any],
                units: Sequence[Unit], part: int, num_parts: int) -> dict[str, Any]:
  """Write the shards of every `num_parts`-th unit from `part` and the manifest part that lists them."""
  _remove_stale(data_dir, units)
  mine = units[part::num_parts]
  done = {u.file: _complete_sidecar(data_dir, u) for u in mine}
  todo = [u for u in mine if done[u.file] is None]
  print(f"[degrade] part {part + 1}/{num_parts}: {len(mine)} shards, {len(mine) - len(todo)} already "
        f"complete, {len(todo)} to write with {config.degrade.num_workers} workers")
  job = {"data": config.data.to_dict(), "seed": int(config.seed), "on_corrupt": config.degrade.on_corrupt,
         "rules": [list(b.match) for b in config.bins], "data_dir": os.fspath(data_dir),
         "log_file": os.fspath(data_dir.parent / "logs" / f"degrade-part{part}-workers.log")}
  for sidecar in _run_units(todo, job, int(config.degrade.num_workers)):
    done[sidecar["file"]] = sidecar
  for car in done.values():  # sidecars written before skipped files were named
    if "skipped_names" not in car:
      names = _source(job["data"], _source_split(header, car["split"])).relative_names
      car["skipped_names"] = [names[i] for i in car["skipped"]]
  part_manifest = {**header, "part": part, "num_parts": num_parts,
                   "expected": [u.file for u in units], "units": done}
  shards.write_json(data_dir / f"manifest.part-{part}-of-{num_parts}.json", part_manifest)
  return part_manifest


def plan(config: ml_collections.ConfigDict, specs: Sequence[str] | None = None
         ) -> tuple[dict[str, Any], list[Unit]]:
  """The manifest header (what the shards depend on) and every unit of the job, in a fixed order."""
  from msnet import degradations  # noqa: PLC0415
  d = config.data
  if d.train_split == d.eval_split:
    raise ValueError(f"config.data.train_split and eval_split are both {d.train_split!r}: "
                     "their shards would share W/data/<split>/")
  rps = int(config.degrade.records_per_shard)
  header: dict[str, Any] = {
      "format": shards.FORMAT_VERSION, "degradations": degradations.PIXELS_VERSION,
      "source": {k: d[k] for k in _SOURCE_KEYS}, "seed": int(config.seed),
      "bins": [{"name": b.name, "match": list(b.match)} for b in config.bins],
      "records_per_shard": rps, "versions": _versions(), "splits": {}}
  n_train = _records_in_use(_source(d.to_dict(), d.train_split), d.max_train_examples)
  holdout = _holdout_examples(d, n_train)
  # (role, split as named in W/data/ and the manifest, source split, its records [first, stop), specs)
  roles = [("train", d.train_split, d.train_split, 0, n_train - holdout, all_train_specs(config)),
           ("eval", d.eval_split, d.eval_split, 0,
            _records_in_use(_source(d.to_dict(), d.eval_split), d.max_eval_examples), all_eval_specs(config))]
  if holdout:
    roles.append((HOLDOUT, HOLDOUT, d.train_split, n_train - holdout, n_train, holdout_specs(config)))
  units: list[Unit] = []
  for role, split, source_split, first, end, split_specs in roles:
    if specs is not None:
      split_specs = _canonical_unique(specs)
    source = _source(d.to_dict(), source_split)
    entry = {"role": role, "num_source_records": len(source), "num_records_used": end - first,
             "class_names": source.class_names, "specs": split_specs}
    base = {k: header[k] for k in ("format", "degradations", "source", "seed", "bins")}
    if split != source_split:  # the holdout: a range of the train source, under a name of its own
      entry.update(source_split=source_split, first_source_record=first)
      base["source_split"] = source_split
    header["splits"][split] = entry
    num_shards = max(1, -(-(end - first) // rps))
    # Shard-major order: a worker takes the same records for the next spec and decodes them only once.
    for k in range(num_shards):
      start, stop = first + k * rps, min(first + (k + 1) * rps, end)
      for spec in split_specs:
        slug = degradations.spec_slug(spec)
        key = json.dumps({**base, "split": split, "spec": spec, "start": start, "stop": stop}, sort_keys=True)
        units.append(Unit(split, source_split, spec, k, num_shards, start, stop,
                          f"{split}/{slug}/{shards.shard_name(k, num_shards)}",
                          hashlib.sha256(key.encode()).hexdigest()[:16]))
  return header, units


def _source_split(header: dict[str, Any], split: str) -> str:
  """The source split whose records a split of the manifest holds (itself, but for the holdout)."""
  return header["splits"][split].get("source_split", split)


def _records_in_use(source: sources.ImageSource, cap: int) -> int:
  """The first `cap` records of a source (all of them when cap <= 0)."""
  return len(source) if cap <= 0 else min(len(source), cap)


def _holdout_examples(data: ml_collections.ConfigDict, n_train: int) -> int:
  """config.data.holdout_examples, refused when it would leave no training record or clash with a split name."""
  holdout = int(data.get("holdout_examples", 0))  # absent from config.json of workdirs made before the field
  if holdout <= 0:
    return 0
  if HOLDOUT in (data.train_split, data.eval_split):
    raise config_lib.ConfigError(
        f"config.data.holdout_examples: the held-out records are written to W/data/{HOLDOUT}/, but a source "
        f"split is named {HOLDOUT!r} (data.train_split / eval_split): rename that split or set holdout_examples=0")
  if holdout >= n_train:
    raise config_lib.ConfigError(
        f"config.data.holdout_examples: holding out {holdout} records leaves none of the {n_train} training "
        f"records in use (split {data.train_split!r}, data.max_train_examples={data.max_train_examples}) to "
        f"train on: set it below {n_train}")
  return holdout


def merge_manifests(workdir: str | os.PathLike[str], *, verify: bool = True,
                    reference: dict[str, Any] | None = None) -> dict[str, Any]:
  """Check the parts `W/data/manifest.part-*-of-N.json` and merge them into `W/data/manifest.json`.

  Checks: all N parts present, same source/seed/bins/splits, every expected shard written by exactly
  one part, files present with their recorded size (and sha256 when `verify`), the same source records
  skipped in every spec. Spec entries of an earlier manifest with the same source and seed
  whose files still exist are kept. The job merged is that of `reference` (a part), by default that of
  the newest part file; parts of other jobs (other specs or sizes) are ignored.
  """
  data_dir = epath.Path(workdir) / "data"
  part_files = sorted(data_dir.glob("manifest.part-*-of-*.json"))
  if not part_files:
    raise FileNotFoundError(f"{data_dir}: no manifest.part-*-of-*.json to merge; run `msnet degrade`")
  part_files.sort(key=lambda p: p.stat().mtime)
  parts = [shards.read_json(p) for p in part_files]
  newest = reference or parts[-1]
  if newest is None:
    raise ValueError(f"{part_files[-1]}: unreadable manifest part")
  n = newest["num_parts"]
  parts = [p for p in parts if p is not None and p["num_parts"] == n and _same_job(p, newest)]
  have = sorted(p["part"] for p in parts)
  if have != list(range(n)):
    raise PartsMissingError(f"{data_dir}: need parts 0..{n - 1} of the same job, found {have}")
  units: dict[str, dict[str, Any]] = {}
  for p in parts:
    for file, sidecar in p["units"].items():
      if file in units:
        raise ValueError(f"{file} was written by two parts")
      units[file] = sidecar
  missing = [f for f in newest["expected"] if units.get(f) is None]
  if missing:
    raise ValueError(f"{len(missing)} shards were not written by any part, e.g. {missing[:3]}")

  splits: dict[str, Any] = {}
  for split, info in newest["splits"].items():
    entry = {k: v for k, v in info.items() if k != "specs"}
    entry["specs"] = {}
    skipped_by_spec, names = {}, {}
    for spec in info["specs"]:
      files = [f for f in newest["expected"] if units[f]["split"] == split and units[f]["spec"] == spec]
      cars = sorted((units[f] for f in files), key=lambda c: c["shard"])
      for c in cars:
        _check_file(data_dir, c, verify)
      skipped_by_spec[spec] = sorted(i for c in cars for i in c["skipped"])
      names.update((i, name) for c in cars for i, name in zip(c["skipped"], c["skipped_names"], strict=True))
      entry["specs"][spec] = _spec_entry(split, spec, cars)
    skipped = {tuple(v) for v in skipped_by_spec.values()}
    if len(skipped) > 1:
      raise ValueError(f"split {split}: specs skipped different source records: {skipped_by_spec}")
    entry["skipped"] = list(skipped.pop()) if skipped else []
    entry["skipped_names"] = [names[i] for i in entry["skipped"]]
    splits[split] = entry

  manifest = {k: v for k, v in newest.items() if k not in ("part", "expected", "units", "splits")}
  manifest.update(complete=True, splits=splits)
  old = shards.read_json(data_dir / "manifest.json")
  if old and _same_source(old, manifest):
    for split, entry in old.get("splits", {}).items():
      if split in splits and _split_header(entry) == _split_header(splits[split]):
        for spec, spec_entry in entry["specs"].items():
          if spec not in splits[split]["specs"] and all(
              (data_dir / s["file"]).exists() for s in spec_entry["shards"]):
            splits[split]["specs"][spec] = spec_entry
  shards.write_json(data_dir / "manifest.json", manifest)
  return manifest


def _spec_entry(split: str, spec: str, cars: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Manifest entry of one spec: shards with checksums and the mean PSNR / bpp / ratio achieved."""
  def mean(key: str) -> float | None:
    count = sum(c[f"{key}_count"] for c in cars)
    return sum(c[f"{key}_sum"] for c in cars) / count if count else None
  finite = sum(c["psnr_count"] for c in cars)
  return {
      "dir": f"{split}/{cars[0]['file'].split('/')[1]}", "bin": cars[0]["bin"],
      "num_records": sum(c["num_records"] for c in cars),
      # Mean over records whose PSNR is finite; infinite (identical pixels) only when all are.
      "mean_psnr": mean("psnr") if finite else math.inf,
      "num_identical": sum(c["psnr_inf_count"] for c in cars),
      "mean_bpp": mean("bpp"), "mean_ratio": mean("ratio"),
      "shards": [{k: c[k] for k in ("file", "num_records", "bytes", "sha256")} for c in cars],
  }


def _check_file(data_dir: epath.Path, car: dict[str, Any], verify: bool) -> None:
  path = data_dir / car["file"]
  if not path.exists():
    raise FileNotFoundError(f"{path}: listed in a manifest part but missing")
  if path.stat().length != car["bytes"]:
    raise ValueError(f"{path}: {path.stat().length} bytes, the manifest part says {car['bytes']}")
  if verify and shards.sha256_file(path) != car["sha256"]:
    raise ValueError(f"{path}: sha256 differs from the manifest part")


def _same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
  return all(a.get(k) == b.get(k)
             for k in ("format", "degradations", "source", "seed", "bins", "records_per_shard"))


def _split_header(entry: dict[str, Any]) -> dict[str, Any]:
  """What the records of a split depend on (sizes, class names), without its specs."""
  return {k: v for k, v in entry.items() if k not in ("specs", "skipped", "skipped_names")}


def _same_job(a: dict[str, Any], b: dict[str, Any]) -> bool:
  return _same_source(a, b) and a["splits"] == b["splits"] and a["expected"] == b["expected"]


def _manifest_covers(manifest: dict[str, Any], header: dict[str, Any], units: Sequence[Unit],
                     data_dir: epath.Path) -> bool:
  """True when a complete manifest of the same source lists every unit's file with its size."""
  if not manifest.get("complete") or not _same_source(manifest, header):
    return False
  listed = {}
  for split, entry in manifest["splits"].items():
    if _split_header(entry) != _split_header(header["splits"].get(split, {})):
      return False
    for spec_entry in entry["specs"].values():
      listed.update({s["file"]: s["bytes"] for s in spec_entry["shards"]})
  for u in units:
    path = data_dir / u.file
    if u.file not in listed or not path.exists() or path.stat().length != listed[u.file]:
      return False
  return True


def _remove_stale(data_dir: epath.Path, units: Sequence[Unit]) -> None:
  """Delete shards of these spec dirs that the plan does not name (an earlier run with other sizes) and
  temporary files that killed writers of this host left."""
  expected = {u.file for u in units}
  if data_dir.exists():
    shards.remove_dead_temps(data_dir)
  for spec_dir in sorted({u.file.rsplit("/", 1)[0] for u in units}):
    d = data_dir / spec_dir
    if not d.exists():
      continue
    shards.remove_dead_temps(d)
    for p in d.glob("shard-*"):
      shard = re.match(r"shard-\d{5}-of-\d{5}\.array_record", p.name)
      if shard and f"{spec_dir}/{shard.group()}" not in expected:
        p.unlink(missing_ok=True)  # several processes may clean at once


def _complete_sidecar(data_dir: epath.Path, unit: Unit) -> dict[str, Any] | None:
  """The sidecar of a unit whose shard is complete and current, else None (the unit is redone)."""
  path = data_dir / unit.file
  car = shards.read_json(shards.sidecar_path(path))
  if car is None or car.get("fingerprint") != unit.fingerprint or not path.exists():
    return None
  return car if path.stat().length == car["bytes"] else None


def _part(degrade_cfg: ml_collections.ConfigDict) -> tuple[int, int, bool]:
  """(this part, number of parts, split by JAX process?).

  Several JAX processes always split the units among themselves (shard_index -1 asks for it even with
  one); a split by hand (num_shards > 1) is for independent single-process jobs and cannot be combined.
  """
  import jax  # noqa: PLC0415 (the main process only; workers never import JAX)
  if degrade_cfg.shard_index == -1 or jax.process_count() > 1:
    if degrade_cfg.num_shards > 1 and jax.process_count() > 1:
      raise ValueError(
          f"config.degrade.num_shards={degrade_cfg.num_shards} splits the degrade by hand, but this is one "
          f"job of {jax.process_count()} JAX processes, which split it among themselves: leave num_shards=1 "
          "and shard_index=0, or run each part as a plain single process")
    return jax.process_index(), jax.process_count(), True
  return int(degrade_cfg.shard_index), int(degrade_cfg.num_shards), False


def _versions() -> dict[str, str]:
  import imagecodecs  # noqa: PLC0415
  import PIL  # noqa: PLC0415

  from msnet import degradations  # noqa: PLC0415
  return {"imagecodecs": imagecodecs.__version__, **degradations.codecs.versions(), "pillow": PIL.__version__,
          "numpy": np.__version__}


# ---- running units (main process or spawned workers) ----

_progress: Any = None  # shared counter of images done, set per process
_sources: dict[tuple[str, str], sources.ImageSource] = {}
_decoded: dict[tuple[str, str, int, int], list[Any]] = {}  # the last record range decoded, per process


def _source(data: dict[str, Any], split: str) -> sources.ImageSource:
  """The source of a split, opened once per process."""
  key = (json.dumps(data, sort_keys=True), split)
  if key not in _sources:
    _sources[key] = sources.open_source(data, split)
  return _sources[key]


def _records_of(data: dict[str, Any], unit: Unit) -> list[Any]:
  """Decoded source records [start, stop) of a unit (a CorruptImageError in place of a bad one).

  Kept until the process moves to another range: consecutive units are the same range in other specs.
  Costs records_per_shard decoded images of memory per worker (1024 x 224x224x3 = 150 MB).
  """
  key = (json.dumps(data, sort_keys=True), unit.source_split, unit.start, unit.stop)
  if key not in _decoded:
    _decoded.clear()
    source, items = _source(data, unit.source_split), []
    for i in range(unit.start, unit.stop):
      try:
        items.append(source[i])
      except sources.CorruptImageError as e:
        items.append(e)
    _decoded[key] = items
  return _decoded[key]


def _init_worker(counter: Any, log_file: str | None = None) -> None:
  """A worker's progress counter; with `log_file`, everything the worker would print on the terminal the
  workers share goes there instead: its Python warnings and logging records (Pillow's warnings on odd files)
  and what C libraries write to stderr (libtiff's and libjpeg's messages), as the main process's go to W/logs/."""
  global _progress
  _progress = counter
  if log_file is not None:
    pathlib.Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s worker {os.getpid()} %(name)s %(levelname)s %(message)s"))
    logging.root.addHandler(handler)
    logging.captureWarnings(True)


def _run_units(units: Sequence[Unit], job: dict[str, Any], num_workers: int) -> Iterator[dict[str, Any]]:
  """Run units, yielding their sidecars, with one progress bar over images."""
  if not units:
    return
  total = sum(u.stop - u.start for u in units)
  bar = tqdm.tqdm(total=total, unit="img", desc="degrade", mininterval=1.0, file=sys.stderr)
  ctx = multiprocessing.get_context("spawn")
  counter = ctx.Value("q", 0)
  try:
    if num_workers == 0:
      _init_worker(counter)
      for u in units:
        yield _degrade_unit(u, job)
        bar.update(counter.value - bar.n)
      return
    with ctx.Pool(min(num_workers, len(units)), initializer=_init_worker,
                  initargs=(counter, job.get("log_file"))) as pool:
      pending = [pool.apply_async(_degrade_unit, (u, job)) for u in units]
      while pending:
        time.sleep(0.2)
        bar.update(counter.value - bar.n)
        for r in [r for r in pending if r.ready()]:
          pending.remove(r)
          yield r.get()  # re-raises a worker's error; leaving the `with` stops the others
  finally:
    bar.update(counter.value - bar.n)
    bar.close()


def _degrade_unit(unit: Unit, job: dict[str, Any]) -> dict[str, Any]:
  """Degrade the records of one unit into its shard and write its sidecar.

  A unit that another writer (process, machine) completed since the plan is returned as it is.
  """
  from msnet import degradations  # noqa: PLC0415
  data_dir = epath.Path(job["data_dir"])
  finished = _complete_sidecar(data_dir, unit)
  if finished is not None:
    with _progress.get_lock():
      _progress.value += unit.stop - unit.start
    return finished
  items = _records_of(job["data"], unit)
  names = _source(job["data"], unit.source_split).relative_names
  path = data_dir / unit.file
  path.parent.mkdir(parents=True, exist_ok=True)
  bin_ = degradations.bin_of(unit.spec, job["rules"])
  stats = {"psnr_sum": 0.0, "psnr_count": 0, "psnr_inf_count": 0, "bpp_sum": 0.0, "bpp_count": 0,
           "ratio_sum": 0.0, "ratio_count": 0}
  skipped: list[int] = []

  def records() -> Iterator[bytes]:
    for i, item in enumerate(items, start=unit.start):
      if isinstance(item, sources.CorruptImageError):
        if job["on_corrupt"] == "raise":
          raise type(item)(
              f"{item} (record {i} of split {unit.source_split!r}; config.degrade.on_corrupt='skip' skips it)")
        skipped.append(i)
        continue
      image, info = degradations.apply(unit.spec, item["image"], seed=job["seed"], index=i)
      meta = {"label": item["label"], "spec": unit.spec, "bin": bin_,
              "bitstream_bin": degradations.bin_of_bitstream(info, job["rules"]), "index": i,
              "psnr": float(info["psnr"]), "bpp": _opt_float(info.get("bpp")),
              "level": _opt_float(info.get("level")),
              "ratio": _opt_float(info.get("ratio")), "codec": info.get("codec")}
      _accumulate(stats, meta)
      yield shards.encode_record(image, meta)
      with _progress.get_lock():
        _progress.value += 1

  written = shards.write_shard(path, records())
  with _progress.get_lock():
    _progress.value += len(skipped)
  sidecar = {"fingerprint": unit.fingerprint, "file": unit.file, "split": unit.split, "spec": unit.spec,
             "shard": unit.shard, "num_shards": unit.num_shards, "start": unit.start, "stop": unit.stop,
             "bin": bin_, "skipped": skipped, "skipped_names": [names[i] for i in skipped], **written, **stats}
  shards.write_json(shards.sidecar_path(path), sidecar)
  return sidecar


def _opt_float(x: Any) -> float | None:
  return None if x is None else float(x)


def _accumulate(stats: dict[str, Any], meta: dict[str, Any]) -> None:
  if math.isfinite(meta["psnr"]):
    stats["psnr_sum"] += meta["psnr"]
    stats["psnr_count"] += 1
  else:
    stats["psnr_inf_count"] += 1
  for key in ("bpp", "ratio"):
    if meta[key] is not None:
      stats[f"{key}_sum"] += meta[key]
      stats[f"{key}_count"] += 1
