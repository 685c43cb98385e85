"""The jitted groups: masked top-1/top-5 sums and bin confusions of a batch, reduced across devices by jit.

Every step is jitted two ways from one body: over one global batch [B, ...] fed from the host, and scanned
(`lax.scan`) over a spec's device-resident batches [N, B, ...] in one call (resident.py puts them there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from msnet import decision, methods, models, parallel

TOP_K = 5


def _counts(probs: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masked top-1 and top-5 correct counts of probs [M, B, C] -> ([M], [M]) int32, and top-1 per image [B, M].

  Top-1 is argmax (first index on ties, as NumPy); top-k counts the label when fewer than k classes have a
  strictly higher probability, which never depends on how ties are broken among the others. A NaN row
  (the oracle rules give one for a bin outside the branches) counts as wrong. The per-image top-1 keeps
  the batch axis leading, so it stays sharded like the batch.
  """
  k = min(TOP_K, probs.shape[-1])
  p_label = jnp.take_along_axis(probs, labels[None, :, None], axis=-1)
  m = mask[None, :] & ~jnp.any(jnp.isnan(probs), axis=-1)
  top1 = (jnp.argmax(probs, axis=-1) == labels[None, :]) & m
  topk = (jnp.sum(probs > p_label, axis=-1) < k) & m
  return jnp.sum(top1, axis=1, dtype=jnp.int32), jnp.sum(topk, axis=1, dtype=jnp.int32), top1.T


def _reliability(probs: jax.Array, labels: jax.Array, mask: jax.Array, num_bins: int) -> jax.Array:
  """[M, 3, num_bins] float32 sums per confidence bin: predictions, correct ones, summed confidence.

  Confidence is the top class's share of its row (AMS's rows of per-class maxima do not sum to 1); the bins
  are msnet.calibration's, (i / num_bins, (i + 1) / num_bins]. NaN rows are left out, as in `_counts`.
  """
  m = (mask[None, :] & ~jnp.any(jnp.isnan(probs), axis=-1)).astype(jnp.float32)
  safe = jnp.nan_to_num(probs)
  confidence = jnp.max(safe, axis=-1) / jnp.maximum(jnp.sum(safe, axis=-1), 1e-30)
  correct = (jnp.argmax(safe, axis=-1) == labels[None, :]).astype(jnp.float32)
  b = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  onehot = jax.nn.one_hot(b, num_bins, dtype=jnp.float32) * m[..., None]          # [M, B, bins]
  return jnp.stack([jnp.sum(onehot, axis=1), jnp.einsum("mb,mbk->mk", correct, onehot),
                    jnp.einsum("mb,mbk->mk", confidence, onehot)], axis=1)


def _confusion(true: jax.Array, pred: jax.Array, mask: jax.Array, k: int) -> jax.Array:
  """[k, k] masked counts, rows = true bin (a reduction, not a matmul, so the batch axis may stay sharded)."""
  t = jax.nn.one_hot(true, k, dtype=jnp.int32) * mask[:, None].astype(jnp.int32)
  p = jax.nn.one_hot(pred, k, dtype=jnp.int32)
  return jnp.sum(t[:, :, None] * p[:, None, :], axis=0)


def zeros(num_outputs: int, num_bins: int = 0, ece_bins: int = 0) -> dict[str, jax.Array]:
  acc = {"correct1": jnp.zeros((num_outputs,), jnp.int32), "correct5": jnp.zeros((num_outputs,), jnp.int32),
         "n": jnp.zeros((), jnp.int32)}
  if ece_bins:
    acc["reliability"] = jnp.zeros((num_outputs, 3, ece_bins), jnp.float32)
  if num_bins:
    acc["master_confusion"] = jnp.zeros((num_bins, num_bins), jnp.int32)
    acc["bitstream_confusion"] = jnp.zeros((num_bins, num_bins), jnp.int32)
  return acc


