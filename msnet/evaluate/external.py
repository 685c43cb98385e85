"""`msnet evaluate --external PATH`: every trained method of a workdir on a benchmark set it did not make.

The set is read from its own files, never written into W/data, and its results never touch W/eval's own
(results.*, cells.jsonl, correct/). Layouts (`--layout`, detected when not given):
  imagenet-c  <corruption>/<severity>/<class>/<file> (ImageNet-C, Tiny-ImageNet-C; a group level above the
              corruption, `noise/gaussian_noise/3/...`, is accepted too): one cell per (corruption, severity).
  cifar10-c   <corruption>.npy, uint8 [5 n, H, W, 3] (severities 1-5 in order, n images each) and labels.npy
              [5 n]: severity s is rows [(s - 1) n, s n).
  folder      <class>/<file>: one cell.
Detection: labels.npy -> cifar10-c; every top-level directory holding numeric (severity) directories, itself or
one level down -> imagenet-c; no such directory -> folder; a mix, or nothing, is refused.

Classes are matched to the workdir's (the manifest's class names of config.data.eval_split) by directory name
(WordNet ids for ImageNet); a class the workdir does not know is an error, a subset of its classes is fine.
CIFAR-10-C's labels are indices in CIFAR-10's class order, so the workdir's classes must be CIFAR-10's. Images
of another size are resized and cropped as the workdir's data config says (`sources._shape`). A file that
cannot be decoded (or is too small without `resize_shorter`) is named on stderr, counted and skipped, as
degrade's on_corrupt="skip" does; its cell's n leaves it out.

The bitstream rule reads each file's own bin: IJG quality from a JPEG file's quantisation tables, the clean bin
for PNG and .npy pixels. The oracle needs the true bin, which an external set does not have: it is left out
(meta "missing"). The steps are evaluate's (`evaluate_batches`, `build_groups`), with each record's "bin" set to
its bitstream bin, so the master's confusion reads "rows = the bin of the file's bitstream".

Outputs in W/eval/external/<name>/ (process 0 writes):
  results.json  {"rows", "meta"}: the sweeps' ROW_FIELDS (msnet/evaluate/__init__.py) with spec =
                "<corruption>:<severity>" ("folder" for the folder layout), sweeps = [corruption], kind = the
                corruption, level = the severity (null for folder), codec "", codec_level / psnr / bpp null.
                meta: name, source, layout, methods, missing, bins, sweeps ({corruption: [specs]}), specs,
                records and skipped ({spec: count}), evaluated_now, global_batch, devices, processes, traces,
                wall_s.
  results.csv   the same rows.
  cells.jsonl   the resume log: a cell is skipped by a rerun when its line has the same methods, source and
                record count and its per-image file exists. A line also holds skipped_files (the unreadable
                files process 0 met; every process names its own on stderr) and routing: images per bin by
                their bitstream, and as the master routed them (null without a master).
  correct/<corruption>-<severity>.npz  every method's top-1 per readable image, in the cell's file order
                (results.write_correct's format; msnet.report.stats.load_correct reads it).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from msnet import degradations, errors, parallel
from msnet.data import loader, reader, shards, sources
from msnet.evaluate.groups import build_groups
from msnet.evaluate.plan import make_plan, method_names
from msnet.evaluate.results import append_cell, correct_path, read_cells, rows_of, write_correct, write_results
from msnet.evaluate.run import evaluate_batches

LAYOUTS = ("imagenet-c", "cifar10-c", "folder")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10C_SEVERITIES = 5
LABELS_FILE = "labels.npy"
FOLDER_SPEC = "folder"
EXTERNAL_DIR = "external"  # W/eval/external/<name>/
NO_ORACLE = "no true bin on an external set; the bitstream rule reads each file's own"


def _log(message: str) -> None:
  print(f"[msnet] evaluate: {message}", file=sys.stderr, flush=True)


class CellSource:
  """Random access to one cell's images as encoded records (`loader.source_eval_batches` reads them).

  A record's "bin" and "bitstream_bin" are the bin read from the file's bitstream; an unreadable file
  becomes a record with label -1, which the loader masks like padding, and its name goes to `skipped`.
  """

  def __init__(self, names: Sequence[str], labels: Sequence[int], data_cfg: Any, bin_rules: list[list[str]]):
    self.names, self.labels = list(names), [int(x) for x in labels]
    self.skipped: list[str] = []
    self._size, self._shorter = int(data_cfg.image_size), int(data_cfg.resize_shorter)
    self._max_pixels = int(data_cfg.max_pixels)
    self._rules = bin_rules

  def __len__(self) -> int:
    return len(self.names)

  def _load(self, i: int) -> tuple[np.ndarray, int]:
    """The decoded image of record i (any size) and its bitstream bin."""
    raise NotImplementedError

  def _example(self, i: int) -> tuple[np.ndarray, int, int]:
    """(shaped image, label, bitstream bin) of record i; raises CorruptImageError when it cannot be used."""
    image, bin_ = self._load(i)
    return sources.shape(image, self._size, self._shorter, self.names[i]), self.labels[i], bin_

  def _unusable(self) -> tuple[np.ndarray, int, int]:
    return np.zeros((self._size, self._size, 3), np.uint8), -1, 0

  def __getitem__(self, i: int) -> dict[str, Any]:
    try:
      image, label, _ = self._example(i)
    except sources.CorruptImageError:
      image, label, _ = self._unusable()
    return {"image": image, "label": label}

  def read(self, i: int) -> bytes:
    """Record i for the loader; an unusable file is named on stderr, counted in `skipped` and masked."""
    try:
      image, label, bin_ = self._example(i)
    except sources.CorruptImageError as e:
      self.skipped.append(self.names[i])
      _log(f"skipped unreadable file {e}")
      image, label, bin_ = self._unusable()
    return shards.encode_record(image, dict(label=label, bin=bin_, bitstream_bin=bin_))


class FileCell(CellSource):
  """Image files read as `msnet predict` reads them (`reader.read_image`: the shards' decoders, the bin from
  the file's own bitstream, lossless files in the clean bin, config.data.max_pixels)."""

  def _load(self, i: int) -> tuple[np.ndarray, int]:
    f = reader.read_image(self.names[i], self._max_pixels)
    return f.image, degradations.bin_of_bitstream(f.bitstream, self._rules)


class ArrayCell(CellSource):
  """Rows [start, stop) of a uint8 [N, H, W, 3] array (a CIFAR-10-C .npy, memory-mapped): raw pixels, clean bin."""

  def __init__(self, array: np.ndarray, start: int, stop: int, labels: np.ndarray, name: str, data_cfg: Any,
               bin_rules: list[list[str]]):
    super().__init__([f"{name}[{i}]" for i in range(start, stop)], labels[start:stop], data_cfg, bin_rules)
    self._array, self._start = array, start

  def _load(self, i: int) -> tuple[np.ndarray, int]:
    return np.asarray(self._array[self._start + i]), 0


@dataclasses.dataclass
class Cell:
  """One (corruption, severity) of the set: spec "<corruption>:<severity>", or "folder"."""
  spec: str
  kind: str
  level: float | None
  source: CellSource

  @property
  def slug(self) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", self.spec.replace(":", "-"))


# ---------------------------------------------------------------------------------------------------------
# Reading a set.


def _subdirs(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _severity_dirs(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted((d for d in _subdirs(path) if d.name.isdigit()), key=lambda d: int(d.name))


def _corruption_dirs(root: pathlib.Path) -> tuple[dict[str, pathlib.Path], list[pathlib.Path]]:
  """{corruption: its directory} (at the top, or one group level down), sorted by corruption name, and the
  top-level directories that are neither."""
  found: dict[str, pathlib.Path] = {}
  other = []
  for d in _subdirs(root):
    if _severity_dirs(d):
      found[d.name] = d
    elif grouped := [g for g in _subdirs(d) if _severity_dirs(g)]:
      found.update((g.name, g) for g in grouped)
    else:
      other.append(d)
  return dict(sorted(found.items())), other


def detect_layout(root: pathlib.Path) -> str:
  """The layout of a set directory; refuses an empty or ambiguous one, naming what it found."""
  corruptions, other = _corruption_dirs(root)
  if (root / LABELS_FILE).exists():
    if corruptions or other:
      raise errors.InvalidInputError(
          f"--external={root}: ambiguous layout, both {LABELS_FILE} (cifar10-c) and directories "
          f"({', '.join(d.name for d in _subdirs(root)[:5])}); pass --layout=cifar10-c, imagenet-c or folder")
    return "cifar10-c"
  if corruptions and other:
    raise errors.InvalidInputError(
        f"--external={root}: ambiguous layout, {', '.join(sorted(corruptions)[:3])} hold severity directories "
        f"(imagenet-c) but {', '.join(d.name for d in other[:3])} do not (folder); pass --layout or remove the "
        "directories of the other layout")
  if corruptions:
    return "imagenet-c"
  if other:
    return "folder"
  raise errors.MissingInputError(f"--external={root}: empty set, no {LABELS_FILE} and no directories; expected "
                                 "<corruption>/<severity>/<class>/<file> (imagenet-c), <corruption>.npy + "
                                 f"{LABELS_FILE} (cifar10-c) or <class>/<file> (folder)")


def _label_of(class_dirs: Sequence[pathlib.Path], class_names: Sequence[str], where: pathlib.Path) -> dict[str, int]:
  """The workdir's class index of each class directory; refuses names the workdir does not know."""
  index = {c: i for i, c in enumerate(class_names)}
  unknown = [d.name for d in class_dirs if d.name not in index]
  if unknown:
    raise errors.InvalidInputError(
        f"{where}: {len(unknown)} class folder(s) the workdir does not know: {', '.join(unknown[:10])}"
        f"{', ...' if len(unknown) > 10 else ''}; the workdir's {len(class_names)} classes are "
        f"{', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''}: name the folders after them "
        "(WordNet ids for ImageNet) or remove the others")
  return {d.name: index[d.name] for d in class_dirs}


def _file_cell(directory: pathlib.Path, class_names: Sequence[str], data_cfg: Any, rules: list[list[str]]
               ) -> FileCell:
  """The images of `directory/<class>/`, sorted by class then file name."""
  class_dirs = _subdirs(directory)
  label_of = _label_of(class_dirs, class_names, directory)
  files = [(str(d / f.name), label_of[d.name]) for d in class_dirs for f in sorted(d.iterdir())
           if f.is_file() and sources._is_image(f.name)]
  if not files:
    raise errors.MissingInputError(f"{directory}: no images in <class>/ folders (expected "
                                   f"{', '.join(sources.IMAGE_EXTENSIONS)} files)")
  return FileCell([f for f, _ in files], [lab for _, lab in files], data_cfg, rules)


def _cifar10c_cells(root: pathlib.Path, class_names: Sequence[str], data_cfg: Any, rules: list[list[str]]
                    ) -> list[Cell]:
  if tuple(class_names) != CIFAR10_CLASSES:
    raise errors.InvalidInputError(
        f"--external={root}: CIFAR-10-C labels are CIFAR-10 class indices ({', '.join(CIFAR10_CLASSES)}), but "
        f"the workdir's classes are {', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''}; "
        "evaluate a workdir trained on CIFAR-10")
  labels_path = root / LABELS_FILE
  if not labels_path.exists():
    raise errors.MissingInputError(f"{labels_path} not found: a cifar10-c set holds <corruption>.npy files and "
                                   f"{LABELS_FILE}")
  labels = np.load(labels_path)
  if (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) % CIFAR10C_SEVERITIES
      or len(labels) == 0 or labels.min() < 0 or labels.max() >= len(class_names)):
    raise errors.InvalidInputError(
        f"{labels_path}: expected integer class indices in [0, {len(class_names)}) of shape "
        f"({CIFAR10C_SEVERITIES} x n,), got {labels.dtype} {labels.shape}"
        + (f" in [{labels.min()}, {labels.max()}]" if labels.size and np.issubdtype(labels.dtype, np.number) else ""))
  n = len(labels) // CIFAR10C_SEVERITIES
  cells = []
  for path in sorted(p for p in root.glob("*.npy") if p.name != LABELS_FILE):
    try:
      array = np.load(path, mmap_mode="r")
    except ValueError as e:
      raise errors.InvalidInputError(f"{path}: not a readable .npy array ({e})") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3 or len(array) != len(labels):
      raise errors.InvalidInputError(
          f"{path}: expected uint8 images of shape ({len(labels)}, H, W, 3) ({CIFAR10C_SEVERITIES} severities x "
          f"{n} images, as {LABELS_FILE}), got {array.dtype} {array.shape}")
    for s in range(1, CIFAR10C_SEVERITIES + 1):
      source = ArrayCell(array, (s - 1) * n, s * n, labels, path.name, data_cfg, rules)
      cells.append(Cell(f"{path.stem}:{s}", path.stem, float(s), source))
  if not cells:
    raise errors.MissingInputError(f"--external={root}: {LABELS_FILE} but no <corruption>.npy files")
  return cells


def open_set(root: pathlib.Path, layout: str | None, class_names: Sequence[str],
             config: ml_collections.ConfigDict) -> tuple[str, list[Cell]]:
  """(layout, cells) of the set at `root`, its classes matched to the workdir's."""
  if not root.is_dir():
    raise errors.MissingInputError(f"--external={root}: no such directory; give the directory of the set")
  if layout is not None and layout not in LAYOUTS:
    raise errors.InvalidInputError(f"--layout={layout}: unknown layout; use one of {', '.join(LAYOUTS)} (or leave "
                                   "it out to detect it)")
  layout = layout or detect_layout(root)
  rules = [list(b.match) for b in config.bins]
  if layout == "cifar10-c":
    return layout, _cifar10c_cells(root, class_names, config.data, rules)
  if layout == "folder":
    return layout, [Cell(FOLDER_SPEC, FOLDER_SPEC, None, _file_cell(root, class_names, config.data, rules))]
  corruptions, _ = _corruption_dirs(root)
  if not corruptions:
    raise errors.MissingInputError(f"--external={root}: no <corruption>/<severity>/ directories (imagenet-c)")
  cells = [Cell(f"{c}:{int(s.name)}", c, float(s.name), _file_cell(s, class_names, config.data, rules))
           for c, d in corruptions.items() for s in _severity_dirs(d)]
  return layout, cells


def workdir_classes(workdir: pathlib.Path, split: str) -> list[str]:
  """The class names of the workdir's eval split, in label order (W/data/manifest.json)."""
  manifest = shards.read_json(workdir / "data" / "manifest.json") or {}
  names = manifest.get("splits", {}).get(split, {}).get("class_names")
  if not names:
    raise errors.MissingInputError(f"{workdir / 'data' / 'manifest.json'}: no class names of split {split!r}, "
                                   "which an external set's classes are matched to; run `msnet degrade` first")
  return list(names)


# ---------------------------------------------------------------------------------------------------------
# The run.


def run_external(config: ml_collections.ConfigDict, workdir: Any, path: Any, layout: str | None = None,
                 name: str | None = None) -> list[dict[str, Any]]:
  """Evaluate every trained method on the set at `path`; returns the rows (also in W/eval/external/<name>/)."""
  start = time.perf_counter()
  workdir, root = pathlib.Path(workdir), pathlib.Path(path).expanduser().absolute()
  name = name or root.resolve().name
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
    raise errors.InvalidInputError(f"--name={name}: the results' directory name may hold letters, digits, '_', "
                                   "'-' and '.' only")
  layout, cells = open_set(root, layout, workdir_classes(workdir, config.data.eval_split), config)
  plan = make_plan(config, workdir)
  if "oracle" in plan.routed:
    plan.routed.remove("oracle")
    plan.missing["oracle"] = NO_ORACLE
  names = method_names(config, plan)
  if not names:
    raise errors.MissingInputError("evaluate: no method can run (no training stage is complete); run `msnet train` "
                                   "first")
  out = workdir / "eval" / EXTERNAL_DIR / name
  is_writer = jax.process_index() == 0
  if is_writer:
    out.mkdir(parents=True, exist_ok=True)

  logged = read_cells(out / "cells.jsonl")
  done = np.array([logged.get(c.spec, {}).get("methods") == sorted(names)
                   and logged[c.spec].get("source") == str(root) and logged[c.spec].get("records") == len(c.source)
                   and correct_path(out, c.spec, c.slug).exists() for c in cells], np.int32)
  if jax.process_count() > 1:  # every process must skip the same cells, whatever its view of the filesystem
    from jax.experimental import multihost_utils  # noqa: PLC0415
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  todo = [c for c, d in zip(cells, done) if not d]
  if is_writer:
    _log(f"{name} ({layout}, {root}): {len(names)} methods x {len(cells)} cells ({len(cells) - len(todo)} already "
         f"done); oracle left out: {NO_ORACLE}")

  mesh = parallel.make_mesh(config.mesh)
  groups = build_groups(config, workdir, plan, mesh)
  gb = config.evaluate.global_batch
  for c in tqdm.tqdm(todo, desc=f"evaluate {name}", unit="cell", disable=not is_writer):
    t0 = time.perf_counter()
    batches = loader.source_eval_batches(c.source, gb, mesh)
    result = evaluate_batches(config, groups, mesh, batches, -(-len(c.source) // gb), c.spec)
    n = result["n"]
    master = result["master_confusion"]
    cell = dict(spec=c.spec, methods=sorted(names), source=str(root), records=len(c.source),
                skipped=len(c.source) - n, skipped_files=c.source.skipped,
                counts={m: result["counts"][m] for m in names},
                routing=dict(bitstream=result["bitstream_confusion"].sum(axis=1).tolist(),
                             master=None if master is None else master.sum(axis=0).tolist()),
                fields=dict(kind=c.kind, level=c.level, codec="", codec_level=None, pre=""),
                quality=dict(records=len(c.source), psnr=None, bpp=None), wall_s=round(time.perf_counter() - t0, 3))
    if is_writer:
      write_correct(out, c.spec, {m: result["correct"][m] for m in names}, c.slug)
      append_cell(out / "cells.jsonl", cell)
    logged[c.spec] = cell

  sweeps: dict[str, list[str]] = {}
  for c in cells:
    sweeps.setdefault(c.kind, []).append(c.spec)
  rows = [r for c in cells for r in rows_of(logged[c.spec], [c.kind])]
  skipped = {c.spec: logged[c.spec]["skipped"] for c in cells}
  if is_writer and sum(skipped.values()):
    _log(f"{sum(skipped.values())} unreadable files skipped: "
         + ", ".join(f"{s} {k}" for s, k in skipped.items() if k))
  meta = dict(name=name, source=str(root), layout=layout, methods=names, missing=plan.missing,
              bins=[b.name for b in config.bins], sweeps=sweeps, specs=[c.spec for c in cells],
              records={c.spec: len(c.source) for c in cells}, skipped=skipped,
              evaluated_now=[c.spec for c in todo], global_batch=gb, devices=jax.device_count(),
              processes=jax.process_count(), traces=dict(groups.traces), wall_s=round(time.perf_counter() - start, 3))
  if is_writer:
    write_results(out, rows, meta)
    _log(f"results in {out}")
  return rows
