"""A stage's metrics: metrics.jsonl and the console, the training clock, and the one-call-late fetch.

The loop dispatches a call (one or more steps) and only then fetches the previous call's metrics, so the
host never waits on the call it just dispatched; `flush` fetches at once (before a save: a state is saved
only after its own steps' losses were seen to be finite).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

METRICS = "metrics.jsonl"


class Log:
  """metrics.jsonl + console, process 0 only."""

  def __init__(self, path: epath.Path, bar: Any) -> None:
    self.primary = jax.process_index() == 0
    self.path = path
    self.bar = bar

  def __call__(self, record: dict[str, Any], console: str | None = None) -> None:
    if not self.primary:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if console and self.bar is not None:
      self.bar.write(console)
    elif console:
      print(console, flush=True)


class Clock:
  """Training images/s that leaves out compilation (everything up to the first finished call of a run, and
  the first call of a second program: the single steps short of a whole call) and validation; checkpoint saves
  count, they are part of training."""

  def __init__(self, start_step: int) -> None:
    self.excluded = 0.0
    self.first: tuple[float, int, float] | None = None   # (time, step, excluded seconds) marks
    self.last: tuple[float, int, float] | None = None
    self.window = (time.perf_counter(), start_step, 0.0)

  def exclude(self, seconds: float) -> None:
    self.excluded += seconds

  def tick(self, done: int) -> None:
    self.last = (time.perf_counter(), done, self.excluded)
    if self.first is None:
      self.first = self.window = self.last

  @staticmethod
  def _rate(a: tuple[float, int, float], b: tuple[float, int, float], gb: int) -> float | None:
    if b[1] == a[1]:
      return None
    return (b[1] - a[1]) * gb / max(b[0] - a[0] - (b[2] - a[2]), 1e-9)

  def window_rate(self, gb: int) -> float | None:
    """Since the previous call (or the first tick); None right after the first tick."""
    rate = self._rate(self.window, self.last, gb)
    self.window = self.last
    return rate

  def rate(self, gb: int) -> float | None:
    """Since the first tick; None when the run made a single call (nothing but compilation to time)."""
    return None if self.first is None else self._rate(self.first, self.last, gb)


def finite(m: dict[str, float]) -> bool:
  return math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])


class Metrics:
  """Fetches each call's per-step metrics one call late, stops on a non-finite one, logs every
  `log_every` steps (and the last), and keeps the last step's values for DONE.json.

  A call's metrics are scalars (one step) or arrays with one entry per step of the call.
  """

  def __init__(self, log: Log, name: str, total: int, steps_per_epoch: int, global_batch: int, log_every: int,
               start: int, on_non_finite: Callable[[int, dict[str, float]], None]) -> None:
    self.log, self.name, self.total = log, name, total
    self.steps_per_epoch, self.global_batch, self.log_every = steps_per_epoch, global_batch, log_every
    self.on_non_finite = on_non_finite  # raises
    self.clock = Clock(start)
    self.last: dict[str, float] = {}
    self._pending: tuple[int, dict[str, jax.Array]] | None = None

  def push(self, done: int, metrics: dict[str, jax.Array]) -> None:
    """The metrics of the call that ended at step `done`; the previous call's are fetched now."""
    self.flush()
    self._pending = (done, metrics)

  def flush(self) -> None:
    if self._pending is not None:
      done, metrics = self._pending
      self._pending = None
      self._resolve(done, metrics)

  def _resolve(self, done: int, metrics: dict[str, jax.Array]) -> None:
    host = {k: np.atleast_1d(np.asarray(v, np.float64)) for k, v in jax.device_get(metrics).items()}
    n = len(host["loss"])
    rows = [(done - n + 1 + i, {k: float(v[i]) for k, v in host.items()}) for i in range(n)]
    for step, m in rows:
      if not finite(m):
        self.on_non_finite(step, m)
    self.last = rows[-1][1]
    self.clock.tick(done)
    logged = [(step, m) for step, m in rows if step % self.log_every == 0 or step == self.total]
    if not logged:
      return
    ips = self.clock.window_rate(self.global_batch)
    for step, m in logged:
      self.log({"step": step, "epoch": step / self.steps_per_epoch, **m, "images_per_s": ips},
               f"[{self.name}] step {step}/{self.total} loss {m['loss']:.4f} acc {m['accuracy']:.3f} "
               f"lr {m['lr']:.3g} |g| {m['grad_norm']:.3g}" + (f" {ips:.0f} img/s" if ips else ""))
