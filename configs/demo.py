r"""The demo: the whole master-slave experiment on the embedded CIFAR-10 in about 10 minutes on 2 CPU cores.

  msnet demo                                   # = msnet run --config=configs/demo.py --workdir=msnet-demo
  msnet run --config=configs/demo.py:runlocal --workdir=/tmp/w   # the ~1 minute smoke version

A narrow VGG-16 (width 1/4) trained from scratch on 20k training images for a few epochs, branches for
JPEG 5-20 and JPEG 2000 at 12:1-24:1 (the strongest ratios reachable at 32x32), the master, every comparison method, and sweeps over 1,000 test
images. Numbers are far below a converged network (configs/cifar10_paper.py); the shape of the curves
and the ranking of the methods are what the demo shows.
"""

from msnet import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  config_lib.cifar_jp2k(c)
  c.data.max_train_examples = 20000
  c.data.max_eval_examples = 1000
  c.model.width = 0.25
  c.model.fc_width = 256
  c.model.norm = "group"
  c.model.trunk_layers = 10
  c.degrade.records_per_shard = 2500
  c.train.global_batch = 128
  c.train.log_every_steps = 25
  c.train.checkpoint_every_steps = 200
  c.evaluate.global_batch = 500
  c.stages.baseline.epochs = 7
  c.stages.baseline.lr = 0.05
  c.stages.baseline.warmup_steps = 100
  # Fine-tuning stages by exact step counts (a mixture "epoch" would count every spec's records).
  c.stages.branch.steps = 300
  c.stages.branch.lr = 0.02
  c.stages.master.steps = 1000  # 500 steps leave this small master at ~76% bin accuracy, 1000 at ~97%
  c.stages.master.lr = 0.05
  for name in ("da_fc8", "da_fc67", "da_fc678"):
    c.stages[name].steps = 150
  c.stages.stability.steps = 100
  c.stages.alexnet_baseline.steps = 400  # ~2.5 epochs of the 20k images, for the VGG-vs-AlexNet figure
  c.stages.alexnet_baseline.lr = 0.02
  c.stages.alexnet_baseline.warmup_steps = 100
  c.stages.deepcloak.num_examples = 512
  c.master.conv_features = (8, 16, 32)  # a master of a few % of the narrow slave's FLOPs
  c.master.fc_features = (128, 64)
  c.sweeps.jpeg = tuple(f"jpeg:{q}" for q in (2, 5, 10, 20, 30, 50, 75, 90))
  c.sweeps.noise = tuple(f"noise:{s}" for s in (5, 10, 20, 40, 80))
  c.sweeps.blur = tuple(f"blur:{s}" for s in (0.5, 1, 1.5, 2, 3))
  c.sweeps.noise_jpeg = tuple(f"noise:10+jpeg:{q}" for q in (5, 10, 20, 50, 90))
  c.sweeps.blur_jpeg = tuple(f"blur:1@4+jpeg:{q}" for q in (5, 10, 20, 50, 90))
  if args.get("runlocal"):
    config_lib.shrink_for_runlocal(c)
  return c
