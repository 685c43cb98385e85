"""Loaders over pre-degraded shards, yielding global `jax.Array`s sharded over the "data" axis.

One code path for 1 CPU, 8 fake CPU devices, a GPU box or a TPU pod: every process reads only its part
of the records, builds its local slice of the global batch, and `jax.make_array_from_process_local_data`
assembles the global array.

Training (`TrainLoader`): per spec a shard source; one spec, a weighted mixture (`MapDataset.mix`, each
spec shuffled first so every epoch mixes other records) or, without weights, the concatenation; seeded
global shuffle, infinite repeat (reshuffled each epoch), random horizontal flip seeded by the record's
position in the global stream, then batches of `global_batch // process_count`. Process p takes batches
p, p+P, p+2P, ... of that stream, so the global batch of step s is the same set of records for any
number of processes (only whole global batches are ever read, and each record by one process).
`train_dataset` states that order as a Grain pipeline (the reference, and the path of Grain worker
processes, config.train.num_workers > 0); the threaded path computes the same ids with NumPy for whole
batches (`_StreamIds`), reads each batch's records in one batched read per shard, decodes the headers
as one array and flips while copying the pixels, in `shards.read_threads()` threads (one per core),
batches in flight yielded in order and already on the devices. Each epoch's permutation is Grain's
index_shuffle computed for the whole epoch with NumPy (`_permutation`). When the records fit a host-memory
budget (config.train.host_cache), they are read once in bulk and each batch is gathered from memory with
the same ids and coins (`_CachedReader`): the same batches; otherwise each batch reads the shards.

Augmentation is horizontal flip only. The shards hold exactly the degraded pixels the network must learn
from; a flip re-encodes nothing and keeps JPEG block edges on the 8x8 (and 4:2:0 chroma 16x16) grid when
the width is a multiple of 16 (32, 224), whereas crops by other offsets, rescaling or colour jitter would
move or blur the blocking artefacts that define the quality bins.

Evaluation (`eval_batches`): deterministic order; process p reads its contiguous slice of the records,
padded to the same number of batches on every process; `mask` is False on padding.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import threading
from typing import Any, Callable, Iterator, Sequence
import weakref

from etils import epath
import grain
import jax
from jax.sharding import Mesh
import numpy as np

from msnet import degradations, errors, parallel
from msnet.data import degrade, shards

# Grain worker processes (config.train.num_workers > 0): elements are whole local batches, a few in flight
# per process keep memory bounded at 224 px.
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
_IN_FLIGHT_BYTES = 1 << 30  # images of the batches the threaded path reads ahead (at least 2 batches)
_ALIGN = 64  # bytes: XLA's CPU client takes a host buffer at this alignment without copying it
_SHUFFLE_ROUNDS = 4  # the rounds of Grain's index_shuffle in MapDataset.shuffle
_M32 = 0xFFFFFFFF


def _check_batch(global_batch: int, mesh: Mesh, what: str) -> int:
  """The per-process batch; refuses batches the mesh or the processes cannot split evenly."""
  data, processes = mesh.shape["data"], jax.process_count()
  if global_batch % data or global_batch % processes:
    raise ValueError(f"{what} global batch {global_batch} must be divisible by the 'data' mesh axis size "
                     f"({data}) and by the number of processes ({processes})")
  return global_batch // processes


def _empty(shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
  """An uninitialised array at a 64-byte boundary: `jax.device_put` to a CPU device aliases it instead of
  copying (0.11 ms instead of 0.3 ms per 128 images at 32x32 measured), so a batch's images are written
  once. Each batch gets its own and nothing writes it after the transfer."""
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(size + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + size].view(dtype).reshape(shape)


def _global(batch: dict[str, np.ndarray], mesh: Mesh, global_batch: int) -> dict[str, jax.Array]:
  sharding = parallel.data_sharding(mesh)
  if jax.process_count() == 1:  # the local batch is the global one: one batched transfer of all its arrays
    return jax.device_put(batch, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
          for k, v in batch.items()}


class _BatchReader:
  """Reads a batch of record ids (the sources concatenated) into arrays, optionally flipping some images.

  Each source's records of the batch come in one `read_batch` call (a ShardSource: one ArrayRecord read
  per shard; any other source of `.read(i)`, record by record), and `shards.decode_batch` mirrors the
  flipped images while copying them. Picklable, for Grain worker processes.
  """

  def __init__(self, sources: Sequence[Any], fields: dict[str, str], flip_seed: int | None = None,
               local_batch: int = 0, process_index: int = 0, process_count: int = 1):
    self.sources, self.fields, self.flip_seed = list(sources), dict(fields), flip_seed
    self.shape = tuple(self.sources[0][0]["image"].shape)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
    self.local_batch, self.process_index, self.process_count = local_batch, process_index, process_count

  def __call__(self, index: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    which = np.searchsorted(self.offsets, ids, side="right") - 1
    records: list[bytes] = [b""] * len(ids)
    for s in np.unique(which).tolist():
      rows = np.flatnonzero(which == s)
      local = ids[rows] - self.offsets[s]
      source = self.sources[s]
      got = source.read_batch(local) if hasattr(source, "read_batch") else [source.read(int(i)) for i in local]
      for j, record in zip(rows.tolist(), got):
        records[j] = record
    flip = _flips(self.flip_seed, index, len(ids), self.local_batch, self.process_index, self.process_count)
    batch = shards.decode_batch(records, list(dict.fromkeys(self.fields.values())), flip=flip,
                                out=_empty((len(ids), *self.shape)))
    return {"image": batch["image"], **{name: batch[key] for name, key in self.fields.items()}}


class _CachedReader:
  """`_BatchReader`'s batches from host memory: the sources' records read once in bulk
  (`ShardSource.read_arrays`: sequential reads in threads) into one image and one label array, then each
  batch gathered by one fancy index with the same ids and coins, so the same batches bit for bit at a few
  microseconds per image instead of a random ArrayRecord read each.

  With flips the image array holds every image twice, as read and mirrored (`cache_bytes`): mirroring
  3-byte pixels per batch cost 15x the gather (0.17 ms per 128 images at 32x32 against 0.012 ms), so a
  flipped image is gathered from the mirrored half.
  """

  def __init__(self, sources: Sequence[Any], label_key: str, flip_seed: int | None, local_batch: int,
               process_index: int, process_count: int):
    shapes = sorted({tuple(s[0]["image"].shape) for s in sources})
    if len(shapes) > 1:
      raise ValueError(f"the train specs' images are of sizes {shapes}: one batch holds one image size")
    offsets = np.cumsum([0] + [len(s) for s in sources])
    self.num_records = n = int(offsets[-1])
    self.images = np.empty((n if flip_seed is None else 2 * n, *shapes[0]), np.uint8)
    self.labels = np.empty(n, np.int32)
    for s, a, b in zip(sources, offsets[:-1], offsets[1:]):
      s.read_arrays(fields=[label_key], out={"image": self.images[a:b], label_key: self.labels[a:b]})
    if flip_seed is not None:
      pixels = self.images.view("V3")[..., 0]  # [2n, H, W], one item per RGB pixel: mirrors whole pixels
      pixels[n:] = pixels[:n, :, ::-1]
    self.flip_seed, self.local_batch = flip_seed, local_batch
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, index: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    flip = _flips(self.flip_seed, index, len(ids), self.local_batch, self.process_index, self.process_count)
    rows = ids if flip is None else ids + self.num_records * flip
    image = np.take(self.images, rows, axis=0, out=_empty((len(ids), *self.images.shape[1:])), mode="clip")
    return {"image": image, "label": np.take(self.labels, ids)}


def _flips(seed: int | None, index: int, n: int, local_batch: int, process_index: int,
           process_count: int) -> np.ndarray | None:
  """The coins of the n rows of a process's local batch `index` (None: no flips), by the rows' positions in
  the stream of all processes: the same flips for any process count."""
  if seed is None:
    return None
  first = (index * process_count + process_index) * local_batch
  return _coin(seed, np.arange(first, first + n, dtype=np.uint64))


def _coin(seed: int, positions: np.ndarray) -> np.ndarray:
  """A fair coin per stream position (splitmix64 of seed and position): stateless, vectorised."""
  z = positions + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return ((z ^ (z >> np.uint64(31))) >> np.uint64(63)).astype(bool)


def train_dataset(sources: Sequence[Any], weights: Sequence[float] | None, seed: int, hflip: bool,
                  local_batch: int, process_index: int, process_count: int,
                  label_key: str = "label") -> grain.MapDataset:
  """The infinite dataset of one process's local batches as a Grain pipeline (the random-access part of
  TrainLoader with Grain worker processes; the order `_StreamIds` reproduces)."""
  reader = _BatchReader(sources, {"label": label_key}, seed if hflip else None, local_batch, process_index,
                        process_count)
  ds = id_dataset([len(s) for s in sources], weights, seed)
  ds = ds.repeat().batch(local_batch, drop_remainder=True)[process_index::process_count]
  return ds.map_with_index(reader)


def id_dataset(lengths: Sequence[int], weights: Sequence[float] | None, seed: int) -> grain.MapDataset:
  """One epoch of the record ids of the training stream (the sources concatenated): the shuffled
  concatenation, or the mixture of the sources each shuffled with its own seed."""
  offsets = np.cumsum([0] + [int(n) for n in lengths])
  ids = [grain.MapDataset.range(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]
  if weights is None:
    return grain.MapDataset.concatenate(ids).shuffle(seed)
  return grain.MapDataset.mix([r.shuffle(seed + 1 + i) for i, r in enumerate(ids)], list(weights))


def _permutation(n: int, seed: int) -> np.ndarray:
  """Grain's shuffle of one epoch of n elements under `seed` (position j -> element), for all j at once:
  `grain.experimental.index_shuffle(j, n - 1, seed, 4)` (tested equal) without a Python call per element.

  Grain's C++ (index_shuffle.cc): a Simon cipher with words of W bits, W = max(ceil(log2(n - 1)) rounded up
  to even, 16) / 2, round keys from `std::seed_seq{seed}`, two double rounds, re-encrypted while above
  n - 1 (cycle walking). A block of 16 bits over a few elements would take thousands of re-encryptions
  each: there the cycles of the whole block's table are walked by pointer doubling instead.
  """
  if n <= 1:
    return np.zeros(max(n, 0), np.int64)
  top = n - 1
  bits = math.ceil(math.log2(top)) if top > 1 else 0  # log2 of libm, as Grain's std::log2
  w = max(bits + bits % 2, 16) // 2
  mask, shift = np.uint64((1 << w) - 1), np.uint64(w)
  keys = [np.uint64(k) & mask for k in _seed_seq(seed, _SHUFFLE_ROUNDS)]

  def rotl(x: np.ndarray, r: int) -> np.ndarray:
    return ((x << np.uint64(r)) | (x >> np.uint64(w - r))) & mask

  def simon(x: np.ndarray) -> np.ndarray:
    return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

  def encrypt(v: np.ndarray) -> np.ndarray:
    left, right = (v >> shift) & mask, v & mask
    for r in range(0, _SHUFFLE_ROUNDS, 2):
      left ^= simon(right) ^ keys[r]
      right ^= simon(left) ^ keys[r + 1]
    return (left << shift) | right

  block = 1 << 2 * w
  if block > 4 * n:
    nxt = encrypt(np.arange(block, dtype=np.uint64)).astype(np.int64)  # a permutation of the block
    hit = nxt <= top
    while not hit[:n].all():  # nxt[x]: x's answer where hit, else a value ever further along x's cycle
      nxt, hit = np.where(hit, nxt, nxt[nxt]), hit | hit[nxt]
    return nxt[:n]
  out = np.arange(n, dtype=np.uint64)
  todo = np.arange(n)
  while todo.size:
    out[todo] = encrypt(out[todo])
    todo = todo[out[todo] > np.uint64(top)]
  return out.astype(np.int64)


def _seed_seq(seed: int, n: int) -> list[int]:
  """`std::seed_seq{seed}.generate` of n 32-bit words (the algorithm the C++ standard specifies)."""
  words, s = [0x8B8B8B8B] * n, 1
  t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
  p = (n - t) // 2
  q, m = p + t, max(s + 1, n)

  def mix(x: int) -> int:
    return x ^ (x >> 27)
  for k in range(m):
    r1 = 1664525 * mix(words[k % n] ^ words[(k + p) % n] ^ words[(k - 1) % n]) & _M32
    r2 = r1 + (s if k == 0 else k % n + (seed & _M32) if k <= s else k % n) & _M32
    words[(k + p) % n] = (words[(k + p) % n] + r1) & _M32
    words[(k + q) % n] = (words[(k + q) % n] + r2) & _M32
    words[k % n] = r2
  for k in range(m, m + n):
    r3 = 1566083941 * mix((words[k % n] + words[(k + p) % n] + words[(k - 1) % n]) & _M32) & _M32
    r4 = (r3 - k % n) & _M32
    words[(k + p) % n] ^= r3
    words[(k + q) % n] ^= r4
    words[k % n] = r4
  return words


def _mixture(positions: np.ndarray, proportions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(dataset, key in it) of each position of Grain's mixture with integer proportions, vectorised: Grain's
  `_dataset_and_key_of_next_element` (the first dataset whose count of elements up to k rises at k)."""
  remaining = sum(proportions)
  k, k1 = positions.astype(np.int64), positions.astype(np.int64) + 1
  which, key = np.full(len(k), -1, np.int64), np.zeros(len(k), np.int64)
  for d, p in enumerate(proportions):
    nk, nk1 = k * (remaining - p) // remaining, k1 * (remaining - p) // remaining
    hit = (which < 0) & ((k - nk) != (k1 - nk1))
    which[hit], key[hit] = d, (k1 - nk1)[hit] - 1
    remaining -= p
    k, k1 = nk, nk1
  return which, key


