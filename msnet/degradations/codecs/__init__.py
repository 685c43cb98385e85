"""The codec registry: every lossy codec msnet encodes with, and recognises in a file, is one entry of `CODECS`.

The spec grammar's codec ops name their codec (`op.codec`); `degradations.apply` encodes and decodes through
the entry; the bin rules match its name; the file reader sniffs a file's first bytes with it and reads the
level back; degrade records its library's version in the manifest. A new codec is a module here (encode,
decode, sniff, the level a receiver reads) and one entry below, beside its op in `degradations.spec`.

What a receiver reads (`level`): the op's level, on the bin rules' scale, from the bytes alone, or None when
the file does not carry it. JPEG's IJG quality is in its quantisation tables and JPEG 2000's ratio is its
rate. WebP, AVIF and JPEG XL store quantisers, not the encoder's quality setting, so their files are binned
by their rate (`codec@bpp` bin rules, `degradations.bins`); a lossless WebP or JPEG XL file is the clean bin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from msnet.degradations.codecs import avif, jp2k, jpeg, jxl, webp
from msnet.degradations.codecs.jp2k import decode as jp2k_decode, encode_psnr as jp2k_encode_psnr
from msnet.degradations.codecs.jp2k import encode_ratio as jp2k_encode_ratio, strip_com
from msnet.degradations.codecs.jpeg import decode as jpeg_decode, encode as jpeg_encode


@dataclasses.dataclass(frozen=True)
class Codec:
  """One codec: how an op encodes with it, how its files are decoded, recognised and read back."""
  name: str                                       # bin rule kind and record `codec` field
  title: str                                      # for figures and messages
  suffixes: tuple[str, ...]                       # file suffixes `msnet predict` lists in a folder
  library: str                                    # imagecodecs.version(dict) key, recorded by degrade
  encode: Callable[[Any, np.ndarray], bytes]      # (spec op, RGB uint8 HxWx3) -> the file's bytes
  decode: Callable[[bytes], np.ndarray]           # the file's bytes -> its samples
  sniff: Callable[[bytes], bool]                  # do these bytes start a file of this codec?
  level: Callable[[bytes, float], float | None]   # (bytes, bpp) -> the op level a receiver reads, or None
  lossless: Callable[[bytes], bool] = lambda data: False  # a lossless file of a lossy codec: the clean bin
  # For the file reader's generic path (JPEG and JPEG 2000 have their own, `data.reader`): (width, height)
  # from the header before decoding, bits per sample, and the EXIF orientation to apply after decoding.
  size: Callable[[bytes], tuple[int, int]] | None = None
  bits: Callable[[bytes], int] = lambda data: 8
  orientation: Callable[[bytes], int] | None = None  # None: the decoder applies the file's own

  @property
  def reads_level(self) -> bool:
    """Does a file carry the op's level (else the bitstream rule bins it by rate)?"""
    return self.level is not _no_level


def _no_level(data: bytes, bpp: float) -> None:
  """Files that store quantisers, not the encoder's quality setting: binned by rate (`codec@bpp` rules)."""
  return None


def exif_orientation(data: bytes) -> int:
  """The EXIF orientation (1-8) Pillow reads from a WebP EXIF chunk or AVIF `irot` / `imir` / Exif item."""
  import io  # noqa: PLC0415
  import PIL.Image  # noqa: PLC0415
  with PIL.Image.open(io.BytesIO(data)) as im:
    value = im.getexif().get(0x0112, 1)
  return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _jp2k_encode(op: Any, image: np.ndarray) -> bytes:
  return jp2k_encode_ratio(image, op.ratio) if hasattr(op, "ratio") else jp2k_encode_psnr(image, op.psnr)


CODECS: dict[str, Codec] = {c.name: c for c in (
    Codec("jpeg", "JPEG", (".jpg", ".jpeg", ".jpe", ".jfif"), "libjpeg_turbo",
          encode=lambda op, image: jpeg_encode(image, op.quality, op.subsampling), decode=jpeg_decode,
          sniff=lambda data: data.startswith(jpeg.SOI), level=jpeg.level),
    Codec("jp2k", "JPEG 2000", (".jp2", ".j2k", ".jpx", ".j2c", ".jpc"), "openjpeg",
          encode=_jp2k_encode, decode=jp2k_decode,
          sniff=lambda data: data.startswith((jp2k.SOC, jp2k.JP2_SIGNATURE)), level=jp2k.level),
    Codec("webp", "WebP", (".webp",), "libwebp", encode=lambda op, image: webp.encode(image, op.quality),
          decode=webp.decode, sniff=webp.sniff, level=_no_level, lossless=webp.lossless, size=webp.size,
          orientation=exif_orientation),
    Codec("avif", "AVIF", (".avif",), "libavif", encode=lambda op, image: avif.encode(image, op.quality),
          decode=avif.decode, sniff=avif.sniff, level=_no_level, size=avif.size, bits=avif.bits,
          orientation=exif_orientation),
    Codec("jxl", "JPEG XL", (".jxl",), "libjxl", encode=lambda op, image: jxl.encode(image, op.distance),
          decode=jxl.decode, sniff=jxl.sniff, level=_no_level, lossless=jxl.lossless, size=jxl.size,
          bits=lambda data: jxl.header(data).bits),
)}


def get(name: str) -> Codec:
  """The registry entry named `name`; ValueError listing the known ones."""
  if name not in CODECS:
    raise ValueError(f"unknown codec {name!r}; known: {', '.join(CODECS)}")
  return CODECS[name]


def encode(op: Any, image: np.ndarray) -> bytes:
  """The file a one-codec spec or op (`"webp:30"`, `Jpeg(10)`) makes of an RGB uint8 image."""
  if isinstance(op, str):
    from msnet.degradations.spec import parse  # noqa: PLC0415 (spec's ops name the codecs defined here)
    (op,) = parse(op).ops
  return get(op.codec).encode(op, image)


def sniff(data: bytes) -> Codec | None:
  """The codec whose file these bytes start, by signature (not by suffix); None for any other format."""
  return next((c for c in CODECS.values() if c.sniff(data)), None)


def suffixes() -> tuple[str, ...]:
  return tuple(s for c in CODECS.values() for s in c.suffixes)


def versions() -> dict[str, str]:
  """The version of every codec's library (imagecodecs' names), for manifests and benchmark records."""
  import imagecodecs  # noqa: PLC0415
  found = imagecodecs.version(dict)
  return {c.library: str(found.get(c.library, "")) for c in CODECS.values()}


__all__ = ["CODECS", "Codec", "encode", "get", "jp2k_decode", "jp2k_encode_psnr", "jp2k_encode_ratio", "jpeg_decode",
           "jpeg_encode", "sniff", "strip_com", "suffixes", "versions"]
