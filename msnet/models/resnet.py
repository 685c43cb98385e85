"""ResNets as layer tables: the CIFAR pre-activation ResNet-18 / -34 and the ImageNet ResNet-50 (v1.5).

resnet18 / resnet34 (He et al. 2016, "Identity Mappings in Deep Residual Networks"; variant "cifar"): a 3x3
stem conv (no norm: every block starts with one), 4 stages of pre-activation basic blocks ([2, 2, 2, 2] or
[3, 4, 6, 3] blocks of 64, 128, 256, 512 channels, stride 2 at the first block of stages 2-4), then norm,
ReLU, global average pool and the classifier `fc`. A block is x + conv(relu(norm(conv(relu(norm(x)))))), the
shortcut a 1x1 conv of the pre-activated input where the shape changes.
resnet50 (torchvision's ResNet-50 v1.5; variant "imagenet"): 7x7/2 stem conv, norm, ReLU, 3x3/2 max pool,
4 stages of [3, 4, 6, 3] post-activation bottleneck blocks (1x1, 3x3 with the stage's stride, 1x1 to 4x the
width; a 1x1 conv + norm shortcut where the shape changes), global average pool, `fc`.

Rows: "stem", ("pool1"), "block<stage>_<i>" (kind "basic" / "bottleneck"), ("fc_norm"), "gap", "fc". Each row
is one param group, so `model.trunk_layers` counts residual blocks (the stem always in the trunk) and
re-splitting moves whole blocks. The width multiplier scales every conv (`scaled`). Convs have no bias (a norm
follows each); the norm is GroupNorm (`group_count` groups, torch's epsilon 1e-5). Padding is torch's
(symmetric ints), so strided convs and the max pool see the same pixels as torchvision's.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msnet.models.layers import CONV_INIT, OUT_FC_INIT, Conv, ConvPolicy, LayerSpec, group_count, scaled

Array = jax.Array
BLOCK_KINDS = ("basic", "bottleneck")
DEPTHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
          "resnet50": ("bottleneck", (3, 4, 6, 3))}
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4  # a bottleneck block's output is 4x its width
EPSILON = 1e-5  # torch's GroupNorm / BatchNorm epsilon


def resnet_table(arch: str, num_classes: int, width: float = 1.0) -> tuple[LayerSpec, ...]:
  """The rows of `arch` (a key of DEPTHS); features of a block row = its output channels."""
  kind, depths = DEPTHS[arch]
  if kind == "basic":
    rows = [LayerSpec("stem", "stem", scaled(64, width), kernel=3, padding=1, relu=False)]
  else:
    rows = [LayerSpec("stem", "stem", scaled(64, width), kernel=7, stride=2, padding=3),
            LayerSpec("pool1", "pool", kernel=3, stride=2, padding=1)]
  for stage, (channels, n) in enumerate(zip(WIDTHS, depths), start=1):
    out = scaled(channels, width) * (EXPANSION if kind == "bottleneck" else 1)
    for i in range(1, n + 1):
      rows.append(LayerSpec(f"block{stage}_{i}", kind, out, kernel=3, stride=2 if stage > 1 and i == 1 else 1))
  if kind == "basic":
    rows.append(LayerSpec("fc_norm", "norm"))
  return (*rows, LayerSpec("gap", "gap"), LayerSpec("fc", "fc", num_classes, relu=False))


def _norm(channels: int, dtype: Any, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=group_count(channels), epsilon=EPSILON, use_fast_variance=False, dtype=dtype,
                      name=name)


class Stem(nn.Module):
  """The stem conv; where the row has `relu` (ResNet-50's post-activation stem) followed by norm and ReLU."""
  spec: LayerSpec
  dtype: Any = jnp.float32
  policy: ConvPolicy | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    x = Conv(s.features, s.kernel, s.stride, s.padding, dtype=self.dtype, policy=self.policy, kernel_init=CONV_INIT,
             use_bias=False, name="conv")(x)
    return nn.relu(_norm(s.features, self.dtype, "norm")(x)) if s.relu else x


class BasicBlock(nn.Module):
  """Pre-activation basic block (He et al. 2016b)."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  policy: ConvPolicy | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(Conv, dtype=self.dtype, policy=self.policy, kernel_init=CONV_INIT, use_bias=False)
    pre = nn.relu(_norm(x.shape[-1], self.dtype, "norm1")(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, 0, name="shortcut")(pre)
    y = conv(self.features, 3, self.stride, 1, name="conv1")(pre)
    y = conv(self.features, 3, 1, 1, name="conv2")(nn.relu(_norm(self.features, self.dtype, "norm2")(y)))
    return y + shortcut


class Bottleneck(nn.Module):
  """Post-activation bottleneck block, v1.5: the stride on the 3x3 conv (torchvision's)."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  policy: ConvPolicy | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(Conv, dtype=self.dtype, policy=self.policy, kernel_init=CONV_INIT, use_bias=False)
    mid = self.features // EXPANSION
    y = nn.relu(_norm(mid, self.dtype, "norm1")(conv(mid, 1, 1, 0, name="conv1")(x)))
    y = nn.relu(_norm(mid, self.dtype, "norm2")(conv(mid, 3, self.stride, 1, name="conv2")(y)))
    y = _norm(self.features, self.dtype, "norm3")(conv(self.features, 1, 1, 0, name="conv3")(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = _norm(self.features, self.dtype, "shortcut_norm")(
          conv(self.features, 1, self.stride, 0, name="shortcut")(x))
    return nn.relu(y + shortcut)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def apply_resnet(layers: tuple[LayerSpec, ...], x: Array, train: bool, *, norm: str = "group",
                 dropout: float = 0.0, dtype: Any = jnp.float32, policy: ConvPolicy | None = None) -> Array:
  """Runs ResNet rows on x in the calling compact module (the `run` of layers.Stack for ResNet tables).

  `train` and `dropout` are unused (GroupNorm acts the same in training and inference; no dropout layer):
  the signature is the one every table runner has.
  """
  del train, dropout
  if norm != "group":
    raise ValueError(f"model.norm {norm!r}: the ResNets are built with GroupNorm ('group') for now")
  for spec in layers:
    if spec.kind == "stem":
      x = Stem(spec, dtype=dtype, policy=policy, name=spec.name)(x)
    elif spec.kind in BLOCKS:
      x = BLOCKS[spec.kind](spec.features, spec.stride, dtype=dtype, policy=policy, name=spec.name)(x)
    elif spec.kind == "pool":
      p = spec.padding if isinstance(spec.padding, int) else 0
      x = nn.max_pool(x, (spec.kernel, spec.kernel), (spec.stride, spec.stride), ((p, p), (p, p)))
    elif spec.kind == "norm":
      x = nn.relu(_norm(x.shape[-1], dtype, spec.name)(x))
    elif spec.kind == "gap":
      x = jnp.mean(x, axis=(1, 2))
    elif spec.kind == "fc":
      x = nn.Dense(spec.features, dtype=dtype, kernel_init=OUT_FC_INIT, name=spec.name)(x)
    else:
      raise ValueError(f"layer {spec.name}: {spec.kind!r} is not a ResNet row kind")
  return x


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // stride + 1


def row_flops(spec: LayerSpec, shapes: Any, size: int) -> tuple[float, int]:
  """(forward FLOPs of one copy of a stem or block row, its output size) for input maps `size` x `size`.

  `shapes`: the row's param shapes for one copy (a dict of {"kernel": shape} per conv). 2 x MAC of each conv.
  """
  def conv(name: str, at: int) -> float:
    return 2.0 * at * at * math.prod(shapes[name]["kernel"])

  if spec.kind == "stem":
    out = _conv_out(size, spec.kernel, spec.stride, int(spec.padding))
    return conv("conv", out), out
  out = _conv_out(size, 3, spec.stride, 1)
  flops = conv("shortcut", out) if "shortcut" in shapes else 0.0
  if spec.kind == "basic":
    return flops + conv("conv1", out) + conv("conv2", out), out
  return flops + conv("conv1", size) + conv("conv2", out) + conv("conv3", out), out
