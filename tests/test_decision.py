"""Decision rules against NumPy references, ties included."""

import jax
import numpy as np
import pytest

from msnet import decision


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def ref_ms(bl, ml):
  k = np.argmax(np_softmax(ml), axis=-1)
  return np_softmax(bl)[k, np.arange(bl.shape[1])]


def ref_ams(bl):
  return np_softmax(bl).max(0)


def ref_map(bl, ml):
  p, q = np_softmax(ml), np_softmax(bl)
  return sum(p[:, k, None] * q[k] for k in range(bl.shape[0]))


def ref_oracle(bl, bins):
  return np_softmax(bl)[bins, np.arange(bl.shape[1])]


def random_case(seed, k=3, b=16, c=10):
  rng = np.random.default_rng(seed)
  bl = (rng.normal(size=(k, b, c)) * 3).astype(np.float32)
  ml = (rng.normal(size=(b, k)) * 2).astype(np.float32)
  bins = rng.integers(0, k, size=b)
  return bl, ml, bins


@pytest.mark.parametrize("seed", [0, 1])
def test_rules_match_numpy(seed):
  bl, ml, bins = random_case(seed)
  np.testing.assert_allclose(decision.ms(bl, ml), ref_ms(bl, ml), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(decision.ams(bl), ref_ams(bl), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(decision.map_rule(bl, ml), ref_map(bl, ml), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(decision.oracle(bl, bins), ref_oracle(bl, bins), rtol=1e-5, atol=1e-6)
  for out in (decision.ms(bl, ml), decision.ams(bl), decision.map_rule(bl, ml), decision.oracle(bl, bins)):
    assert out.shape == (16, 10) and out.dtype == np.float32
  np.testing.assert_allclose(np.asarray(decision.map_rule(bl, ml)).sum(-1), 1.0, rtol=1e-5)


def test_ties():
  bl, ml, _ = random_case(2, k=4, b=6)
  # Equal master logits everywhere: MS takes branch 0, like np.argmax; partial ties take the lowest index.
  ml[:] = 0.0
  ml[1, 2] = ml[1, 3] = 5.0
  ml[2, 1] = ml[2, 3] = 5.0
  out = np.asarray(decision.ms(bl, ml))
  np.testing.assert_allclose(out, ref_ms(bl, ml), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[0], np_softmax(bl[0, 0]), rtol=1e-5)
  np.testing.assert_allclose(out[1], np_softmax(bl[2, 1]), rtol=1e-5)
  np.testing.assert_allclose(out[2], np_softmax(bl[1, 2]), rtol=1e-5)
  # Uniform master: MAP is the mean of the branches.
  np.testing.assert_allclose(decision.map_rule(bl, ml)[0], np_softmax(bl[:, 0]).mean(0), rtol=1e-5)
  # Identical branches: every rule returns that branch's probabilities (AMS raw max == the branch).
  same = np.repeat(bl[:1], 4, axis=0)
  p = np_softmax(same[0])
  for out in (decision.ms(same, ml), decision.ams(same), decision.map_rule(same, ml),
              decision.oracle(same, np.array([0, 1, 2, 3, 3, 1]))):
    np.testing.assert_allclose(out, p, rtol=1e-5, atol=1e-6)
  # Tied class logits inside a branch: AMS keeps both tied maxima.
  tied = np.zeros((2, 1, 3), np.float32)
  tied[1, 0] = [2.0, 2.0, 0.0]
  np.testing.assert_allclose(decision.ams(tied), ref_ams(tied), rtol=1e-6)
  assert np.argmax(decision.ams(tied)[0]) == 0


def test_oracle_out_of_range_is_nan_and_shapes_are_checked():
  bl, ml, _ = random_case(3, k=3, b=4)
  out = np.asarray(decision.oracle(bl, np.array([0, 3, -1, 2])))
  assert np.isnan(out[1]).all() and np.isnan(out[2]).all() and np.isfinite(out[[0, 3]]).all()
  with pytest.raises(ValueError, match="master_logits"):
    decision.ms(bl, ml[:, :2])
  with pytest.raises(ValueError, match="bins"):
    decision.oracle(bl, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="branch_logits"):
    decision.ams(bl[0])


def test_rules_are_jitted():
  for rule in (decision.ms, decision.ams, decision.map_rule, decision.oracle):
    assert hasattr(rule, "lower"), rule
  bl, ml, bins = random_case(4)
  jax.jit(lambda b, m: decision.ms(b, m))(bl, ml).block_until_ready()
