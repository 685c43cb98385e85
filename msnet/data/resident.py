"""Device-resident training data: a stage's records put on the devices once, every batch gathered and
flipped inside the jitted step, so the host does nothing per step but hand over a stream position.

The uint8 images and int32 labels of every train spec are concatenated and *replicated* on every device
(`ResidentLoader.data`): each device then gathers its own rows of the global batch from local memory, with
no collective, and every process builds the same arrays from its own full read of the shards. The cost is
the whole set once per device, which `use_device_data` weighs against config.train.device_data.

The stream (this path's own deterministic order; the host path keeps Grain's):
  - Position j of the global stream (j = step * global_batch + row) picks a spec and a draw of that spec
    by the rule of `grain.MapDataset.mix` (`mixture_tables`: Grain's interleaving, periodic in the sum S
    of its integer proportions, so a table of S entries gives it for every j); without weights, one spec
    is drawn: the concatenation of all records.
  - Draw d of a spec with N records is record `permute(d mod N)` of that spec, a pseudo-random
    permutation of [0, N) keyed by fold_in(fold_in(key(seed), spec), d div N): every spec epoch visits
    each record once, in a new order. The permutation is a 4-round Feistel network on the smallest
    even-bit domain >= N with cycle walking, so one index costs O(1) and no epoch needs a sort.
  - The image at position j is flipped when `coin(seed, j)`, the jnp twin of the host loader's coin.
The global batch of a step depends only on the position, never on the processes or devices; the iterator
state {"epoch", "position"} (epoch = position div the stage's record count) is what a checkpoint saves.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from msnet import errors, parallel
from msnet.data import shards

ROUNDS = 4
_U32 = 2**32


def _wide_mul(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(high, low) 32-bit halves of the 64-bit product of uint32 arrays (16-bit limbs, no uint64)."""
  a0, a1, b0, b1 = a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
  return p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16), (mid << 16) | (p00 & 0xFFFF)


