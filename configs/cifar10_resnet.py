r"""The method on a ResNet, against AugMix: does master-slave beat it at equal cost, and do the two add up?

  msnet run --config=configs/cifar10_resnet.py --workdir=runs/resnet-s0 [--config.seed=N]
  msnet run --config=configs/cifar10_resnet.py:on_augmix --workdir=runs/resnet-aug-s0 \
      --config.shared.workdir=runs/resnet-s0 [--config.seed=N]      # branches grown from that run's AugMix
  ...:full and ...:full,on_augmix: the same at full width for one accelerator (`_full_width`; not run yet)
  python benchmarks/resnet_vs_augmix.py --runs runs/resnet-s0,... --on-augmix runs/resnet-aug-s0,...

All 50,000 CIFAR-10 training and 10,000 test images, as configs/cifar10_repro.py, on a CIFAR pre-activation
ResNet-18 at width 1/8 (8, 16, 32, 64 channels, GroupNorm; 176k params): 604 train images/s on the 2 CPU
cores at batch 128 (benchmarks/bench_models.py-style step timing), so one seed of both runs takes about 40
minutes and three seeds fit one working session. Width 1/4 runs at 268 images/s: its 20 epochs alone would
take an hour per seed.

Trunk: `model.trunk_layers` counts residual blocks after the stem. 4 = the stem and stages 1-2 (the 32x32 and
16x16 maps), the place of the VGG reproduction's depth 4 (conv1_1..conv2_2); each branch is stages 3-4 and the
classifier, about half of the network's FLOPs (each stage costs about the same).

Methods: the baseline; DA (`da_fc8`: a ResNet's only DA stage fine-tunes its classifier `fc`); AugMix (the
`augmix` stage: the baseline fine-tuned with AugMix's chains and JS loss, msnet/train/stages.py says why);
MS and MAP over branches grown from the baseline; and, in the `:on_augmix` run, MS and MAP over branches grown
from the AugMix network (`shared.stages`: that run's augmix is this run's baseline, its master routes them,
its shards are linked). Budgets: a branch step trains half the network on one batch and an AugMix step the
whole network on three (clean and two AugMix copies), so AugMix's 400 steps cost about 1,200 baseline-step
equivalents of training against 1,600 x 0.67 ~ 1,070 for the two branches (2 x 800 steps; the trunk's forward
pass, a third of a step, runs in both): the comparison is at about equal training cost. The report of this
pair of runs is benchmarks/resnet_vs_augmix.py's, which pairs their per-image results.
"""

from msnet import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, known=("runlocal", "on_augmix", "full"))
  c = config_lib.base_config()
  config_lib.cifar_jp2k(c)
  c.model.arch = "resnet18"
  c.model.width = 0.125              # 8..64 channels: three seeds in a session on 2 CPU cores (docstring)
  c.model.norm = "group"
  c.model.trunk_layers = 4           # stem + stages 1-2 (blocks 1_1..2_2) shared; each branch stages 3-4 + fc
  c.comparisons = ("da_fc8", "augmix")
  c.degrade.records_per_shard = 2500
  c.train.global_batch = 128
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 500
  c.evaluate.global_batch = 500
  c.stages.baseline.epochs = 8       # cosine to zero; 3,128 steps
  c.stages.baseline.lr = 0.1
  c.stages.baseline.warmup_steps = 200
  c.stages.branch.steps = 800
  c.stages.branch.lr = 0.02
  c.stages.master.steps = 1500
  c.stages.master.lr = 0.05
  c.stages.da_fc8.steps = 600        # the classifier only: fast, and its gain saturates early
  c.stages.augmix.steps = 400        # about the two branches' training cost (docstring)
  c.stages.augmix.lr = 0.01
  c.stages.deepcloak.train_specs = ()
  c.master.conv_features = (8, 16, 32)  # the reproduction's small master
  c.master.fc_features = (128, 64)
  c.sweeps.jpeg = tuple(f"jpeg:{q}" for q in (5, 10, 20, 50))
  c.sweeps.jp2k = ("jp2k:12", "jp2k:24")
  c.sweeps.noise = ("noise:20",)
  c.sweeps.blur = ("blur:1.5",)
  c.evaluate.sweeps = ("clean", "jpeg", "jp2k", "noise", "blur")
  c.evaluate.methods = ("baseline", "branches", "ms", "ams", "map", "oracle", "comparisons")
  if args.get("full"):
    _full_width(c)
  if args.get("on_augmix"):
    c.shared.data = True
    c.shared.stages = ("master", "baseline=augmix")
    c.comparisons = ()
    c.evaluate.methods = ("baseline", "ms", "map", "oracle")
  if args.get("runlocal"):
    config_lib.shrink_for_runlocal(c)
    c.sweeps.jp2k = ("jp2k:12",)
    c.evaluate.sweeps = ("clean", "jpeg", "jp2k", "noise", "blur")
  return c


def _full_width(c) -> None:
  """`:full`, the same comparison at full width on one accelerator, where the baseline should reach >= 94% clean.

  ResNet-18 at width 1 (64..512 channels, 11.2M params) with BatchNorm, the norm of the 94% CIFAR recipes (each
  branch keeps its own running statistics), and their augmentation: random crops (pad 4) besides the flips, for
  the stages that train on clean records (baseline, AugMix; crops would move a degraded record's JPEG grid, so
  the branches, the master and DA keep flips only). Batch 512, SGD lr 0.4 (batch 128's 0.1, linear rule) after
  5 epochs of warmup (Goyal et al. 2017), 40 epochs; the fixed-step stages keep their images seen (steps / 4)
  at their own learning rates (configs/cifar10_repro.py's `:gpu` says why: 4x rates trained its VGG and
  master to chance). bfloat16, device-resident data, 7 steps per call (98 steps an epoch).
  Prepared, not yet run: no accelerator time was left for it (README, "On a ResNet, against AugMix").
  """
  c.model.width = 1.0
  c.model.norm = "batch"
  config_lib.for_one_accelerator(c, scale=4, lr_scale=1, stages=("branch", "master", "da_fc8", "augmix"))
  c.stages.baseline.epochs = 40
  c.stages.baseline.lr = 0.4
  c.stages.baseline.warmup_steps = 5 * 98  # 5 epochs of 98 steps (50,000 images at 512)
  for name in ("baseline", "augmix"):
    c.stages[name].crop_pad = 4
