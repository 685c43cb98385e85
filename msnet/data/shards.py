"""Pre-degraded ArrayRecord shards: record format, atomic writer, random-access reader, manifest I/O.

Layout of a workdir W:
  W/data/<split>/<spec_slug>/shard-00000-of-00004.array_record       records in source-index order
  W/data/<split>/<spec_slug>/shard-00000-of-00004.array_record.json  sidecar: sha256, counts, PSNR/bpp sums
  W/data/manifest.json                                               (msnet.data.degrade)

`<split>` is the source split name (config.data.train_split / eval_split) or `holdout` (the held-out end
of the train split, config.data.holdout_examples), `<spec_slug>` is `degradations.spec_slug(spec)`. Shard k
of a spec holds the source records [F + k*R, F + (k+1)*R) (R = config.degrade.records_per_shard, F = 0 but
for the holdout's first record) that decoded, so the shards of every spec of a split line up.

Record format, version 3 (one ArrayRecord record per image; files written with `group_size:1` so any
record is read without decompressing its neighbours). A fixed 64-byte little-endian header (`HEADER`),
so the loaders read the labels, bins and sizes of a whole batch as one NumPy view, with no per-record
parse; then the pixels at a fixed offset; then the two strings:
  bytes [0, 64)          magic b"MSNR", version (3), h, w, spec and codec string lengths, then
                           label          class index (sorted class names of the source)
                           bin            quality bin of the spec by config.bins rules (the master's label)
                           bitstream_bin  bin a receiver infers from the bitstream (codec + estimated level)
                           index          record index in the source split (-1: not from a source split)
                           level          the last codec's level as a receiver reads it from the file, on the
                                          bin rules' scale (JPEG: IJG quality of its tables; JPEG 2000: the
                                          ratio); NaN: no codec, or a file that does not carry it
                           psnr           dB against the source image (inf when identical, NaN unknown)
                           bpp            bits per pixel of the last codec of the chain (NaN: none)
                           ratio          achieved compression ratio of the last codec (NaN: none)
  bytes [64, 64 + h*w*3) the degraded image, uint8 RGB, row-major (exactly what the network sees)
  then                   spec (canonical degradation spec string, e.g. "blur:1@4+jpeg:10") and codec
                         (a `degradations.codecs.CODECS` name; empty: none), UTF-8
Records of versions 1 (a JSON header per record) and 2 (an integer `jpeg_quality` in place of `level`) are refused with the command that rewrites them: the format
version is part of every shard's fingerprint, so `msnet degrade` redoes them in place.

A shard is written under a temporary name of its own writer (`<name>.tmp-<host>-<pid>-<random>`), closed,
fsynced and given its final name, so a file with its final name is always complete and no two writers
(processes, machines on a shared filesystem) ever share or rename each other's temporary file. A final
name is taken without replacing a file another writer put there with the same bytes; its `.json` sidecar
is written after it and records the file's sha256 and size.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import re
import secrets
import socket
import threading
from typing import Any, Iterable, Sequence

from etils import epath
import numpy as np

from msnet import errors

FORMAT_VERSION = 3
MAGIC = b"MSNR"
HEADER = np.dtype([
    ("magic", "S4"), ("version", "<u2"), ("h", "<u2"), ("w", "<u2"), ("spec_len", "<u2"), ("codec_len", "<u2"),
    ("pad", "<u2"), ("label", "<i4"), ("bin", "<i4"), ("bitstream_bin", "<i4"), ("index", "<i4"),
    ("level", "<f8"), ("psnr", "<f8"), ("bpp", "<f8"), ("ratio", "<f8")])
INT_FIELDS = ("label", "bin", "bitstream_bin", "index")  # decode_batch keys
ARRAY_FIELDS = ("label", "bin", "bitstream_bin")                       # what read_arrays gives beside the images
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1,zstd:3"
# Random access: no readahead, and no thread pool inside a read (the callers' threads are the parallelism).
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
_CHUNK = 1024  # records per task of read_arrays: bounded temporary lists of bytes
_SHARD_RE = re.compile(r"shard-(\d{5})-of-(\d{5})\.array_record")
_TEMP_RE = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
_REQUIRED = ("label", "bin", "bitstream_bin")
_DEFAULTS: dict[str, Any] = {"spec": "", "index": -1, "psnr": math.nan, "bpp": None, "level": None,
                             "ratio": None, "codec": None}


def read_threads() -> int:
  """Threads that read and decode records: one per core this process may run on (2 at least, so reads
  overlap the consumer; 16 at most, past which one process's reads contend for the GIL)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(2, min(16, cores))


def encode_record(image: np.ndarray, meta: dict[str, Any]) -> bytes:
  """One record: fixed header, raw pixels, spec and codec strings.

  `meta` needs label, bin and bitstream_bin; spec, index, psnr, bpp, level, ratio and codec may be
  left out by records that come from no source split (an external set's files), and take their
  "unknown" values (see the format above). None stands for "none" in bpp, level, ratio and codec.
  """
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"records hold uint8 HxWx3 images, got {image.dtype} {image.shape}")
  unknown = set(meta) - set(_REQUIRED) - set(_DEFAULTS)
  missing = [k for k in _REQUIRED if k not in meta]
  if unknown or missing:
    raise ValueError(f"record meta: unknown keys {sorted(unknown)}, missing {missing}")
  m = {**_DEFAULTS, **meta}
  if not -1 <= m["index"] < 2 ** 31:
    raise ValueError(f"record index must be in [-1, 2**31), got {m['index']}")
  spec, codec = str(m["spec"]).encode(), (m["codec"] or "").encode()
  header = np.zeros((), HEADER)
  header[()] = (MAGIC, FORMAT_VERSION, image.shape[0], image.shape[1], len(spec), len(codec), 0, m["label"],
                m["bin"], m["bitstream_bin"], m["index"], _nan(m["level"]), m["psnr"], _nan(m["bpp"]),
                _nan(m["ratio"]))
  return header.tobytes() + np.ascontiguousarray(image).tobytes() + spec + codec


