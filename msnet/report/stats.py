"""Paired bootstrap confidence intervals over test images, from the per-image top-1 `msnet evaluate` keeps.

Every interval of the report comes from one set of resamples: B draws of n image indices with replacement,
shared by all (method, spec) cells, so each image keeps its pairing between methods and between its clean
and degraded versions; that pairing is what makes differences of 1-2 points decidable. Intervals are
percentile intervals. Each draw becomes a [B, n] count of how often each image was drawn, and one matrix
product with the [n, cells] per-image results gives every cell's accuracy in every resample. NumPy only:
the report imports no JAX.

Runs of one config with different seeds are pooled image by image: an image's results in all runs travel
together in a resample, since the same test image is easy or hard for every seed.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from msnet import errors

Key = tuple[str, str]  # (method, canonical spec)

CORRECT_DIR = "correct"  # W/eval/correct/<spec slug>.npz, written by msnet.evaluate.results.write_correct
TOP1_PREFIX = "top1."
CHUNK_ENTRIES = 1 << 22  # resample indices drawn per chunk (B x n int64 ~ 32 MiB)


def load_correct(eval_dir: pathlib.Path) -> dict[Key, np.ndarray]:
  """(method, canonical spec) -> bool [n] top-1 per test record in record order; {} when evaluate kept none."""
  out: dict[Key, np.ndarray] = {}
  for path in sorted((pathlib.Path(eval_dir) / CORRECT_DIR).glob("*.npz")):
    with np.load(path) as z:
      spec, n = str(z["spec"]), int(z["n"])
      for name in z.files:
        if name.startswith(TOP1_PREFIX):
          out[(name[len(TOP1_PREFIX):], spec)] = np.unpackbits(z[name], count=n).astype(bool)
  return out


def pool_runs(runs: Sequence[Mapping[Key, np.ndarray]], names: Sequence[str] | None = None
              ) -> dict[Key, np.ndarray]:
  """Per-image correct counts summed over runs (int [n], 0..len(runs)) for the cells every run has.

  The runs must have evaluated the same test records: a cell's n must agree across runs.
  """
  names = list(names or [f"run {i}" for i in range(len(runs))])
  keys = [k for k in runs[0] if all(k in r for r in runs[1:])] if runs else []
  pooled = {}
  for key in keys:
    sizes = [len(r[key]) for r in runs]
    if len(set(sizes)) > 1:
      raise errors.InvalidInputError(f"{key[0]} on {key[1]}: the runs have different test sets "
                                     f"({', '.join(f'{nm} n={s}' for nm, s in zip(names, sizes))}); pool only "
                                     "runs of one config that differ in their seed")
    pooled[key] = np.sum([np.asarray(r[key], np.int64) for r in runs], axis=0)
  return pooled


def plural_cells(keys: Sequence[Key]) -> str:
  """'ms on jpeg:10' or 'ms on jpeg:10 and 17 more cells', for messages."""
  first = f"{keys[0][0]} on {keys[0][1]}"
  return first if len(keys) == 1 else f"{first} and {len(keys) - 1} more cells"


def resample_indices(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
  """The B x n image indices drawn with replacement, in chunks of rows (the same draws for a given seed)."""
  rng = np.random.default_rng(seed)
  chunk = max(1, CHUNK_ENTRIES // max(n, 1))
  for start in range(0, resamples, chunk):
    yield rng.integers(0, n, (min(chunk, resamples - start), n))


@dataclasses.dataclass(frozen=True)
class Bootstrap:
  """Every cell's accuracy (fraction) on the observed images (point) and in each of B resamples (samples [B]).

  No resamples (B = 0) gives point estimates with unbounded intervals: nothing can be decided from them.
  """
  point: dict[Key, float]
  samples: dict[Key, np.ndarray]
  n: int
  resamples: int
  seed: int
  level: float

  def interval(self, statistic: Callable[[Mapping[Key, Any]], Any]) -> dict[str, float]:
    """statistic(accuracies) on the observed images and in every resample -> point, lo, hi, undefined.

    The statistic gets one mapping of cell -> accuracy, floats for the point and [B] arrays for the
    resamples, so one NumPy expression serves both. It returns NaN where it is undefined (% change with
    c - d <= 0): such a resample counts against both ends, below the lower percentile and above the upper
    one, so the interval only widens; with more than (1 - level) / 2 of them it is unbounded. `undefined`
    is their fraction.
    """
    point = float(statistic(self.point))
    if self.resamples == 0:
      return dict(point=point, lo=-np.inf, hi=np.inf, undefined=1.0)
    s = np.broadcast_to(np.asarray(statistic(self.samples), np.float64), (self.resamples,))
    undefined = np.isnan(s)
    alpha = (1.0 - self.level) / 2.0
    lo = np.quantile(np.where(undefined, -np.inf, s), alpha, method="lower")
    hi = np.quantile(np.where(undefined, np.inf, s), 1.0 - alpha, method="higher")
    return dict(point=point, lo=float(lo), hi=float(hi), undefined=float(undefined.mean()))


def paired_bootstrap(correct: Mapping[Key, np.ndarray], *, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95, runs: int = 1) -> Bootstrap:
  """Resample the test images jointly for all cells: correct holds each cell's per-image top-1 (bool [n]) or,
  pooled over `runs` runs, its per-image correct count (int [n], 0..runs). Every cell needs the same n."""
  if not 0.0 < level < 1.0:
    raise ValueError(f"level={level}: a confidence level is a fraction in (0, 1), e.g. 0.95")
  if resamples < 0:
    raise ValueError(f"resamples={resamples}: must be >= 0 (the report uses >= 1,000)")
  keys = list(correct)
  sizes = {k: len(correct[k]) for k in keys}
  if len(set(sizes.values())) > 1:
    by_n: dict[int, list[Key]] = {}
    for key, v in sizes.items():
      by_n.setdefault(v, []).append(key)
    raise ValueError("paired bootstrap: cells hold different numbers of test images ("
                     + "; ".join(f"n = {v}: {plural_cells(ks)}" for v, ks in sorted(by_n.items()))
                     + "); every spec of a split must hold the same records (re-run `msnet evaluate` after "
                     "`msnet degrade`)")
  n = next(iter(sizes.values()), 0)
  if n == 0:
    raise ValueError("paired bootstrap: no per-image results (W/eval/correct/ is empty or its cells have n = 0)")
  k = np.stack([np.asarray(correct[key], np.float64) for key in keys], axis=1)   # [n, cells]
  total = float(n * runs)
  samples = np.empty((resamples, len(keys)))
  row = 0
  for idx in resample_indices(n, resamples, seed):
    b = len(idx)
    counts = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
    samples[row:row + b] = counts.astype(np.float64) @ k / total
    row += b
  return Bootstrap(point={key: float(v) for key, v in zip(keys, k.sum(0) / total)},
                   samples={key: samples[:, i] for i, key in enumerate(keys)}, n=n, resamples=resamples,
                   seed=seed, level=level)


def pct_change(c: Any, d: Any, d_prime: Any) -> Any:
  """The paper's % change 100 (d' - d) / (c - d) of accuracies (floats or arrays); NaN where c - d <= 0.

  With c - d <= 0 the baseline does not degrade, so there is no loss to recover and the ratio means
  nothing (it flips sign through a pole at c = d).
  """
  c, d, d_prime = (np.asarray(x, np.float64) for x in (c, d, d_prime))
  den = c - d
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(den > 0, 100.0 * (d_prime - d) / np.where(den > 0, den, 1.0), np.nan)


def pct_change_ci(correct: Mapping[Key, np.ndarray], method: str, *, clean: str = "clean",
                  degraded: str = "jpeg:10", baseline: str = "baseline", resamples: int = 2000, seed: int = 0,
                  level: float = 0.95) -> dict[str, float]:
  """A method's % change against the baseline with its paired bootstrap interval, in percent.

  Keys: point, lo, hi, undefined (fraction of resamples with c - d <= 0, counted against both ends), n.
  """
  cells = [(baseline, clean), (baseline, degraded), (method, degraded)]
  lacking = [f"{m} on {s}" for m, s in cells if (m, s) not in correct]
  if lacking:
    raise KeyError(f"% change of {method}: no per-image results for {', '.join(lacking)} (run `msnet evaluate` "
                   "with these methods and specs)")
  boot = paired_bootstrap({key: correct[key] for key in cells}, resamples=resamples, seed=seed, level=level)
  ci = boot.interval(lambda a: pct_change(a[cells[0]], a[cells[1]], a[cells[2]]))
  return dict(ci, n=boot.n)


def decide(ci: Mapping[str, float], threshold: float = 0.0) -> str:
  """A claim "statistic > threshold" from its interval: holds when the whole interval is above the threshold,
  fails when it lies at or below it, undecided when it straddles it (or is unbounded or missing)."""
  if ci["lo"] > threshold:
    return "holds"
  if ci["hi"] <= threshold:
    return "fails"
  return "undecided"


def verdict(ci: Mapping[str, float], higher_better: bool = True) -> str:
  """A difference a - b from its interval: "better" (a) when the whole interval is on the good side of 0,
  "worse" when it is on the other, "undecided" when it holds 0 (or is unbounded)."""
  lo, hi = (ci["lo"], ci["hi"]) if higher_better else (-ci["hi"], -ci["lo"])
  return "better" if lo > 0 else "worse" if hi < 0 else "undecided"


def combine(verdicts: Sequence[str]) -> str:
  """A claim made of parts: holds when every part holds, fails when any part fails, else undecided."""
  if verdicts and all(v == "holds" for v in verdicts):
    return "holds"
  return "fails" if "fails" in verdicts else "undecided"
