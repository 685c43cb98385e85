"""Grain loaders over pre-degraded shards, yielding global `jax.Array`s sharded over the "data" axis.

One code path for 1 CPU, 8 fake CPU devices, a GPU box or a TPU pod: every process reads only its part
of the records, builds its local slice of the global batch, and `jax.make_array_from_process_local_data`
assembles the global array.

Training (`TrainLoader`): per spec a shard source; one spec, a weighted mixture (`MapDataset.mix`, each
spec shuffled first so every epoch mixes other records) or, without weights, the concatenation; seeded
global shuffle, infinite repeat (reshuffled each epoch), random horizontal flip seeded by the record's
position in the global stream, then batches of `global_batch // process_count`. Process p takes batches
p, p+P, p+2P, ... of that stream, so the global batch of step s is the same set of records for any
number of processes (only whole global batches are ever read, and each record by one process).

Augmentation is horizontal flip only. The shards hold exactly the degraded pixels the network must learn
from; a flip re-encodes nothing and keeps JPEG block edges on the 8x8 (and 4:2:0 chroma 16x16) grid when
the width is a multiple of 16 (32, 224), whereas crops by other offsets, rescaling or colour jitter would
move or blur the blocking artefacts that define the quality bins.

Evaluation (`eval_batches`): deterministic order; process p reads its contiguous slice of the records,
padded to the same number of batches on every process; `mask` is False on padding.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Sequence

import grain
import jax
from jax.sharding import Mesh
import numpy as np

from msnet import parallel
from msnet.data import shards

# Elements of the threaded read are whole local batches: a few in flight keep memory bounded at 224 px.
_READ = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


def _check_batch(global_batch: int, mesh: Mesh, what: str) -> int:
  """The per-process batch; refuses batches the mesh or the processes cannot split evenly."""
  data, processes = mesh.shape["data"], jax.process_count()
  if global_batch % data or global_batch % processes:
    raise ValueError(f"{what} global batch {global_batch} must be divisible by the 'data' mesh axis size "
                     f"({data}) and by the number of processes ({processes})")
  return global_batch // processes


def _global(batch: dict[str, np.ndarray], mesh: Mesh, global_batch: int) -> dict[str, jax.Array]:
  sharding = parallel.data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
          for k, v in batch.items()}


def _train_example(record: dict[str, Any], label_key: str) -> dict[str, np.ndarray]:
  return {"image": record["image"], "label": np.int32(record[label_key])}


def _flip(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
  if rng.random() < 0.5:
    example = {**example, "image": example["image"][:, ::-1]}
  return example


def train_dataset(sources: Sequence[Any], weights: Sequence[float] | None, seed: int, hflip: bool,
                  local_batch: int, process_index: int, process_count: int,
                  label_key: str = "label") -> grain.MapDataset:
  """The infinite dataset of one process's local batches (the random-access part of TrainLoader)."""
  if weights is None:
    ds = grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in sources]).shuffle(seed)
  else:
    ds = grain.MapDataset.mix(
        [grain.MapDataset.source(s).shuffle(seed + 1 + i) for i, s in enumerate(sources)], list(weights))
  ds = ds.repeat().map(functools.partial(_train_example, label_key=label_key))
  if hflip:
    ds = ds.random_map(_flip, seed=seed)
  return ds.batch(local_batch, drop_remainder=True)[process_index::process_count]


class TrainLoader:
  """Infinite iterator of `{"image": uint8 [B,H,W,3], "label": int32 [B]}` global batches.

  `label_key="bin"` gives the quality bin as the label (the master's training). `get_state()` /
  `set_state()` save and restore the position: a restored loader yields the same next batch.
  """

  def __init__(self, workdir: str | os.PathLike[str], split: str, specs: Sequence[str],
               weights: Sequence[float] | None, global_batch: int, seed: int, mesh: Mesh,
               hflip: bool, num_workers: int, label_key: str = "label"):
    if not specs:
      raise ValueError("TrainLoader needs at least one spec")
    if weights is not None and (len(weights) != len(specs) or min(weights) <= 0):
      raise ValueError(f"weights {list(weights)} must be positive, one per spec {list(specs)}")
    self._mesh, self._global_batch = mesh, global_batch
    local = _check_batch(global_batch, mesh, "train")
    sources = [shards.open_shards(shards.spec_dir(workdir, split, s)) for s in specs]
    for spec, src in zip(specs, sources):
      if len(src) == 0:
        raise ValueError(f"no records for spec {spec!r} in split {split!r}")
    self.num_records = sum(len(s) for s in sources)
    if global_batch > self.num_records:
      raise ValueError(f"train global batch {global_batch} exceeds the {self.num_records} records of {list(specs)}")

    ds = train_dataset(sources, weights, seed, hflip, local, jax.process_index(), jax.process_count(), label_key)
    it = ds.to_iter_dataset(_READ)
    if num_workers > 0:
      _absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    self._it = iter(it)

  def __iter__(self) -> TrainLoader:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    return _global(next(self._it), self._mesh, self._global_batch)

  def get_state(self) -> dict[str, Any]:
    """The Grain iterator state (JSON-serialisable), to checkpoint with the model."""
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state)


def eval_batches(workdir: str | os.PathLike[str], split: str, spec: str, global_batch: int,
                 mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
  """Every record of a spec exactly once, in order, as padded global batches.

  Yields `{"image", "label", "bin", "bitstream_bin", "mask"}`; every process yields the same number of
  batches (collectives in the eval step stay in lockstep), padding rows have `mask == False`.
  """
  local = _check_batch(global_batch, mesh, "evaluation")
  source = shards.open_shards(shards.spec_dir(workdir, split, spec))
  n = len(source)
  if n == 0:
    return
  start, stop = parallel.process_slice(n)
  num_batches = -(-(-(-n // jax.process_count())) // local)  # of the largest process slice
  for batch in local_eval_batches(source, start, stop, local, num_batches):
    yield _global(batch, mesh, global_batch)


def local_eval_batches(source: Any, start: int, stop: int, local_batch: int,
                       num_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """Records [start, stop) of `source` in order, as `num_batches` numpy batches padded with mask False."""
  ds = grain.MapDataset.source(source)[start:stop].map(_eval_example).batch(local_batch)
  it = iter(ds.to_iter_dataset(_READ))
  shape = source[0]["image"].shape
  for _ in range(num_batches):
    yield _pad(next(it, None), local_batch, shape)


def _eval_example(record: dict[str, Any]) -> dict[str, np.ndarray]:
  return {"image": record["image"], "label": np.int32(record["label"]), "bin": np.int32(record["bin"]),
          "bitstream_bin": np.int32(record["bitstream_bin"]), "mask": np.True_}


def _pad(batch: dict[str, np.ndarray] | None, size: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  """A batch grown to `size` rows with zeros (mask False); None gives a batch of padding only."""
  if batch is None:
    batch = {"image": np.zeros((0, *shape), np.uint8), "label": np.zeros(0, np.int32),
             "bin": np.zeros(0, np.int32), "bitstream_bin": np.zeros(0, np.int32), "mask": np.zeros(0, bool)}
  short = size - len(batch["mask"])
  return {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) if short else v
          for k, v in batch.items()}


def _absl_flags_parsed() -> None:
  """Grain worker processes read absl flags; outside an absl app they are unparsed and would raise."""
  from absl import flags  # noqa: PLC0415
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
