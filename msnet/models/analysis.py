"""Analytic cost and receptive fields, read off the layer tables.

FLOPs are 2 x multiply-accumulates of conv and fully connected layers, with padding taps counted (the
convention of ../shared/reference/cpu-performance.md: CIFAR VGG-16 = 0.6275 GFLOP/image); biases, ReLU,
pooling and normalisation are left out (<1 %). Channel counts come from the params, spatial sizes from
the table, and every branch layer counts K times (K = the leading axis of the branch params). A ResNet row
(stem, residual block) counts as one layer: the sum of its convs (`resnet.row_flops`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from msnet.models import resnet
from msnet.models.layers import LayerSpec
from msnet.models.master import Master
from msnet.models.slave import Slave, model_table


def _out_size(size: int, spec: LayerSpec) -> int:
  if spec.kind == "pool" and isinstance(spec.padding, int):
    return (size + 2 * spec.padding - spec.kernel) // spec.stride + 1
  if spec.kind == "pool" or spec.padding == "VALID":
    return (size - spec.kernel) // spec.stride + 1
  if spec.padding == "SAME":
    return math.ceil(size / spec.stride)
  return (size + 2 * spec.padding - spec.kernel) // spec.stride + 1


def _segments(module: Any, params: Mapping[str, Any]) -> list[tuple[tuple[LayerSpec, ...], Mapping[str, Any], bool]]:
  """(table rows, their params, stacked on K?) for each part of the module."""
  params = params.get("params", params)
  if isinstance(module, Slave):
    return [(module.table[:module.trunk_size], params["trunk"], False),
            (module.table[module.trunk_size:], params["branches"], True)]
  if isinstance(module, Master):
    return [(module.table, params, False)]
  raise TypeError(f"flops are defined for Slave and Master modules, got {type(module).__name__}")


def layer_flops(module: Any, params: Mapping[str, Any], image_size: int) -> list[dict[str, Any]]:
  """Per weight layer: dict(layer, flops (per image, all branches), out (h, w, c), copies (K or 1))."""
  rows, size = [], image_size
  for layers, p, stacked in _segments(module, params):
    for spec in layers:
      if spec.kind == "pool":
        size = _out_size(size, spec)
        continue
      if spec.kind in ("norm", "gap"):
        size = 1 if spec.kind == "gap" else size
        continue
      if spec.kind in ("stem", *resnet.BLOCK_KINDS):
        leaves = jax.tree.leaves(p[spec.name])
        copies = leaves[0].shape[0] if stacked else 1
        shapes = jax.tree.map(lambda a: tuple(a.shape[1:] if stacked else a.shape), p[spec.name])
        flops, size = resnet.row_flops(spec, shapes, size)
        rows.append(dict(layer=spec.name, flops=float(flops * copies), out=(size, size, spec.features), copies=copies))
        continue
      kernel = p[spec.name]["kernel"]
      shape = kernel.shape[1:] if stacked else kernel.shape
      copies = kernel.shape[0] if stacked else 1
      if spec.kind == "conv":
        size = _out_size(size, spec)
        flops = 2 * size * size * math.prod(shape)
        out = (size, size, shape[-1])
      else:
        flops, out = 2 * math.prod(shape), (shape[-1],)
      rows.append(dict(layer=spec.name, flops=float(flops * copies), out=out, copies=copies))
  return rows


def flops_per_image(module: Any, params: Mapping[str, Any], image_size: int) -> float:
  """Forward FLOPs (2 x MAC) of one image through `module` (a slave: trunk once + every branch)."""
  return sum(r["flops"] for r in layer_flops(module, params, image_size))


def receptive_fields(arch: str, variant: str = "imagenet") -> list[dict[str, Any]]:
  """Per conv/pool layer: receptive field size `rf` (pixels) and cumulative `stride` (jump) on the input."""
  cfg = ml_collections.ConfigDict(dict(arch=arch, variant=variant, width=1.0, fc_width=8))
  rf, jump, out = 1, 1, []
  for spec in model_table(cfg, num_classes=2):
    if spec.kind == "fc":
      break
    rf += (spec.kernel - 1) * jump
    jump *= spec.stride
    out.append(dict(layer=spec.name, rf=rf, stride=jump))
  return out
