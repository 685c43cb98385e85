"""AugMix's operations against Pillow on the same images (the reference AugMix code applies Pillow's), its
random mixing (deterministic, a convex combination, uint8, jit), the Jensen-Shannon loss against NumPy, and the
stage's config and loss name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image, ImageOps

from msnet import config as config_lib
from msnet.train import augmix, losses, optim, stages, state as state_lib, step as step_lib
from tests.test_degradations import cifar_images

FILL = (augmix.FILL,) * 3


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  return np.stack(cifar_images(32))


def narrow_range_images() -> np.ndarray:
  """Images whose channels span narrow [lo, hi] ranges, so that autocontrast meets every kind of stretch,
  including the (lo, hi) where Pillow's float64 lowers a value by one (lo=0, hi=25: 25 -> 254)."""
  rng = np.random.RandomState(0)
  lo = rng.randint(0, 200, (64, 1, 1, 3))
  hi = lo + rng.randint(1, 56, (64, 1, 1, 3))
  lo[0], hi[0] = 0, 25
  x = rng.randint(0, 1 << 16, (64, 32, 32, 3)) % (hi - lo + 1) + lo
  x[:, 0, 0], x[:, 0, 1] = lo[:, 0, 0], hi[:, 0, 0]  # both ends present
  return x.astype(np.uint8)


def pillow(images: np.ndarray, op) -> np.ndarray:
  return np.stack([np.asarray(op(Image.fromarray(x))) for x in images])


def pillow_affine(coeffs: tuple[float, ...]):
  return lambda im: im.transform(im.size, Image.Transform.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=FILL)


def batch(value: float, n: int) -> jax.Array:
  return jnp.full((n,), value)


@pytest.mark.parametrize("name", ["autocontrast", "equalize"])
def test_histogram_ops_equal_pillow(images: np.ndarray, name: str) -> None:
  for x in (images, narrow_range_images()):
    got = np.asarray(getattr(augmix, name)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, pillow(x, getattr(ImageOps, name)))


def test_autocontrast_keeps_pillow_float64_rounding() -> None:
  """Pillow maps the top of [0, 25] to 254, not 255 (int(25 * 10.2) in float64 is 254): so does msnet's."""
  x = np.zeros((1, 2, 2, 3), np.uint8)
  x[0, 0, 0] = 25
  assert np.asarray(augmix.autocontrast(jnp.asarray(x)))[0, 0, 0].tolist() == [254] * 3
  assert np.asarray(ImageOps.autocontrast(Image.fromarray(x[0])))[0, 0].tolist() == [254] * 3


def test_equalize_clips_its_top_value_as_pillow() -> None:
  """511 pixels below the top value make Pillow's step 2 and its map of the top value 256, clipped to 255."""
  v = np.concatenate([np.arange(511) % 255, np.full(1024 - 511, 255)])
  x = np.repeat(v.reshape(1, 32, 32, 1), 3, axis=-1).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(augmix.equalize(jnp.asarray(x))), pillow(x, ImageOps.equalize))
  assert np.asarray(augmix.equalize(jnp.asarray(x)))[0, -1, -1].tolist() == [255] * 3


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_posterize_equals_pillow(images: np.ndarray, bits: int) -> None:
  got = np.asarray(augmix.posterize(jnp.asarray(images), batch(bits, len(images))))
  np.testing.assert_array_equal(got, pillow(images, lambda im: ImageOps.posterize(im, bits)))


@pytest.mark.parametrize("threshold", [0, 1, 128, 180, 254, 256])
def test_solarize_equals_pillow(images: np.ndarray, threshold: int) -> None:
  got = np.asarray(augmix.solarize(jnp.asarray(images), batch(threshold, len(images))))
  np.testing.assert_array_equal(got, pillow(images, lambda im: ImageOps.solarize(im, threshold)))


@pytest.mark.parametrize("degrees", [-29, -8, -7, -4, -3, 0, 1, 4, 5, 7, 8, 15, 29])
def test_rotate_equals_pillow(images: np.ndarray, degrees: int) -> None:
  """Bit-exact: Pillow's nearest-neighbour rotation runs in 16.16 fixed point from float64 coefficients, which
  msnet tabulates per whole degree (a float32 map instead differs at 4 and 7 degrees, where a pixel centre lands
  3e-5 pixel from an edge)."""
  got = np.asarray(augmix.rotate(jnp.asarray(images), batch(degrees, len(images))))
  ref = pillow(images, lambda im: im.rotate(degrees, resample=Image.NEAREST, fillcolor=FILL))
  np.testing.assert_array_equal(got, ref)
  if degrees:
    assert (got == augmix.FILL).all(-1).any()  # the corners come from outside


@pytest.mark.parametrize("level", [-0.09, -0.031, 0.0271, 0.0871])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_shear_equals_pillow(images: np.ndarray, level: float, axis: str) -> None:
  coeffs = (1, level, 0, 0, 1, 0) if axis == "x" else (1, 0, 0, level, 1, 0)
  fn = augmix.shear_x_coeffs if axis == "x" else augmix.shear_y_coeffs
  got = np.asarray(augmix.affine(jnp.asarray(images), fn(batch(level, len(images)))))
  np.testing.assert_array_equal(got, pillow(images, pillow_affine(coeffs)))