def _nan(x: float | None) -> float:
  return math.nan if x is None else float(x)


class StaleRecordError(errors.InvalidInputError):
  """A record of an older format (or not a record at all); the message says how to rewrite it."""


def check_headers(headers: np.ndarray, where: str = "a record") -> None:
  """Refuses headers (a HEADER array) that are not of this format version."""
  bad = (headers["magic"] != MAGIC) | (headers["version"] != FORMAT_VERSION)
  if bad.any():
    first = headers[int(np.argmax(bad))]
    raise StaleRecordError(f"{where}: {_describe(first.tobytes())}; this msnet reads record format "
                           f"{FORMAT_VERSION}: rewrite the shards with `msnet degrade --workdir=W`")


def _describe(data: bytes) -> str:
  """What the first bytes of a record that is not of this version are."""
  if data[:4] == MAGIC:
    return f"record format {int.from_bytes(data[4:6], 'little')}"
  if data[4:5] == b"{":  # version 1: uint32 length, then a JSON header
    return "record format 1 (a JSON header per record)"
  return "not an msnet record (no MSNR magic)"


def decode_record(data: bytes) -> dict[str, Any]:
  """A record as the dict `open_shards` returns (bpp, level, ratio NaN when there is no codec; codec None)."""
  h = np.frombuffer(data, HEADER, count=1)
  check_headers(h)
  h = h[0]
  pixels = int(h["h"]) * int(h["w"]) * 3
  image = np.frombuffer(data, np.uint8, count=pixels, offset=HEADER.itemsize).reshape(int(h["h"]), int(h["w"]), 3)
  strings = HEADER.itemsize + pixels
  spec_end = strings + int(h["spec_len"])
  codec = data[spec_end:spec_end + int(h["codec_len"])].decode()
  return {
      "image": image, "label": int(h["label"]), "spec": data[strings:spec_end].decode(), "bin": int(h["bin"]),
      "bitstream_bin": int(h["bitstream_bin"]), "index": int(h["index"]), "psnr": float(h["psnr"]),
      "bpp": float(h["bpp"]), "level": float(h["level"]), "ratio": float(h["ratio"]),
      "codec": codec or None,
  }


