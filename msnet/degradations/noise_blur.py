"""Additive Gaussian noise and Gaussian blur on uint8 HxWx3 images.

Noise is a pure function of (seed, index, key): a record's noise never depends on the worker that
writes it or on the order records are processed in.

Blur is a separable float64 convolution written as two banded matrices (one per axis) with the
border folded in: `mode='nearest'` (edge pixels repeat), like scipy.ndimage and skimage's default.
Matrices go through BLAS; run workers with OPENBLAS_NUM_THREADS=1 so processes do not oversubscribe.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np


def stable_key(text: str) -> int:
  """A hash of `text` that is the same in every process and Python run (unlike `hash()`)."""
  return zlib.crc32(text.encode("utf-8"))


def add_noise(image: np.ndarray, sigma: float, *, seed: int, index: int, key: int, position: int) -> np.ndarray:
  """image + N(0, sigma^2) per pixel and channel (float32), rounded half to even, clipped to uint8.

  The generator is `np.random.default_rng([seed, index, key, position])`: `key` is the stable hash of the
  spec prefix that ends with this op and `position` its place in the chain.
  """
  rng = np.random.default_rng([seed, index, key, position])
  noisy = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
  return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float, radius: int) -> np.ndarray:
  """[n, n] float64 matrix M with (M @ x)[i] = sum_k w[k] * x[clip(i + k, 0, n - 1)], k in -radius..radius."""
  offsets = np.arange(-radius, radius + 1)
  weights = np.exp(-0.5 * (offsets / sigma) ** 2)
  weights /= weights.sum()
  rows = np.repeat(np.arange(n), offsets.size)
  cols = np.clip(rows + np.tile(offsets, n), 0, n - 1)
  m = np.zeros((n, n))
  np.add.at(m, (rows, cols), np.tile(weights, n))
  m.setflags(write=False)
  return m


def gaussian_blur(image: np.ndarray, sigma: float, radius: int) -> np.ndarray:
  """Separable Gaussian blur (kernel size 2 * radius + 1, border 'nearest'), rounded to uint8."""
  h, w, c = image.shape
  mh, mw = _blur_matrix(h, sigma, radius), _blur_matrix(w, sigma, radius)
  x = mh @ image.reshape(h, w * c).astype(np.float64)                 # along rows: [h, w*c]
  x = mw @ x.reshape(h, w, c).transpose(1, 0, 2).reshape(w, h * c)   # along columns: [w, h*c]
  x = x.reshape(w, h, c).transpose(1, 0, 2)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8, order="C")
