"""Models: the slave (shared trunk + vmapped branches) over VGG-16 / AlexNet / ResNet tables (the arch registry),
the master, the fast CPU conv, pretrained VGG-16 / ResNet-50 import, and analytic FLOPs / receptive fields."""

from msnet.models import registry
from msnet.models.analysis import flops_per_image, layer_flops, receptive_fields
from msnet.models.layers import (CPU_POLICY, XLA_POLICY, Conv, ConvPolicy, LayerSpec, compiler_options, conv2d,
                                 normalize_input)
from msnet.models.master import Master, build_master
from msnet.models.pretrained import load_pretrained, load_pretrained_vgg16
from msnet.models.slave import (Slave, build_slave, join_branches, model_table, move_to_trunk, part_of, resplit_params,
                                tile_branches, trunk_weight_layers)

__all__ = [
    "CPU_POLICY", "Conv", "ConvPolicy", "LayerSpec", "Master", "Slave", "XLA_POLICY", "build_master",
    "build_slave", "compiler_options", "conv2d", "flops_per_image", "join_branches", "layer_flops",
    "load_pretrained", "load_pretrained_vgg16", "model_table", "move_to_trunk", "normalize_input", "part_of",
    "receptive_fields", "registry", "resplit_params", "tile_branches", "trunk_weight_layers",
]
