"""Decision rules of the master-slave system: class probabilities [B, C] from the K branch outputs.

branch_logits [K, B, C] are the slave's vmapped outputs, master_logits [B, K] the master's bin logits
(bin k <-> branch k), bins [B] integer bin indices. Every rule applies softmax in float32 and returns [B, C].
- `ms` (the paper's Eq. 2): the branch of the master's most probable bin. Ties go to the lowest bin index,
  as np.argmax; the argmax of the master's softmax is the argmax of its logits, which is what is computed.
- `ams` (Eq. 3): per class, the max over branches of the branch probabilities. Returned as the raw max
  (not renormalised, so rows sum to >= 1), as in the paper; its top-1 is the argmax of that max.
- `map_rule`: sum_k p(bin k | x) p_k(y | x), the full posterior the paper left out for cost.
- `oracle`: the branch of the given bin (the true bin: an upper bound; the bitstream's bin: the
  "bitstream" rule). Bins outside [0, K) give NaN rows rather than a silently wrong branch.
- `hybrid`: the bitstream's branch when the bitstream's bin is a degradation bin (not 0), else MS's. The
  bitstream reads only the last encode: a strong last codec is certain, but a mild one may hide a strong
  earlier encode (`jpeg:10+jpeg:90` reads as quality 90) that only the master, which sees pixels, can find.
- `temper`: branch logits divided by each branch's temperature (the calibrate stage's), so that `ams` and
  `map_rule` of tempered logits are the `ams_cal` and `map_cal` rules. The learned gate is `map_rule` with
  the gate's logits in place of the master's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _check(branch_logits: Array, master_logits: Array | None = None) -> None:
  if branch_logits.ndim != 3:
    raise ValueError(f"branch_logits must be [K, B, C], got shape {branch_logits.shape}")
  if master_logits is not None and master_logits.shape != branch_logits.shape[:2][::-1]:
    raise ValueError(f"master_logits must be [B, K] = {branch_logits.shape[:2][::-1]} for branch_logits "
                     f"{branch_logits.shape}, got {master_logits.shape}")


def _pick(probs: Array, index: Array) -> Array:
  """probs[index[b], b, :] for each b; indices outside [0, K) (negative ones too) give NaN."""
  k = probs.shape[0]
  index = jnp.where((index >= 0) & (index < k), index, k).astype(jnp.int32)
  return jnp.take_along_axis(probs, index[None, :, None], axis=0, mode="fill", fill_value=jnp.nan)[0]


@jax.jit
def ms(branch_logits: Array, master_logits: Array) -> Array:
  _check(branch_logits, master_logits)
  return _pick(jax.nn.softmax(branch_logits.astype(jnp.float32), axis=-1), jnp.argmax(master_logits, axis=-1))


@jax.jit
def ams(branch_logits: Array) -> Array:
  _check(branch_logits)
  return jnp.max(jax.nn.softmax(branch_logits.astype(jnp.float32), axis=-1), axis=0)


@jax.jit
def map_rule(branch_logits: Array, master_logits: Array) -> Array:
  _check(branch_logits, master_logits)
  p_bin = jax.nn.softmax(master_logits.astype(jnp.float32), axis=-1)
  p_cls = jax.nn.softmax(branch_logits.astype(jnp.float32), axis=-1)
  return jnp.einsum("bk,kbc->bc", p_bin, p_cls, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def temper(branch_logits: Array, temperatures: Array) -> Array:
  """[K, B, C] logits / T_k per branch: a temperature changes a branch's confidence, never its top-1."""
  _check(branch_logits)
  if temperatures.shape != branch_logits.shape[:1]:
    raise ValueError(f"temperatures must be [K] = {branch_logits.shape[:1]}, got {temperatures.shape}")
  return branch_logits.astype(jnp.float32) / temperatures.astype(jnp.float32)[:, None, None]


@jax.jit
def oracle(branch_logits: Array, bins: Array) -> Array:
  _check(branch_logits)
  if bins.shape != branch_logits.shape[1:2]:
    raise ValueError(f"bins must be [B] = {branch_logits.shape[1:2]}, got {bins.shape}")
  return _pick(jax.nn.softmax(branch_logits.astype(jnp.float32), axis=-1), bins)


@jax.jit
def hybrid(branch_logits: Array, master_logits: Array, bitstream_bins: Array) -> Array:
  """The bitstream's branch where it names a degradation bin, else MS's: the last encode's reading is exact
  when that encode is strong, and only the master sees a strong encode behind a mild one."""
  _check(branch_logits, master_logits)
  if bitstream_bins.shape != branch_logits.shape[1:2]:
    raise ValueError(f"bitstream_bins must be [B] = {branch_logits.shape[1:2]}, got {bitstream_bins.shape}")
  route = jnp.where(bitstream_bins != 0, bitstream_bins, jnp.argmax(master_logits, axis=-1))
  return _pick(jax.nn.softmax(branch_logits.astype(jnp.float32), axis=-1), route)
