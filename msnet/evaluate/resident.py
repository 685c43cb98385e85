"""Device-resident evaluation data: a spec's records put on the devices once, for the scanned steps.

The records are laid out as the host path feeds them (loader.source_eval_batches): process p holds records
[p * per, (p + 1) * per) of the spec (parallel.process_slice) cut into `num_batches` local batches, the last
padded with zero rows whose mask is False; batch i of every process makes global batch i. Stacked, that is
one [num_batches, global_batch, ...] array per field, sharded over "data" on axis 1 (steps.stacked_sharding),
so a `lax.scan` over axis 0 sees exactly the host path's batches and its sums and per-image rows come out
the same.

config.evaluate.device_data decides per spec: "on", "off", a budget in bytes per device, or "auto": half of
the smallest free memory of this process's accelerators, and the host path on the CPU, where the networks'
compute bounds both paths and neither measured faster (benchmarks/bench_eval.py on the demo's networks, 2
shared cores: images per CPU second 0.96x and 1.06x for the device path in two runs of alternating rounds,
wall-clock figures swinging more than that with the other programs' load).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from msnet import parallel
from msnet.data import shards
from msnet.evaluate.steps import stacked_sharding

FIELDS = ("label", "bin", "bitstream_bin")  # int32 per record, beside the uint8 image and the bool mask
_FREE_SHARE = 0.5                            # of an accelerator's free memory "auto" lets one spec take


def num_batches(records: int, global_batch: int) -> int:
  """Batches of the largest process slice: every process runs the same number (collectives in lockstep)."""
  largest = -(-records // jax.process_count())
  return -(-largest // (global_batch // jax.process_count()))


def bytes_per_device(records: int, image_shape: tuple[int, ...], global_batch: int, mesh: Any) -> int:
  """Device memory one spec's resident arrays take on each device (padding included; split over "data")."""
  row = math.prod(image_shape) + 4 * len(FIELDS) + 1
  return -(-num_batches(records, global_batch) * global_batch * row // mesh.shape["data"])


def budget(setting: str) -> float:
  """Bytes per device a spec's records may take on the devices under config.evaluate.device_data."""
  if setting == "on":
    return math.inf
  if setting == "off":
    return 0.0
  if setting != "auto":
    return float(setting)
  return 0.0 if jax.default_backend() == "cpu" else _FREE_SHARE * free_bytes_per_device()


def free_bytes_per_device() -> float:
  """Free memory of the fullest of this process's accelerators (0 when they do not say)."""
  free = []
  for d in jax.local_devices():
    stats = d.memory_stats() or {}
    if "bytes_limit" in stats:
      free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return float(min(free)) if free else 0.0


def choose(config: ml_collections.ConfigDict, mesh: Any, records: list[int]) -> list[bool]:
  """Per spec (its record count): evaluate it from device-resident records? The same answer on every process
  (process 0's), since the two paths run different collectives."""
  size = int(config.data.image_size)
  limit = budget(str(config.evaluate.device_data))
  gb = int(config.evaluate.global_batch)
  chosen = np.array([bytes_per_device(n, (size, size, 3), gb, mesh) <= limit for n in records], np.int32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    chosen = np.asarray(multihost_utils.broadcast_one_to_all(chosen))
  return [bool(c) for c in chosen]


def read_local(workdir: pathlib.Path, split: str, spec: str, global_batch: int) -> dict[str, np.ndarray]:
  """This process's records of a spec as padded local batches: {"image": uint8 [N, local, H, W, 3], FIELDS:
  int32 [N, local], "mask": bool [N, local]}, N = `num_batches` (host memory only)."""
  source = shards.open_shards(shards.spec_dir(workdir, split, spec))
  n = len(source)
  start, stop = parallel.process_slice(n)
  local = global_batch // jax.process_count()
  rows = num_batches(n, global_batch) * local
  shape = source[0]["image"].shape if n else (0, 0, 3)
  out = {"image": np.zeros((rows, *shape), np.uint8), **{k: np.zeros(rows, np.int32) for k in FIELDS}}
  if stop > start:  # a process past the last record (fewer records than processes) holds padding only
    for k, v in source.read_arrays(start, stop, FIELDS).items():
      out[k][:stop - start] = v
  out["mask"] = (np.arange(rows) < stop - start) & (out["label"] >= 0)
  return {k: v.reshape(-1, local, *v.shape[1:]) for k, v in out.items()}


def place(local: dict[str, np.ndarray], mesh: Any, global_batch: int) -> dict[str, jax.Array]:
  """Every process's `read_local` arrays -> global [N, global_batch, ...] arrays on the devices."""
  sharding = stacked_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0], global_batch, *v.shape[2:]))
          for k, v in local.items()}
