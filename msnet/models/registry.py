"""The model registry: one entry per `model.arch`, read by the slave, config validation, the stages and the study.

An entry says how to build the arch's layer table from the model config, which function runs a slice of it
(the slave's trunk or one branch), what `model.trunk_layers` counts (the rows after which the trunk may end),
which variants, norms and dropout it supports, and which branch layers each DA stage fine-tunes. A new network
is one entry here, not a check in every module that reads `model.arch`. The ResNets take GroupNorm or BatchNorm
(norm "batch": running statistics per branch, the `batch_stats` collection; resnet.py); VGG-16 and AlexNet
none or GroupNorm. Pretrained weights are imported per arch too (msnet.models.pretrained.IMPORTERS).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from msnet.models import resnet
from msnet.models.alexnet import alexnet_table
from msnet.models.layers import LayerSpec, apply_table
from msnet.models.vgg import vgg16_table

# Rows after which the trunk may end (a VGG/AlexNet conv layer or a ResNet residual block), and what they are.
CUT_KINDS = {"conv": "conv layers", **dict.fromkeys(resnet.BLOCK_KINDS, "residual blocks")}

# VGG's and AlexNet's fully connected layers, as the DA comparison stages name them.
FC_DA = {"da_fc8": ("fc8",), "da_fc67": ("fc6", "fc7"), "da_fc678": ("fc6", "fc7", "fc8")}


@dataclasses.dataclass(frozen=True)
class Arch:
  """How msnet builds and cuts one architecture."""
  table: Callable[[ml_collections.ConfigDict, int], tuple[LayerSpec, ...]]  # (model config, num_classes)
  run: Callable[..., Any]           # runs a slice of the table in a compact module (layers.Stack)
  unit: str                         # what model.trunk_layers counts, for docs and error messages
  variants: tuple[str, ...]         # accepted model.variant values
  norms: tuple[str, ...]            # accepted model.norm values
  dropout: bool                     # whether model.dropout acts anywhere in the network
  da_layers: Mapping[str, tuple[str, ...]]  # DA stage -> the branch layers it fine-tunes


ARCHS: dict[str, Arch] = {
    "vgg16": Arch(table=lambda m, n: vgg16_table(n, m.width, m.fc_width), run=apply_table,
                  unit="conv layers", variants=("cifar", "imagenet"),
                  norms=("none", "group"), dropout=True, da_layers=FC_DA),
    "alexnet": Arch(table=lambda m, n: alexnet_table(m.variant, n, m.width, m.fc_width), run=apply_table,
                    unit="conv layers", variants=("cifar", "imagenet"),
                    norms=("none", "group"), dropout=True, da_layers=FC_DA),
    **{name: Arch(table=lambda m, n, name=name: resnet.resnet_table(name, n, m.width), run=resnet.apply_resnet,
                  unit="residual blocks", variants=(variant,), norms=("group", "batch"), dropout=False,
                  da_layers={"da_fc8": ("fc",)})
       for name, variant in (("resnet18", "cifar"), ("resnet34", "cifar"), ("resnet50", "imagenet"))},
}


def get(arch: str) -> Arch:
  """The registry entry of `arch`; unknown names are refused naming model.arch."""
  if arch not in ARCHS:
    raise ValueError(f"model.arch {arch!r} is not one of {sorted(ARCHS)}")
  return ARCHS[arch]


def cut_layers(table: tuple[LayerSpec, ...]) -> list[str]:
  """Names of the rows `model.trunk_layers` counts, in order: trunk_layers=d ends the trunk after the d-th."""
  return [s.name for s in table if s.kind in CUT_KINDS]
