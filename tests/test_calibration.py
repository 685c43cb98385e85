"""Temperature scaling and the ECE against brute-force float64 references; the calibrate stage's fit on
synthetic logits whose true temperatures are known."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from msnet import calibration, config as config_lib, decision
from msnet.train import calibrate


def _softmax(z: np.ndarray) -> np.ndarray:
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, t: float, w: np.ndarray) -> float:
  p = _softmax(logits / t)[np.arange(len(labels)), labels]
  return float(np.sum(w * -np.log(p)) / w.sum())


def _sample(rng: np.random.Generator, n: int, c: int, true_t: float, scale: float = 3.0
            ) -> tuple[np.ndarray, np.ndarray]:
  """Logits and labels drawn from softmax(logits / true_t): the NLL-optimal temperature is near true_t."""
  logits = scale * rng.standard_normal((n, c))
  p = _softmax(logits / true_t)
  labels = np.array([rng.choice(c, p=row) for row in p])
  return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_is_the_nll_minimum(true_t: float) -> None:
  rng = np.random.default_rng(0)
  logits, labels = _sample(rng, 4000, 10, true_t)
  w = rng.uniform(0.5, 2.0, len(labels))
  t = calibration.fit_temperature(logits, labels, w)
  grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
  best = grid[np.argmin([_nll(logits, labels, g, w) for g in grid])]
  assert t == pytest.approx(best, rel=2e-3)
  assert _nll(logits, labels, t, w) <= min(_nll(logits, labels, t * f, w) for f in (0.99, 1.01))
  assert t == pytest.approx(true_t, rel=0.15)  # the sample's optimum is near the generating temperature


def test_fit_temperature_refuses_bad_input() -> None:
  with pytest.raises(ValueError, match=r"\[N, C\]"):
    calibration.fit_temperature(np.zeros((4, 3)), np.zeros(5, int))
  with pytest.raises(ValueError, match="no examples"):
    calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, int))


def test_fit_temperature_of_a_chance_network_is_bounded() -> None:
  """Labels independent of the logits: the best softmax is flat, T grows to its cap instead of diverging."""
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2000, 5))
  labels = np.tile(np.arange(5), 400)
  t = calibration.fit_temperature(logits, labels)
  assert np.isfinite(t) and t > 5


def test_histogram_and_ece_match_a_loop() -> None:
  rng = np.random.default_rng(2)
  probs = _softmax(2 * rng.standard_normal((500, 10)))
  probs[0] = 0.1  # a tie row: confidence 0.1, argmax index 0
  labels = rng.integers(0, 10, 500)
  hist = calibration.histogram(probs, labels, 15)
  conf, pred = probs.max(1), probs.argmax(1)
  expected = 0.0
  for i in range(15):
    lo, hi = i / 15, (i + 1) / 15
    sel = (conf > lo) & (conf <= hi)
    assert hist["count"][i] == sel.sum()
    if sel.any():
      expected += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
  assert calibration.ece(hist) == pytest.approx(expected)
  # Rows that do not sum to one (AMS) are normalised: scaling a row changes nothing.
  scaled = calibration.histogram(3 * probs, labels, 15)
  # Merging the histograms of two halves is the histogram of the whole.
  halves = [calibration.histogram(probs[:200], labels[:200], 15), calibration.histogram(probs[200:], labels[200:], 15)]
  merged = calibration.merge(halves)
  for key in ("count", "correct", "confidence"):
    np.testing.assert_allclose(scaled[key], hist[key])
    np.testing.assert_allclose(merged[key], hist[key])
  assert np.isnan(calibration.ece({"count": [0.0], "correct": [0.0], "confidence": [0.0]}))


def test_confidence_on_a_bin_edge_goes_to_the_lower_bin() -> None:
  assert calibration.confidence_bin(np.array([1 / 15, 2 / 15 + 1e-9, 1.0, 0.0]), 15).tolist() == [0, 2, 14, 0]


def test_temper_keeps_top1_and_checks_shapes() -> None:
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((3, 8, 10)), jnp.float32)
  t = jnp.asarray([0.5, 1.0, 4.0])
  out = np.asarray(decision.temper(logits, t))
  np.testing.assert_allclose(out, np.asarray(logits) / np.array([0.5, 1.0, 4.0])[:, None, None], rtol=1e-6)
  assert (out.argmax(-1) == np.asarray(logits).argmax(-1)).all()
  with pytest.raises(ValueError, match="temperatures must be"):
    decision.temper(logits, jnp.ones(2))


def test_calibrate_fit_recovers_each_branch_temperature() -> None:
  """The stage's fit over hold-out specs: one temperature per branch, the master's, and lower ECE after."""
  c = config_lib.base_config()
  config_lib.cifar_jp2k(c)
  rng = np.random.default_rng(4)
  logits = {}
  for spec, b in (("clean", 0), ("jpeg:10", 1), ("jpeg:20", 1), ("jp2k:16", 2)):
    n = 1500
    z0, labels = _sample(rng, n, 10, 0.5)   # branch 0 is over-confident by a factor 2: T = 0.5
    branch = np.stack([z0] + [3.0 * rng.standard_normal((n, 10)) for _ in range(2)], axis=1)
    branch[np.arange(n), 1, labels] += 4.0  # branches 1 and 2: informative, with their own scales
    branch[np.arange(n), 2, labels] += 1.0
    logits[spec] = {"branch": branch.astype(np.float32), "master": (3.0 * rng.standard_normal((n, 3))).astype(np.float32),
                    "label": labels, "bin": np.full(n, b)}
  out = calibrate.fit(c, logits)
  assert len(out["temperatures"]) == 3 and out["temperatures"][0] == pytest.approx(0.5, rel=0.2)
  for k, entry in enumerate(out["branches"]):
    stacked = np.concatenate([v["branch"][:, k] for v in logits.values()]).astype(np.float64)
    labels = np.concatenate([v["label"] for v in logits.values()])
    # Bins equally weighted, and the two specs of the JPEG bin equally within it.
    weights = np.concatenate([np.full(len(v["label"]), w / len(v["label"]))
                              for v, w in zip(logits.values(), (1.0, 0.5, 0.5, 1.0))])
    assert entry["temperature"] == pytest.approx(calibration.fit_temperature(stacked, labels, weights), rel=1e-6)
    assert entry["nll_all_bins_calibrated"] <= entry["nll_all_bins_raw"] + 1e-9
    # Its own-bin temperature: the fit on its bin's records alone, with the same within-bin weights.
    sel = np.concatenate([np.full(len(v["label"]), b == k) for v, b in zip(logits.values(), (0, 1, 1, 2))])
    assert entry["own_bin_temperature"] == pytest.approx(
        calibration.fit_temperature(stacked[sel], labels[sel], weights[sel]), rel=1e-6)
    assert entry["nll_own_bin_own_bin_t"] <= entry["nll_own_bin_calibrated"] + 1e-9
  assert out["master_nll_calibrated"] <= out["master_nll_raw"] + 1e-9
  assert out["records"] == {"clean": 1500, "jpeg:10": 1500, "jpeg:20": 1500, "jp2k:16": 1500}
  json.dumps(out)  # the stage's DONE.json


def test_max_examples_per_spec_takes_a_prefix_of_the_holdout() -> None:
  class Source:
    def __len__(self):
      return 10

    def __getitem__(self, i):
      return {"i": i}

    def read(self, i):
      return bytes([i])

  prefix = calibrate._Prefix(Source(), 4)
  assert len(prefix) == 4 and prefix[3] == {"i": 3} and prefix.read(2) == b"\x02"
  with pytest.raises(IndexError):
    prefix[4]
  with pytest.raises(IndexError):
    prefix.read(4)
  assert len(calibrate._Prefix(Source(), 50)) == 10
