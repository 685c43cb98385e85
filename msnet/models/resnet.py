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
follows each). Padding is torch's (symmetric ints), so strided convs and the max pool see the same pixels as
torchvision's.

The norm (`model.norm`) is "group" (GroupNorm, `group_count` groups: the same in training and inference, for
training from scratch at small batches) or "batch" (`BatchNorm`: torch's BatchNorm2d, which torchvision's
weights need). BatchNorm's running statistics are the `batch_stats` collection (mean, var per norm layer, next
to its scale/bias params); the slave vmaps them over its branches like the params, so each branch has its own
statistics and the trunk one copy. A part runs in training mode (batch statistics, running statistics updated)
only where the runner's `norm_train` says so (the slave's caller decides per part: msnet.train.stages).
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
MOMENTUM = 0.9  # weight of the old running statistics: torch's BatchNorm2d momentum 0.1


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


class BatchNorm(nn.Module):
  """torch's BatchNorm2d over NHWC: normalises with the batch's biased variance and, in training, updates the
  running mean and the running *unbiased* variance (torch's rule; nn.BatchNorm keeps the biased one) with
  momentum `MOMENTUM`. Variables as nn.BatchNorm's: params scale/bias, batch_stats mean/var. Statistics in
  float32, two-pass (no E[x^2] - E[x]^2 cancellation), over the whole global batch under jit."""
  use_running_average: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean = jnp.mean(x32, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
      if not self.is_initializing():
        n = x.size // c
        ra_mean.value = MOMENTUM * ra_mean.value + (1 - MOMENTUM) * mean
        ra_var.value = MOMENTUM * ra_var.value + (1 - MOMENTUM) * var * (n / max(n - 1, 1))
    y = (x32 - mean) * (jax.lax.rsqrt(var + EPSILON) * scale) + bias
    return y.astype(self.dtype)


def _norm(channels: int, dtype: Any, name: str, norm: str, norm_train: bool) -> nn.Module:
  if norm == "batch":
    return BatchNorm(use_running_average=not norm_train, dtype=dtype, name=name)
  return nn.GroupNorm(num_groups=group_count(channels), epsilon=EPSILON, use_fast_variance=False, dtype=dtype,
                      name=name)


class Stem(nn.Module):
  """The stem conv; where the row has `relu` (ResNet-50's post-activation stem) followed by norm and ReLU."""
  spec: LayerSpec
  norm: str = "group"
  norm_train: bool = False
  dtype: Any = jnp.float32
  policy: ConvPolicy | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    x = Conv(s.features, s.kernel, s.stride, s.padding, dtype=self.dtype, policy=self.policy, kernel_init=CONV_INIT,
             use_bias=False, name="conv")(x)
    return nn.relu(_norm(s.features, self.dtype, "norm", self.norm, self.norm_train)(x)) if s.relu else x


class BasicBlock(nn.Module):
  """Pre-activation basic block (He et al. 2016b)."""
  features: int
  stride: int = 1
  norm: str = "group"
  norm_train: bool = False
  dtype: Any = jnp.float32
  policy: ConvPolicy | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(Conv, dtype=self.dtype, policy=self.policy, kernel_init=CONV_INIT, use_bias=False)
    norm = functools.partial(_norm, dtype=self.dtype, norm=self.norm, norm_train=self.norm_train)
    pre = nn.relu(norm(x.shape[-1], name="norm1")(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, 0, name="shortcut")(pre)
    y = conv(self.features, 3, self.stride, 1, name="conv1")(pre)
    y = conv(self.features, 3, 1, 1, name="conv2")(nn.relu(norm(self.features, name="norm2")(y)))
    return y + shortcut


class Bottleneck(nn.Module):
  """Post-activation bottleneck block, v1.5: the stride on the 3x3 conv (torchvision's)."""
  features: int
  stride: int = 1
  norm: str = "group"
  norm_train: bool = False
  dtype: Any = jnp.float32
  policy: ConvPolicy | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(Conv, dtype=self.dtype, policy=self.policy, kernel_init=CONV_INIT, use_bias=False)
    norm = functools.partial(_norm, dtype=self.dtype, norm=self.norm, norm_train=self.norm_train)
    mid = self.features // EXPANSION
    y = nn.relu(norm(mid, name="norm1")(conv(mid, 1, 1, 0, name="conv1")(x)))
    y = nn.relu(norm(mid, name="norm2")(conv(mid, 3, self.stride, 1, name="conv2")(y)))
    y = norm(self.features, name="norm3")(conv(self.features, 1, 1, 0, name="conv3")(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = norm(self.features, name="shortcut_norm")(
          conv(self.features, 1, self.stride, 0, name="shortcut")(x))
    return nn.relu(y + shortcut)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def apply_resnet(layers: tuple[LayerSpec, ...], x: Array, train: bool, *, norm: str = "group",
                 norm_train: bool = False, dropout: float = 0.0, dtype: Any = jnp.float32,
                 policy: ConvPolicy | None = None) -> Array:
  """Runs ResNet rows on x in the calling compact module (the `run` of layers.Stack for ResNet tables).

  `norm_train`: BatchNorm layers normalise with the batch's statistics and update their running ones (False:
  the running ones, inference). `train` and `dropout` are unused (no dropout layer): the signature is the one
  every table runner has.
  """
  del train, dropout
  if norm not in ("group", "batch"):
    raise ValueError(f"model.norm {norm!r}: the ResNets take 'group' (GroupNorm) or 'batch' (BatchNorm)")
  kw = dict(norm=norm, norm_train=norm_train, dtype=dtype, policy=policy)
  for spec in layers:
    if spec.kind == "stem":
      x = Stem(spec, **kw, name=spec.name)(x)
    elif spec.kind in BLOCKS:
      x = BLOCKS[spec.kind](spec.features, spec.stride, **kw, name=spec.name)(x)
    elif spec.kind == "pool":
      p = spec.padding if isinstance(spec.padding, int) else 0
      x = nn.max_pool(x, (spec.kernel, spec.kernel), (spec.stride, spec.stride), ((p, p), (p, p)))
    elif spec.kind == "norm":
      x = nn.relu(_norm(x.shape[-1], dtype, spec.name, norm, norm_train)(x))
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
