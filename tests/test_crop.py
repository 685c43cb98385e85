"""The random-translation augmentation (msnet/train/crop.py) against NumPy, and its place in the train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from msnet import config as config_lib
from msnet.train import crop, step as step_lib
from msnet.train.state import TrainState


def numpy_crop(images: np.ndarray, at: np.ndarray, pad: int) -> np.ndarray:
  """torchvision's RandomCrop(size, padding=pad) at given offsets: zero-pad, then slice."""
  h, w = images.shape[1:3]
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return np.stack([p[r:r + h, c:c + w] for p, (r, c) in zip(padded, at)])


def test_crop_equals_numpy_pad_and_slice_at_every_offset_including_the_corners():
  pad = 4
  images = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
  at = np.array([[0, 0], [0, 8], [8, 0], [8, 8], [4, 4], [1, 7], [7, 1], [3, 0], [2, 5]])
  got = np.asarray(crop.crop(jnp.asarray(images), jnp.asarray(at), pad))
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, numpy_crop(images, at, pad))
  np.testing.assert_array_equal(got[4], images[4])  # offset (pad, pad) is the image itself


def test_offsets_cover_zero_to_twice_the_pad_and_follow_the_key():
  at = np.asarray(crop.offsets(jax.random.key(1), 4000, 4))
  assert at.shape == (4000, 2) and at.min() == 0 and at.max() == 8
  assert set(np.unique(at[:, 0])) == set(range(9)) == set(np.unique(at[:, 1]))
  np.testing.assert_array_equal(at, np.asarray(crop.offsets(jax.random.key(1), 4000, 4)))
  assert not np.array_equal(at, np.asarray(crop.offsets(jax.random.key(2), 4000, 4)))


def _linear_step(crop_pad: int):
  """The real train step around a linear classifier on the raw pixels, whose loss shows which images it saw."""
  def apply(params, model_state, images, train, rng):
    del train, rng
    return images.reshape(images.shape[0], -1).astype(jnp.float32) @ params["w"] / 255.0, model_state
  tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
  params = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(8 * 8 * 3, 5)), jnp.float32)}
  step = step_lib._train_step(apply, tx, schedule, {"w": True}, jax.random.key(7), "ce", 0.0, 0.0, None, crop_pad)
  state = TrainState(step=jnp.asarray(5), params=params, opt_state=tx.init(params), model_state={})
  return apply, params, state, step


def test_the_step_trains_on_images_cropped_by_its_own_key_folded_from_the_steps():
  images = np.random.default_rng(4).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  labels = np.arange(6) % 5
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  apply, params, state, step = _linear_step(crop_pad=2)
  _, metrics = jax.jit(step)(state, batch)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 5), step_lib.CROP_STREAM)
  seen = numpy_crop(images, np.asarray(crop.offsets(key, 6, 2)), 2)
  logits, _ = apply(params, {}, jnp.asarray(seen), True, None)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()
  assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-5)
  _, _, state0, step0 = _linear_step(crop_pad=0)
  logits0, _ = apply(params, {}, jnp.asarray(images), True, None)
  want0 = optax.softmax_cross_entropy_with_integer_labels(logits0, jnp.asarray(labels)).mean()
  assert float(jax.jit(step0)(state0, batch)[1]["loss"]) == pytest.approx(float(want0), rel=1e-5)
  assert float(want) != pytest.approx(float(want0), rel=1e-3)  # the crop changed what the step saw


@pytest.mark.parametrize("value", [-1, 32])  # a float is refused by the ConfigDict itself
def test_bad_crop_pad_is_refused_naming_the_field(value):
  c = config_lib.base_config()
  c.stages.baseline.crop_pad = value
  with pytest.raises(config_lib.ConfigError, match=r"config\.stages\.baseline\.crop_pad: must be an integer"):
    config_lib.validate(c)
