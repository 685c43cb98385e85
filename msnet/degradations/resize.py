"""Scale an image and back with one of Pillow's filters: the resampling an image meets between two encodes."""

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
