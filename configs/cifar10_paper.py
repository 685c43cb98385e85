r"""The faithful small-scale reproduction: the full VGG-16 layer layout at CIFAR size, trained to convergence.

  msnet run --config=configs/cifar10_paper.py --workdir=runs/cifar10_paper

Full width (64..512 channels), GroupNorm, trunk = the first 10 conv layers (conv1_1..conv4_3) so each branch
holds conv5_1..conv5_3 + fc6..fc8: at 32x32 the paper's "first eleven layers" would leave a 2x2 map with two
convs per branch; msnet counts weight layers conv1_1=1 ... conv5_3=13 and `model.trunk_layers=11` gives the
paper's split exactly. Hours on 2 CPU cores (about 7-8 min per epoch of training); not run in CI.
JPEG 2000 bin: the paper's "quality 10 to 2" reads as ratios of ~100:1 and stronger at ImageNet size; at
32x32 codestream headers cap the ratio near 25:1, so the bin is the strongest reachable band, jp2k:12-24
(msnet.config.cifar_jp2k).
"""

from msnet import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, ("runlocal", "trunk_layers"))
  c = config_lib.base_config()
  config_lib.cifar_jp2k(c)
  c.model.width = 1.0
  c.model.fc_width = 512
  c.model.norm = "group"
  c.model.trunk_layers = int(args.get("trunk_layers", 10))
  c.stages.baseline.epochs = 60
  c.stages.baseline.lr = 0.05
  c.stages.baseline.warmup_steps = 500
  c.stages.branch.epochs = 10
  c.stages.master.epochs = 5
  for name in ("da_fc8", "da_fc67", "da_fc678", "stability"):
    c.stages[name].epochs = 10
  if args.get("runlocal"):
    config_lib.shrink_for_runlocal(c)
  return c
