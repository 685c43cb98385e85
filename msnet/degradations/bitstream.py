"""What a receiver can read from a JPEG bitstream without the source: the IJG quality.

The quantization tables (DQT segments) are parsed from the bytes here, no image library needed, and
matched against the IJG tables: Annex K (ITU-T T.81) luminance and chrominance tables scaled as libjpeg's
`jpeg_quality_scaling` does, S = 5000 / Q (Q < 50) else 200 - 2Q, entry = (S * T + 50) // 100 clamped to
[1, 255] (baseline) or [1, 32767] (16-bit tables).
"""

from __future__ import annotations

import functools

import numpy as np

# ITU-T T.81 Annex K.1, natural (row-major) order.
_ANNEX_K_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_ANNEX_K_CHROMA = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    *(99,) * 32)
# Natural-order index of the k-th coefficient in zigzag order (DQT stores tables in zigzag order).
_ZIGZAG = (
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63)


@functools.lru_cache(maxsize=2)
def _ijg_tables(max_value: int) -> np.ndarray:
  """[100, 2, 64] IJG luma/chroma tables for Q = 1..100, in zigzag (bitstream) order."""
  q = np.arange(1, 101)
  scale = np.where(q < 50, 5000 // q, 200 - 2 * q)[:, None, None]
  base = np.array([_ANNEX_K_LUMA, _ANNEX_K_CHROMA])[:, _ZIGZAG][None]
  return np.clip((scale * base + 50) // 100, 1, max_value)


def _dqt_segments(data: bytes) -> tuple[bytes, ...]:
  """Payloads of the DQT segments before the first scan (tables of the first scan are all read by then)."""
  data = bytes(data)
  if data[:2] != b"\xff\xd8":
    raise ValueError(f"not a JPEG bitstream: no SOI marker FFD8 at the start (got {data[:4].hex() or 'no bytes'})")
  segments = []
  i, n = 2, len(data)
  while i + 1 < n:
    if data[i] != 0xFF:
      raise ValueError(f"corrupt JPEG bitstream: expected a marker at byte {i}, got {data[i]:#04x}")
    marker = data[i + 1]
    if marker == 0xFF:  # fill byte
      i += 1
      continue
    if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
      i += 2
      continue
    if marker in (0xD9, 0xDA):  # EOI or SOS
      break
    end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
    if end > n or end < i + 4:
      raise ValueError(f"truncated JPEG bitstream: segment FF{marker:02X} at byte {i} runs past the end")
    if marker == 0xDB:
      segments.append(data[i + 4:end])
    i = end
  if not segments:
    raise ValueError("JPEG bitstream has no quantization table (no DQT segment before the first scan)")
  return tuple(segments)


def _parse_dqt(segments: tuple[bytes, ...]) -> dict[int, tuple[np.ndarray, int]]:
  """{table id: (64 values in zigzag order, precision 0=8-bit / 1=16-bit)}; later tables replace earlier ones."""
  tables = {}
  for seg in segments:
    j = 0
    while j < len(seg):
      precision, table_id = seg[j] >> 4, seg[j] & 0x0F
      size = 64 * (precision + 1)
      if precision > 1 or j + 1 + size > len(seg):
        raise ValueError("corrupt JPEG bitstream: bad DQT table")
      values = np.frombuffer(seg, dtype=">u2" if precision else np.uint8, count=64, offset=j + 1)
      tables[table_id] = (values.astype(np.int64), precision)
      j += 1 + size
  return tables


@functools.lru_cache(maxsize=1024)
def _quality_of(segments: tuple[bytes, ...]) -> int:
  tables = _parse_dqt(segments)
  luma_id = 0 if 0 in tables else min(tables)
  luma, precision = tables[luma_id]
  ref = _ijg_tables(32767 if precision else 255)
  dist = np.abs(ref[:, 0] - luma).sum(axis=1)
  chroma_id = next((t for t in sorted(tables) if t != luma_id), None)
  if chroma_id is not None:
    dist = dist + np.abs(ref[:, 1] - tables[chroma_id][0]).sum(axis=1)
  return int(np.argmin(dist)) + 1


def estimate_jpeg_quality(jpeg_bytes: bytes) -> int:
  """IJG quality 1..100 whose scaled tables best match the bitstream's (luma, plus chroma if present).

  Exact for files written by libjpeg / libjpeg-turbo / Pillow / imagecodecs with `quality=Q`; for other
  encoders' tables it is the nearest IJG quality in summed absolute difference (ties: the lower Q).
  Memoised on the raw tables, so a stream of same-quality files costs only the marker walk.
  """
  return _quality_of(_dqt_segments(jpeg_bytes))
