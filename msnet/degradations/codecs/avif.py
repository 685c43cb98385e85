"""AVIF: libavif with libaom through imagecodecs, 8-bit 4:2:0, the settings of the web's encoders.

Encode: `avif_encode(level=Q, speed=SPEED, pixelformat=YUV420, codec=AOM)`, one thread. Q is libavif's quality
0-100 (100 lossless), mapped by libavif to AV1 quantisers. SPEED is libaom's speed 0-10: libavif's default
(-1, libaom's own) costs about 70 ms per 32x32 image on this machine; `benchmarks/bench_degrade_codecs.py`
measures the speeds and the rate each costs, and SPEED is chosen there. Deterministic with one thread.
Decode: libavif with dav1d or libaom, which Pillow's AVIF plugin also uses: the same pixels (tested).

A receiver reads the codec (the `ftyp` brand) and the rate, not Q.
"""

from __future__ import annotations

import imagecodecs
import numpy as np

SPEED = 8
BRANDS = (b"avif", b"avis")


def encode(image: np.ndarray, quality: int) -> bytes:
  return imagecodecs.avif_encode(image, level=quality, speed=SPEED, numthreads=1,
                                 pixelformat=imagecodecs.AVIF.PIXEL_FORMAT.YUV420,
                                 codec=imagecodecs.AVIF.CODEC_CHOICE.AOM)


def decode(data: bytes) -> np.ndarray:
  return imagecodecs.avif_decode(data, numthreads=1)


def sniff(data: bytes) -> bool:
  """An ISO-BMFF `ftyp` box whose major or compatible brands name AVIF."""
  if data[4:8] != b"ftyp":
    return False
  end = min(int.from_bytes(data[:4], "big"), len(data))
  brands = [data[8:12]] + [data[i:i + 4] for i in range(16, end - 3, 4)]
  return any(b in BRANDS for b in brands)


def _property(data: bytes, kind: bytes, length: int) -> bytes | None:
  """The first `length` bytes after the version and flags of the first `kind` property, searched before the
  media data (`mdat`) so that coded samples are never mistaken for a box."""
  mdat = data.find(b"mdat")
  i = data.find(kind, 0, mdat if mdat >= 0 else len(data))
  return data[i + 8:i + 8 + length] if i >= 0 and i + 8 + length <= len(data) else None


def size(data: bytes) -> tuple[int, int]:
  """(width, height) from the `ispe` property, before any pixel is decoded."""
  ispe = _property(data, b"ispe", 8)
  if ispe is None:
    raise ValueError("AVIF file without an image spatial extents (ispe) property")
  return int.from_bytes(ispe[:4], "big"), int.from_bytes(ispe[4:], "big")


def bits(data: bytes) -> int:
  """Bits per sample from the `pixi` property (8 when absent, libavif's default)."""
  pixi = _property(data, b"pixi", 2)
  return 8 if pixi is None else int(pixi[1])