@pytest.mark.parametrize("pixels", [-10, -3, -1, 1, 2, 3])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_translate_equals_pillow(images: np.ndarray, pixels: int, axis: str) -> None:
  coeffs = (1, 0, pixels, 0, 1, 0) if axis == "x" else (1, 0, 0, 0, 1, pixels)
  fn = augmix.translate_x_coeffs if axis == "x" else augmix.translate_y_coeffs
  got = np.asarray(augmix.affine(jnp.asarray(images), fn(batch(pixels, len(images)))))
  np.testing.assert_array_equal(got, pillow(images, pillow_affine(coeffs)))


def test_one_batch_takes_each_image_its_own_parameters(images: np.ndarray) -> None:
  """Every whole degree AugMix draws at any severity (|degrees| <= 29), and random float32 shears."""
  rng = np.random.RandomState(1)
  x = np.concatenate([images, images])[:59]
  degrees = np.arange(59) - 29
  levels = rng.uniform(-0.3, 0.3, 59).astype(np.float32)
  rotated = np.asarray(augmix.rotate(jnp.asarray(x), jnp.asarray(degrees)))
  sheared = np.asarray(augmix.affine(jnp.asarray(x), augmix.shear_x_coeffs(jnp.asarray(levels))))
  for i in range(59):
    im = Image.fromarray(x[i])
    ref = im.rotate(int(degrees[i]), resample=Image.NEAREST, fillcolor=FILL)
    np.testing.assert_array_equal(rotated[i], np.asarray(ref), err_msg=f"image {i}, {degrees[i]} degrees")
    np.testing.assert_array_equal(sheared[i], np.asarray(pillow_affine((1, float(levels[i]), 0, 0, 1, 0))(im)),
                                  err_msg=f"image {i}, shear {levels[i]}")


def test_augmix_is_deterministic_uint8_and_jits(images: np.ndarray) -> None:
  settings = augmix.Settings()
  x = jnp.asarray(images)
  fn = jax.jit(lambda x, k: augmix.augmix(x, k, settings))
  a, b, c = fn(x, jax.random.key(0)), fn(x, jax.random.key(0)), fn(x, jax.random.key(1))
  assert a.dtype == jnp.uint8 and a.shape == x.shape
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(augmix.augmix(x, jax.random.key(0), settings)))
  differ = (np.asarray(a) != np.asarray(c)).reshape(len(images), -1).any(-1)
  assert differ.all()  # another key: every image changes
  assert (np.asarray(a) != images).reshape(len(images), -1).any(-1).mean() > 0.9


@pytest.mark.parametrize("depth", [-1, 2])
def test_the_mix_is_a_convex_combination(images: np.ndarray, depth: int) -> None:
  settings = augmix.Settings(width=4, depth=depth, alpha=0.5)
  x = jnp.asarray(images)
  chains, weights, skip = augmix.chains(x, jax.random.key(3), settings)
  assert chains.shape == (4, *x.shape) and chains.dtype == jnp.uint8
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1, rtol=1e-5)
  assert ((np.asarray(skip) >= 0) & (np.asarray(skip) <= 1)).all()
  mixed = np.asarray(augmix.mix(x, chains, weights, skip))
  inputs = np.concatenate([images[None], np.asarray(chains)])
  assert (mixed >= inputs.min(0)).all() and (mixed <= inputs.max(0)).all()
  np.testing.assert_array_equal(mixed, np.asarray(augmix.augmix(x, jax.random.key(3), settings)))
  ones = jnp.ones(len(images))
  np.testing.assert_array_equal(np.asarray(augmix.mix(x, chains, weights, 0 * ones)), images)
  first = jax.nn.one_hot(jnp.zeros(len(images), jnp.int32), 4)
  np.testing.assert_array_equal(np.asarray(augmix.mix(x, chains, first, ones)), np.asarray(chains[0]))


def test_js_loss_matches_numpy() -> None:
  rng = np.random.RandomState(0)
  clean, aug1, aug2 = (rng.randn(6, 10).astype(np.float32) * 3 for _ in range(3))
  labels = rng.randint(0, 10, 6)
  lam = 12.0

  def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)

  p = [softmax(z) for z in (clean, aug1, aug2)]
  m = sum(p) / 3
  js = np.mean([(q * np.log(q / m)).sum(-1).mean() for q in p])
  ce = -np.log(p[0][np.arange(6), labels]).mean()
  got = float(losses.augmix_loss(*(jnp.asarray(z) for z in (clean, aug1, aug2)), jnp.asarray(labels), lam))
  np.testing.assert_allclose(got, ce + lam * js, rtol=1e-5)
  same = jnp.asarray(clean)
  assert float(losses.js_divergence(same, same, same)) == pytest.approx(0, abs=1e-6)


