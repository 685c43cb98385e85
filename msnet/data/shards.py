"""Pre-degraded ArrayRecord shards: record format, atomic writer, random-access reader, manifest I/O.

Layout of a workdir W:
  W/data/<split>/<spec_slug>/shard-00000-of-00004.array_record       records in source-index order
  W/data/<split>/<spec_slug>/shard-00000-of-00004.array_record.json  sidecar: sha256, counts, PSNR/bpp sums
  W/data/manifest.json                                               (msnet.data.degrade)

`<split>` is the source split name (config.data.train_split / eval_split) or `holdout` (the held-out end
of the train split, config.data.holdout_examples), `<spec_slug>` is `degradations.spec_slug(spec)`. Shard k
of a spec holds the source records [F + k*R, F + (k+1)*R) (R = config.degrade.records_per_shard, F = 0 but
for the holdout's first record) that decoded, so the shards of every spec of a split line up.

Record format (one ArrayRecord record per image; files written with `group_size:1` so any record is
read without decompressing its neighbours):
  bytes [0, 4)      L, the header length, uint32 little-endian
  bytes [4, 4+L)    header, a UTF-8 JSON object:
                      v             record format version (1)
                      h, w          image height and width
                      label         class index (sorted class names of the source)
                      spec          canonical degradation spec string, e.g. "blur:1@4+jpeg:10"
                      bin           quality bin of the spec by config.bins rules (the master's label)
                      bitstream_bin bin a receiver infers from the bitstream (codec + estimated level)
                      index         record index in the source split
                      psnr          dB against the source image (Infinity when identical)
                      bpp           bits per pixel of the last codec of the chain, or null
                      jpeg_quality  IJG quality estimated from the JPEG bitstream, -1 if the last codec is not JPEG
                      ratio         achieved compression ratio of the last codec, or null
                      codec         "jpeg", "jp2k" or null
  bytes [4+L, end)  h*w*3 bytes: the degraded image, uint8 RGB, row-major (exactly what the network sees)

A shard is written under a temporary name of its own writer (`<name>.tmp-<host>-<pid>-<random>`), closed,
fsynced and given its final name, so a file with its final name is always complete and no two writers
(processes, machines on a shared filesystem) ever share or rename each other's temporary file. A final
name is taken without replacing a file another writer put there with the same bytes; its `.json` sidecar
is written after it and records the file's sha256 and size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import socket
import struct
from typing import Any, Iterable, Sequence

from etils import epath
import numpy as np

from msnet import errors

FORMAT_VERSION = 1
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1,zstd:3"
_SHARD_RE = re.compile(r"shard-(\d{5})-of-(\d{5})\.array_record")
_HEADER = struct.Struct("<I")
_TEMP_RE = re.compile(r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")


def encode_record(image: np.ndarray, meta: dict[str, Any]) -> bytes:
  """One record: header (meta + shape) and raw pixels; `meta` holds the header fields but h, w, v."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"records hold uint8 HxWx3 images, got {image.dtype} {image.shape}")
  header = json.dumps({"v": FORMAT_VERSION, "h": image.shape[0], "w": image.shape[1], **meta},
                      separators=(",", ":")).encode()
  return _HEADER.pack(len(header)) + header + np.ascontiguousarray(image).tobytes()


def _parse(data: bytes) -> tuple[dict[str, Any], np.ndarray]:
  """(header, HxWx3 uint8 view of the pixels) of one record."""
  (n,) = _HEADER.unpack_from(data)
  header = json.loads(data[4:4 + n])
  return header, np.frombuffer(data, dtype=np.uint8, offset=4 + n).reshape(header["h"], header["w"], 3)


def decode_record(data: bytes) -> dict[str, Any]:
  """A record as the dict `open_shards` returns (bpp NaN when there is no codec)."""
  h, image = _parse(data)
  return {
      "image": image, "label": h["label"], "spec": h["spec"], "bin": h["bin"],
      "bitstream_bin": h["bitstream_bin"], "index": h["index"], "psnr": float(h["psnr"]),
      "bpp": math.nan if h["bpp"] is None else float(h["bpp"]), "jpeg_quality": h["jpeg_quality"],
      "ratio": math.nan if h["ratio"] is None else float(h["ratio"]), "codec": h["codec"],
  }


def decode_batch(records: Sequence[bytes], keys: Sequence[str]) -> dict[str, np.ndarray]:
  """Records of one image size -> {"image": uint8 [n,H,W,3], key: int32 [n] per header key}.

  The loaders' path: one array per field instead of a dict per record, the pixels copied once.
  """
  if not records:
    raise ValueError("decode_batch needs at least one record")
  images: np.ndarray | None = None
  fields: dict[str, list[int]] = {k: [] for k in keys}
  for j, data in enumerate(records):
    header, image = _parse(data)
    if images is None:
      images = np.empty((len(records), *image.shape), np.uint8)
    elif image.shape != images.shape[1:]:
      raise ValueError(f"record {j} of the batch is {header['h']}x{header['w']}, the first "
                       f"{images.shape[1]}x{images.shape[2]}: one batch holds one image size")
    images[j] = image
    for k in keys:
      fields[k].append(header[k])
  return {"image": images, **{k: np.asarray(v, np.int32) for k, v in fields.items()}}


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
  """Random access over the records of shard files, decoded to dicts; a Grain data source.

  Picklable (the ArrayRecord readers reopen lazily), so Grain worker processes can use it.
  """

  def __init__(self, paths: Sequence[str | os.PathLike[str]]):
    from array_record.python import array_record_data_source  # noqa: PLC0415
    self.paths = [os.fspath(p) for p in paths]
    self._source = array_record_data_source.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return decode_record(self.read(i))

  def read(self, i: int) -> bytes:
    """The encoded record i (see `decode_record`, `decode_batch`)."""
    if not 0 <= i < len(self._source):
      raise IndexError(f"record {i} out of range for {len(self._source)} records")
    return self._source[i]

  def __repr__(self) -> str:
    return f"ShardSource({len(self.paths)} shards, {len(self)} records, {os.path.dirname(self.paths[0])})"


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
  codec), jpeg_quality (-1 if none), ratio, codec).
  """
  path = epath.Path(path)
  if path.is_dir():
    return ShardSource(shard_files(path))
  if not path.exists():
    raise errors.MissingInputError(f"{path}: no such spec directory or shard file; run `msnet degrade` "
                                   "with this spec in the config")
  return ShardSource([path])
