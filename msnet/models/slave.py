"""The slave: one shared trunk and K branches whose params are stacked on a leading axis (nn.vmap).

Param tree: {"trunk": {"conv1_1": {"kernel", "bias"}, ...}, "branches": {"conv5_1": ..., "fc6", "fc7", "fc8"}}
(plus "<conv>_norm" {"scale", "bias"} with norm="group"); every leaf under "branches" has a leading axis K.
All K branches run on the same trunk features in one vmapped computation and return logits [K, B, C].
The baseline network is the slave with K=1; `tile_branches` copies its branch K times so every branch
starts from the baseline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msnet.models.alexnet import alexnet_table
from msnet.models.layers import ConvPolicy, LayerSpec, Stack, normalize_input
from msnet.models.vgg import vgg16_table

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_table(model_cfg: ml_collections.ConfigDict, num_classes: int) -> tuple[LayerSpec, ...]:
  """The layer table of `model_cfg.arch`/`variant` at the configured widths."""
  if model_cfg.arch == "vgg16":
    return vgg16_table(num_classes, model_cfg.width, model_cfg.fc_width)
  if model_cfg.arch == "alexnet":
    return alexnet_table(model_cfg.variant, num_classes, model_cfg.width, model_cfg.fc_width)
  raise ValueError(f"model.arch {model_cfg.arch!r} is not 'vgg16' or 'alexnet'")


def trunk_size(table: tuple[LayerSpec, ...], trunk_layers: int) -> int:
  """Rows of `table` in the trunk: up to the trunk_layers-th conv and the pools right after it."""
  convs = [i for i, s in enumerate(table) if s.kind == "conv"]
  if not 1 <= trunk_layers <= len(convs):
    raise ValueError(f"model.trunk_layers={trunk_layers}: must be in [1, {len(convs)}], the number of conv "
                     f"layers ({', '.join(table[i].name for i in convs)})")
  n = convs[trunk_layers - 1] + 1
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

  def setup(self):
    kw = dict(norm=self.norm, dropout=self.dropout, dtype=self.dtype, policy=self.policy)
    self.trunk = Stack(self.table[:self.trunk_size], **kw)
    branch = nn.vmap(Stack, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=(None, None), out_axes=0, axis_size=self.num_branches)
    self.branches = branch(self.table[self.trunk_size:], **kw)

  def trunk_features(self, x: Array) -> Array:
    """The trunk output [B, h, w, C_trunk_out] for uint8 images x (what DeepCloak masks)."""
    return self.trunk(normalize_input(x, self.input_norm))

  def __call__(self, x: Array, *, train: bool = False, feature_mask: Array | None = None) -> Array:
    features = self.trunk_features(x)
    if feature_mask is not None:
      features = features * jnp.asarray(feature_mask, features.dtype)
    return self.branches(features, train).astype(jnp.float32)


def build_slave(model_cfg: ml_collections.ConfigDict, num_classes: int, num_branches: int,
                policy: ConvPolicy | None = None) -> Slave:
  """The slave of `model_cfg` (arch, variant, width, fc_width, norm, input_norm, trunk_layers, dropout,
  compute_dtype). `policy` picks conv formulations (None: measured default for the backend)."""
  if num_branches < 1:
    raise ValueError(f"num_branches must be >= 1, got {num_branches}")
  table = model_table(model_cfg, num_classes)
  return Slave(table=table, trunk_size=trunk_size(table, model_cfg.trunk_layers), num_branches=num_branches,
               norm=model_cfg.norm, input_norm=model_cfg.input_norm, dropout=model_cfg.dropout,
               dtype=DTYPES[model_cfg.compute_dtype], policy=policy)


def tile_branches(params: Mapping[str, Any], k: int) -> dict[str, Any]:
  """Slave params (or {"params": ...}) with the single (K=1) branch copied k times on the leading axis."""
  if "branches" not in params:
    if "params" in params:
      return {**params, "params": tile_branches(params["params"], k)}
    raise KeyError(f"no 'branches' in the params (top-level keys: {sorted(params)})")

  def tile(path, leaf):
    if leaf.shape[0] != 1:
      raise ValueError(f"branches/{jax.tree_util.keystr(path)} has {leaf.shape[0]} branches; tile_branches "
                       "expects the baseline's single branch (leading axis 1)")
    return jnp.repeat(leaf, k, axis=0)

  return {**params, "branches": jax.tree_util.tree_map_with_path(tile, params["branches"])}
