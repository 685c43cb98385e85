"""The report's paired bootstrap against brute force and closed forms on small synthetic per-image results."""

from __future__ import annotations

import itertools
import math
import pathlib

import numpy as np
import pytest

from msnet.evaluate import results as eval_results
from msnet.report import stats

BASE_C, BASE_D, MS_D = ("baseline", "clean"), ("baseline", "jpeg:10"), ("ms", "jpeg:10")


def _bits(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
  """Exactly k of n images correct, at random positions."""
  out = np.zeros(n, bool)
  out[rng.choice(n, k, replace=False)] = True
  return out


def test_resampled_accuracies_equal_direct_indexing() -> None:
  rng = np.random.default_rng(0)
  n = 37
  cells = {BASE_C: rng.random(n) < 0.8, BASE_D: rng.random(n) < 0.5, MS_D: rng.random(n) < 0.6}
  boot = stats.paired_bootstrap(cells, resamples=300, seed=5)
  idx = np.concatenate(list(stats.resample_indices(n, 300, 5)))
  assert idx.shape == (300, n)
  for key, bits in cells.items():
    # The same draw for every cell (paired), each resample's accuracy = the mean over its drawn images.
    np.testing.assert_allclose(boot.samples[key], bits[idx].mean(axis=1), rtol=0, atol=1e-12)
    assert boot.point[key] == pytest.approx(bits.mean())


def test_distribution_matches_exhaustive_enumeration() -> None:
  # n = 5: all 5^5 = 3125 equally likely resamples enumerated; the bootstrap's distribution of a paired
  # difference must match that exact distribution (CDF within sampling error of 20,000 resamples, sd ~ 0.0035).
  a = np.array([1, 1, 0, 1, 0], bool)
  b = np.array([1, 0, 0, 0, 1], bool)
  exact = np.array([a[list(t)].mean() - b[list(t)].mean() for t in itertools.product(range(5), repeat=5)])
  boot = stats.paired_bootstrap({("a", "s"): a, ("b", "s"): b}, resamples=20000, seed=1)
  diff = boot.samples[("a", "s")] - boot.samples[("b", "s")]
  for x in np.unique(exact):
    assert np.mean(diff <= x + 1e-9) == pytest.approx(np.mean(exact <= x + 1e-9), abs=0.015), x
  ci = boot.interval(lambda acc: acc[("a", "s")] - acc[("b", "s")])
  assert ci["point"] == pytest.approx(0.2)
  # The interval's ends are the exact distribution's 2.5th / 97.5th percentiles, up to one atom (0.2 apart).
  assert abs(ci["lo"] - np.quantile(exact, 0.025, method="lower")) <= 0.2 + 1e-9
  assert abs(ci["hi"] - np.quantile(exact, 0.975, method="higher")) <= 0.2 + 1e-9


def test_paired_variance_matches_closed_form() -> None:
  # Resampling images: var of a mean of n iid draws from the empirical distribution = pop. variance / n.
  # For a paired difference that is the variance of the per-image differences, far below the unpaired
  # var(a) + var(b) when the two methods tend to be right on the same images.
  rng = np.random.default_rng(2)
  n = 400
  a = rng.random(n) < 0.6
  b = a.copy()
  b[rng.choice(n, 40, replace=False)] ^= True  # b differs from a on 10% of the images
  boot = stats.paired_bootstrap({("a", "s"): a, ("b", "s"): b}, resamples=20000, seed=3)
  diff = boot.samples[("a", "s")] - boot.samples[("b", "s")]
  x = a.astype(float) - b.astype(float)
  assert np.var(diff) == pytest.approx(np.var(x) / n, rel=0.05)
  assert np.var(boot.samples[("a", "s")]) == pytest.approx(a.mean() * (1 - a.mean()) / n, rel=0.05)
  assert np.var(diff) < 0.5 * (np.var(a) + np.var(b)) / n


def test_interval_coverage_level_and_ordering() -> None:
  rng = np.random.default_rng(4)
  cells = {("a", "s"): rng.random(500) < 0.7}
  wide = stats.paired_bootstrap(cells, resamples=4000, seed=0, level=0.99).interval(lambda acc: acc[("a", "s")])
  narrow = stats.paired_bootstrap(cells, resamples=4000, seed=0, level=0.8).interval(lambda acc: acc[("a", "s")])
  assert wide["lo"] < narrow["lo"] <= narrow["point"] <= narrow["hi"] < wide["hi"]
  # Close to the normal approximation p +- 1.96 sqrt(p (1 - p) / n) at this n.
  p = cells[("a", "s")].mean()
  ci = stats.paired_bootstrap(cells, resamples=4000, seed=0).interval(lambda acc: acc[("a", "s")])
  half = 1.959964 * math.sqrt(p * (1 - p) / 500)
  assert ci["lo"] == pytest.approx(p - half, abs=0.006) and ci["hi"] == pytest.approx(p + half, abs=0.006)


def test_pct_change_ci_point_and_undefined_resamples() -> None:
  rng = np.random.default_rng(6)
  n = 1000
  cells = {BASE_C: _bits(n, 800, rng), BASE_D: _bits(n, 400, rng), MS_D: _bits(n, 500, rng)}
  ci = stats.pct_change_ci(cells, "ms")
  assert ci["point"] == pytest.approx(100 * (0.5 - 0.4) / (0.8 - 0.4))
  assert ci["lo"] < ci["point"] < ci["hi"] and ci["undefined"] == 0.0 and ci["n"] == n
  assert stats.decide(ci) == "holds"

  # c - d = 1 point at n = 200: the baseline's clean and JPEG-10 accuracies swap in many resamples, where
  # % change is undefined; they count against both ends, so the interval is unbounded and nothing is decided.
  n = 200
  cells = {BASE_C: _bits(n, 101, rng), BASE_D: _bits(n, 99, rng), MS_D: _bits(n, 150, rng)}
  ci = stats.pct_change_ci(cells, "ms", resamples=1000)
  assert ci["undefined"] > 0.025
  assert (ci["lo"], ci["hi"]) == (-math.inf, math.inf)
  assert stats.decide(ci) == "undecided"

  assert math.isnan(stats.pct_change(0.5, 0.5, 0.7)) and math.isnan(stats.pct_change(0.4, 0.5, 0.7))
  assert stats.pct_change(70.2, 61.2, 66.7) == pytest.approx(61.1, abs=0.05)  # the paper's MS row


def test_claim_verdicts_from_intervals() -> None:
  rng = np.random.default_rng(7)

  def verdict(n: int, k_ms: int, k_da: int) -> str:
    cells = {("ms", "s"): _bits(n, k_ms, rng), ("da", "s"): _bits(n, k_da, rng)}
    return stats.decide(stats.paired_bootstrap(cells, resamples=2000).interval(
        lambda acc: acc[("ms", "s")] - acc[("da", "s")]))

  assert verdict(100, 52, 50) == "undecided"  # 2 points apart at n = 100: the interval straddles 0
  assert verdict(10000, 6000, 5000) == "holds"
  assert verdict(10000, 5000, 6000) == "fails"
  assert stats.combine(["holds", "holds"]) == "holds"
  assert stats.combine(["holds", "undecided"]) == "undecided"
  assert stats.combine(["undecided", "fails"]) == "fails"
  assert stats.combine([]) == "undecided"
  # No resamples (no per-image results): a point estimate alone decides nothing.
  none = stats.Bootstrap(point={("a", "s"): 0.9}, samples={}, n=0, resamples=0, seed=0, level=0.95)
  assert stats.decide(none.interval(lambda acc: acc[("a", "s")])) == "undecided"


def test_pooled_runs_resample_images_jointly() -> None:
  rng = np.random.default_rng(8)
  n = 300
  runs = [{("a", "s"): rng.random(n) < 0.7, ("b", "s"): rng.random(n) < 0.5} for _ in range(3)]
  pooled = stats.pool_runs(runs)
  np.testing.assert_array_equal(pooled[("a", "s")], sum(r[("a", "s")].astype(int) for r in runs))
  boot = stats.paired_bootstrap(pooled, resamples=500, seed=9, runs=3)
  assert boot.point[("a", "s")] == pytest.approx(np.mean([r[("a", "s")].mean() for r in runs]))
  # Each image's three results travel together: the same as indexing every run with the same draw.
  idx = np.concatenate(list(stats.resample_indices(n, 500, 9)))
  direct = np.mean([r[("b", "s")][idx].mean(axis=1) for r in runs], axis=0)
  np.testing.assert_allclose(boot.samples[("b", "s")], direct, atol=1e-12)
  # A cell only some runs have is left out; runs over different test sets cannot be pooled.
  assert set(stats.pool_runs([runs[0], {("a", "s"): runs[1][("a", "s")]}])) == {("a", "s")}
  with pytest.raises(ValueError, match=r"different test sets \(W1 n=300, W2 n=299\)"):
    stats.pool_runs([runs[0], {("a", "s"): runs[1][("a", "s")][:-1]}], names=["W1", "W2"])


def test_bad_inputs_name_the_cause() -> None:
  cells = {BASE_C: np.ones(10, bool), BASE_D: np.zeros(9, bool)}
  with pytest.raises(ValueError, match=r"different numbers of test images \(n = 9: baseline on jpeg:10; "
                     r"n = 10: baseline on clean\)"):
    stats.paired_bootstrap(cells)
  with pytest.raises(KeyError, match="no per-image results for ms on jpeg:10"):
    stats.pct_change_ci({BASE_C: np.ones(10, bool), BASE_D: np.zeros(10, bool)}, "ms")
  with pytest.raises(ValueError, match="level=95"):
    stats.paired_bootstrap({BASE_C: np.ones(10, bool)}, level=95)
  with pytest.raises(ValueError, match="no per-image results"):
    stats.paired_bootstrap({})


def test_load_correct_reads_what_evaluate_writes(tmp_path: pathlib.Path) -> None:
  rng = np.random.default_rng(10)
  written = {"jpeg:10": {"baseline": rng.random(13) < 0.5, "ms": rng.random(13) < 0.5},
             "blur:1@4": {"baseline": rng.random(13) < 0.5, "ms": np.ones(13, bool)}}
  for spec, by_method in written.items():
    eval_results.write_correct(tmp_path, spec, by_method)
  loaded = stats.load_correct(tmp_path)
  assert set(loaded) == {(m, s) for s, by in written.items() for m in by}
  for (m, s), bits in loaded.items():
    assert bits.dtype == bool and np.array_equal(bits, written[s][m])  # 13 bits: padding of the last byte dropped
  assert stats.load_correct(tmp_path / "nothing") == {}
  with pytest.raises(ValueError, match="different lengths"):
    eval_results.write_correct(tmp_path, "clean", {"a": np.ones(3, bool), "b": np.ones(4, bool)})
