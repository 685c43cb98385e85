"""AlexNet as a layer table, torchvision's single-tower version (Krizhevsky 2014, "one weird trick").

"imagenet": conv1 11x11/4 pad 2 (64), pool1 3x3/2, conv2 5x5 pad 2 (192), pool2 3x3/2, conv3-5 3x3 pad 1
(384, 256, 256), pool5 3x3/2, then fc6/fc7 (`fc_width`) and fc8. At 224x224 pool5 leaves 6x6x256 (9216
inputs to fc6), so torchvision's AdaptiveAvgPool2d((6, 6)) is the identity and is left out. Dropout acts on
the inputs of fc6 and fc7, as in torchvision.
"cifar" (32x32): conv1 5x5/1 pad 2 instead of 11x11/4, same pools (32->15->7->3), so pool5 leaves 3x3x256.
The width multiplier scales the convs; `trunk_layers` counts the 5 conv layers (conv1=1 ... conv5=5).
"""

from __future__ import annotations

from msnet.models.layers import LayerSpec, scaled


def alexnet_table(variant: str, num_classes: int, width: float = 1.0,
                  fc_width: int = 4096) -> tuple[LayerSpec, ...]:
  if variant == "imagenet":
    conv1 = LayerSpec("conv1", "conv", scaled(64, width), kernel=11, stride=4, padding=2)
  elif variant == "cifar":
    conv1 = LayerSpec("conv1", "conv", scaled(64, width), kernel=5, stride=1, padding=2)
  else:
    raise ValueError(f"alexnet variant {variant!r} is not 'imagenet' or 'cifar'")
  return (
      conv1,
      LayerSpec("pool1", "pool", kernel=3, stride=2),
      LayerSpec("conv2", "conv", scaled(192, width), kernel=5, padding=2),
      LayerSpec("pool2", "pool", kernel=3, stride=2),
      LayerSpec("conv3", "conv", scaled(384, width), kernel=3, padding=1),
      LayerSpec("conv4", "conv", scaled(256, width), kernel=3, padding=1),
      LayerSpec("conv5", "conv", scaled(256, width), kernel=3, padding=1),
      LayerSpec("pool5", "pool", kernel=3, stride=2),
      LayerSpec("fc6", "fc", fc_width, dropout_before=True),
      LayerSpec("fc7", "fc", fc_width, dropout_before=True),
      LayerSpec("fc8", "fc", num_classes, relu=False),
  )
