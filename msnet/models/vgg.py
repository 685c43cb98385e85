"""VGG-16 (Simonyan & Zisserman 2015, configuration D) as a layer table.

Layer names follow the paper/Caffe: conv1_1 ... conv5_3, pool1 ... pool5, fc6, fc7, fc8. The weight layers
are counted conv1_1=1 ... conv5_3=13 (fc6-fc8 are 14-16); `model.trunk_layers` is how many of the 13 conv
layers the slave's shared trunk holds. The paper's "first eleven layers" is read as conv1_1 ... conv5_1
(trunk_layers=11); the CIFAR configs default to 10 (conv1_1 ... conv4_3 plus pool4), so each branch has the
whole last block conv5_1-conv5_3 + fc6-fc8.

Both variants use the same table. "imagenet" means 224x224 inputs: pool5 leaves 7x7x512, which fc6 sees
flattened in (h, w, c) order (25088 inputs, as Keras' VGG16); "cifar" means 32x32: pool5 leaves 1x1xC.
The width multiplier scales every conv layer (round, at least 8 channels); fc6/fc7 have `fc_width` units.
As in the original network, dropout acts on the outputs of fc6 and fc7 (i.e. before fc7 and fc8).
"""

from __future__ import annotations

from msnet.models.layers import LayerSpec, scaled

BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def vgg16_table(num_classes: int, width: float = 1.0, fc_width: int = 4096) -> tuple[LayerSpec, ...]:
  rows: list[LayerSpec] = []
  for b, (channels, n) in enumerate(BLOCKS, start=1):
    for i in range(1, n + 1):
      rows.append(LayerSpec(f"conv{b}_{i}", "conv", scaled(channels, width), kernel=3))
    rows.append(LayerSpec(f"pool{b}", "pool", kernel=2, stride=2))
  rows += [LayerSpec("fc6", "fc", fc_width),
           LayerSpec("fc7", "fc", fc_width, dropout_before=True),
           LayerSpec("fc8", "fc", num_classes, dropout_before=True, relu=False)]
  return tuple(rows)
