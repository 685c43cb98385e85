r"""The method on today's ImageNet network: imported torchvision ResNet-50 (v1.5, BatchNorm), 224x224.

  msnet run --config=configs/imagenet_resnet50.py \
    --config.data.tfds_data_dir=/path/to/tensorflow_datasets \
    --config.model.pretrained=/path/to/resnet50.safetensors --workdir=gs://bucket/run

configs/imagenet_vgg16.py's data, stages and evaluation, with the slave a torchvision ResNet-50 whose weights
are imported (`.safetensors` or `.pth`, msnet.models.pretrained.IMPORTERS; branch 1 keeps them). Each branch has
its own BatchNorm running statistics (model.norm="batch"), carried through every stage. The trunk is the stem
and stages 1-3 (13 of the 16 bottleneck blocks, as the paper shares 11 of VGG-16's 13 conv layers): a branch is
stage 4 and the classifier, 17.0M of the network's 25.6M params and a fifth of its 8.2 GFLOPs per image. The comparisons
are a ResNet's: DA on its only fc layer (`da_fc8` fine-tunes `fc`) and AugMix, as in configs/cifar10_resnet.py.
benchmarks/bench_device.py --arch resnet50 times this network's train step on an accelerator.
"""

import pathlib

from msnet import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, ("runlocal", "model_axis"))
  c = config_lib.config_file(pathlib.Path(__file__).with_name("imagenet_vgg16.py"),
                             ",".join(k if v is True else f"{k}={v}" for k, v in args.items()) or None)
  c.model.arch = "resnet50"
  c.model.norm = "batch"            # torchvision's BatchNorm: the imported running statistics, then one set per branch
  c.model.input_norm = "torch"      # ImageNet mean / std, as the torchvision weights were trained
  c.model.trunk_layers = 13         # stem + stages 1-3 shared; each branch stage 4 (blocks 4_1..4_3) + fc
  c.model.dropout = 0.0             # a ResNet has none
  c.model.pretrained = "resnet50.safetensors"  # torchvision's resnet50 state dict; override with your path
  c.comparisons = ("da_fc8", "augmix")
  c.stages.deepcloak.train_specs = ()
  c.stages.augmix.epochs = 1
  c.stages.augmix.lr = 0.001
  c.sharding_rules = ((".*", "replicate"),)  # 25.6M params: no layer large enough to shard
  if args.get("runlocal"):
    c.model.pretrained = ""         # no weights file: a few baseline steps from scratch instead of the import
  return c