def _heads(module: Any, features: jax.Array) -> jax.Array:
  """The slave's vmapped branches alone, on given trunk features -> [K, B, C] float32 logits."""
  return module.branches(features, False, False).astype(jnp.float32)  # no dropout, running statistics


@dataclasses.dataclass
class Layout:
  """How the shared-trunk step lays out its outputs (fixed when it is built, so it compiles once).

  heads: names of the K=1 methods whose branch is stacked first in the params (baseline, da_*);
  slave: K when the assembled slave's branches follow them, else 0; branch_names: the `branch_<bin>`
  names reported for those branches ([] when "branches" is not evaluated); deepcloak: the baseline head
  on masked features; master: MS/MAP/hybrid/map_cal need it; gate: the learned gate runs; routed: the rules
  computed from the slave's logits; ece_bins: confidence bins of the reliability sums of every output;
  calibrated_branch_names: `branch_<bin>_cal`, each branch at its calibrated temperature (the same top-1 as
  the branch, its own confidences: what the calibration's ECE is measured on).
  """
  heads: list[str]
  slave: int
  branch_names: list[str]
  deepcloak: bool
  master: bool
  routed: list[str]
  gate: bool = False
  ece_bins: int = 15
  calibrated_branch_names: list[str] = dataclasses.field(default_factory=list)

  @property
  def outputs(self) -> list[str]:
    return [*self.heads, *self.branch_names, *self.calibrated_branch_names, *(["deepcloak"] if self.deepcloak else []),
            *self.routed]


def stacked_sharding(mesh: Any) -> NamedSharding:
  """A spec's device-resident batches [N, B, ...]: batch i is [B, ...] over "data", as a host-fed batch."""
  return NamedSharding(mesh, P(None, "data"))


def _jit(step: Callable[..., Any], arg_shardings: tuple[Any, ...], mesh: Any, stacked: bool
         ) -> Callable[..., tuple[dict[str, jax.Array], jax.Array]]:
  """step(acc, *args, batch) jitted over one global batch, or (stacked) scanned over the leading axis of
  [N, B, ...] batches in one call: the same sums, added batch by batch in the same order, and the per-image
  top-1 stacked to [N, B, outputs]."""
  repl = parallel.replicated(mesh)
  batches = stacked_sharding(mesh) if stacked else parallel.data_sharding(mesh)

  def scanned(acc: dict[str, jax.Array], *args: Any) -> tuple[dict[str, jax.Array], jax.Array]:
    *fixed, data = args
    return jax.lax.scan(lambda a, batch: step(a, *fixed, batch), acc, data)
  return jax.jit(scanned if stacked else step, in_shardings=(repl, *arg_shardings, batches),
                 out_shardings=(repl, batches), compiler_options=models.compiler_options())


