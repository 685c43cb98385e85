"""`msnet predict` on image files: find them, decode them as msnet decoded its own degraded shards, read each
file's bitstream bin, and print one line (or one JSON object) per file.

JPEG files are decoded by `codecs.jpeg_decode` and JPEG 2000 files (raw J2K codestreams or JP2 containers)
by `codecs.jp2k_decode`, the decoders that made the shards, so a file holding a shard's bitstream gives the
network the pixels `msnet evaluate` gave it; every other format goes through Pillow as the sources do.
What a receiver reads from the file is what the `bitstream` rule routes by (`degradations.bin_of_bitstream`):
a JPEG's IJG quality from its quantisation tables; a JPEG 2000 file's ratio 24 / bpp, bpp = codestream bits
(COM segments and the JP2 boxes left out, as `degradations.apply` counts them) over the decoded image's
pixels; no codec for anything else, so PNG and other lossless files go to the clean bin 0.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import PIL.Image
import tqdm

from msnet import degradations, errors
from msnet.data.sources import CorruptImageError, _decode_bytes
from msnet.degradations import codecs

if TYPE_CHECKING:  # the predictor imports JAX; reading files does not need it
  from msnet.predict import Predictor

JPEG_SOI = b"\xff\xd8"
J2K_SOC = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
JPEG2000_SUFFIXES = (".jp2", ".j2k", ".jpx", ".j2c", ".jpc")
LOSSLESS_FORMATS = ("PNG", "BMP", "TIFF", "PPM", "GIF", "TGA", "QOI")
SKIPPED_EXIT_CODE = 3  # `msnet predict` classified the readable files but skipped some
BITSTREAM_RULES = ("bitstream", "hybrid")  # the rules whose bins are read from each file's bitstream


@dataclasses.dataclass
class ImageFile:
  """A decoded file: RGB uint8 pixels at the file's own size and what its bitstream says."""
  path: str
  image: np.ndarray
  bitstream: dict[str, Any]  # codec ("jpeg" | "jp2k" | None), jpeg_quality, bpp: bin_of_bitstream's input
  source: str                # how the bitstream rule got its bin, e.g. "bitstream: jpeg q=10"


def find_images(paths: Sequence[str | os.PathLike[str]]) -> list[pathlib.Path]:
  """The files named, and every image file under the directories named (recursive, sorted, hidden files
  left out; image = a suffix Pillow reads or a JPEG 2000 one). A path that does not exist is refused."""
  readable = {*PIL.Image.registered_extensions(), *JPEG2000_SUFFIXES}
  found: list[pathlib.Path] = []
  for p in map(pathlib.Path, paths):
    if p.is_dir():
      found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in readable
                      and not any(part.startswith(".") for part in f.relative_to(p).parts))
    elif p.exists():
      found.append(p)
    else:
      raise errors.MissingInputError(f"{p}: no such file or directory; give image files or directories of them")
  return found


def _boxes(data: bytes) -> dict[bytes, bytes]:
  """Top-level boxes of a JP2 file, type -> payload (the first of each type)."""
  boxes, i = {}, 0
  while i + 8 <= len(data):
    length, kind, header = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8], 8
    if length == 1:
      length, header = int.from_bytes(data[i + 8:i + 16], "big"), 16
    elif length == 0:
      length = len(data) - i
    if length < header or i + length > len(data):
      raise ValueError(f"corrupt JP2 file: box {kind!r} at byte {i} runs past the end")
    boxes.setdefault(kind, data[i + header:i + length])
    i += length
  return boxes


def _codestream(data: bytes) -> bytes:
  """The J2K codestream of a raw codestream or a JP2 container, without COM segments."""
  if data.startswith(JP2_SIGNATURE):
    boxes = _boxes(data)
    if b"jp2c" not in boxes:
      raise ValueError("JP2 file without a contiguous codestream box (jp2c)")
    data = boxes[b"jp2c"]
  return codecs._strip_com(data)


