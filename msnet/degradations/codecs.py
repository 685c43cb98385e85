"""Real JPEG and JPEG 2000 encode/decode through imagecodecs, with JPEG 2000 rate control.

JPEG: libjpeg-turbo via `imagecodecs.jpeg8_encode(level=Q, subsampling=...)`, the same library and
settings as Pillow's `save(format='JPEG', quality=Q, subsampling=...)` (islow DCT, no optimised Huffman
tables, fancy upsampling on decode), so the pixels equal Pillow's bit for bit.

JPEG 2000: OpenJPEG via `imagecodecs.jpeg2k_encode`, always the irreversible 9/7 wavelet with the
RGB->YCC component transform, one quality layer, and a raw J2K codestream (`codecformat='J2K'`, no JP2
container). OpenJPEG's "Created by OpenJPEG" COM segment (39 bytes) is removed, so the size, bpp and
ratio count exactly the bytes a decoder needs. imagecodecs' `level` is a target PSNR in dB
(OpenJPEG fixed-quality mode), not a ratio: `jp2k:R` searches the level (see `jp2k_encode_ratio`).
"""

from __future__ import annotations

import math

import imagecodecs
import numpy as np

# The size of the codestream grows monotonically (in steps) with imagecodecs' PSNR level; it saturates
# above about 70 dB for 8-bit images (every coding pass kept) and is at its floor below about 15-20 dB.
_LEVEL_MIN, _LEVEL_MAX = 1.0, 100.0
_RATE_TOL = 0.05         # stop the search when the size is within 5% of the target
_RATE_MAX_ENCODES = 10   # encodes per image at most
_DEFAULT_SLOPE = 0.1     # d ln(bytes) / d level (dB) before two encodes give a measured one


def jpeg_encode(image: np.ndarray, quality: int, subsampling: str) -> bytes:
  return imagecodecs.jpeg8_encode(image, level=quality, subsampling=subsampling)


def jpeg_decode(data: bytes) -> np.ndarray:
  return imagecodecs.jpeg8_decode(data)


def _strip_com(codestream: bytes) -> bytes:
  """The J2K codestream without COM segments in its main header (comments; no decoder reads them)."""
  if codestream[:4] != b"\xff\x4f\xff\x51":
    raise ValueError("expected a J2K codestream starting with SOC, SIZ")
  out, i = [codestream[:2]], 2
  while codestream[i:i + 2] != b"\xff\x90":  # up to the first tile-part (SOT)
    end = i + 2 + int.from_bytes(codestream[i + 2:i + 4], "big")
    if codestream[i:i + 2] != b"\xff\x64":
      out.append(codestream[i:end])
    i = end
  out.append(codestream[i:])
  return b"".join(out)


def jp2k_encode_psnr(image: np.ndarray, psnr: float) -> bytes:
  """OpenJPEG fixed-quality encode at target PSNR `psnr` dB (clamped to imagecodecs' lossy range 1..1000)."""
  level = min(max(float(psnr), 1.0), 1000.0)
  data = imagecodecs.jpeg2k_encode(image, level=level, codecformat="J2K", reversible=False, numthreads=1)
  return _strip_com(data)


def jp2k_encode_ratio(image: np.ndarray, ratio: float) -> bytes:
  """Codestream whose size is closest to image.nbytes / ratio, found by a bounded search on the PSNR level.

  The size is a monotone step function of the level, so the search brackets the target and then
  interpolates ln(size) linearly in the level (regula falsi, with bisection when one side stalls),
  at most `_RATE_MAX_ENCODES` encodes. It returns the encode closest to the target in ln(size) (ties:
  the smaller one) and stops early within 5%: 3-4 encodes on average. Deterministic: the same image
  and ratio always give the same bytes.

  Reachable ratios depend on size and content. A 32x32 RGB codestream cannot shrink below 110-130
  bytes (about 100 bytes of headers plus the coarsest data OpenJPEG keeps): CIFAR images reach at most
  23-27:1 (measured on 1,000 test images), so `jp2k:30` and stronger all return that smallest encode
  (PSNR 10-20 dB). At 224x224 the floor is near 1000:1 and 10-400:1 is reachable on natural content.
  At the other end the 9/7 quantiser saturates near 50 dB, so smooth images cannot reach low ratios
  (x7 upsampled CIFAR images stop at 26-44:1; CIFAR images at 2-5:1). The ratio achieved is
  `apply`'s info["ratio"].
  """
  target = math.log(image.nbytes / ratio)
  tried: dict[float, bytes] = {}

  def error(level: float) -> float:
    if level not in tried:
      tried[level] = jp2k_encode_psnr(image, level)
    return math.log(len(tried[level])) - target

  lo: tuple[float, float] | None = None  # (level, error < 0): too small
  hi: tuple[float, float] | None = None  # (level, error > 0): too large
  level = min(max(35.0 - 4.0 * math.log2(ratio / 10.0), 15.0), 60.0)
  prev: tuple[float, float] | None = None
  stalled_side = 0
  while len(tried) < _RATE_MAX_ENCODES:
    e = error(level)
    if abs(e) <= math.log1p(_RATE_TOL):
      break
    side = 1 if e > 0 else -1
    if side > 0 and (hi is None or level < hi[0]):
      hi = (level, e)
    elif side < 0 and (lo is None or level > lo[0]):
      lo = (level, e)
    if lo is not None and hi is not None:
      if hi[0] - lo[0] < 1e-3:
        break
      stalled_side = stalled_side + side if stalled_side * side > 0 else side
      t = 0.5 if abs(stalled_side) >= 2 else min(max(lo[1] / (lo[1] - hi[1]), 0.05), 0.95)
      nxt = lo[0] + t * (hi[0] - lo[0])
    else:
      slope = _DEFAULT_SLOPE
      if prev is not None and prev[0] != level and (e - prev[1]) / (level - prev[0]) > 1e-3:
        slope = (e - prev[1]) / (level - prev[0])
      nxt = min(max(level - min(max(e / slope, -20.0), 20.0), _LEVEL_MIN), _LEVEL_MAX)
    if nxt in tried:  # a level bound reached, still on the same side: the target is out of reach
      break
    prev, level = (level, e), nxt
  return min(tried.values(), key=lambda b: (abs(math.log(len(b)) - target), len(b)))


def jp2k_decode(data: bytes) -> np.ndarray:
  return imagecodecs.jpeg2k_decode(data, numthreads=1)
