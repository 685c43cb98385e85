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

import os
from typing import Any, Iterator, Sequence

from etils import epath
import grain
import jax
from jax.sharding import Mesh
import numpy as np

from msnet import degradations, errors, parallel
from msnet.data import degrade, shards

# Elements of the threaded read are whole local batches: a few in flight keep memory bounded at 224 px.
# Two threads overlap reads with the train step; more only contend for the GIL (measured on 2 cores:
# 4 threads 17k img/s, 2 threads 20k, at the demo's 32x32 batches of 128). Grain worker processes
# (config.train.num_workers) are the way to more parallelism.
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


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


class _BatchReader:
  """Reads a batch of record ids (the sources concatenated) into arrays, optionally flipping some images.

  Grain shuffles, mixes and batches only the integer ids; the records of a whole batch are then read
  and decoded here in one call, which costs a fraction of Grain's per-element path with a dict per
  record. Picklable, for Grain worker processes.
  """

  def __init__(self, sources: Sequence[Any], fields: dict[str, str], flip_seed: int | None = None,
               local_batch: int = 0, process_index: int = 0, process_count: int = 1):
    self.sources, self.fields, self.flip_seed = list(sources), dict(fields), flip_seed
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
    self.local_batch, self.process_index, self.process_count = local_batch, process_index, process_count

  def __call__(self, index: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    which = np.searchsorted(self.offsets, ids, side="right") - 1
    records = [self.sources[s].read(int(i - self.offsets[s])) for s, i in zip(which, ids)]
    batch = shards.decode_batch(records, list(self.fields.values()))
    out = {"image": batch["image"], **{name: batch[key] for name, key in self.fields.items()}}
    if self.flip_seed is not None:
      # Element positions in the stream of all processes: the same flips for any process count.
      first = (index * self.process_count + self.process_index) * self.local_batch
      flip = _coin(self.flip_seed, np.arange(first, first + len(ids), dtype=np.uint64))
      out["image"][flip] = out["image"][flip, :, ::-1]
    return out


def _coin(seed: int, positions: np.ndarray) -> np.ndarray:
  """A fair coin per stream position (splitmix64 of seed and position): stateless, vectorised."""
  z = positions + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return ((z ^ (z >> np.uint64(31))) >> np.uint64(63)).astype(bool)


def train_dataset(sources: Sequence[Any], weights: Sequence[float] | None, seed: int, hflip: bool,
                  local_batch: int, process_index: int, process_count: int,
                  label_key: str = "label") -> grain.MapDataset:
  """The infinite dataset of one process's local batches (the random-access part of TrainLoader)."""
  reader = _BatchReader(sources, {"label": label_key}, seed if hflip else None, local_batch, process_index,
                        process_count)
  ids = [grain.MapDataset.range(int(a), int(b)) for a, b in zip(reader.offsets[:-1], reader.offsets[1:])]
  if weights is None:
    ds = grain.MapDataset.concatenate(ids).shuffle(seed)
  else:
    ds = grain.MapDataset.mix([r.shuffle(seed + 1 + i) for i, r in enumerate(ids)], list(weights))
  ds = ds.repeat().batch(local_batch, drop_remainder=True)[process_index::process_count]
  return ds.map_with_index(reader)


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
  yield from source_eval_batches(shards.open_shards(shards.spec_dir(workdir, split, spec)), global_batch, mesh)


def holdout_source(workdir: str | os.PathLike[str], spec: str) -> shards.ShardSource:
  """The held-out training records of one spec (config.data.holdout_examples): images of the training
  distribution that no stage trained on, for fitting on top of trained networks (e.g. temperatures).

  The manifest decides, not the directory: shards left by an earlier degrade with a hold-out are not
  held out once the train split has taken those records back.
  """
  path = epath.Path(workdir) / "data" / "manifest.json"
  entry = (shards.read_json(path) or {}).get("splits", {}).get(degrade.HOLDOUT)
  if entry is None:
    raise errors.MissingInputError(f"{path}: no held-out training records; set config.data.holdout_examples > 0 "
                                   "and run `msnet degrade`")
  spec = str(degradations.parse(spec))
  if spec not in entry["specs"]:
    raise errors.MissingInputError(
        f"{path}: no held-out records of spec {spec!r}, only of {list(entry['specs'])} (clean and every bin's "
        "train_specs); put it in a bin's train_specs, keep config.data.holdout_examples > 0 and run `msnet degrade`")
  return shards.open_shards(shards.spec_dir(workdir, degrade.HOLDOUT, spec))


def source_eval_batches(source: Any, global_batch: int, mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
  """`eval_batches` over any random-access source of encoded records (`.read(i)`, `len`): e.g. an external
  benchmark set read from its own files."""
  local = _check_batch(global_batch, mesh, "evaluation")
  n = len(source)
  if n == 0:
    return
  start, stop = parallel.process_slice(n)
  num_batches = -(-(-(-n // jax.process_count())) // local)  # of the largest process slice
  for batch in local_eval_batches(source, start, stop, local, num_batches):
    yield _global(batch, mesh, global_batch)


def local_eval_batches(source: Any, start: int, stop: int, local_batch: int,
                       num_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """Records [start, stop) of `source` in order, as `num_batches` numpy batches padded with mask False.

  A record with a negative label (an external file that could not be read) is masked like padding.
  """
  reader = _BatchReader([source], {k: k for k in ("label", "bin", "bitstream_bin")})
  ds = grain.MapDataset.range(start, stop).batch(local_batch).map_with_index(reader)
  it = iter(ds.to_iter_dataset(_READ))
  shape = source[0]["image"].shape
  for _ in range(num_batches):
    batch = next(it, None)
    if batch is not None:
      batch["mask"] = batch["label"] >= 0
    yield _pad(batch, local_batch, shape)


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