def decode_batch(records: Sequence[bytes], keys: Sequence[str], flip: np.ndarray | None = None,
                 out: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Records of one image size -> {"image": uint8 [n,H,W,3], key: int32 [n] per key of INT_FIELDS}.

  The loaders' path: the headers of the batch are one NumPy view and each image is copied once, into
  `out` when given; images where `flip` is True are mirrored left-right during that copy.
  """
  if not records:
    raise ValueError("decode_batch needs at least one record")
  if bad := [k for k in keys if k not in INT_FIELDS]:
    raise KeyError(f"decode_batch reads the integer header fields {INT_FIELDS}, not {bad}")
  size = HEADER.itemsize
  headers = np.frombuffer(b"".join([r[:size] for r in records]), HEADER)
  check_headers(headers)
  h, w = int(headers["h"][0]), int(headers["w"][0])
  odd = (headers["h"] != h) | (headers["w"] != w)
  if odd.any():
    j = int(np.argmax(odd))
    raise ValueError(f"record {j} of the batch is {headers['h'][j]}x{headers['w'][j]}, the first {h}x{w}: "
                     "one batch holds one image size")
  if out is not None and (out.shape, out.dtype, out.flags.c_contiguous) != ((len(records), h, w, 3), np.uint8, True):
    raise ValueError(f"decode_batch out: a C-contiguous uint8 array of shape {(len(records), h, w, 3)} for these "
                     f"records, got {out.dtype} {out.shape}")
  images = np.empty((len(records), h, w, 3), np.uint8) if out is None else out
  flat = images.reshape(len(records), h * w * 3)
  pixels = images.view(np.dtype("V3")).reshape(len(records), h, w)  # one item per RGB pixel: mirrors whole pixels
  mirror = np.zeros(len(records), bool) if flip is None else np.asarray(flip, bool)
  for j, data in enumerate(records):
    if mirror[j]:
      pixels[j] = np.frombuffer(data, "V3", count=h * w, offset=size).reshape(h, w)[:, ::-1]
    else:
      flat[j] = np.frombuffer(data, np.uint8, count=h * w * 3, offset=size)
  return {"image": images, **{k: headers[k].astype(np.int32) for k in keys}}


def spec_dir(workdir: str | os.PathLike[str], split: str, spec: Any) -> epath.Path:
  """W/data/<split>/<spec_slug>: the shards of one spec of one source split."""
  from msnet import degradations  # noqa: PLC0415 (keeps this module importable on its own)
  return epath.Path(workdir) / "data" / split / degradations.spec_slug(spec)


def shard_name(k: int, n: int) -> str:
  return f"shard-{k:05d}-of-{n:05d}{SHARD_SUFFIX}"


def sidecar_path(shard: str | os.PathLike[str]) -> epath.Path:
  return epath.Path(f"{shard}.json")


def write_shard(path: str | os.PathLike[str], records: Iterable[bytes]) -> dict[str, Any]:
  """Write records atomically (own temporary file, fsync, final name); returns {num_records, bytes, sha256}.

  When another writer finished the same shard first (its file holds the same bytes), that file is kept.
  """
  from array_record.python import array_record_module  # noqa: PLC0415 (C++ extension)
  path = os.fspath(path)
  tmp = os.fspath(temp_path(path))
  writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  count = 0
  try:
    for record in records:
      writer.write(record)
      count += 1
  finally:
    writer.close()
  digest = hashlib.sha256()
  with open(tmp, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
    os.fsync(f.fileno())
  size = os.path.getsize(tmp)
  _publish(tmp, path, digest.hexdigest())
  return {"num_records": count, "bytes": size, "sha256": digest.hexdigest()}


def _publish(tmp: str, path: str, sha256: str) -> None:
  """Give `tmp` the name `path`, never replacing a file of the same bytes that another writer put there.

  A hard link creates the name only if it is free, atomically; a file already there with other bytes is
  stale (an earlier job's) and is replaced. Filesystems without hard links fall back to a check, then a
  rename.
  """
  try:
    os.link(tmp, path)
  except FileExistsError:
    if sha256_file(path) != sha256:
      os.replace(tmp, path)
  except OSError:  # no hard links here (some FUSE mounts)
    if not os.path.exists(path) or sha256_file(path) != sha256:
      os.replace(tmp, path)
  if os.path.exists(tmp):
    os.unlink(tmp)


def temp_path(path: str | os.PathLike[str]) -> epath.Path:
  """A temporary name beside `path` that belongs to this writer alone: host, pid and a random part."""
  return epath.Path(f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def remove_dead_temps(directory: str | os.PathLike[str]) -> None:
  """Delete the temporary files in `directory` whose writer, a process of this host, no longer runs.

  Left by a kill; temporary files of running writers and of other hosts are never touched (a writer on
  another host is cleaned up by that host's next run).
  """
  host = socket.gethostname()
  for p in epath.Path(directory).glob("*.tmp-*"):
    writer = _TEMP_RE.search(p.name)
    if writer and writer.group("host") == host and not _running(int(writer.group("pid"))):
      p.unlink(missing_ok=True)


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # signal 0 only asks whether the process exists
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, as another user's process
    pass
  return True


def sha256_file(path: str | os.PathLike[str]) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
  """A JSON file, or None when it does not exist or is unreadable (e.g. cut by a kill)."""
  path = epath.Path(path)
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
  """Write JSON atomically (tmp + rename), so a reader never sees half a file."""
  path = epath.Path(path)
  tmp = temp_path(path)
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
  tmp.replace(path)


class ShardSource:
  """Random and batched access over the records of shard files; `[i]` decodes to a dict.

  Opening reads each shard's record count and checks its first record's format (old shards are refused
  here, with the command that rewrites them). Thread-safe; picklable (the ArrayRecord readers reopen
  lazily), so Grain worker processes can use it.
  """

  def __init__(self, paths: Sequence[str | os.PathLike[str]]):
    self.paths = [os.fspath(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(read_threads(), max(1, len(self.paths)))) as pool:
      counts = list(pool.map(_inspect, self.paths))
    self.offsets = np.cumsum([0] + counts)
    self._readers: list[Any] = [None] * len(self.paths)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i: int) -> dict[str, Any]:
    return decode_record(self.read(i))

  def __getstate__(self) -> dict[str, Any]:
    return {"paths": self.paths, "offsets": self.offsets}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._readers, self._lock = [None] * len(self.paths), threading.Lock()

  def _reader(self, k: int) -> Any:
    if self._readers[k] is None:
      from array_record.python import array_record_module  # noqa: PLC0415 (C++ extension)
      with self._lock:
        if self._readers[k] is None:
          self._readers[k] = array_record_module.ArrayRecordReader(self.paths[k], _READER_OPTIONS)
    return self._readers[k]

  def read(self, i: int) -> bytes:
    """The encoded record i (see `decode_record`, `decode_batch`)."""
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    k = int(np.searchsorted(self.offsets, i, side="right")) - 1
    return self._reader(k).read([int(i - self.offsets[k])])[0]

  def read_batch(self, ids: Sequence[int] | np.ndarray) -> list[bytes]:
    """The encoded records `ids` (any order, repeats allowed): one ArrayRecord read per shard touched."""
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
      raise IndexError(f"records {ids.min()}..{ids.max()} out of range for {len(self)} records")
    shard = np.searchsorted(self.offsets, ids, side="right") - 1
    order = np.argsort(shard, kind="stable")
    cuts = np.flatnonzero(np.diff(shard[order])) + 1
    out: list[bytes] = [b""] * len(ids)
    for group in np.split(order, cuts) if ids.size else []:
      k = int(shard[group[0]])
      for j, record in zip(group.tolist(), self._reader(k).read((ids[group] - self.offsets[k]).tolist())):
        out[j] = record
    return out

  def read_range(self, start: int, stop: int) -> list[bytes]:
    """The encoded records [start, stop), in order: one sequential read per shard touched."""
    if not 0 <= start <= stop <= len(self):
      raise IndexError(f"records [{start}, {stop}) out of range for {len(self)} records")
    out: list[bytes] = []
    k = int(np.searchsorted(self.offsets, start, side="right")) - 1
    while start < stop:
      end = min(stop, int(self.offsets[k + 1]))
      out += self._reader(k).read(int(start - self.offsets[k]), int(end - self.offsets[k]))
      start, k = end, k + 1
    return out

  def read_arrays(self, start: int = 0, stop: int | None = None, fields: Sequence[str] = ARRAY_FIELDS,
                  out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Records [start, stop) as arrays: {"image": uint8 [N,H,W,3], field: int32 [N]}, read by `read_threads()`
    threads in chunks straight into the output (for putting a spec's records on the devices or in host
    memory). `out` (those arrays, e.g. slices of one array over several specs) saves a concatenation's copy."""
    stop = len(self) if stop is None else stop
    if not 0 <= start <= stop <= len(self):
      raise IndexError(f"records [{start}, {stop}) out of range for {len(self)} records")
    if start == stop:
      return {"image": np.zeros((0, 0, 0, 3), np.uint8), **{k: np.zeros(0, np.int32) for k in fields}}
    shape = (stop - start, *decode_record(self.read(start))["image"].shape)
    if out is None:
      out = {"image": np.empty(shape, np.uint8), **{k: np.empty(stop - start, np.int32) for k in fields}}
    want = {"image": (shape, np.uint8), **{k: ((stop - start,), np.int32) for k in fields}}
    if bad := [k for k, v in want.items()
               if k not in out or (out[k].shape, out[k].dtype) != v or not out[k].flags.c_contiguous]:
      raise ValueError(f"read_arrays out: {bad} must be C-contiguous arrays of shape and dtype "
                       f"{[(want[k][0], np.dtype(want[k][1]).name) for k in bad]}")

    def chunk(a: int) -> None:
      b = min(a + _CHUNK, stop)
      part = decode_batch(self.read_range(a, b), fields, out=out["image"][a - start:b - start])
      for k in fields:
        out[k][a - start:b - start] = part[k]
    with concurrent.futures.ThreadPoolExecutor(read_threads()) as pool:
      list(pool.map(chunk, range(start, stop, _CHUNK)))  # list(): re-raises a chunk's error
    return out

  def __repr__(self) -> str:
    return f"ShardSource({len(self.paths)} shards, {len(self)} records, {os.path.dirname(self.paths[0])})"


def _inspect(path: str) -> int:
  """The record count of a shard file, after checking its first record is of this format."""
  from array_record.python import array_record_module  # noqa: PLC0415
  reader = array_record_module.ArrayRecordReader(path, _READER_OPTIONS)
  try:
    n = reader.num_records()
    if n:
      first = reader.read([0])[0]
      if first[:4] != MAGIC or first[4:6] != FORMAT_VERSION.to_bytes(2, "little"):
        raise StaleRecordError(f"{path}: {_describe(first)}; this msnet reads record format {FORMAT_VERSION}: "
                               f"rewrite the shards with `{_rewrite_command(path)}` (the format is part of every "
                               "shard's fingerprint, so degrade redoes the old ones in place)")
    return n
  finally:
    reader.close()


def _rewrite_command(path: str) -> str:
  """`msnet degrade --workdir=W` for a shard W/data/<split>/<spec>/<file>."""
  p = epath.Path(path)
  workdir = p.parent.parent.parent.parent if p.parent.parent.parent.name == "data" else "W"
  return f"msnet degrade --workdir={workdir}"


def spec_arrays(workdir: str | os.PathLike[str], split: str, spec: Any, start: int = 0,
                stop: int | None = None) -> dict[str, np.ndarray]:
  """Every record (or records [start, stop)) of one spec of a split as NumPy arrays: {"image": uint8
  [N,H,W,3], "label", "bin", "bitstream_bin": int32 [N]}, in source-index order (device-resident data)."""
  return open_shards(spec_dir(workdir, split, spec)).read_arrays(start, stop)


def shard_files(directory: str | os.PathLike[str]) -> list[epath.Path]:
  """The complete shard set of a spec dir, in order; raises when none or some are missing."""
  directory = epath.Path(directory)
  found = sorted(p for p in directory.glob(f"shard-*{SHARD_SUFFIX}") if _SHARD_RE.fullmatch(p.name))
  if not found:
    raise errors.MissingInputError(f"{directory}: no shards; run `msnet degrade` with this spec in the config")
  totals = {int(_SHARD_RE.fullmatch(p.name).group(2)) for p in found}
  ks = [int(_SHARD_RE.fullmatch(p.name).group(1)) for p in found]
  if len(totals) != 1 or ks != list(range(totals.pop())):
    raise errors.MissingInputError(f"{directory}: incomplete shard set {[p.name for p in found]}; "
                                   "rerun `msnet degrade` to finish it")
  return found


def open_shards(path: str | os.PathLike[str]) -> ShardSource:
  """Records of a spec dir (all its shards, in source-index order) or of one shard file.

  `[i]` gives dict(image uint8 HxWx3, label, spec, bin, bitstream_bin, index, psnr, bpp (NaN if no
  codec), level (NaN if none), ratio, codec).
  """
  path = epath.Path(path)
  if path.is_dir():
    return ShardSource(shard_files(path))
  if not path.exists():
    raise errors.MissingInputError(f"{path}: no such spec directory or shard file; run `msnet degrade` "
                                   "with this spec in the config")
  return ShardSource([path])
