"""Apply a degradation spec to one image and report what it did (PSNR, bits per pixel, bitstream quality)."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from msnet.degradations import codecs
from msnet.degradations.noise_blur import add_noise, gaussian_blur, stable_key
from msnet.degradations.resize import crop_shift, resize_round_trip
from msnet.degradations.spec import Blur, Clean, Noise, Resize, Shift, Spec, parse


def as_rgb_uint8(image: Any) -> np.ndarray:
  """uint8 HxWx3 (C-contiguous) from uint8 HxWx3, greyscale HxW / HxWx1 (replicated to 3 channels) or RGBA.

  RGBA: the alpha channel is dropped, not composited over a background (the colour channels are kept as
  stored). Any other dtype (bool, float, uint16, ...) or shape is refused with a ValueError naming it, so
  pixel ranges are never guessed.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8, got dtype {image.dtype} with shape {image.shape}")
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[:, :, 0]
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  elif image.ndim == 3 and image.shape[2] == 4:
    image = image[:, :, :3]
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"image must be HxWx3 RGB (or HxW / HxWx1 grey, HxWx4 RGBA), got shape {image.shape}")
  return np.ascontiguousarray(image)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB of two uint8 images over all pixels and channels; inf when identical."""
  d = a.astype(np.int32) - b
  mse = float(np.mean(d * d))
  return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


@functools.lru_cache(maxsize=1024)
def _noise_keys(spec: Spec) -> tuple[int, ...]:
  """Per op: stable hash of the canonical spec prefix ending with it (`noise:10+jpeg:Q` share noise)."""
  return tuple(stable_key(str(Spec(spec.ops[:i + 1]))) for i in range(len(spec.ops)))


def apply(spec: str | Spec, image: np.ndarray, *, seed: int = 0, index: int = 0) -> tuple[np.ndarray, dict]:
  """Degrade `image` by `spec` (left to right) -> (uint8 HxWx3, info).

  info: `psnr` (dB against the input, inf if unchanged); for the last codec of the chain, if any:
  `codec` (its `codecs.CODECS` name), `bpp` (bits per pixel of the encoded file), `ratio` (raw RGB bytes /
  file bytes) and `level`, what a receiver reads back from the bytes on the bin rules' scale (JPEG: the IJG
  quality of the quantisation tables; JPEG 2000: the ratio; None where the file does not carry it); None
  without a codec. `lossless`: the last encode was lossless (`jxl:0`), so a receiver bins it as clean.
  A chain that encodes more than once (`jpeg:10+resize:0.5+jpeg:75`) reports only its last encode, which is
  all a receiver of the file can read: the bitstream of `jpeg:10+jpeg:90` says quality 90.
  Noise depends only on (seed, index, the spec up to the noise op), never on process or call order.
  """
  spec = parse(spec)
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
  source = as_rgb_uint8(image)
  x = source
  info: dict[str, Any] = dict(psnr=math.inf, bpp=None, level=None, ratio=None, codec=None, lossless=False)
  for position, op in enumerate(spec.ops):
    if isinstance(op, Clean):
      continue
    if isinstance(op, Noise):
      x = add_noise(x, op.sigma, seed=seed, index=index, key=_noise_keys(spec)[position], position=position)
      continue
    if isinstance(op, Blur):
      x = gaussian_blur(x, op.sigma, op.radius)
      continue
    if isinstance(op, Resize):
      x = resize_round_trip(x, op.factor, op.resample)
      continue
    if isinstance(op, Shift):
      x = crop_shift(x, op.dx, op.dy)
      continue
    if op.codec is None:
      raise TypeError(f"unknown degradation op {op!r}")
    codec = codecs.get(op.codec)
    data = codec.encode(op, x)
    x = codec.decode(data)
    bpp = len(data) * 8 / (x.shape[0] * x.shape[1])
    info.update(codec=codec.name, bpp=bpp, ratio=x.nbytes / len(data), level=codec.level(data, bpp),
                lossless=codec.lossless(data))
  if x is source:
    x = source.copy()
  info["psnr"] = psnr(source, x)
  return x, info
