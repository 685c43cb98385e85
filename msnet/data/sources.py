"""Image sources: random access to (uint8 HxWx3 image, integer label) pairs of one split.

Three kinds, chosen by `config.data.source`:
- "embedded_cifar10": the CIFAR-10 JPEG copy committed under msnet/data/embedded/cifar10 (tarballs of
  `split/class/*.jpg`), so a fresh clone runs with no network. Checked against SHA256SUMS once.
- "folder": an ImageFolder, a directory or a .tar/.tar.gz holding `split/class/*.jpg|png`.
- "tfds": `tfds.data_source(name, split=..., data_dir=...)`, random access over ArrayRecord files with
  no TensorFlow in the process.

Sources only decode and shape images; the degrade job applies `max_*_examples` caps. Every source decodes
with `reader.decode`, the reader of `msnet predict` and external sets: the pixel limit
(`data.max_pixels`) checked from the header, truncated files refused, EXIF orientation applied, more than
8 bits scaled by the bit depth, RGB out (grey replicated and alpha dropped on purpose: the network and the
codecs work on 3 channels). With `resize_shorter > 0` the shorter side is resized (bicubic) and the
center `image_size` square is cropped, before any degradation, so the network sees exactly the
degraded pixels. Without resizing a larger image is center-cropped and a smaller one is unusable
(`ImageTooSmallError`, a `CorruptImageError`: the degrade job skips or refuses it by `degrade.on_corrupt`).
Images are decoded lazily, one per `[i]`: workers of the degrade job each open their own source.

ImageFolder records are ordered round-robin over the sorted classes (files sorted within a class), so
the first N records, which the `max_*_examples` caps keep, are class-balanced.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pathlib
import tarfile
from typing import Any, Mapping, Sequence

import numpy as np
import PIL.Image

from msnet import errors
from msnet.data import reader
from msnet.data.reader import CorruptImageError, ImageTooSmallError

EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "embedded" / "cifar10"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ImageSource:
  """Random access to `{"image": uint8 HxWx3, "label": int}` with `.class_names`."""

  def __init__(self, names: Sequence[str], relative_names: Sequence[str], class_names: Sequence[str],
               image_size: int, resize_shorter: int, max_pixels: int):
    self.names = list(names)  # file name (or tfds key) of each record, for error messages
    self.relative_names = list(relative_names)  # the same relative to the source, for the manifest
    self.class_names = list(class_names)
    self._image_size = image_size
    self._resize_shorter = resize_shorter
    self.max_pixels = max_pixels  # the reader's limit, from the header before decoding (reader.PixelLimitError)

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for a source of {len(self)} images")
    array, label = self._load(i)
    return {"image": shape(array, self._image_size, self._resize_shorter, self.names[i]), "label": label}

  def _load(self, i: int) -> tuple[np.ndarray, int]:
    """The decoded RGB image (any size) and label of record i."""
    raise NotImplementedError


class _ArchiveFolder(ImageSource):
  """An ImageFolder inside a tarball, read once into memory; members are decoded on access."""

  def __init__(self, path: pathlib.Path, split: str, image_size: int, resize_shorter: int, max_pixels: int):
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
      data = gzip.decompress(data)
    entries = []  # (class, file name, offset, size)
    for name, offset, size in _tar_files(data):
      parts = name.strip("/").split("/")
      if len(parts) >= 3 and parts[-3] == split and _is_image(parts[-1]):
        entries.append((parts[-2], name, offset, size))
    if not entries:
      raise errors.MissingInputError(f"{path}: no images under '{split}/<class>/' (expected {IMAGE_EXTENSIONS})")
    by_class: dict[str, list[tuple[str, str, int, int]]] = {}
    for e in sorted(entries):
      by_class.setdefault(e[0], []).append(e)
    class_names = sorted(by_class)
    label_of = {c: i for i, c in enumerate(class_names)}
    entries = _round_robin([by_class[c] for c in class_names])
    super().__init__([f"{path}:{e[1]}" for e in entries], [e[1] for e in entries], class_names, image_size,
                     resize_shorter, max_pixels)
    self._labels = [label_of[e[0]] for e in entries]
    self._data = memoryview(data)
    self._spans = [(e[2], e[3]) for e in entries]

  def _load(self, i: int) -> tuple[np.ndarray, int]:
    offset, size = self._spans[i]
    return reader.decode(self._data[offset:offset + size], self.names[i], self.max_pixels).image, self._labels[i]


class _DirFolder(ImageSource):
  """An ImageFolder directory `root/split/class/*`."""

  def __init__(self, root: pathlib.Path, split: str, image_size: int, resize_shorter: int, max_pixels: int):
    split_dir = root / split
    if not split_dir.is_dir():
      raise errors.MissingInputError(f"{root}: no split directory '{split}'; add {split}/<class>/ image folders or "
                                     "name an existing one in config.data.train_split / eval_split")
    class_names = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    entries = _round_robin([[(split_dir / c / f, label) for f in sorted(os.listdir(split_dir / c)) if _is_image(f)]
                            for label, c in enumerate(class_names)])
    if not entries:
      raise errors.MissingInputError(f"{split_dir}: no images in '<class>/' folders (expected {IMAGE_EXTENSIONS})")
    super().__init__([str(e[0]) for e in entries], [e[0].relative_to(root).as_posix() for e in entries],
                     class_names, image_size, resize_shorter, max_pixels)
    self._labels = [e[1] for e in entries]

  def _load(self, i: int) -> tuple[np.ndarray, int]:
    try:
      data = pathlib.Path(self.names[i]).read_bytes()
    except OSError as e:
      raise CorruptImageError(f"{self.names[i]}: {e}") from None
    return reader.decode(data, self.names[i], self.max_pixels).image, self._labels[i]


class _TfdsSource(ImageSource):
  """`tfds.data_source`: random access, no TensorFlow. The images are read undecoded (SkipDecoding) and decoded
  by `reader.decode`, so a TFDS record and the same file in a folder give the same pixels or the same refusal."""

  def __init__(self, name: str, split: str, data_dir: str, image_size: int, resize_shorter: int,
               max_pixels: int):
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy; only this source needs it)
    self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                decoders={"image": tfds.decode.SkipDecoding()})
    label = self._ds.dataset_info.features["label"]
    super().__init__([f"tfds:{name}/{split}[{i}]" for i in range(len(self._ds))],
                     [f"{split}[{i}]" for i in range(len(self._ds))], label.names,
                     image_size, resize_shorter, max_pixels)

  def _load(self, i: int) -> tuple[np.ndarray, int]:
    try:
      record = self._ds[i]
    except Exception as e:  # noqa: BLE001 (TFDS raises whatever its deserializer raises on a bad record)
      raise CorruptImageError(f"{self.names[i]}: {e}") from None
    return reader.decode(record["image"], self.names[i], self.max_pixels).image, int(record["label"])


def open_source(data_cfg: Mapping[str, Any], split: str) -> ImageSource:
  """The source of `data_cfg` ("source", "path", "tfds_*", "image_size", "resize_shorter") for a split."""
  size, shorter = int(data_cfg["image_size"]), int(data_cfg["resize_shorter"])
  limit = int(data_cfg.get("max_pixels", reader.DEFAULT_MAX_PIXELS))
  kind = data_cfg["source"]
  if kind == "embedded_cifar10":
    path = EMBEDDED_DIR / f"{split}.tar.gz"
    if not path.exists():
      raise errors.MissingInputError(f"embedded CIFAR-10 has no split {split!r}: set config.data.train_split / "
                                     "eval_split to 'train' or 'test'")
    _verify_embedded(path)
    return _ArchiveFolder(path, split, size, shorter, limit)
  if kind == "folder":
    path = pathlib.Path(data_cfg["path"]).expanduser()
    if path.is_dir():
      return _DirFolder(path, split, size, shorter, limit)
    if path.is_file():
      return _ArchiveFolder(path, split, size, shorter, limit)
    raise errors.MissingInputError(f"config.data.path: {path} is neither a directory nor a .tar/.tar.gz file")
  if kind == "tfds":
    return _TfdsSource(data_cfg["tfds_name"], split, data_cfg["tfds_data_dir"], size, shorter, limit)
  raise ValueError(f"config.data.source: unknown source {kind!r}")


@functools.cache
def _verify_embedded(path: pathlib.Path) -> None:
  """Refuse a damaged embedded tarball (checked once per process)."""
  sums = dict(line.split()[::-1] for line in (EMBEDDED_DIR / "SHA256SUMS").read_text().splitlines() if line)
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if sums.get(path.name) != digest:
    raise CorruptImageError(f"{path}: sha256 {digest} does not match SHA256SUMS ({sums.get(path.name)})")


def _tar_files(data: bytes) -> list[tuple[str, int, int]]:
  """(name, data offset, size) of the regular files of an uncompressed tar.

  Reads the 512-byte ustar headers directly (about 20x faster than `tarfile` for the 50,000 members of
  CIFAR-10 train, which every degrade worker indexes); per-file extended headers (long names, pax) fall
  back to `tarfile`.
  """
  files, pos = [], 0
  while pos + 512 <= len(data):
    header = data[pos:pos + 512]
    if header.count(0) == 512:
      break
    kind = header[156:157]
    if kind not in (b"0", b"\0", b"5", b"g") or not header[124:136].strip(b"\0 ").isdigit():
      with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    size = int(header[124:136].strip(b"\0 "), 8)
    name = header[:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
    if kind in (b"0", b"\0"):  # skips directories and the pax global header (git archive's comment)
      files.append((f"{prefix}/{name}" if prefix else name, pos + 512, size))
    pos += 512 + -(-size // 512) * 512
  return files


def _round_robin(groups: Sequence[Sequence[Any]]) -> list[Any]:
  """Interleave per-class lists (class 0 file 0, class 1 file 0, ...) so any prefix is class-balanced."""
  out = []
  for i in range(max((len(g) for g in groups), default=0)):
    out += [g[i] for g in groups if i < len(g)]
  return out


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def shape(image: np.ndarray, size: int, shorter: int, name: str) -> np.ndarray:
  """Resize the shorter side to `shorter` (if > 0), then center-crop size x size."""
  h, w = image.shape[:2]
  if shorter > 0 and min(h, w) != shorter:
    scale = shorter / min(h, w)
    new = (max(shorter, round(w * scale)), max(shorter, round(h * scale)))
    image = np.asarray(PIL.Image.fromarray(image).resize(new, PIL.Image.Resampling.BICUBIC))
    h, w = image.shape[:2]
  if h < size or w < size:
    raise ImageTooSmallError(f"{name}: image is {h}x{w}, smaller than config.data.image_size={size}; "
                             "set config.data.resize_shorter to resize it")
  if (h, w) != (size, size):
    top, left = (h - size) // 2, (w - size) // 2
    image = image[top:top + size, left:left + size]
  return np.ascontiguousarray(image)