def _mul64(hi: jax.Array, lo: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
  """(hi, lo) * c mod 2**64."""
  c_hi, c_lo = jnp.uint32(c >> 32), jnp.uint32(c & 0xFFFFFFFF)
  carry, low = _wide_mul(lo, c_lo)
  return carry + lo * c_hi + hi * c_lo, low


def _xor_shift(hi: jax.Array, lo: jax.Array, s: int) -> tuple[jax.Array, jax.Array]:
  """z ^ (z >> s) for 0 < s < 32."""
  return hi ^ (hi >> s), lo ^ ((lo >> s) | (hi << (32 - s)))


def coin(seed: int, positions: jax.Array) -> jax.Array:
  """loader._coin (splitmix64 of seed and position) in uint32 pairs: the same flips for the same
  positions (< 2**32), inside a jitted step and without jax_enable_x64."""
  c = seed * 0x9E3779B97F4A7C15 % 2**64
  c_hi, c_lo = jnp.uint32(c >> 32), jnp.uint32(c & 0xFFFFFFFF)
  lo = positions.astype(jnp.uint32) + c_lo
  hi = c_hi + (lo < c_lo).astype(jnp.uint32)
  hi, lo = _mul64(*_xor_shift(hi, lo, 30), 0xBF58476D1CE4E5B9)
  hi, lo = _mul64(*_xor_shift(hi, lo, 27), 0x94D049BB133111EB)
  return (hi >> 31).astype(bool)  # bit 63 of z ^ (z >> 31) is bit 63 of z


def _hash(x: jax.Array) -> jax.Array:
  """lowbias32: a 32-bit integer hash with good avalanche, the Feistel round function."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def half_bits(n: int) -> int:
  """Half the bits of the smallest even-bit power of two >= n: the Feistel halves' width."""
  return (max(1, math.ceil(math.log2(n))) + 1) // 2 if n > 1 else 0


def permute(x: jax.Array, n: jax.Array, half: jax.Array, keys: jax.Array) -> jax.Array:
  """Element i: the image of x[i] < n[i] under the permutation of [0, n[i]) keyed by keys[i] ([ROUNDS]
  uint32), half[i] = half_bits(n[i]). Cycle walking: re-encrypt until inside [0, n), at most a few rounds
  on average since the domain is < 4n."""
  x, n, half = x.astype(jnp.uint32), n.astype(jnp.uint32), half.astype(jnp.uint32)
  mask = (jnp.uint32(1) << half) - 1

  def encrypt(v: jax.Array) -> jax.Array:
    left, right = v >> half, v & mask
    for r in range(ROUNDS):
      left, right = right, left ^ (_hash(right ^ keys[:, r]) & mask)
    return (left << half) | right

  return jax.lax.while_loop(lambda v: jnp.any(v >= n), lambda v: jnp.where(v >= n, encrypt(v), v), encrypt(x))


def integer_proportions(weights: Sequence[float]) -> list[int]:
  """Grain's integer form of mixture weights: scaled so the smallest is 100, truncated."""
  scale = 100 / min(weights)
  return [int(w * scale) for w in weights]


def mixture_tables(proportions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(spec, draw) of positions [0, S) of `MapDataset.mix`'s interleaving (S = sum of proportions).

  Grain's rule, position k: walking the specs, k's count of spec i's elements is k minus the part left to
  the later specs, k * (rest - p_i) // rest; the first spec whose count steps between k and k + 1 provides
  element k. It is periodic: position q*S + r is spec[r]'s draw q * p_spec + draw[r].
  """
  total = sum(proportions)
  spec, draw = np.zeros(total, np.int32), np.zeros(total, np.int64)
  for k in range(total):
    rest, a, b = total, k, k + 1
    for i, p in enumerate(proportions):
      na, nb = a * (rest - p) // rest, b * (rest - p) // rest
      if a - na != b - nb:
        spec[k], draw[k] = i, b - nb - 1
        break
      rest, a, b = rest - p, na, nb
  return spec, draw


def spec_bytes(workdir: str | os.PathLike[str], split: str, specs: Sequence[str]) -> int:
  """Bytes the resident arrays of `specs` take on each device (images + labels)."""
  total = 0
  for spec in specs:
    src = shards.open_shards(shards.spec_dir(workdir, split, spec))
    if len(src):
      total += len(src) * (int(np.prod(src[0]["image"].shape)) + 4)
  return total


def use_device_data(setting: Any, nbytes: int, device: Any) -> bool:
  """Whether a stage whose records take `nbytes` on each device trains from device-resident data.

  `setting` is config.train.device_data: "off", "on" (refused when the device reports less memory than
  `nbytes`), a budget in bytes per device, or "auto": on accelerators when the records fit a quarter of the
  device's memory (`memory_stats()["bytes_limit"]`: the rest is the model's, activations included), on the
  CPU off. Off there because its data order is the one the committed results (the demo's tables) used,
  and the tests and the demo keep it; benchmarks/bench_steps_per_call.py measures what "on" changes there.
  """
  setting = str(setting)
  if setting == "off":
    return False
  limit = int((device.memory_stats() or {}).get("bytes_limit", 0))
  if setting == "on":
    if limit and nbytes > limit:
      raise errors.UserError(f"config.train.device_data='on': the stage's records take {nbytes / 2**30:.2f} GiB "
                             f"per device, more than the {limit / 2**30:.2f} GiB of {device}")
    return True
  if setting == "auto":
    return device.platform != "cpu" and nbytes <= limit // 4
  return nbytes <= float(setting)


class ResidentLoader:
  """The stage's records on the devices; `__next__` gives each step's stream position (a uint32 scalar),
  `batch(data, position)` builds that step's global batch inside the jitted step.

  Same interface as loader.TrainLoader (`num_records`, `get_state`, `set_state`), so the loop and the
  checkpoints treat both alike.
  """

  def __init__(self, workdir: str | os.PathLike[str], split: str, specs: Sequence[str],
               weights: Sequence[float] | None, global_batch: int, seed: int, mesh: Mesh, hflip: bool,
               label_key: str = "label"):
    if not specs:
      raise ValueError("ResidentLoader needs at least one spec")
    if weights is not None and (len(weights) != len(specs) or min(weights) <= 0):
      raise ValueError(f"weights {list(weights)} must be positive, one per spec {list(specs)}")
    data, processes = mesh.shape["data"], jax.process_count()
    if global_batch % data or global_batch % processes:
      raise ValueError(f"train global batch {global_batch} must be divisible by the 'data' mesh axis size "
                       f"({data}) and by the number of processes ({processes})")
    images, labels = [], []
    for spec in specs:
      src = shards.open_shards(shards.spec_dir(workdir, split, spec))
      if len(src) == 0:
        raise ValueError(f"no records for spec {spec!r} in split {split!r}")
      batch = src.read_arrays(fields=[label_key])
      images.append(batch["image"])
      labels.append(batch[label_key])
    sizes = np.asarray([len(x) for x in labels], np.int64)
    self.num_records = int(sizes.sum())
    if global_batch > self.num_records:
      raise ValueError(f"train global batch {global_batch} exceeds the {self.num_records} records of {list(specs)}")
    self._mesh, self._global_batch, self._seed, self._hflip = mesh, global_batch, seed, hflip
    if weights is None:  # one stream over the concatenation, as the host loader's unweighted case
      proportions, sizes = [1], np.asarray([self.num_records])
    else:
      proportions = integer_proportions(weights)
    spec_table, draw_table = mixture_tables(proportions)
    host = {
        "image": np.concatenate(images), "label": np.concatenate(labels),
        "spec_table": spec_table, "draw_table": draw_table.astype(np.uint32),
        "proportion": np.asarray(proportions, np.uint32), "size": sizes.astype(np.uint32),
        "offset": np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint32),
        "half": np.asarray([half_bits(int(n)) for n in sizes], np.uint32),
    }
    repl = parallel.replicated(mesh)
    self.nbytes = host["image"].nbytes + host["label"].nbytes
    self.data = {k: jax.make_array_from_callback(v.shape, repl, lambda idx, v=v: v[idx]) for k, v in host.items()}
    self.position = 0

  def __iter__(self) -> ResidentLoader:
    return self

  def __next__(self) -> np.ndarray:
    if self.position + self._global_batch > _U32:
      raise OverflowError(f"stream position {self.position}: the device-resident stream ends at 2**32 images")
    position = np.uint32(self.position)
    self.position += self._global_batch
    return position

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self.position // self.num_records, "position": self.position}

  def set_state(self, state: dict[str, Any]) -> None:
    if "position" not in state:
      raise ValueError(f"iterator state {sorted(state)} is not a device-resident one ({{'epoch', 'position'}}): "
                       "the checkpoint was written by the host data path; set config.train.device_data='host' "
                       "to resume it")
    self.position = int(state["position"])

  def indices(self, data: dict[str, jax.Array], position: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(record index into data["image"], stream position) of each row of the batch at `position`."""
    j = position.astype(jnp.uint32) + jnp.arange(self._global_batch, dtype=jnp.uint32)
    period = data["spec_table"].shape[0]
    r = j % jnp.uint32(period)
    spec = data["spec_table"][r]
    draw = (j // jnp.uint32(period)) * data["proportion"][spec] + data["draw_table"][r]
    size = data["size"][spec]
    epoch, within = draw // size, draw % size
    base = jax.random.key(self._seed)
    keys = jax.vmap(lambda s, e: jax.random.bits(jax.random.fold_in(jax.random.fold_in(base, s), e), (ROUNDS,),
                                                 jnp.uint32))(spec, epoch)
    return data["offset"][spec] + permute(within, size, data["half"][spec], keys), j

  def batch(self, data: dict[str, jax.Array], position: jax.Array) -> dict[str, jax.Array]:
    """The global batch at `position`: gathered from the resident records, rows split over "data"."""
    sharded = parallel.data_sharding(self._mesh)
    index, j = self.indices(data, position)
    index = jax.lax.with_sharding_constraint(index, sharded)
    images = jax.lax.with_sharding_constraint(data["image"][index], sharded)
    if self._hflip:
      flip = jax.lax.with_sharding_constraint(coin(self._seed, j), sharded)
      images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return {"image": images, "label": jax.lax.with_sharding_constraint(data["label"][index], sharded)}
