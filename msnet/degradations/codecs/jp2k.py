"""JPEG 2000: OpenJPEG through its C API (`openjpeg`), decoded by `imagecodecs.jpeg2k_decode`.

Always the irreversible 9/7 wavelet with the RGB->YCC component transform, one quality layer, and a raw J2K
codestream (no JP2 container). `jp2k:R` uses OpenJPEG's own rate allocation, `jp2k_psnr:P` its fixed-quality
mode: one encode each. The COM segment is removed, so the size, bpp and ratio count exactly the bytes a
decoder needs. A receiver reads the ratio back from the rate: 24 / bpp for 8-bit RGB.
"""

from __future__ import annotations

import imagecodecs
import numpy as np

from msnet.degradations.codecs import openjpeg

SOC = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def strip_com(codestream: bytes) -> bytes:
  """The J2K codestream without COM segments in its main header (comments; no decoder reads them)."""
  if codestream[:4] != SOC:
    raise ValueError("expected a J2K codestream starting with SOC, SIZ")
  out, i = [codestream[:2]], 2
  while codestream[i:i + 2] != b"\xff\x90":  # up to the first tile-part (SOT)
    length = int.from_bytes(codestream[i + 2:i + 4], "big")
    if codestream[i:i + 1] != b"\xff" or length < 2 or i + 2 + length > len(codestream):
      raise ValueError(f"corrupt J2K main header: no valid marker segment at byte {i}")
    end = i + 2 + length
    if codestream[i:i + 2] != b"\xff\x64":
      out.append(codestream[i:end])
    i = end
  out.append(codestream[i:])
  return b"".join(out)


def encode_psnr(image: np.ndarray, psnr: float) -> bytes:
  """OpenJPEG fixed-quality encode at target PSNR `psnr` dB (the pixels of imagecodecs' `level=psnr`)."""
  return strip_com(openjpeg.encode(image, psnr=psnr))


def encode_ratio(image: np.ndarray, ratio: float) -> bytes:
  """OpenJPEG's rate allocation for image.nbytes / ratio bytes, in one encode (`opj_compress -r ratio`).

  After tier-1 coding OpenJPEG keeps the coding passes of highest distortion-rate slope that fit the
  budget, less its estimate of the headers. Where the ratio is reachable, the achieved one is within
  3% of the target at 224x224 and within 6% at 32x32, above or below (headers are estimated).
  Deterministic: the same image and ratio give the same bytes.

  Reachable ratios depend on size and content. A 32x32 RGB codestream cannot shrink below 114-130
  bytes (about 100 bytes of headers plus the coarsest data OpenJPEG keeps): CIFAR images reach at most
  23.6-26.9:1 (1,000 test images), so `jp2k:30` and stronger all give that smallest encode (PSNR
  12-28 dB). At 224x224 the floor is near 1000:1 and 10-400:1 is reachable on natural content. At the
  other end the 9/7 quantiser saturates near 50 dB, so smooth images cannot reach low ratios (x7
  upsampled CIFAR images stop at 26-44:1; CIFAR images at 2-5.4:1). The ratio achieved is `apply`'s
  info["ratio"].
  """
  return strip_com(openjpeg.encode(image, ratio=ratio))


def decode(data: bytes) -> np.ndarray:
  return imagecodecs.jpeg2k_decode(data, numthreads=1)


def level(data: bytes, bpp: float) -> float | None:
  """The compression ratio a receiver reads from the rate: 24 bits of RGB per pixel over the codestream's."""
  return 24.0 / bpp if bpp > 0 else None
