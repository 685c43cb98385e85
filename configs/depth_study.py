r"""The trunk-depth study: branches, MS/AMS/oracle and the cost of a branch at several `model.trunk_layers`.

  msnet study --config=configs/depth_study.py --workdir=runs/depth          # 4 depths on the demo's network
  msnet study --config=configs/depth_study.py:runlocal --workdir=/tmp/depth  # 2 depths, tiny steps
  msnet study --config=configs/depth_study.py:repro --workdir=runs/depth-repro  # the reproduction's network

`:repro` studies the network of configs/cifar10_repro.py instead (all 50,000 training and 10,000 test images, its
stage lengths: 3,000-step branches) at depths 2, 3, 4 and 7, which decides the depth that config uses (4, chosen on
the demo's network with intervals too wide to decide: issue 21). About 80 minutes on 2 idle CPU cores, from the
reproduction's stage times: the baseline 26 min, then per depth two branches (11 min) and the evaluation.

The demo's data, network and stages (configs/demo.py): one baseline and one master, trained once, and per
depth the branches for JPEG 5-20 and JPEG 2000 12:1-24:1 from the baseline re-split at that depth, each
`stages.branch.steps` long as in the demo. Only the methods and specs the table needs are evaluated.
W/study/depth.md holds the table and figure, and each depth against `study.reference` (the base config's own
depth: 10 for the demo, 4 for :repro) as a paired difference of % change with its interval (msnet/study.py).
"""

import pathlib

import ml_collections

from msnet import config as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, known=("runlocal", "repro"))
  base = "cifar10_repro.py" if args.get("repro") else "demo.py"
  c = config_lib.config_file(pathlib.Path(__file__).with_name(base), "runlocal" if args.get("runlocal") else None)
  c.comparisons = ()                     # no DA / stability / DeepCloak / AlexNet: the study trains none of them
  c.stages.deepcloak.train_specs = ()    # so `msnet degrade` writes no shards for DeepCloak
  c.evaluate.methods = ("baseline", "branches", "ms", "ams", "oracle")
  c.sweeps = ml_collections.ConfigDict(dict(
      clean=("clean",),
      jpeg=("jpeg:5", "jpeg:10", "jpeg:20"),
      jp2k=("jp2k:12", "jp2k:24"),       # 24:1, the strongest ratio reachable at 32x32 (config_lib.cifar_jp2k)
  ))
  c.evaluate.sweeps = tuple(c.sweeps.keys())
  c.study = ml_collections.ConfigDict(dict(
      trunk_layers=(2, 4, 7, 10),        # depths studied: conv layers in the shared trunk (conv1_1=1 ... conv5_3=13)
      specs=("clean", "jpeg:10", "jpeg:5", "jp2k:24"),  # accuracy columns of the table (each in an evaluated sweep)
      accuracy_methods=("baseline", "ms"),             # methods whose accuracy at `specs` the table shows
      change_methods=("oracle", "ms", "ams"),          # methods whose % change the table shows
      clean="clean",                     # the % change's c: the baseline's accuracy on this spec ...
      degraded="jpeg:10",                # ... and d, on this one (the paper's Table 1: JPEG quality 10)
      resamples=2000,                    # bootstrap resamples of the test images for the % change intervals
      level=0.95,                        # confidence level of those intervals
      # the depth every other is compared with, paired (% change minus its own); one of trunk_layers.
      # None: config.model.trunk_layers, the depth the base config uses (it follows a --config.model override)
      reference=ml_collections.config_dict.placeholder(int),
  ))
  if args.get("repro"):
    c.study.trunk_layers = (2, 3, 4, 7)
  if args.get("runlocal"):
    c.study.trunk_layers = (4, 10)
    c.study.specs = ("clean", "jpeg:10", "jp2k:24")
    c.sweeps = ml_collections.ConfigDict(dict(clean=("clean",), jpeg=("jpeg:10",), jp2k=("jp2k:24",)))
    c.evaluate.sweeps = tuple(c.sweeps.keys())
  return c
