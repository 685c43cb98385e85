"""JPEG: libjpeg-turbo through imagecodecs.

`imagecodecs.jpeg8_encode(level=Q, subsampling=...)` is the same library and settings as Pillow's
`save(format='JPEG', quality=Q, subsampling=...)` (islow DCT, no optimised Huffman tables, fancy upsampling
on decode), so the pixels equal Pillow's bit for bit. A receiver reads the IJG quality back from the
quantisation tables (`degradations.bitstream`).
"""

from __future__ import annotations

import imagecodecs
import numpy as np

from msnet.degradations.bitstream import estimate_jpeg_quality

SOI = b"\xff\xd8\xff"


def encode(image: np.ndarray, quality: int, subsampling: str) -> bytes:
  return imagecodecs.jpeg8_encode(image, level=quality, subsampling=subsampling)


def decode(data: bytes) -> np.ndarray:
  return imagecodecs.jpeg8_decode(data)


def level(data: bytes, bpp: float) -> float | None:
  """The IJG quality the quantisation tables say; None for tables no IJG quality gives."""
  q = estimate_jpeg_quality(data)
  return float(q) if q >= 1 else None