def test_stage_settings_reach_the_step_and_are_validated(tmp_path) -> None:
  c = config_lib.base_config()
  assert "augmix" in config_lib.COMPARISON_STAGES and "augmix" not in c.comparisons  # added by name
  c.stages.augmix.severity, c.stages.augmix.js_lambda = 5, 6.0
  (tmp_path / "train" / "baseline").mkdir(parents=True)
  (tmp_path / "train" / "baseline" / "DONE.json").write_text("{}")
  job = stages.make_job(c, tmp_path, "augmix")
  assert job.loss == "augmix" and job.mixing == augmix.Settings(severity=5, js_lambda=6.0)
  assert job.train_specs == ["clean"] and job.trainable == (".*",)
  for field, value in [("severity", 0), ("severity", 11), ("width", 0), ("depth", 0), ("alpha", 0.0),
                       ("js_lambda", -1.0)]:
    bad = config_lib.base_config()
    bad.stages.augmix[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.stages.augmix.{field}: "):
      config_lib.validate(bad)


def test_the_train_step_draws_from_the_stage_key_and_the_step() -> None:
  """The AugMix step is a function of (state, batch, stage key): the same inputs give the same params (a resumed
  run repeats an uninterrupted one), and another step count draws other copies."""
  def apply(params, model_state, images, train, rng):
    del train, rng
    return jnp.mean(images.astype(jnp.float32) / 255, axis=(1, 2)) @ params["w"], model_state

  params = {"w": jnp.asarray(np.random.RandomState(0).randn(3, 4), jnp.float32)}
  tx = optax.sgd(0.5)
  step = jax.jit(step_lib._train_step(apply, tx, optax.constant_schedule(0.5), optim.trainable_mask(params, (".*",)),
                                      jax.random.key(7), "augmix", 0.0, 0.0, augmix.Settings()))
  images = np.stack(cifar_images(8))
  batch = {"image": jnp.asarray(images), "label": jnp.arange(8) % 4}
  state = state_lib.TrainState(step=jnp.asarray(0), params=params, opt_state=tx.init(params))
  (a, ma), (b, mb) = step(state, batch), step(state, batch)
  np.testing.assert_array_equal(np.asarray(a.params["w"]), np.asarray(b.params["w"]))
  _, ml = step(state.replace(step=jnp.asarray(5)), batch)
  assert float(ma["loss"]) == float(mb["loss"]) != float(ml["loss"])
  assert int(a.step) == 1 and np.isfinite(float(ma["loss"]))
  with pytest.raises(ValueError, match="loss 'nope'"):
    step_lib._train_step(apply, tx, optax.constant_schedule(0.5), None, jax.random.key(0), "nope", 0.0, 0.0, None)
  with pytest.raises(ValueError, match="needs augmix.Settings"):
    step_lib._train_step(apply, tx, optax.constant_schedule(0.5), None, jax.random.key(0), "augmix", 0.0, 0.0, None)


def test_each_drawn_operation_is_pillows_at_the_reference_magnitude(images: np.ndarray) -> None:
  """The draws of a step, applied, equal the reference code's Pillow calls at the magnitudes its int_parameter /
  float_parameter give (computed here in float64 from the drawn float32 level), image by image."""
  x = np.concatenate([images] * 8)
  d = augmix.draw(jax.random.key(11), len(x), 3)
  got = np.asarray(augmix.apply_ops(jnp.asarray(x), d))
  ops, levels, signs = np.asarray(d.op), np.asarray(d.level).astype(np.float64), np.asarray(d.sign)
  assert set(ops) == set(range(len(augmix.OPS)))
  size = x.shape[1]
  for i, im in enumerate(map(Image.fromarray, x)):
    name, level, sign = augmix.OPS[ops[i]], levels[i], int(signs[i])
    shear = float(np.float32(sign) * np.float32(levels[i]) * np.float32(0.3) / np.float32(10))  # as drawn
    ref = {
        "autocontrast": lambda: ImageOps.autocontrast(im),
        "equalize": lambda: ImageOps.equalize(im),
        "posterize": lambda: ImageOps.posterize(im, 4 - int(level * 4 / 10)),
        "solarize": lambda: ImageOps.solarize(im, 256 - int(level * 256 / 10)),
        "rotate": lambda: im.rotate(sign * int(level * 30 / 10), resample=Image.NEAREST, fillcolor=FILL),
        "shear_x": lambda: pillow_affine((1, shear, 0, 0, 1, 0))(im),
        "shear_y": lambda: pillow_affine((1, 0, 0, shear, 1, 0))(im),
        "translate_x": lambda: pillow_affine((1, 0, sign * int(level * size / 3 / 10), 0, 1, 0))(im),
        "translate_y": lambda: pillow_affine((1, 0, 0, 0, 1, sign * int(level * size / 3 / 10)))(im),
    }
    np.testing.assert_array_equal(got[i], np.asarray(ref[name]()), err_msg=f"image {i}: {name} at {level}")