class _StreamIds:
  """The record ids at any positions of `train_dataset`'s stream, for a whole batch at a time.

  Exactly Grain's ids (tested against it), without its Python per element: shuffling position g of a
  dataset of n gives permutation(n, seed + g // n)[g % n]; a weighted mixture first maps g to a spec and
  a key by Grain's selection map (weights scaled so the smallest is 100, as `MapDataset.mix` does), spec
  d's keys shuffled with seed + 1 + d. An epoch's permutation is computed once, the next one ahead in a
  background thread.
  """

  def __init__(self, lengths: Sequence[int], weights: Sequence[float] | None, seed: int):
    self.lengths, self.seed = [int(n) for n in lengths], int(seed)
    self.offsets = np.cumsum([0] + self.lengths)
    self.proportions = None if weights is None else [int(w * (100 / min(weights))) for w in weights]
    self._perms: dict[tuple[int, int], concurrent.futures.Future] = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(1)
    self._lock = threading.Lock()  # the read threads call it
    weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    with self._lock:
      return self._ids(np.asarray(positions, np.int64))

  def _ids(self, positions: np.ndarray) -> np.ndarray:
    if self.proportions is None:
      return self._shuffled(int(self.offsets[-1]), self.seed, positions)
    which, keys = _mixture(positions, self.proportions)
    ids = np.empty_like(positions)
    for d in np.unique(which).tolist():
      rows = which == d
      ids[rows] = self.offsets[d] + self._shuffled(self.lengths[d], self.seed + 1 + d, keys[rows])
    return ids

  def _shuffled(self, n: int, seed: int, positions: np.ndarray) -> np.ndarray:
    epochs = positions // n
    out = np.empty_like(positions)
    for e in np.unique(epochs).tolist():
      rows = epochs == e
      out[rows] = self._perm(n, (seed + e) % 2**32)[positions[rows] - e * n]
    return out

  def _perm(self, n: int, seed: int) -> np.ndarray:
    for key in ((n, seed), (n, (seed + 1) % 2**32)):  # this epoch's, and the next one's ahead
      if key not in self._perms:
        self._perms[key] = self._pool.submit(_permutation, *key)
    while len(self._perms) > 2 * len(self.lengths) + 2:  # oldest first; each spec needs two epochs at most
      del self._perms[next(iter(self._perms))]
    return self._perms[(n, seed)].result()


