"""Temperature scaling and the expected calibration error, in float64 NumPy.

AMS compares the branches' softmax outputs class by class, which is only fair when a branch's confidence
means the same as another's; temperature scaling (Guo et al., 2017) divides a network's logits by one scalar
T fitted by NLL on held-out data, which leaves its top-1 unchanged and makes its confidence honest.

The expected calibration error (ECE) uses `num_bins` equal-width confidence bins; a prediction of confidence
c (the top class's normalised probability) falls in bin ceil(c * num_bins) - 1, clipped to [0, num_bins),
so a bin holds (i / num_bins, (i + 1) / num_bins]. The evaluation's jitted histogram (msnet.evaluate.steps)
bins the same way; this module is its reference.
"""

from __future__ import annotations

import numpy as np

MIN_INVERSE_TEMPERATURE = 1e-3  # T <= 1000: a network no better than chance gets a flat softmax, not NaN


def _weighted_nll(s: float, logits: np.ndarray, labels: np.ndarray, weights: np.ndarray
                  ) -> tuple[float, float, float]:
  """NLL of softmax(s * logits) at inverse temperature s, and its first and second derivative in s."""
  z = s * logits
  z = z - z.max(axis=1, keepdims=True)
  p = np.exp(z)
  p /= p.sum(axis=1, keepdims=True)
  log_norm = np.log(np.exp(z).sum(axis=1))
  picked = z[np.arange(len(labels)), labels]
  mean_logit = (p * logits).sum(axis=1)
  var_logit = (p * logits * logits).sum(axis=1) - mean_logit ** 2
  return (float(np.sum(weights * (log_norm - picked))),
          float(np.sum(weights * (mean_logit - logits[np.arange(len(labels)), labels]))),
          float(np.sum(weights * np.maximum(var_logit, 0.0))))


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax in float64."""
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
  """The weighted mean NLL of softmax(logits) at the labels (the quantity `fit_temperature` minimises)."""
  w = np.asarray(weights, np.float64)
  return _weighted_nll(1.0, np.asarray(logits, np.float64), np.asarray(labels, np.int64), w / w.sum())[0]


def fit_temperature(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None,
                    max_iter: int = 100, tol: float = 1e-10) -> float:
  """The temperature T > 0 minimising the (weighted) NLL of softmax(logits / T) over [N, C] logits.

  The NLL is convex in s = 1/T (its second derivative is the variance of the logits under the softmax), so
  Newton's method on s with step halving converges to the global minimum.
  """
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.int64)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"fit_temperature: logits must be [N, C] and labels [N], got {logits.shape} and {labels.shape}")
  if logits.shape[0] == 0:
    raise ValueError("fit_temperature: no examples")
  w = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
  w = w / w.sum()
  s = 1.0
  value, grad, hess = _weighted_nll(s, logits, labels, w)
  for _ in range(max_iter):
    step = grad / hess if hess > 0 else np.sign(grad)
    t = 1.0
    while True:
      candidate = max(s - t * step, MIN_INVERSE_TEMPERATURE)
      new_value, new_grad, new_hess = _weighted_nll(candidate, logits, labels, w)
      if new_value <= value or t < 1e-8:
        break
      t *= 0.5
    done = abs(candidate - s) < tol * max(1.0, s)
    s, value, grad, hess = candidate, new_value, new_grad, new_hess
    if done:
      break
  return 1.0 / s


def confidence_bin(confidence: np.ndarray, num_bins: int) -> np.ndarray:
  """Bin index of each confidence in (0, 1]: bin i holds (i / num_bins, (i + 1) / num_bins]."""
  return np.clip(np.ceil(np.asarray(confidence, np.float64) * num_bins).astype(np.int64) - 1, 0, num_bins - 1)


def histogram(probs: np.ndarray, labels: np.ndarray, num_bins: int) -> dict[str, list[float]]:
  """Per confidence bin: predictions, correct ones and their summed confidence, from [N, C] probabilities.

  Rows need not sum to 1 (AMS's per-class max does not): confidence is the top class's share of the row.
  """
  probs = np.asarray(probs, np.float64)
  confidence = probs.max(axis=1) / probs.sum(axis=1)
  correct = probs.argmax(axis=1) == np.asarray(labels)
  b = confidence_bin(confidence, num_bins)
  return {"count": np.bincount(b, minlength=num_bins).astype(float).tolist(),
          "correct": np.bincount(b, weights=correct.astype(float), minlength=num_bins).tolist(),
          "confidence": np.bincount(b, weights=confidence, minlength=num_bins).tolist()}


def ece(hist: dict[str, list[float]]) -> float:
  """Expected calibration error of a histogram: sum over bins of |accuracy - mean confidence| x its share."""
  count = np.asarray(hist["count"], np.float64)
  n = count.sum()
  if n == 0:
    return float("nan")
  return float(np.sum(np.abs(np.asarray(hist["correct"]) - np.asarray(hist["confidence"]))) / n)


def merge(hists: list[dict[str, list[float]]]) -> dict[str, list[float]]:
  """The histogram of the union of the examples of several histograms (e.g. a bin's specs)."""
  return {k: np.sum([h[k] for h in hists], axis=0).tolist() for k in ("count", "correct", "confidence")}
