"""JPEG XL: libjxl through imagecodecs, lossy VarDCT at a butteraugli distance, the settings of `cjxl -d D`.

The spec's level is libjxl's distance D (0-25): 0 is lossless, 1.0 "visually lossless" (cjxl's default), each
step up is stronger and 25 is libjxl's maximum. Encode: `jpegxl_encode(distance=D, effort=EFFORT)`, cjxl's
default effort 7 of 1-10, one thread, a bare codestream (no container). Deterministic.
Decode: libjxl. No second JPEG XL decoder is installed here (Pillow has no JPEG XL plugin), so the tests
check lossless round trips, the header parse and determinism instead of a second decoder's pixels.

A receiver reads the codec (the codestream or container signature), the rate, and from the header the size,
bit depth, orientation and whether the image is XYB-encoded (lossy VarDCT) or lossless; not D.
"""

from __future__ import annotations

import dataclasses

import imagecodecs
import numpy as np

from msnet.degradations.codecs import boxes

EFFORT = 7
MAX_DISTANCE = 25.0
CODESTREAM = b"\xff\x0a"
CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_RATIOS = ((1, 1), (1, 1), (12, 10), (4, 3), (3, 2), (16, 9), (5, 4), (2, 1))  # SizeHeader.ratio -> x / y


def encode(image: np.ndarray, distance: float) -> bytes:
  if distance == 0:
    return imagecodecs.jpegxl_encode(image, lossless=True, effort=EFFORT, numthreads=1)
  return imagecodecs.jpegxl_encode(image, distance=distance, effort=EFFORT, numthreads=1)


def decode(data: bytes) -> np.ndarray:
  """libjxl applies the header's orientation to the pixels (keeporientation=False, libjxl's default)."""
  return imagecodecs.jpegxl_decode(data, keeporientation=False, numthreads=1)


def sniff(data: bytes) -> bool:
  return data.startswith((CODESTREAM, CONTAINER))


@dataclasses.dataclass(frozen=True)
class Header:
  width: int
  height: int
  bits: int          # bits per sample (integer samples); 0 for floating-point samples
  orientation: int   # EXIF convention 1-8
  xyb: bool | None   # XYB colour (lossy VarDCT); None where extra channels hide the flag from this parser


class _Bits:
  """JPEG XL's bit reader: least significant bit first."""

  def __init__(self, data: bytes):
    self.value, self.pos, self.end = int.from_bytes(data, "little"), 0, 8 * len(data)

  def u(self, n: int) -> int:
    if self.pos + n > self.end:
      raise ValueError("JPEG XL header runs past the end of the file")
    out = (self.value >> self.pos) & ((1 << n) - 1)
    self.pos += n
    return out

  def u32(self, *dists: tuple[int, int]) -> int:
    """U32(d0..d3): a 2-bit selector, then (bits, offset) of the chosen distribution."""
    bits, offset = dists[self.u(2)]
    return offset + (self.u(bits) if bits else 0)


def _size(r: _Bits) -> tuple[int, int]:
  """A SizeHeader: (width, height)."""
  div8 = r.u(1)
  height = 8 * (1 + r.u(5)) if div8 else r.u32(*_IMAGE_SIZE)
  ratio = r.u(3)
  if ratio == 0:
    width = 8 * (1 + r.u(5)) if div8 else r.u32(*_IMAGE_SIZE)
  else:
    num, den = _RATIOS[ratio]
    width = height * num // den
  return width, height


_IMAGE_SIZE = ((9, 1), (13, 1), (18, 1), (30, 1))
_PREVIEW_DIV8 = ((0, 16), (0, 32), (5, 1), (9, 33))
_PREVIEW = ((6, 1), (8, 65), (10, 321), (12, 1345))


def _bit_depth(r: _Bits) -> int:
  if r.u(1):  # floating-point samples
    r.u32((0, 32), (0, 16), (0, 24), (6, 1))
    r.u(4)
    return 0
  return r.u32((0, 8), (0, 10), (0, 12), (6, 1))


def header(data: bytes) -> Header:
  """The codestream's SizeHeader and ImageMetadata up to `xyb_encoded` (ISO/IEC 18181-1 A.2 to A.6)."""
  codestream = _codestream(data)
  r = _Bits(codestream[2:2 + 256])
  width, height = _size(r)
  if r.u(1):  # all_default: 8-bit, orientation 1, XYB
    return Header(width, height, 8, 1, True)
  orientation = 1
  if r.u(1):  # extra_fields
    orientation = 1 + r.u(3)
    if r.u(1):  # intrinsic size
      _size(r)
    if r.u(1):  # preview
      _preview(r)
    if r.u(1):  # animation
      r.u32((0, 100), (0, 1000), (10, 1), (30, 1))
      r.u32((0, 1), (0, 1001), (8, 1), (10, 1))
      r.u32((0, 0), (3, 0), (16, 0), (32, 0))
      r.u(1)
  bits = _bit_depth(r)
  r.u(1)  # modular_16_bit_buffer_sufficient
  extra = r.u32((0, 0), (0, 1), (4, 2), (12, 1))
  return Header(width, height, bits, orientation, bool(r.u(1)) if extra == 0 else None)


def _preview(r: _Bits) -> None:
  """Skips a PreviewHeader."""
  dists = _PREVIEW_DIV8 if r.u(1) else _PREVIEW
  r.u32(*dists)
  if r.u(3) == 0:
    r.u32(*dists)


def _codestream(data: bytes) -> bytes:
  """The codestream of a bare codestream or of a container (its `jxlc` box, or the first `jxlp` box's part)."""
  if data.startswith(CODESTREAM):
    return data
  found = boxes.top_level(data, "JPEG XL container")
  if b"jxlc" in found:
    return found[b"jxlc"]
  if b"jxlp" in found:
    return found[b"jxlp"][4:]
  raise ValueError("JPEG XL container without a codestream box (jxlc / jxlp)")


def size(data: bytes) -> tuple[int, int]:
  h = header(data)
  return h.width, h.height


def lossless(data: bytes) -> bool:
  """Not XYB-encoded: libjxl's lossless (modular) mode. A header this parser cannot read to the flag (extra
  channels) counts as lossy."""
  return header(data).xyb is False
