r"""The CIFAR-10 reproduction plus the methods beyond the paper: calibrated branches and a learned gate.

  msnet run --config=configs/cifar10_beyond.py --workdir=runs/beyond-s0

Everything of configs/cifar10_repro.py (network, trunk depth, stage lengths, sweeps), with two changes:
- the last 5,000 of the 50,000 training images are held out of every stage (`data.holdout_examples`; 500 per
  class: the folder source interleaves the classes) and degraded at every bin's training specs: the
  calibrate stage fits one temperature per branch, and the master's, on them by NLL. The test split is
  never used for fitting. Every stage trains on the other 45,000 images.
- `config.extensions` adds the `calibrate` and `gate` stages after the master, and the evaluation adds the
  `ams_cal`, `map_cal` and `gate` rules, and each branch at its calibrated temperature (`branch_<bin>_cal`),
  with a 15-bin expected calibration error for every method and spec.

The learned gate is the master's network (3 conv + 3 FC layers) started from the trained master and trained
with the branches frozen to minimise the NLL of the gated mixture sum_k g_k(x) p_k(y|x), on the master's data
(every bin's training specs, bins equally likely): the same added FLOPs as MS and MAP, by construction.
"""

import importlib.util
import pathlib

from msnet import config as config_lib


def _repro():
  path = pathlib.Path(__file__).with_name("cifar10_repro.py")
  spec = importlib.util.spec_from_file_location("msnet_cifar10_repro_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg)
  c = _repro().get_config(None)
  c.data.holdout_examples = 5000     # 10% of the training split, 500 images per class
  c.extensions = ("calibrate", "gate")
  c.stages.gate.steps = 1000         # from the trained master; the mixture's NLL, branches frozen
  c.stages.gate.lr = 0.01
  c.evaluate.methods = ("baseline", "branches", "ms", "ams", "map", "oracle", "bitstream", "hybrid",
                        "ams_cal", "map_cal", "gate", "comparisons")
  if args.get("runlocal"):
    config_lib.shrink_for_runlocal(c)
    c.data.holdout_examples = 64
  return c
