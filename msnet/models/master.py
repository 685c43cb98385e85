"""The master: the paper's small quality-prediction CNN, 3 conv + 3 fully connected layers.

conv1-conv3 are 3x3 SAME convs with ReLU, each followed by a 2x2/2 max pool; fc1, fc2 (ReLU) and fc3 with
one output per quality bin. Input normalisation is the "standard" one, (x/255 - 0.5)/0.25: the master is
always trained from scratch. Param tree: {"conv1", "conv2", "conv3", "fc1", "fc2", "fc3"}.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msnet.models.layers import ConvPolicy, LayerSpec, apply_table, normalize_input


def master_table(conv_features: tuple[int, ...], fc_features: tuple[int, ...], num_bins: int
                 ) -> tuple[LayerSpec, ...]:
  rows: list[LayerSpec] = []
  for i, f in enumerate(conv_features, start=1):
    rows += [LayerSpec(f"conv{i}", "conv", f, kernel=3), LayerSpec(f"pool{i}", "pool", kernel=2, stride=2)]
  for i, f in enumerate(fc_features, start=1):
    rows.append(LayerSpec(f"fc{i}", "fc", f))
  rows.append(LayerSpec(f"fc{len(fc_features) + 1}", "fc", num_bins, relu=False))
  return tuple(rows)


class Master(nn.Module):
  """uint8 images [B,H,W,3] -> bin logits [B, num_bins] (float32)."""
  table: tuple[LayerSpec, ...]
  input_norm: str = "standard"
  dtype: Any = jnp.float32
  policy: ConvPolicy | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = normalize_input(x, self.input_norm)
    return apply_table(self.table, x, train, dtype=self.dtype, policy=self.policy).astype(jnp.float32)


def build_master(master_cfg: ml_collections.ConfigDict, num_bins: int, policy: ConvPolicy | None = None,
                 dtype: Any = jnp.float32) -> Master:
  """The master of `master_cfg` (conv_features: 3 widths, fc_features: 2 hidden widths)."""
  conv, fc = tuple(master_cfg.conv_features), tuple(master_cfg.fc_features)
  if len(conv) != 3 or len(fc) != 2:
    raise ValueError(f"the master has 3 conv and 3 FC layers: got conv_features={list(conv)}, "
                     f"fc_features={list(fc)} (+ the bin output layer)")
  return Master(table=master_table(conv, fc, num_bins), dtype=dtype, policy=policy)