def make_shared_step(module: Any, dc_module: Any, master: Any, layout: Layout, num_bins: int, mesh: Any,
                     shardings: tuple[Any, Any, Any, Any], traces: dict[str, int], stacked: bool = False
                     ) -> Callable[..., tuple[dict[str, jax.Array], jax.Array]]:
  """acc, variables, dc_variables, master_params, gate_params, temperatures, feature_mask, batch -> (acc plus this
  batch's sums, top-1 per image [B, outputs]); `stacked`: batch holds [N, B, ...] and top-1 is [N, B, outputs].

  The trunk runs once; every stacked head (K=1 methods sharing the baseline's trunk, then the slave's K
  branches) runs on its features in one vmapped call; DeepCloak's head on the masked features; the master
  once, and the gate (a network of the master's architecture) once. `temperatures` = the calibrate stage's
  {"branch": [K] (fitted on every bin: ams_cal), "own_bin": [K] (each on its bin: map_cal, branch_<bin>_cal),
  "master": []}. Unused arguments are None.
  """
  n_heads = len(layout.heads)

  def step(acc, params, dc_params, master_params, gate_params, temperatures, feature_mask, batch):
    traces["shared"] = traces.get("shared", 0) + 1
    mask = batch["mask"]
    out = dict(acc, n=acc["n"] + jnp.sum(mask, dtype=jnp.int32))
    out["bitstream_confusion"] = acc["bitstream_confusion"] + _confusion(batch["bin"], batch["bitstream_bin"],
                                                                         mask, num_bins)
    master_logits = None
    if layout.master:
      master_logits = master.apply({"params": master_params}, batch["image"]).astype(jnp.float32)
      out["master_confusion"] = acc["master_confusion"] + _confusion(
          batch["bin"], jnp.argmax(master_logits, axis=-1), mask, num_bins)
    gate_logits = master.apply({"params": gate_params}, batch["image"]).astype(jnp.float32) if layout.gate else None
    if module is None:  # no method needs the trunk
      return out, jnp.zeros((mask.shape[0], 0), bool)
    features = module.apply(params, batch["image"], method="trunk_features")
    probs = []
    if n_heads or layout.slave:
      logits = module.apply(params, features, method=_heads)   # [heads + slave K, B, C]
      probs.append(jax.nn.softmax(logits[:n_heads + (layout.slave if layout.branch_names else 0)], axis=-1))
      slave = logits[n_heads:]
    if layout.calibrated_branch_names:
      probs.append(jax.nn.softmax(decision.temper(slave, temperatures["own_bin"]), axis=-1))
    if layout.deepcloak:
      masked = features * feature_mask.astype(features.dtype)
      probs.append(jax.nn.softmax(dc_module.apply(dc_params, masked, method=_heads), axis=-1))
    for name in layout.routed:  # each rule's function in msnet.methods, the one the predictor calls
      rule = methods.get(name)
      inputs = methods.Inputs(slave, master_logits, gate_logits, temperatures,
                              batch[methods.BIN_FIELDS[rule.bins]] if rule.bins else None)
      probs.append(rule.fn(inputs)["probs"][None])
    every = jnp.concatenate(probs, axis=0)
    c1, c5, top1 = _counts(every, batch["label"], mask)
    out["correct1"], out["correct5"] = acc["correct1"] + c1, acc["correct5"] + c5
    out["reliability"] = acc["reliability"] + _reliability(every, batch["label"], mask, layout.ece_bins)
    return out, top1

  repl = parallel.replicated(mesh)
  return _jit(step, (*shardings, repl, repl), mesh, stacked)


def make_single_step(model: Any, mesh: Any, param_shardings: Any, traces: dict[str, int], name: str = "single",
                     stacked: bool = False) -> Callable[..., tuple[dict[str, jax.Array], jax.Array]]:
  """acc, variables, batch -> (acc, top-1 per image [B, 1]): one whole K=1 network (a method with its own trunk,
  e.g. stability); `stacked` as in `make_shared_step`."""
  def step(acc, variables, batch):
    traces[name] = traces.get(name, 0) + 1
    logits = model.apply(variables, batch["image"], train=False)
    c1, c5, top1 = _counts(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), batch["label"], batch["mask"])
    return {"correct1": acc["correct1"] + c1, "correct5": acc["correct5"] + c5,
            "n": acc["n"] + jnp.sum(batch["mask"], dtype=jnp.int32)}, top1

  return _jit(step, (param_shardings,), mesh, stacked)


def local_rows(x: jax.Array, mesh: Any, stacked: bool = False) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in the order it fed them to the batch; `stacked`:
  of [N, B, ...] batches, flattened to [N * local, ...] (batch after batch, as the host path concatenates)."""
  spec = (stacked_sharding(mesh) if stacked else parallel.data_sharding(mesh)).spec
  local = np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))
  return local.reshape(-1, *local.shape[2:]) if stacked else local


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's rows of equal-length local arrays, concatenated in process order (one collective).

  Process p holds records [p * per, (p + 1) * per) of a spec (parallel.process_slice), so after dropping
  the padding rows the result is in record order.
  """
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def fetch(tree: Any) -> Any:
  """Replicated global arrays -> NumPy (the local copy; valid on every process)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