def read_image(path: str | os.PathLike[str]) -> ImageFile:
  """Decode one file (CorruptImageError naming it when it cannot be) and read its bitstream."""
  name = str(path)
  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise CorruptImageError(f"{name}: {e.strerror or e}") from None
  try:
    if data.startswith(JPEG_SOI):
      quality = degradations.estimate_jpeg_quality(data)
      image = codecs.jpeg_decode(data)
      if image.ndim == 3 and image.shape[2] == 4:  # CMYK: Pillow converts it to RGB
        image = _decode_bytes(data, name)
      return ImageFile(name, _rgb(image, name), {"codec": "jpeg", "jpeg_quality": quality},
                       f"bitstream: jpeg q={quality}")
    if data.startswith((J2K_SOC, JP2_SIGNATURE)):
      image = _rgb(codecs.jp2k_decode(data), name)
      bpp = len(_codestream(data)) * 8 / (image.shape[0] * image.shape[1])
      return ImageFile(name, image, {"codec": "jp2k", "bpp": bpp}, f"bitstream: jp2k {24 / bpp:.1f}:1")
  except (RuntimeError, ValueError) as e:  # imagecodecs' Jpeg8Error / Jpeg2kError; bad DQT, JP2 boxes
    raise CorruptImageError(f"{name}: cannot decode image: {e}") from None
  try:
    with PIL.Image.open(io.BytesIO(data)) as im:
      kind = im.format or "unknown"
  except PIL.UnidentifiedImageError:  # Pillow's own message names a BytesIO object, not the file
    raise CorruptImageError(f"{name}: not an image: neither JPEG, JPEG 2000 nor a format Pillow reads") from None
  image = _decode_bytes(data, name)
  source = "bitstream: lossless" if kind in LOSSLESS_FORMATS else f"bitstream: {kind.lower()} (not read: clean bin)"
  return ImageFile(name, image, {"codec": None}, source)


def _rgb(image: np.ndarray, name: str) -> np.ndarray:
  try:
    return degradations.as_rgb_uint8(image)
  except ValueError as e:
    raise CorruptImageError(f"{name}: {e}") from None


def _record(predictor: Predictor, f: ImageFile, out: dict[str, Any], i: int, source: str) -> dict[str, Any]:
  """One file's result as a JSON-ready dict."""
  names, bins = predictor.class_names, predictor.bin_names
  branch = int(out["branch"][i])
  top = [{"class": names[c], "index": int(c), "prob": float(p)} for c, p in zip(out["top_k"][i], out["top_k_probs"][i])]
  record = {"path": f.path, "class": top[0]["class"], "index": top[0]["index"], "prob": top[0]["prob"],
            "rule": out["rule"], "branch": bins[branch] if branch >= 0 else None, "bin_source": source, "top": top}
  if out["bin_probs"] is not None:
    record["bin_probs"] = {b: float(p) for b, p in zip(bins, out["bin_probs"][i])}
  return record


def _line(record: dict[str, Any]) -> str:
  top = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in record["top"])
  return (f"{record['path']}: {record['class']} {record['prob']:.3f} | branch {record['branch'] or '-'} "
          f"({record['bin_source']}) | top {len(record['top'])}: {top}")


def predict_files(predictor: Predictor, paths: Sequence[str | os.PathLike[str]], rule: str = "ms", top: int = 5,
                  as_json: bool = False, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
  """Classify every image file under `paths` with `rule`, one line per file on `out`; returns how many files
  were skipped (each named on `err`). UserError when no file could be read at all."""
  if rule == "oracle":
    raise errors.InvalidInputError("rule 'oracle' routes by each image's true bin, which a file does not carry; use "
                                   "--rule=bitstream (the bin read from the file) or --rule=ms")
  predictor.params(rule)  # an unknown rule or a missing stage is refused before any file is read
  if top < 1:
    raise errors.InvalidInputError(f"--top must be >= 1, got {top}")
  files = find_images(paths)
  if not files:
    raise errors.MissingInputError(f"no image files in {', '.join(map(str, paths))}")
  rules = [list(b.match) for b in predictor.config.bins]
  batch, skipped, done = predictor.buckets[-1], 0, 0
  bar = tqdm.tqdm(total=len(files), desc="predict", unit="file", file=err, leave=False, disable=len(files) <= batch)
  for lo in range(0, len(files), batch):
    good: list[ImageFile] = []
    shaped: list[np.ndarray] = []
    for path in files[lo:lo + batch]:
      try:
        f = read_image(path)
        shaped.append(predictor.shape(f.image, f.path))
        good.append(f)
      except errors.UserError as e:
        skipped += 1
        print(f"msnet predict: skipped {e}", file=err, flush=True)
    bar.update(len(files[lo:lo + batch]))
    if not good:
      continue
    bins = ([degradations.bin_of_bitstream(f.bitstream, rules) for f in good]
            if rule in BITSTREAM_RULES else None)
    result = predictor.predict(np.stack(shaped), rule=rule, top_k=top, bins=bins)
    for i, f in enumerate(good):
      source = (f.source if rule == "bitstream" or (rule == "hybrid" and bins[i] != 0)
                else ("gate" if rule == "gate" else "master") if result["bin_probs"] is not None else "-")
      record = _record(predictor, f, result, i, source)
      print(json.dumps(record) if as_json else _line(record), file=out, flush=True)
    done += len(good)
  bar.close()
  if not done:
    raise errors.InvalidInputError(f"none of the {len(files)} files could be read as an image (each is named above)")
  if skipped:
    print(f"msnet predict: skipped {skipped} of {len(files)} files", file=err, flush=True)
  return skipped
