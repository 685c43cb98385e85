"""The slave: one shared trunk and K branches whose params are stacked on a leading axis (nn.vmap).

Param tree: {"trunk": {"conv1_1": {"kernel", "bias"}, ...}, "branches": {"conv5_1": ..., "fc6", "fc7", "fc8"}}
(plus "<conv>_norm" {"scale", "bias"} with norm="group"); every leaf under "branches" has a leading axis K.
A ResNet's groups are its rows ("stem", "block2_1": {"conv1", "norm1", ...}, "fc_norm", "fc"), so the cut
moves whole residual blocks. The arch's table and runner come from `registry`.
With model.norm="batch" (the ResNets) the network also has the `batch_stats` collection, laid out like the
params ({"trunk": {"block1_1": {"norm1": {"mean", "var"}}}, "branches": ... with the leading K axis}): each
branch has its own running statistics. Whole networks then travel as variables, {"params": ..., "batch_stats":
...} ({"params": ...} alone for every other norm); `move_to_trunk`, `resplit_params`, `tile_branches`,
`part_of` and `join_branches` take them and move every collection's layer with its params.
All K branches run on the same trunk features in one vmapped computation and return logits [K, B, C].
The baseline network is the slave with K=1; `tile_branches` copies its branch K times so every branch
starts from the baseline. Trunk and branches are one network cut at `trunk_layers`, so `resplit_params` moves
the cut (a relabelling of params: same logits), and one trained baseline serves every trunk depth.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msnet.models import registry
from msnet.models.layers import ConvPolicy, LayerSpec, Stack, apply_table, normalize_input

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_table(model_cfg: ml_collections.ConfigDict, num_classes: int) -> tuple[LayerSpec, ...]:
  """The layer table of `model_cfg.arch`/`variant` at the configured widths."""
  return registry.get(model_cfg.arch).table(model_cfg, num_classes)


def trunk_size(table: tuple[LayerSpec, ...], trunk_layers: int) -> int:
  """Rows of `table` in the trunk: up to the trunk_layers-th cut row (a conv layer of VGG/AlexNet, a residual
  block of a ResNet: `registry.CUT_KINDS`) and the pools right after it."""
  cuts = [i for i, s in enumerate(table) if s.kind in registry.CUT_KINDS]
  if not 1 <= trunk_layers <= len(cuts):
    raise ValueError(f"model.trunk_layers={trunk_layers}: must be in [1, {len(cuts)}], the number of "
                     f"{registry.CUT_KINDS[table[cuts[-1]].kind]} "
                     f"({', '.join(table[i].name for i in cuts)})")
  n = cuts[trunk_layers - 1] + 1
  while n < len(table) and table[n].kind == "pool":
    n += 1
  return n


class Slave(nn.Module):
  """Trunk = table[:trunk_size], K vmapped branches = table[trunk_size:]; uint8 in, logits [K,B,C] out."""
  table: tuple[LayerSpec, ...]
  trunk_size: int
  num_branches: int = 1
  norm: str = "none"
  input_norm: str = "standard"
  dropout: float = 0.0
  dtype: Any = jnp.float32
  policy: ConvPolicy | None = None
  run: Callable[..., Array] = apply_table  # the arch's table runner (registry.Arch.run)

  def setup(self):
    kw = dict(norm=self.norm, dropout=self.dropout, dtype=self.dtype, policy=self.policy, run=self.run)
    self.trunk = Stack(self.table[:self.trunk_size], **kw)
    branch = nn.vmap(Stack, variable_axes={"params": 0, "batch_stats": 0},
                     split_rngs={"params": True, "dropout": True}, in_axes=(None, None, None), out_axes=0,
                     axis_size=self.num_branches)
    self.branches = branch(self.table[self.trunk_size:], **kw)

  def trunk_features(self, x: Array, norm_train: bool = False) -> Array:
    """The trunk output [B, h, w, C_trunk_out] for uint8 images x (what DeepCloak masks)."""
    return self.trunk(normalize_input(x, self.input_norm), False, norm_train)

  def __call__(self, x: Array, *, train: bool = False, feature_mask: Array | None = None,
               norm_train: Collection[str] = ()) -> Array:
    """`train`: dropout on; `norm_train`: the parts ("trunk", "branches") whose BatchNorms use the batch's
    statistics and update their running ones (the others, and every part by default, run on running ones)."""
    features = self.trunk_features(x, "trunk" in norm_train)
    if feature_mask is not None:
      features = features * jnp.asarray(feature_mask, features.dtype)
    return self.branches(features, train, "branches" in norm_train).astype(jnp.float32)


def build_slave(model_cfg: ml_collections.ConfigDict, num_classes: int, num_branches: int,
                policy: ConvPolicy | None = None) -> Slave:
  """The slave of `model_cfg` (arch, variant, width, fc_width, norm, input_norm, trunk_layers, dropout,
  compute_dtype). `policy` picks conv formulations (None: measured default for the backend)."""
  if num_branches < 1:
    raise ValueError(f"num_branches must be >= 1, got {num_branches}")
  table = model_table(model_cfg, num_classes)
  return Slave(table=table, trunk_size=trunk_size(table, model_cfg.trunk_layers), num_branches=num_branches,
               norm=model_cfg.norm, input_norm=model_cfg.input_norm, dropout=model_cfg.dropout,
               dtype=DTYPES[model_cfg.compute_dtype], policy=policy, run=registry.get(model_cfg.arch).run)


def tile_branches(params: Mapping[str, Any], k: int) -> dict[str, Any]:
  """Slave params (or variables) with the single (K=1) branch copied k times on the leading axis."""
  if "branches" not in params:
    if "params" in params:
      return {c: tile_branches(v, k) if "branches" in v else v for c, v in params.items()}
    raise KeyError(f"no 'branches' in the params (top-level keys: {sorted(params)})")

  def tile(path, leaf):
    if leaf.shape[0] != 1:
      raise ValueError(f"branches/{jax.tree_util.keystr(path)} has {leaf.shape[0]} branches; tile_branches "
                       "expects the baseline's single branch (leading axis 1)")
    return jnp.repeat(leaf, k, axis=0)

  return {**params, "branches": jax.tree_util.tree_map_with_path(tile, params["branches"])}


def part_of(variables: Mapping[str, Any], part: str) -> dict[str, Any]:
  """{collection: its `part` ("trunk" or "branches")} of slave variables, collections without one left out."""
  return {c: v[part] for c, v in variables.items() if part in v}


def join_branches(trunk: Mapping[str, Any], branches: list[Mapping[str, Any]]) -> dict[str, Any]:
  """Slave variables of a trunk (`part_of(v, "trunk")`) and the branches of several networks (their
  `part_of(v, "branches")`, same layers), concatenated in order on the leading K axis."""
  out = {c: {"trunk": t} for c, t in trunk.items()}
  for c in dict.fromkeys(c for b in branches for c in b):
    out.setdefault(c, {})["branches"] = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *[b[c] for b in branches])
  return out


def trunk_weight_layers(table: tuple[LayerSpec, ...], trunk_layers: int) -> list[str]:
  """Names of the weight layers (convs; a ResNet's stem and blocks) in the trunk at `trunk_layers`."""
  return [s.name for s in table[:trunk_size(table, trunk_layers)] if s.kind != "pool"]


def resplit_params(params: Mapping[str, Any], table: tuple[LayerSpec, ...], trunk_layers: int) -> dict[str, Any]:
  """Slave params (with K branches) cut at `trunk_layers` instead of wherever they were cut before.

  The same network under `Slave(table, trunk_size(table, trunk_layers), K)` gives the same logits. Layers
  leaving the trunk get the leading K axis (every branch the same copy); layers joining the trunk must be
  equal in all K branches (always true for the K=1 baseline), since the trunk holds one copy.
  """
  return move_to_trunk(params, trunk_weight_layers(table, trunk_layers))


def _layer_of(key: str) -> str:
  """The weight layer a param group belongs to: a conv's GroupNorm ("conv3_1_norm") moves with its conv."""
  return key.removesuffix("_norm")


def move_to_trunk(params: Mapping[str, Any], trunk: Collection[str]) -> dict[str, Any]:
  """Slave params (or variables: every collection moves with the params' layers) with exactly the weight layers
  named in `trunk` (and their norms) in the trunk.

  The name-level core of `resplit_params`, for callers that recorded the trunk's layer names rather than a
  config (a re-split baseline's DONE.json).
  """
  tree = params["params"] if "params" in params else params
  if "trunk" not in tree or "branches" not in tree:
    raise KeyError(f"slave params need 'trunk' and 'branches' (top-level keys: {sorted(tree)})")
  trunk = set(trunk)
  known = {_layer_of(k) for part in ("trunk", "branches") for k in tree[part]}
  if unknown := sorted(trunk - known):
    raise ValueError(f"trunk layers {unknown} are not in the params (their layers: {sorted(known)}); the params "
                     "belong to another network than the one being re-split to")
  k = jax.tree.leaves(tree["branches"])[0].shape[0]
  if "params" in params:
    return {c: _move(v, trunk, k, "" if c == "params" else f"{c}/") for c, v in params.items()}
  return _move(params, trunk, k, "")


def _move(tree: Mapping[str, Any], trunk: set[str], k: int, where: str) -> dict[str, Any]:
  """One collection of `move_to_trunk` (`where`: "" for the params, else "<collection>/", as messages name it).
  The params always have both parts; another collection only the parts it has layers in (a ResNet-50 branch
  of only `fc` has no batch_stats), as a fresh model.init lays it out."""
  new_trunk, new_branches = {}, {}
  for key, p in tree.get("trunk", {}).items():
    if _layer_of(key) in trunk:
      new_trunk[key] = p
    else:
      new_branches[key] = jax.tree.map(lambda x: x[None].repeat(k, axis=0), p)
  for key, p in tree.get("branches", {}).items():
    if _layer_of(key) not in trunk:
      new_branches[key] = p
      continue
    for path, x in jax.tree_util.tree_leaves_with_path(p):
      host = np.asarray(x)
      if not (host == host[:1]).all():
        raise ValueError(
            f"{where}branches/{key}{jax.tree_util.keystr(path)} differs between the {k} branches, so it cannot move "
            f"into the shared trunk (one copy). Re-split the K=1 baseline to this depth instead and fine-tune the "
            f"branches there (msnet.train loads the baseline re-split to config.model.trunk_layers)")
    new_trunk[key] = jax.tree.map(lambda x: x[0], p)
  return {name: part for name, part in (("trunk", new_trunk), ("branches", new_branches)) if part or not where}
