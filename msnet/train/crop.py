"""Random translation of uint8 image batches [B, H, W, 3] inside the jitted train step: zero-pad by `pad`
pixels on every side and crop back to H x W at an offset each image draws (torchvision's
RandomCrop(size, padding=pad), fill 0: the CIFAR ResNet recipes' augmentation, with the flip).

For clean records only (`stages.<name>.crop_pad`): a degraded record's JPEG blocks sit on the 8x8 grid the
test images keep, and a crop would move them; msnet's flips move none (msnet/data/loader.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def offsets(rng: jax.Array, n: int, pad: int) -> jax.Array:
  """[n, 2] (row, column) offsets into the padded images, each uniform in 0..2 pad."""
  return jax.random.randint(rng, (n, 2), 0, 2 * pad + 1)


def crop(images: jax.Array, at: jax.Array, pad: int) -> jax.Array:
  """Each image zero-padded by `pad` and cut back to its size at its offset `at` [B, 2]."""
  h, w, c = images.shape[1:]
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return jax.vmap(lambda x, o: jax.lax.dynamic_slice(x, (o[0], o[1], 0), (h, w, c)))(padded, at)


def random_crop(images: jax.Array, rng: jax.Array, pad: int) -> jax.Array:
  return crop(images, offsets(rng, images.shape[0], pad), pad)
