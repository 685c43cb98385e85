"""What an image meets between two encodes: scaled and back with one of Pillow's filters, or cropped."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def scaled_size(width: int, height: int, factor: float) -> tuple[int, int]:
  """The intermediate (width, height): round-half-up of factor x side, at least one pixel."""
  return tuple(max(1, math.floor(side * factor + 0.5)) for side in (width, height))


def resize_round_trip(image: np.ndarray, factor: float, resample: str) -> np.ndarray:
  """uint8 HxWx3 -> scaled by `factor` with Pillow's `resample` filter, then back to HxW with the same filter."""
  h, w = image.shape[:2]
  method = Image.Resampling[resample.upper()]
  small = Image.fromarray(image).resize(scaled_size(w, h, factor), method)
  return np.asarray(small.resize((w, h), method))


def crop_shift(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
  """The image cropped by `dx` columns on the left and `dy` rows on the top, its last column and row repeated
  to the original size: out[y, x] = image[min(y + dy, H - 1), min(x + dx, W - 1)]. A crop between two uploads
  moves the second encode's 8x8 grid by (dx mod 8, dy mod 8) against the first one's."""
  h, w = image.shape[:2]
  if dx >= w or dy >= h:
    raise ValueError(f"shift:{dx},{dy} crops the whole {w}x{h} image; shift by less than its width and height")
  rows = np.minimum(np.arange(h) + dy, h - 1)
  cols = np.minimum(np.arange(w) + dx, w - 1)
  return np.ascontiguousarray(image[rows[:, None], cols[None, :]])
