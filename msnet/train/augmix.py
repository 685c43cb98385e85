"""AugMix (Hendrycks et al. 2020) on uint8 image batches [B, H, W, 3], in JAX, inside the jitted train step.

Its operations, each image drawing its own from a `jax.random` key: autocontrast, equalize, posterize,
solarize (per-channel lookup tables, as Pillow's ImageOps), rotate, shear_x/y and translate_x/y (Pillow's
AFFINE transform). None is one of msnet's test degradations (no blur, noise, codec, contrast, brightness,
colour or sharpness), so a gain under them is robustness, not having seen the test. Magnitudes follow the
reference code (google-research/augmix, augmentations.py): a level uniform in [0.1, severity] per operation,
scaled to each operation's range; chains of 1-3 operations, `width` chains mixed by Dirichlet(alpha) weights
and the mix joined to the image by a Beta(alpha, alpha) skip weight.

Two departures from the reference, both so that Pillow is an exact reference (tests/test_augmix.py): the
geometric operations sample the nearest neighbour (the reference: bilinear), and pixels that map outside the
image take FILL = 128, mid-grey (the reference: Pillow's default 0), so a shifted border is no darker than
the image's mean. The mix is rounded back to uint8, the input every msnet network reads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FILL = 128  # the value of pixels that a geometric operation maps from outside the image
COLOUR_OPS = ("autocontrast", "equalize", "posterize", "solarize")  # lookup tables per image and channel
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")  # AFFINE coefficients
OPS = COLOUR_OPS + GEOMETRIC_OPS
MAX_DEPTH = 3  # depth -1 draws each chain's length from 1..MAX_DEPTH, as the reference
@dataclasses.dataclass(frozen=True)
class Settings:
  """config.stages.augmix's knobs, which the stage's Job hands to the train step (`mixing`)."""
  severity: int = 3       # every operation's magnitude, 1-10
  width: int = 3          # chains mixed per image
  depth: int = -1         # operations per chain; -1: 1-3 at random per chain
  alpha: float = 1.0      # Dirichlet(alpha) weights over chains, Beta(alpha, alpha) skip weight
  js_lambda: float = 12.0  # weight of the Jensen-Shannon consistency term

  @classmethod
  def from_config(cls, stage: Any) -> Settings:
    return cls(severity=int(stage.severity), width=int(stage.width), depth=int(stage.depth),
               alpha=float(stage.alpha), js_lambda=float(stage.js_lambda))


def histogram(images: jax.Array) -> jax.Array:
  """[B, 3, 256] int32 counts of each value in each image's channels (Pillow's Image.histogram)."""
  def one(x: jax.Array) -> jax.Array:
    x = x.reshape(-1, 3).astype(jnp.int32)
    return jnp.zeros((3, 256), jnp.int32).at[jnp.arange(3)[None, :], x].add(1)
  return jax.vmap(one)(images)


def apply_lut(images: jax.Array, lut: jax.Array) -> jax.Array:
  """out[b, y, x, c] = lut[b, c, images[b, y, x, c]]; lut [B, 3, 256] or [B, 1, 256] (every channel)."""
  b = images.shape[0]
  lut = jnp.broadcast_to(lut, (b, 3, 256)).reshape(b, 3 * 256).astype(jnp.uint8)
  idx = images.astype(jnp.int32) + 256 * jnp.arange(3, dtype=jnp.int32)
  return jnp.take_along_axis(lut, idx.reshape(b, -1), axis=1).reshape(images.shape)


_VALUES = np.arange(256, dtype=np.int32)  # NumPy: importing this module starts no JAX backend


def _first(mask: jax.Array) -> jax.Array:
  return jnp.argmax(mask, axis=-1).astype(jnp.int32)


def _last(mask: jax.Array) -> jax.Array:
  return (255 - jnp.argmax(mask[..., ::-1], axis=-1)).astype(jnp.int32)


@functools.cache
def _pillow_rounded_down() -> np.ndarray:
  """Sorted keys (lo * 256 + hi) * 256 + v of the (lo, hi, v) where Pillow's autocontrast maps v one lower than
  floor((v - lo) * 255 / (hi - lo)): Pillow computes int(v * scale + offset) in float64, which at some exact
  integers lands just below (lo=0, hi=25 maps 25 to 254). NumPy's float64 is the same IEEE arithmetic."""
  keys = []
  for d in range(1, 256):
    lo = np.arange(256 - d)[:, None]
    v = lo + np.arange(d + 1)[None, :]
    scale = 255.0 / d
    pillow = (v * scale + -lo * scale).astype(np.int64)
    keys.append(((lo * 256 + lo + d) * 256 + v)[pillow < (v - lo) * 255 // d])
  return np.sort(np.concatenate(keys)).astype(np.int32)


def autocontrast_lut(hist: jax.Array) -> jax.Array:
  """ImageOps.autocontrast (cutoff 0): each channel's [lo, hi] stretched to [0, 255]; one value: unchanged."""
  lo, hi = _first(hist > 0)[..., None], _last(hist > 0)[..., None]
  span = jnp.maximum(hi - lo, 1)
  stretched = (_VALUES - lo) * 255 // span
  keys = jnp.asarray(_pillow_rounded_down())
  key = (lo * 256 + hi) * 256 + _VALUES
  found = keys[jnp.clip(jnp.searchsorted(keys, key), 0, keys.shape[0] - 1)] == key
  stretched = jnp.clip(stretched - found.astype(jnp.int32), 0, 255)
  return jnp.where(hi > lo, stretched, _VALUES)


def equalize_lut(hist: jax.Array) -> jax.Array:
  """ImageOps.equalize: each channel's cumulative histogram as the map, in Pillow's integer arithmetic."""
  present = hist > 0
  last = jnp.take_along_axis(hist, _last(present)[..., None], axis=-1)
  step = (jnp.sum(hist, axis=-1, keepdims=True) - last) // 255
  lut = (step // 2 + jnp.cumsum(hist, axis=-1) - hist) // jnp.maximum(step, 1)
  keep = (jnp.sum(present, axis=-1, keepdims=True) <= 1) | (step == 0)
  return jnp.where(keep, _VALUES, jnp.minimum(lut, 255))


def posterize_lut(bits: jax.Array) -> jax.Array:
  """ImageOps.posterize: keep the top `bits` [B] (1-8) bits of every value."""
  return (_VALUES & -(1 << (8 - jnp.asarray(bits, jnp.int32)))[:, None, None])


def solarize_lut(threshold: jax.Array) -> jax.Array:
  """ImageOps.solarize: values >= threshold [B] inverted."""
  return jnp.where(_VALUES < jnp.asarray(threshold, jnp.int32)[:, None, None], _VALUES, 255 - _VALUES)


def autocontrast(images: jax.Array) -> jax.Array:
  return apply_lut(images, autocontrast_lut(histogram(images)))


def equalize(images: jax.Array) -> jax.Array:
  return apply_lut(images, equalize_lut(histogram(images)))


def posterize(images: jax.Array, bits: jax.Array) -> jax.Array:
  return apply_lut(images, posterize_lut(bits))


def solarize(images: jax.Array, threshold: jax.Array) -> jax.Array:
  return apply_lut(images, solarize_lut(threshold))


def _fix(*terms: jax.Array) -> jax.Array:
  """Pillow's FIX(v) = floor(v * 65536 + 0.5), v the sum of `terms` (each a float32 times a power of two: exact),
  summed as whole and fractional parts so that no float32 rounding moves it."""
  whole = [jnp.floor(t) for t in terms]
  frac = sum(t - w for t, w in zip(terms, whole))
  return sum(w.astype(jnp.int32) for w in whole) + jnp.floor(frac + 0.5).astype(jnp.int32)


def to_fixed(coeffs: jax.Array) -> jax.Array:
  """AFFINE coefficients [B, 6] -> Pillow's 16.16 fixed-point ones [B, 6] int32: FIX of a, b, d, e and of the
  offsets at the first pixel's centre, c + a/2 + b/2 and f + d/2 + e/2."""
  a, b, c, d, e, f = (coeffs[:, i].astype(jnp.float32) for i in range(6))
  half, one = 32768.0, 65536.0
  return jnp.stack([_fix(one * a), _fix(one * b), _fix(one * c, half * a, half * b),
                    _fix(one * d), _fix(one * e), _fix(one * f, half * d, half * e)], axis=-1)


def affine_fixed(images: jax.Array, fixed: jax.Array) -> jax.Array:
  """Pillow's nearest-neighbour AFFINE in 16.16 fixed point (Geometry.c affine_fixed), fixed [B, 6] int32 from
  `to_fixed`: output pixel (x, y) takes input pixel ((a2 + x a0 + y a1) >> 16, (a5 + x a3 + y a4) >> 16), FILL
  where that is outside the image."""
  n, h, w, _ = images.shape
  a0, a1, a2, a3, a4, a5 = (fixed[:, i, None, None] for i in range(6))
  x = jnp.arange(w, dtype=jnp.int32)[None, None, :]
  y = jnp.arange(h, dtype=jnp.int32)[None, :, None]
  xin = jnp.right_shift(a2 + x * a0 + y * a1, 16)
  yin = jnp.right_shift(a5 + x * a3 + y * a4, 16)
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  idx = (jnp.clip(yin, 0, h - 1) * w + jnp.clip(xin, 0, w - 1)).reshape(n, -1, 1)
  out = jnp.take_along_axis(images.reshape(n, h * w, 3), idx, axis=1).reshape(images.shape)
  return jnp.where(inside[..., None], out, jnp.uint8(FILL))


def affine(images: jax.Array, coeffs: jax.Array) -> jax.Array:
  """Pillow's Image.transform(size, AFFINE, (a, b, c, d, e, f), NEAREST, fillcolor=FILL) of each image, coeffs
  [B, 6]: output pixel (x, y) takes the input pixel holding the point (a x' + b y' + c, d x' + e y' + f) of its
  centre (x', y') = (x + 0.5, y + 0.5), FILL where that is outside the image. Computed in Pillow's fixed point;
  Pillow takes a float64 path when b = d = 0, which gives the same pixels for translations by whole pixels."""
  return affine_fixed(images, to_fixed(coeffs))


def _coeffs(*columns: Any) -> jax.Array:
  """[B, 6] from six scalars or [B] arrays."""
  return jnp.stack(jnp.broadcast_arrays(*(jnp.asarray(x, jnp.float32) for x in columns)), axis=-1)


ROTATION_RANGE = 180  # rotate() takes whole degrees in [-180, 180]


@functools.cache
def _rotation_fixed(h: int, w: int) -> np.ndarray:
  """[2 * ROTATION_RANGE + 1, 6] int32: Pillow's fixed-point coefficients of Image.rotate(degrees) about (w/2, h/2)
  for each whole degree, computed in float64 exactly as Image.rotate and Geometry.c do."""
  def fix(v: float) -> int:
    return math.floor(v * 65536.0 + 0.5)

  rows = []
  for degrees in range(-ROTATION_RANGE, ROTATION_RANGE + 1):
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    c = a * -(w / 2) + b * -(h / 2) + 0.0 + w / 2
    f = d * -(w / 2) + e * -(h / 2) + 0.0 + h / 2
    rows.append([fix(a), fix(b), fix(c + a * 0.5 + b * 0.5), fix(d), fix(e), fix(f + d * 0.5 + e * 0.5)])
  return np.asarray(rows, np.int32)


def rotate_fixed(degrees: jax.Array, h: int, w: int) -> jax.Array:
  """Image.rotate(degrees) (counter-clockwise about the centre), whole degrees [B], as fixed-point coefficients."""
  return jnp.asarray(_rotation_fixed(h, w))[jnp.asarray(degrees, jnp.int32) + ROTATION_RANGE]


def shear_x_coeffs(level: jax.Array) -> jax.Array:
  return _coeffs(1, level, 0, 0, 1, 0)


def shear_y_coeffs(level: jax.Array) -> jax.Array:
  return _coeffs(1, 0, 0, level, 1, 0)


def translate_x_coeffs(pixels: jax.Array) -> jax.Array:
  return _coeffs(1, 0, pixels, 0, 1, 0)


def translate_y_coeffs(pixels: jax.Array) -> jax.Array:
  return _coeffs(1, 0, 0, 0, 1, pixels)


def rotate(images: jax.Array, degrees: jax.Array) -> jax.Array:
  """Image.rotate(degrees, NEAREST, fillcolor=FILL) of each image, whole degrees [B] in [-180, 180]."""
  return affine_fixed(images, rotate_fixed(degrees, images.shape[1], images.shape[2]))


@dataclasses.dataclass(frozen=True)
class Draw:
  """One operation per image [B]: its index in OPS, its level (uniform in [0.1, severity]) and its sign."""
  op: jax.Array
  level: jax.Array
  sign: jax.Array


def draw(key: jax.Array, n: int, severity: int) -> Draw:
  """Each of n images' operation, uniform over OPS, as the reference's sample_level and sign coin."""
  k_op, k_level, k_sign = jax.random.split(key, 3)
  return Draw(op=jax.random.randint(k_op, (n,), 0, len(OPS)),
              level=jax.random.uniform(k_level, (n,), jnp.float32, 0.1, severity),
              sign=jnp.where(jax.random.uniform(k_sign, (n,)) > 0.5, -1.0, 1.0))


def apply_ops(images: jax.Array, d: Draw) -> jax.Array:
  """Each image's drawn operation, its magnitude scaled from the level as the reference's int_parameter /
  float_parameter: posterize to 4 - int(level * 4 / 10) bits, solarize above 256 - int(level * 256 / 10),
  rotate by int(level * 30 / 10) degrees, shear by level * 0.3 / 10, translate by int(level * size / 3 / 10)
  pixels, the geometric ones by the drawn sign. Every operation is computed for every image and one kept: a
  lookup table and a fixed-point map per image, each the identity for the other kind of operation."""
  n, h, w, _ = images.shape

  def int_level(maxval: float) -> jax.Array:
    return jnp.floor(d.level * maxval / 10)

  hist = histogram(images)
  luts = jnp.stack([autocontrast_lut(hist), equalize_lut(hist),
                    jnp.broadcast_to(posterize_lut(4 - int_level(4)), hist.shape),
                    jnp.broadcast_to(solarize_lut(256 - int_level(256)), hist.shape),
                    jnp.broadcast_to(_VALUES, hist.shape)])  # [5, B, 3, 256]: COLOUR_OPS, then unchanged
  shear = d.sign * d.level * 0.3 / 10
  fixed = jnp.stack([to_fixed(_coeffs(1, 0, 0, 0, 1, 0) * jnp.ones((n, 1))),  # unchanged, then GEOMETRIC_OPS
                     rotate_fixed(d.sign * int_level(30), h, w),
                     to_fixed(shear_x_coeffs(shear)), to_fixed(shear_y_coeffs(shear)),
                     to_fixed(translate_x_coeffs(d.sign * int_level(w / 3))),
                     to_fixed(translate_y_coeffs(d.sign * int_level(h / 3)))])
  rows = jnp.arange(n)
  lut = luts[jnp.minimum(d.op, len(COLOUR_OPS)), rows]
  return affine_fixed(apply_lut(images, lut), fixed[jnp.maximum(d.op - len(COLOUR_OPS) + 1, 0), rows])


def chains(images: jax.Array, key: jax.Array, settings: Settings) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(chains [width, B, H, W, 3] uint8, chain weights [B, width] ~ Dirichlet(alpha), skip weight [B] ~
  Beta(alpha, alpha)): each chain `depth` random operations (depth -1: 1-3, drawn per chain and image)."""
  n = images.shape[0]
  k_w, k_m, k_depth, k_ops = jax.random.split(key, 4)
  weights = jax.random.dirichlet(k_w, jnp.full((settings.width,), settings.alpha, jnp.float32), (n,))
  skip = jax.random.beta(k_m, settings.alpha, settings.alpha, (n,))
  steps = settings.depth if settings.depth > 0 else MAX_DEPTH
  depth = (jnp.full((settings.width * n,), steps) if settings.depth > 0
           else jax.random.randint(k_depth, (settings.width * n,), 1, MAX_DEPTH + 1))
  x = jnp.broadcast_to(images, (settings.width, *images.shape)).reshape(-1, *images.shape[1:])
  for i in range(steps):
    stepped = apply_ops(x, draw(jax.random.fold_in(k_ops, i), x.shape[0], settings.severity))
    x = jnp.where((i < depth)[:, None, None, None], stepped, x)
  return x.reshape(settings.width, *images.shape), weights, skip


def mix(images: jax.Array, chain_images: jax.Array, weights: jax.Array, skip: jax.Array) -> jax.Array:
  """(1 - skip) * image + skip * sum_i weights_i * chain_i, rounded to uint8: a convex combination."""
  mixed = jnp.einsum("bk,kbhwc->bhwc", weights, chain_images.astype(jnp.float32))
  out = (1 - skip)[:, None, None, None] * images.astype(jnp.float32) + skip[:, None, None, None] * mixed
  return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def augmix(images: jax.Array, key: jax.Array, settings: Settings) -> jax.Array:
  """One AugMix copy of each image (uint8 in, uint8 out), every choice drawn from `key`."""
  return mix(images, *chains(images, key, settings))
