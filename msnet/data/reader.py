"""The image reader: a file's bytes to the RGB uint8 pixels the network sees, and what its bitstream says.

JPEG files are decoded by `codecs.jpeg_decode` and JPEG 2000 files (raw J2K codestreams or JP2 containers)
by `codecs.jp2k_decode`, the decoders that made the shards, so a file holding a shard's bitstream gives the
network the pixels `msnet evaluate` gave it; every other format goes through Pillow.
What a receiver reads from the file is what the `bitstream` rule routes by (`degradations.bin_of_bitstream`):
a JPEG's IJG quality from its quantisation tables; a JPEG 2000 file's ratio 24 / bpp, bpp = codestream bits
(COM segments and the JP2 boxes left out, as `degradations.apply` counts them) over the decoded image's
pixels; no codec for anything else, so PNG and other lossless files go to the clean bin 0.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
from typing import Any

import numpy as np
import PIL.Image

from msnet import degradations, errors
from msnet.degradations import codecs

JPEG_SOI = b"\xff\xd8"
J2K_SOC = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
JPEG2000_SUFFIXES = (".jp2", ".j2k", ".jpx", ".j2c", ".jpc")
LOSSLESS_FORMATS = ("PNG", "BMP", "TIFF", "PPM", "GIF", "TGA", "QOI")


class CorruptImageError(errors.UserError, ValueError):
  """A source image cannot be decoded; the message names the file."""


class ImageTooSmallError(CorruptImageError):
  """A source image smaller than `data.image_size` without `resize_shorter`: unusable like a corrupt one,
  so `degrade.on_corrupt` decides (skip it, or refuse it with its name)."""


@dataclasses.dataclass
class ImageFile:
  """A decoded file: RGB uint8 pixels at the file's own size and what its bitstream says."""
  path: str
  image: np.ndarray
  bitstream: dict[str, Any]  # codec ("jpeg" | "jp2k" | None), jpeg_quality, bpp: bin_of_bitstream's input
  source: str                # how the bitstream rule got its bin, e.g. "bitstream: jpeg q=10"


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
        image = decode_pillow(data, name)
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
  image = decode_pillow(data, name)
  source = "bitstream: lossless" if kind in LOSSLESS_FORMATS else f"bitstream: {kind.lower()} (not read: clean bin)"
  return ImageFile(name, image, {"codec": None}, source)


def _rgb(image: np.ndarray, name: str) -> np.ndarray:
  try:
    return degradations.as_rgb_uint8(image)
  except ValueError as e:
    raise CorruptImageError(f"{name}: {e}") from None


def decode_pillow(data: bytes | memoryview, name: str) -> np.ndarray:
  try:
    with PIL.Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
      elif im.mode == "LA":
        im = im.convert("RGBA")
      elif im.mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGB")  # CMYK, 16-bit grey, ...: Pillow's conversion
      array = np.asarray(im)
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise CorruptImageError(f"{name}: cannot decode image: {e}") from None
  return to_rgb(array, name)


def to_rgb(array: np.ndarray, name: str) -> np.ndarray:
  from msnet import degradations  # noqa: PLC0415 (import cycle free: degradations never imports data)
  try:
    return degradations.as_rgb_uint8(array)
  except ValueError as e:
    raise CorruptImageError(f"{name}: {e}") from None