class _Prefetch:
  """Items `make(k)` for k = next_index, next_index + 1, ..., up to `stop`, made `depth` ahead by a pool of
  threads and yielded in order; `{"next_index": k}` is the state (as Grain's threaded iterator's)."""

  def __init__(self, make: Callable[[int], Any], depth: int, stop: int | None = None,
               threads: int | None = None):
    self._make, self._depth, self._stop = make, max(1, depth), stop
    self._pool = concurrent.futures.ThreadPoolExecutor(threads or shards.read_threads())
    weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
    self._next, self._pending = 0, {}

  def __iter__(self) -> _Prefetch:
    return self

  def __next__(self) -> Any:
    if self._stop is not None and self._next >= self._stop:
      raise StopIteration
    for k in range(self._next, self._next + self._depth):
      if k not in self._pending and (self._stop is None or k < self._stop):
        self._pending[k] = self._pool.submit(self._make, k)
    item = self._pending.pop(self._next).result()
    self._next += 1
    return item

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next}

  def set_state(self, state: dict[str, Any]) -> None:
    for f in self._pending.values():
      f.cancel()
    self._next, self._pending = int(state["next_index"]), {}


def _depth(source: Any, local_batch: int) -> int:
  """Batches read ahead: two per read thread, within _IN_FLIGHT_BYTES of images (two at least)."""
  image_bytes = local_batch * int(np.prod(source[0]["image"].shape)) if len(source) else 1
  return max(2, min(2 * shards.read_threads(), _IN_FLIGHT_BYTES // max(1, image_bytes)))


def cache_bytes(sources: Sequence[Any], hflip: bool) -> int:
  """Host memory `_CachedReader` takes for the records of `sources`: uint8 images (twice with flips: as read
  and mirrored) and int32 labels."""
  copies = 2 if hflip else 1
  return sum(len(s) * (copies * int(np.prod(s[0]["image"].shape)) + 4) for s in sources if len(s))


def available_memory() -> int:
  """Bytes of host memory available to new allocations now: MemAvailable of /proc/meminfo (Linux: free
  memory plus the page cache the kernel can drop), else the free physical pages; 0 when neither is known."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return 0


def use_host_cache(setting: Any, nbytes: int) -> bool:
  """Whether a stage whose train records take `nbytes` in host memory (`cache_bytes`) is held there.

  `setting` is config.train.host_cache: "off", "on", a budget in bytes, or "auto": a quarter of the
  memory available when the loader opens (the rest for the model, evaluation and the other processes of
  the host, each of which holds its own copy).
  """
  setting = str(setting)
  if setting in ("off", "on"):
    return setting == "on"
  if setting == "auto":
    return nbytes <= available_memory() // 4
  return nbytes <= float(setting)


class TrainLoader:
  """Infinite iterator of `{"image": uint8 [B,H,W,3], "label": int32 [B]}` global batches.

  `label_key="bin"` gives the quality bin as the label (the master's training). `get_state()` /
  `set_state()` save and restore the position: a restored loader yields the same next batch.
  `host_cache` (config.train.host_cache, `use_host_cache`) holds the records in host memory when they fit
  (`cached` says whether they are): the same batches and states as reading them from the shards, which
  the threaded path does otherwise; Grain worker processes (num_workers > 0) always read the shards.
  """

  def __init__(self, workdir: str | os.PathLike[str], split: str, specs: Sequence[str],
               weights: Sequence[float] | None, global_batch: int, seed: int, mesh: Mesh,
               hflip: bool, num_workers: int, label_key: str = "label", host_cache: Any = "auto"):
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

    p, count = jax.process_index(), jax.process_count()
    self.cached = False
    if num_workers > 0:
      ds = train_dataset(sources, weights, seed, hflip, local, p, count, label_key)
      _absl_flags_parsed()
      self._it = iter(ds.to_iter_dataset(_READ).mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers)))
      self._on_devices = False
      return
    flip_seed = seed if hflip else None
    self.cached = use_host_cache(host_cache, cache_bytes(sources, hflip))
    if self.cached:
      reader: Callable[[int, np.ndarray], dict[str, np.ndarray]] = _CachedReader(sources, label_key, flip_seed,
                                                                                   local, p, count)
    else:
      reader = _BatchReader(sources, {"label": label_key}, flip_seed, local, p, count)
    ids = _StreamIds([len(s) for s in sources], weights, seed)

    def make(k: int) -> dict[str, jax.Array]:
      first = (k * count + p) * local  # process p's k-th batch is batch k * count + p of the stream
      return _global(reader(k, ids(np.arange(first, first + local))), mesh, global_batch)
    self._it, self._on_devices = _Prefetch(make, _depth(sources[0], local)), True

  def __iter__(self) -> TrainLoader:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch = next(self._it)
    return batch if self._on_devices else _global(batch, self._mesh, self._global_batch)

  def get_state(self) -> dict[str, Any]:
    """The iterator state (JSON-serialisable), to checkpoint with the model: `{"next_index": k}` on the
    threaded path, as Grain's threaded iterator had it; Grain's multiprocessing state with workers."""
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
  """`eval_batches` over any random-access source of encoded records (`.read(i)`, `len`; `.read_batch(ids)`
  when it has one): e.g. an external benchmark set read from its own files."""
  local = _check_batch(global_batch, mesh, "evaluation")
  n = len(source)
  if n == 0:
    return
  start, stop = parallel.process_slice(n)
  num_batches = -(-(-(-n // jax.process_count())) // local)  # of the largest process slice
  make = _eval_batch(source, start, stop, local)
  yield from _Prefetch(lambda k: _global(make(k), mesh, global_batch), _depth(source, local), num_batches)


def local_eval_batches(source: Any, start: int, stop: int, local_batch: int,
                       num_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """Records [start, stop) of `source` in order, as `num_batches` numpy batches padded with mask False.

  A record with a negative label (an external file that could not be read) is masked like padding.
  """
  yield from _Prefetch(_eval_batch(source, start, stop, local_batch), _depth(source, local_batch), num_batches)


def _eval_batch(source: Any, start: int, stop: int, local_batch: int) -> Callable[[int], dict[str, np.ndarray]]:
  """Local batch k of records [start, stop): read, masked, padded (past the records: padding only)."""
  reader = _BatchReader([source], {k: k for k in ("label", "bin", "bitstream_bin")})
  shape = source[0]["image"].shape

  def make(k: int) -> dict[str, np.ndarray]:
    a, b = start + k * local_batch, min(stop, start + (k + 1) * local_batch)
    batch = None
    if a < b:
      batch = reader(k, np.arange(a, b))
      batch["mask"] = batch["label"] >= 0
    return _pad(batch, local_batch, shape)
  return make


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
