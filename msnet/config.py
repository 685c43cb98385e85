"""The config schema every experiment file builds on, `runlocal` shrinking, and early validation.

Config files in `configs/` call `base_config()` and change fields; `validate()` runs before any work
starts so a misspelled field (refused by the locked ConfigDict), a wrong type, or an impossible value
fails with a message that names the field.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from msnet import errors, methods

# The stages `msnet train` knows, in pipeline order. Branch stages are named `branch_<bin name>`.
GRADIENT_STAGE_CONFIGS = ("baseline", "branch", "master", "gate", "da_fc8", "da_fc67", "da_fc678", "stability",
                          "augmix", "alexnet_baseline")  # config.stages entries of the trained stages
COMPARISON_STAGES = ("da_fc8", "da_fc67", "da_fc678", "stability", "deepcloak", "alexnet_baseline", "augmix")
# Stages whose network is a master (bins out) rather than a K=1 slave: `shared.stages` does not swap the two.
MASTER_STAGES = ("master", "gate")
# Stages beyond the paper, trained after the master when listed in config.extensions.
EXTENSION_STAGES = ("calibrate", "gate")
# The JPEG part of the transcode sweep (the JPEG 2000 part depends on the image size: `cifar_jp2k`).
TRANSCODE_JPEG_SPECS = ("jpeg:10", "jpeg:90", "jpeg:10+jpeg:90", "jpeg:5+jpeg:75", "jpeg:90+jpeg:10",
                        "jpeg:10+resize:0.5+jpeg:75")


class ConfigError(errors.UserError, ValueError):
  """A config field has a wrong type or an impossible value; the message names the field."""


def _stage(**overrides: Any) -> ml_collections.ConfigDict:
  """One training stage: how long, how fast, and on which data."""
  stage = ml_collections.ConfigDict(dict(
      epochs=1.0,             # passes over the stage's training records (a mixture counts all its records)
      steps=-1,               # >0 overrides `epochs` with an exact number of optimizer steps
      lr=0.01,                # peak learning rate
      warmup_steps=0,         # linear warmup from 0 to `lr`
      schedule="cosine",      # "cosine" (decay to 0) or "constant" after warmup
      optimizer="sgd",        # "sgd" (with `momentum`, Nesterov) or "adamw"
      momentum=0.9,           # SGD momentum
      weight_decay=5e-4,      # decoupled weight decay on kernels
      train_specs=(),         # degradation specs of the training mixture; () = the stage's default
      crop_pad=0,             # >0: random translation, zero-pad by this and crop back (msnet/train/crop.py);
                              # for clean records only: it moves a degraded record's JPEG 8x8 grid
  ))
  stage.update(overrides)
  return stage


def base_config() -> ml_collections.ConfigDict:
  """Every field msnet reads, with its default; experiment files change what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # one seed for data order, init, noise degradations and augmentation

  c.data = ml_collections.ConfigDict(dict(
      source="embedded_cifar10",  # "embedded_cifar10", "folder" (dir or .tar/.tar.gz ImageFolder) or "tfds"
      path="",                    # folder/tar path for source="folder"
      tfds_name="",               # e.g. "imagenet2012", "imagenette", "cifar10" for source="tfds"
      tfds_data_dir="",           # TFDS data_dir ("" = TFDS default)
      train_split="train",        # source split used for training shards
      eval_split="test",          # source split used for evaluation shards
      image_size=32,              # network input size; sources larger than this are resized then cropped
      resize_shorter=0,           # >0: resize shorter side to this, center-crop image_size, then degrade
      max_train_examples=-1,      # >0: use the first N training images (runlocal / demo shrink)
      max_eval_examples=-1,       # >0: use the first N evaluation images
      # >0: the last N of the training records in use (after max_train_examples) are held out of every
      # stage: "train" keeps records [0, n - N), W/data/holdout/ gets [n - N, n) of the same source split
      # (a validation slice of the training distribution, never the test split). Folder sources are
      # ordered round-robin over classes, so the last N are class-balanced while every class has images
      # that deep.
      holdout_examples=0,
      # Files whose header claims more pixels are refused before decoding (msnet.data.reader): a tiny
      # JPEG can claim 30000x30000. Pillow's PIL.Image.MAX_IMAGE_PIXELS is the default; every reader
      # (sources, degrade workers, predict, evaluate --external) applies it; `--max-pixels` overrides it.
      max_pixels=89_478_485,
      num_classes=10,             # classifier outputs
  ))

  c.degrade = ml_collections.ConfigDict(dict(
      num_workers=2,              # worker processes writing shards
      records_per_shard=2048,     # records per ArrayRecord shard file
      on_corrupt="skip",          # "skip" (count and skip) or "raise" for unreadable source images
      num_shards=1,               # split the degrade job across machines: total parts ...
      shard_index=0,              # ... and this machine's part (-1: use the JAX process index/count)
  ))

  # Quality bins: the master's labels and the branches' training data. `match` rules say which specs
  # belong to a bin (by their codec and its level: JPEG quality, JPEG 2000 ratio; a chain that encodes
  # twice by its last codec in a degradation bin, see `degradations.bins`); bin 0 takes
  # every spec no other bin matches (clean, mild compression, noise, blur). Each codec's bin reaches the
  # strong end of its scale, beyond its training specs: JPEG quality 1-20 for a branch trained on 5-20,
  # JPEG 2000 from 80:1 upward (`inf`), so `jpeg:2` is a JPEG input for the oracle and the bitstream
  # rule, not a clean one. Rules of two bins may not overlap. The paper's JPEG 2000 "quality 10 to 2"
  # is read as compression ratios of about 100:1 and stronger (GraphicsMagick/JasPer's quality scale
  # maps Q=2..10 to ~110-130:1) at ImageNet size; see `cifar_jp2k()` for 32x32 images.
  c.bins = [
      ml_collections.ConfigDict(dict(name="clean", match=(), train_specs=("clean",))),
      ml_collections.ConfigDict(dict(name="jpeg", match=("jpeg:1-20",),
                                     train_specs=("jpeg:5", "jpeg:10", "jpeg:15", "jpeg:20"))),
      ml_collections.ConfigDict(dict(name="jp2k", match=("jp2k:80-inf",),
                                     train_specs=("jp2k:100", "jp2k:150", "jp2k:200", "jp2k:300"))),
  ]

  # Evaluation sweeps: name -> tuple of specs. Combined sweeps compose left to right with "+".
  c.sweeps = ml_collections.ConfigDict(dict(
      clean=("clean",),
      jpeg=tuple(f"jpeg:{q}" for q in (1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100)),
      jp2k=tuple(f"jp2k:{r}" for r in (2, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 400)),
      noise=tuple(f"noise:{s}" for s in (2, 5, 10, 15, 20, 30, 40, 60, 80, 100)),
      blur=tuple(f"blur:{s}" for s in (0.5, 1, 1.5, 2, 3, 4, 6)),
      noise_jpeg=tuple(f"noise:10+jpeg:{q}" for q in (5, 10, 20, 40, 70, 100)),
      noise_jp2k=tuple(f"noise:10+jp2k:{r}" for r in (5, 20, 60, 100, 200)),
      blur_jpeg=tuple(f"blur:1@4+jpeg:{q}" for q in (5, 10, 20, 40, 70, 100)),
      blur_jp2k=tuple(f"blur:1@4+jp2k:{r}" for r in (5, 20, 60, 100, 200)),
      # Images compressed more than once: a strong first encode behind a mild last one (which the bitstream
      # rule reads as mild), the reverse, a resize in between, JPEG over JPEG 2000, and the single encodes
      # they are compared with. Not in evaluate.sweeps by default: add "transcode" to evaluate it.
      transcode=TRANSCODE_JPEG_SPECS + ("jp2k:100+jpeg:90", "jp2k:100"),
  ))

  c.model = ml_collections.ConfigDict(dict(
      # msnet.models.registry.ARCHS: "vgg16", "alexnet", "resnet18" / "resnet34" (CIFAR pre-activation,
      # variant "cifar") or "resnet50" (ImageNet v1.5, variant "imagenet"); the ResNets take norm "group" or "batch"
      arch="vgg16",
      variant="cifar",           # "cifar" (32x32, small head) or "imagenet" (224x224, fc6/fc7 4096)
      width=1.0,                 # channel width multiplier of every conv layer (cifar variant)
      fc_width=512,              # width of fc6/fc7 (4096 for the imagenet variant)
      # "none" or "group" (GroupNorm after every conv, for training from scratch); the ResNets also "batch"
      # (BatchNorm, torch's; running statistics per branch, in the train state: torchvision ResNet-50 weights)
      norm="none",
      input_norm="standard",     # "standard" (x/255 - 0.5)/0.25, "caffe" (Keras VGG BGR means), "torch" (ImageNet mean/std)
      # Depth of the shared trunk: VGG-16 conv layers (conv1_1=1 ... conv5_3=13), AlexNet's (conv1=1 ...
      # conv5=5), or a ResNet's residual blocks after the stem (resnet18: 1 ... 8, resnet34/50: 1 ... 16)
      trunk_layers=10,
      dropout=0.0,               # dropout before fc6/fc7 (the imagenet VGG uses 0.5; ResNets have none)
      compute_dtype="float32",   # "float32" or "bfloat16" (params stay float32)
      # pretrained weights (imagenet variant): a Keras .h5 or torchvision .safetensors/.pth VGG-16, or a torchvision
      # ResNet-50 (model.norm="batch", input_norm="torch"); msnet.models.pretrained.IMPORTERS
      pretrained="",
  ))

  c.master = ml_collections.ConfigDict(dict(
      conv_features=(32, 64, 64),  # the paper's master: 3 conv layers ...
      fc_features=(256, 128),      # ... and 3 fully connected (these two + the bin output layer)
  ))

  c.stages = ml_collections.ConfigDict(dict(
      baseline=_stage(epochs=30, lr=0.05, warmup_steps=200),
      branch=_stage(epochs=5, lr=0.01),
      master=_stage(epochs=5, lr=0.01),
      da_fc8=_stage(epochs=3, lr=0.01),
      da_fc67=_stage(epochs=3, lr=0.01),
      da_fc678=_stage(epochs=3, lr=0.01),
      stability=_stage(epochs=3, lr=0.005),
      # AugMix (Hendrycks et al. 2020, msnet/train/augmix.py): the whole baseline fine-tuned on clean data with
      # CE + js_lambda * JS(clean, two AugMix copies), for stability's budget (`epochs`/`steps`, `lr` as in
      # _stage; its paper trains from scratch: see msnet/train/stages.py). The other knobs are its paper's:
      augmix=_stage(
          epochs=3, lr=0.005,
          severity=3,      # magnitude of every operation, 1-10 (rotation up to 3 x severity degrees, ...)
          width=3,         # augmentation chains mixed into each copy
          depth=-1,        # operations per chain; -1: 1-3, drawn per chain and image
          alpha=1.0,       # Dirichlet(alpha) weights over the chains, Beta(alpha, alpha) weight of the mix
          js_lambda=12.0,  # weight of the Jensen-Shannon consistency term
      ),
      alexnet_baseline=_stage(epochs=30, lr=0.02, warmup_steps=200),  # AlexNet on clean data (Fig. 1b)
      # The learned gate: the master's network, started from the trained master, trained with the branches
      # frozen to minimise the NLL of the gated mixture sum_k g_k(x) p_k(y|x) on every bin's specs.
      gate=_stage(epochs=1, lr=0.01),
      calibrate=ml_collections.ConfigDict(dict(
          # Per-branch temperatures (and the master's) fitted by NLL on the hold-out slice of the training
          # split (data.holdout_examples), every bin's train specs, bins weighted equally.
          max_examples_per_spec=-1,  # >0: use the first N hold-out records of each spec
          ece_bins=15,               # equal-width confidence bins of the expected calibration error
      )),
      deepcloak=ml_collections.ConfigDict(dict(
          mask_ratio=0.01,         # fraction of trunk-output channels masked (the paper: 1%)
          num_examples=1024,       # clean/degraded pairs used to rank channel sensitivity
          train_specs=("jpeg:10",),  # degradation the sensitivity is measured on
      )),
  ))
  c.stability = ml_collections.ConfigDict(dict(
      alpha=0.01,                # weight of KL(p(clean) || p(perturbed)) added to the clean cross-entropy
      noise_sigma=10.0,          # Gaussian perturbation, sigma on the 0-255 scale (Zheng et al.)
  ))
  # Which comparison methods `msnet run` trains: the paper's; "augmix" (beyond the paper) is added by name.
  c.comparisons = tuple(s for s in COMPARISON_STAGES if s != "augmix")
  # Which stages beyond the paper `msnet run` trains (EXTENSION_STAGES): "calibrate" (temperatures for the
  # ams_cal / map_cal rules; needs data.holdout_examples > 0) and "gate" (the learned gate).
  c.extensions = ()

  # Parts of another run reused without redoing them (linked, not copied): its data/ (`data`: the shards, so
  # both runs need the same data, bins and sweeps) and the stages in `stages`, each "stage" (that run's same
  # stage) or "stage=source" (that run's `source` stage as this run's `stage`). ("master", "baseline=augmix")
  # grows this run's branches from the other run's AugMix network and routes them with its master.
  c.shared = ml_collections.ConfigDict(dict(workdir="", data=False, stages=()))

  c.train = ml_collections.ConfigDict(dict(
      global_batch=128,          # examples per optimizer step over all devices and processes
      log_every_steps=50,        # metrics to metrics.jsonl and the console
      checkpoint_every_steps=500,  # periodic orbax checkpoints (also saved at the end and on SIGTERM)
      keep_checkpoints=2,        # keep the latest N checkpoints
      hflip=True,                # random horizontal flips (moves no JPEG 8x8 grid)
      num_workers=0,             # Grain worker processes (0 = threaded reads in the main process)
      eval_every_epoch=True,     # clean validation accuracy at the end of each epoch
      # Train steps per jitted call (lax.scan over K batches): the host dispatches, logs and checks for NaN
      # once per call. A call never crosses a checkpoint step or (with eval_every_epoch) an epoch end; the
      # steps before such a point that do not make a whole call run one by one (a second program), so
      # choose K dividing checkpoint_every_steps and the epoch's steps.
      steps_per_call=1,
      # Where training batches come from: "off" (Grain reads each batch on the host), "on" (every train
      # spec's records on each device once, batches gathered and flipped inside the step: its own data
      # order, msnet/data/resident.py), a budget in bytes per device (on when the records fit it), or
      # "auto": on accelerators when they fit a quarter of the device's memory, on the CPU "off" (its data
      # order is the one the committed results used; benchmarks/bench_steps_per_call.py measures both).
      device_data="auto",
      # The host path's records (device_data off, num_workers = 0) read once into host memory, each batch
      # gathered from there instead of read from the shards: the same batches and checkpointed state either
      # way. "on", "off", a budget in bytes, or "auto": when they fit a quarter of the memory available as the
      # loader opens (MemAvailable; each process of a host holds its own copy). 224x224 ImageNet does not
      # fit and streams (benchmarks/bench_loader.py measures both paths).
      host_cache="auto",
  ))

  c.evaluate = ml_collections.ConfigDict(dict(
      global_batch=256,          # examples per evaluation step over all devices and processes
      # "comparisons" stands for the methods in config.comparisons (see `evaluated_methods`); list
      # comparison methods by name instead to evaluate others.
      methods=("baseline", "branches", "ms", "ams", "map", "oracle", "bitstream", "comparisons"),
      sweeps=("clean", "jpeg", "jp2k", "noise", "blur",
              "noise_jpeg", "noise_jp2k", "blur_jpeg", "blur_jp2k"),
      # Each spec's records on the devices once, every batch evaluated by one scanned call, or streamed from
      # the host batch by batch: "on", "off", a budget in bytes per device (e.g. "2e9": a spec whose records
      # take more streams), or "auto": a budget of half the accelerators' free memory, and "off" on the CPU
      # (neither path measured faster there: benchmarks/bench_eval.py). The results are the same either
      # way (msnet/evaluate/resident.py).
      device_data="auto",
  ))

  c.mesh = (("data", -1),)          # mesh axes and sizes; -1 takes the remaining devices
  c.sharding_rules = ((".*", "replicate"),)  # (param-path regex, "replicate" | mesh axis for FSDP)
  return c


def cifar_jp2k(c: ml_collections.ConfigDict) -> None:
  """JPEG 2000 levels for 32x32 images, where ~100 bytes of codestream headers cap the ratio near 25:1.

  A 32x32x3 image has 3,072 bytes; the smallest J2K codestream OpenJPEG writes for it is 110-130 bytes, so
  ratios above ~25:1 cannot be reached and would all return that smallest encode. The "strong JPEG 2000"
  bin at CIFAR size is therefore the strongest reachable band, 12:1-24:1 (PSNR ~20-24 dB, comparable to
  the blocky regime of JPEG 5-20 at this size), matching every ratio from 12:1 up.
  """
  jp2k_bin = [b for b in c.bins if b.name == "jp2k"][0]
  jp2k_bin.match = ("jp2k:12-inf",)
  jp2k_bin.train_specs = ("jp2k:12", "jp2k:16", "jp2k:20", "jp2k:24")
  c.sweeps.jp2k = tuple(f"jp2k:{r}" for r in (2, 4, 6, 8, 10, 12, 16, 20, 24))
  c.sweeps.noise_jp2k = tuple(f"noise:10+jp2k:{r}" for r in (4, 8, 12, 16, 24))
  c.sweeps.blur_jp2k = tuple(f"blur:1@4+jp2k:{r}" for r in (4, 8, 12, 16, 24))
  c.sweeps.transcode = TRANSCODE_JPEG_SPECS + ("jp2k:20+jpeg:90", "jp2k:20")


def alexnet_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model config of the alexnet_baseline stage: config.model with AlexNet's layers (Fig. 1b).

  Same variant, width, norm and input normalisation as the VGG-16, so the two differ in architecture
  only; every conv is in the trunk (one branch, nothing is shared).
  """
  m = ml_collections.ConfigDict(c.model.to_dict())
  m.arch = "alexnet"
  m.trunk_layers = 5
  m.pretrained = ""
  return m


def evaluated_methods(c: ml_collections.ConfigDict) -> list[str]:
  """config.evaluate.methods with "comparisons" replaced by config.comparisons, each method once, in order.

  A config that trains fewer comparison methods evaluates fewer, instead of warning that their stages
  are missing; naming a method explicitly still evaluates it.
  """
  methods: list[str] = []
  for m in c.evaluate.methods:
    for name in (c.comparisons if m == "comparisons" else (m,)):
      if name not in methods:
        methods.append(name)
  return methods


def config_file(path: str | os.PathLike[str], arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of another config file: an experiment that extends another one reads it from here."""
  spec = importlib.util.spec_from_file_location(f"msnet_config_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_arg(arg: str | None, known: Sequence[str] = ("runlocal",)) -> dict[str, Any]:
  """`"runlocal,width=0.5"` -> {"runlocal": True, "width": "0.5"}: the config-file argument.

  A key outside `known` is refused (a typo such as `:runlocl` would otherwise run the full config).
  """
  out: dict[str, Any] = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in known:
      raise ConfigError(f"config argument {key!r} (in {arg!r}) is not one of {list(known)}; "
                        f"e.g. --config=configs/x.py:runlocal")
    out[key] = value.strip() if sep else True
  return out


def for_one_accelerator(c: ml_collections.ConfigDict, scale: int, stages: Sequence[str], lr_scale: float,
                        steps_per_call: int = 7, train_records: int = 50_000) -> None:
  """A config moved to one GPU with the same images seen: bfloat16 compute, `scale` x the global batch,
  device-resident training and evaluation data, `steps_per_call` steps per call, a log line per epoch and a
  checkpoint per 10, 14 degrade workers (the lent machine has 16 cores). The fixed-step `stages` take `scale` x
  fewer steps at `lr_scale` x their learning rate; the epoch-based ones (the baseline) are the config's to set.
  steps_per_call must divide an epoch's steps (of `train_records`), so that no call runs short of an epoch end."""
  c.model.compute_dtype = "bfloat16"
  c.train.global_batch *= scale
  epoch = math.ceil(train_records / c.train.global_batch)
  if epoch % steps_per_call:
    raise ConfigError(f"config.train.steps_per_call: {steps_per_call} does not divide the {epoch} steps of an epoch")
  c.train.steps_per_call = steps_per_call
  c.train.log_every_steps = epoch
  c.train.checkpoint_every_steps = 10 * epoch
  c.train.device_data = "on"
  c.evaluate.device_data = "on"
  c.evaluate.global_batch = 2500
  c.degrade.num_workers = 14
  for name in stages:
    c.stages[name].steps = -(-c.stages[name].steps // scale)
    c.stages[name].lr *= lr_scale


def shrink_for_runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrink data, model and steps so the whole pipeline of a config runs in about a minute on 2 CPUs."""
  c.data.max_train_examples = 512
  c.data.max_eval_examples = 128
  c.degrade.records_per_shard = 128
  c.model.width = 0.125
  c.model.fc_width = 64
  c.model.dropout = 0.0
  c.master.conv_features = (8, 16, 16)
  c.master.fc_features = (32, 32)
  for name in GRADIENT_STAGE_CONFIGS:
    c.stages[name].epochs = 1.0
    c.stages[name].steps = 4
    c.stages[name].warmup_steps = 0
  c.stages.deepcloak.num_examples = 64
  for b in c.bins:
    b.train_specs = b.train_specs[:1]
  transcode = c.sweeps.get("transcode")
  c.sweeps = ml_collections.ConfigDict({
      "clean": ("clean",), "jpeg": ("jpeg:10", "jpeg:50"), "jp2k": ("jp2k:8", "jp2k:16"),
      "noise": ("noise:20",), "blur": ("blur:1",), "noise_jpeg": ("noise:10+jpeg:10",),
      "blur_jpeg": ("blur:1@4+jpeg:10",)})
  c.evaluate.sweeps = tuple(c.sweeps.keys())
  if transcode:  # kept whole (a few specs) and, as in the full config, not evaluated by default
    c.sweeps.transcode = transcode
  c.train.global_batch = 32
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 2
  c.evaluate.global_batch = 64


def _check(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(f"config.{field}: {message}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Refuse impossible values before any work starts, naming the field."""
  from msnet import degradations  # spec parsing is the degradation library's job
  from msnet.models import registry  # what each arch accepts

  _check(c.data.source in ("embedded_cifar10", "folder", "tfds"), "data.source",
         f"{c.data.source!r} is not one of 'embedded_cifar10', 'folder', 'tfds'")
  _check(c.data.source != "folder" or bool(c.data.path), "data.path", "required when data.source='folder'")
  _check(c.data.source != "tfds" or bool(c.data.tfds_name), "data.tfds_name", "required when data.source='tfds'")
  _check(c.data.image_size >= 8, "data.image_size", f"must be >= 8, got {c.data.image_size}")
  _check(c.data.num_classes >= 2, "data.num_classes", f"must be >= 2, got {c.data.num_classes}")
  _check(c.data.max_pixels >= c.data.image_size ** 2, "data.max_pixels",
         f"must be >= data.image_size ** 2 = {c.data.image_size ** 2} (or no source image is readable), "
         f"got {c.data.max_pixels}")
  _check(c.data.resize_shorter == 0 or c.data.resize_shorter >= c.data.image_size, "data.resize_shorter",
         f"must be 0 or >= data.image_size ({c.data.image_size}), got {c.data.resize_shorter}")
  holdout = c.data.get("holdout_examples", 0)  # absent from config.json of workdirs made before the field
  _check(holdout >= 0, "data.holdout_examples", f"must be >= 0, got {holdout}")
  _check(c.data.max_train_examples <= 0 or holdout < c.data.max_train_examples, "data.holdout_examples",
         f"{holdout} held-out records leave none of the data.max_train_examples={c.data.max_train_examples} "
         "records for training: hold out fewer or use more")
  _check(c.degrade.num_workers >= 0, "degrade.num_workers", "must be >= 0")
  _check(c.degrade.records_per_shard >= 1, "degrade.records_per_shard", "must be >= 1")
  _check(c.degrade.on_corrupt in ("skip", "raise"), "degrade.on_corrupt", "must be 'skip' or 'raise'")
  _check(c.degrade.num_shards >= 1, "degrade.num_shards", "must be >= 1")
  _check(-1 <= c.degrade.shard_index < c.degrade.num_shards, "degrade.shard_index",
         f"must be -1 or in [0, {c.degrade.num_shards}), got {c.degrade.shard_index}")

  _check(len(c.bins) >= 1, "bins", "needs at least one bin")
  names = [b.name for b in c.bins]
  _check(len(set(names)) == len(names), "bins", f"bin names must be unique, got {names}")
  for i, b in enumerate(c.bins):
    _check(bool(b.train_specs), f"bins[{i}].train_specs", "needs at least one spec")
    for s in b.train_specs:
      _spec_ok(degradations, s, f"bins[{i}].train_specs")
    for rule in b.match:
      try:
        degradations.parse_bin_rule(rule)
      except ValueError as e:
        raise ConfigError(f"config.bins[{i}].match: {e}") from None
    rate_kinds = {r.kind for r in map(degradations.parse_bin_rule, b.match) if r.rate}
    for rule in b.match:
      r = degradations.parse_bin_rule(rule)
      codec = degradations.codecs.get(r.kind)
      _check(r.rate or codec.reads_level or r.kind in rate_kinds, f"bins[{i}].match",
             f"{codec.title} files do not carry their level, so the bitstream rule bins them by rate: add a "
             f"'{r.kind}@bpp:lo-hi' rule beside {rule!r}")
  rules = [list(b.match) for b in c.bins]
  try:
    degradations.bins.check_disjoint(rules)
  except ValueError as e:
    raise ConfigError(f"config.bins: {e}") from None
  for i, b in enumerate(c.bins):
    for s in b.train_specs:
      got = degradations.bin_of(s, rules)
      _check(got == i, f"bins[{i}].train_specs", f"{s!r} falls in bin {got} ({names[got]!r}) by the match rules, "
             f"not in bin {i} ({b.name!r}): widen bins[{i}].match or move the spec")
  for name, specs in c.sweeps.items():
    _check(len(specs) >= 1, f"sweeps.{name}", "is empty")
    for s in specs:
      _spec_ok(degradations, s, f"sweeps.{name}")
  for name in c.evaluate.sweeps:
    _check(name in c.sweeps, "evaluate.sweeps", f"{name!r} is not a sweep in config.sweeps {list(c.sweeps)}")
  known_methods = sorted({*methods.names(), "comparisons"})  # the table's methods, and config.comparisons
  for m in c.evaluate.methods:
    _check(m in known_methods, "evaluate.methods", methods.unknown(m, known_methods))
  for m in c.comparisons:
    _check(m in COMPARISON_STAGES, "comparisons", f"{m!r} is not one of {list(COMPARISON_STAGES)}")
  for m in c.extensions:
    _check(m in EXTENSION_STAGES, "extensions", f"{m!r} is not one of {list(EXTENSION_STAGES)}")
  _check("calibrate" not in c.extensions or c.data.get("holdout_examples", 0) > 0, "data.holdout_examples",
         "the calibrate stage fits temperatures on held-out training images: set it > 0 (e.g. 5000), or drop "
         "'calibrate' from config.extensions")
  _check(c.stages.calibrate.ece_bins >= 1, "stages.calibrate.ece_bins", "must be >= 1")

  shared = c.get("shared", ml_collections.ConfigDict(dict(workdir="", data=False, stages=())))
  _check(bool(shared.workdir) or not (shared.data or shared.stages), "shared.workdir",
         "required when shared.data or shared.stages is set (the run whose parts are reused)")
  trained = {"baseline", *GRADIENT_STAGE_CONFIGS, *(f"branch_{n}" for n in names[1:])} - {"branch"}
  targets = []
  for entry in shared.stages:
    stage, _, source = entry.partition("=")
    for name in (stage, source or stage):
      _check(name in trained, "shared.stages", f"{entry!r}: {name!r} is not a trained stage of this config "
             f"(one of {sorted(trained)}); entries are 'stage' or 'stage=source'")
    _check((stage in MASTER_STAGES) == ((source or stage) in MASTER_STAGES), "shared.stages",
           f"{entry!r}: a master network and a slave network do not stand in for each other")
    targets.append(stage)
  _check(len(set(targets)) == len(targets), "shared.stages", f"a stage is shared twice: {list(shared.stages)}")

  _check(c.model.arch in registry.ARCHS, "model.arch", f"{c.model.arch!r} is not one of {sorted(registry.ARCHS)}")
  arch = registry.get(c.model.arch)
  _check(c.model.variant in arch.variants, "model.variant", f"{c.model.arch} takes {' or '.join(arch.variants)}, "
         f"got {c.model.variant!r}")
  _check(c.model.width > 0, "model.width", f"must be > 0, got {c.model.width}")
  _check(c.model.norm in arch.norms, "model.norm", f"{c.model.arch} takes {' or '.join(arch.norms)}, "
         f"got {c.model.norm!r}")
  _check(c.model.input_norm in ("standard", "caffe", "torch"), "model.input_norm",
         "must be 'standard', 'caffe' or 'torch'")
  cuts = registry.cut_layers(arch.table(c.model, int(c.data.num_classes)))
  _check(1 <= c.model.trunk_layers <= len(cuts), "model.trunk_layers",
         f"must be in [1, {len(cuts)}] ({c.model.arch} {arch.unit}), got {c.model.trunk_layers}")
  _check(0.0 <= c.model.dropout < 1.0, "model.dropout", "must be in [0, 1)")
  _check(arch.dropout or c.model.dropout == 0, "model.dropout", f"{c.model.arch} has no dropout layer: set 0")
  for m in c.comparisons:
    _check(not m.startswith("da_") or m in arch.da_layers, "comparisons",
           f"{m!r} fine-tunes layers {c.model.arch} does not have; its DA stages are {sorted(arch.da_layers)}")
  _check(c.model.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype", "must be float32 or bfloat16")
  _check(len(c.master.conv_features) == 3, "master.conv_features", "the master has exactly 3 conv layers")
  _check(len(c.master.fc_features) == 2, "master.fc_features",
         "the master has 3 FC layers: give the 2 hidden widths (the third outputs the bins)")

  for name in GRADIENT_STAGE_CONFIGS:
    s = c.stages[name]
    if name == "baseline" and c.model.pretrained:
      continue  # the baseline is the imported pretrained network, not trained
    _check(s.epochs > 0 or s.steps > 0, f"stages.{name}.epochs",
           "epochs or steps must be > 0" + (" (or set model.pretrained)" if name == "baseline" else ""))
    _check(s.lr > 0 and math.isfinite(s.lr), f"stages.{name}.lr", f"must be a positive number, got {s.lr}")
    _check(s.schedule in ("cosine", "constant"), f"stages.{name}.schedule", "must be 'cosine' or 'constant'")
    _check(s.optimizer in ("sgd", "adamw"), f"stages.{name}.optimizer", "must be 'sgd' or 'adamw'")
    _check(s.warmup_steps >= 0, f"stages.{name}.warmup_steps", "must be >= 0")
    _check(isinstance(s.crop_pad, int) and 0 <= s.crop_pad < c.data.image_size, f"stages.{name}.crop_pad",
           f"must be an integer in [0, data.image_size = {c.data.image_size}), got {s.crop_pad!r}")
    for spec in s.train_specs:
      _spec_ok(degradations, spec, f"stages.{name}.train_specs")
  _check(0 < c.stages.deepcloak.mask_ratio < 1, "stages.deepcloak.mask_ratio", "must be in (0, 1)")
  _check(c.stages.deepcloak.num_examples >= 1, "stages.deepcloak.num_examples", "must be >= 1")
  a = c.stages.augmix
  _check(isinstance(a.severity, int) and 1 <= a.severity <= 10, "stages.augmix.severity",
         f"must be an integer in [1, 10] (AugMix's scale; its paper: 3), got {a.severity!r}")
  _check(isinstance(a.width, int) and a.width >= 1, "stages.augmix.width",
         f"must be an integer >= 1 (chains per copy; its paper: 3), got {a.width!r}")
  _check(isinstance(a.depth, int) and (a.depth == -1 or a.depth >= 1), "stages.augmix.depth",
         f"must be -1 (1-3 operations at random, its paper) or an integer >= 1, got {a.depth!r}")
  _check(a.alpha > 0 and math.isfinite(a.alpha), "stages.augmix.alpha",
         f"must be a positive number (Dirichlet and Beta parameter), got {a.alpha}")
  _check(a.js_lambda >= 0 and math.isfinite(a.js_lambda), "stages.augmix.js_lambda",
         f"must be a number >= 0, got {a.js_lambda}")
  _check(c.stability.alpha >= 0, "stability.alpha", "must be >= 0")
  _check(c.stability.noise_sigma > 0, "stability.noise_sigma", "must be > 0")

  _check(c.train.global_batch >= 1, "train.global_batch", "must be >= 1")
  _check(c.train.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
  _check(c.train.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be >= 1")
  _check(c.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
  _check(c.train.steps_per_call >= 1, "train.steps_per_call", "must be >= 1")
  _check(_device_data_ok(c.train.device_data), "train.device_data",
         f"must be 'auto', 'on', 'off' or a budget in bytes per device >= 0, got {c.train.device_data!r}")
  _check(_device_data_ok(c.train.host_cache), "train.host_cache",
         f"must be 'auto', 'on', 'off' or a budget in bytes >= 0, got {c.train.host_cache!r}")
  _check(c.train.host_cache != "on" or c.train.num_workers == 0, "train.host_cache",
         "'on' reads the records into this process's memory, which Grain worker processes "
         f"(train.num_workers = {c.train.num_workers}) do not use: set num_workers = 0 or host_cache = 'auto'")
  _check(c.evaluate.global_batch >= 1, "evaluate.global_batch", "must be >= 1")
  _check(_device_data_ok(c.evaluate.device_data), "evaluate.device_data",
         f"must be 'auto', 'on', 'off' or a budget in bytes per device >= 0, got {c.evaluate.device_data!r}")
  for i, axis in enumerate(c.mesh):
    _check(len(axis) == 2 and isinstance(axis[0], str) and isinstance(axis[1], int), f"mesh[{i}]",
           f"must be a (name, size) pair, got {axis!r}")
  _check(c.mesh[0][0] == "data", "mesh", "the first mesh axis must be 'data'")


def _device_data_ok(value: Any) -> bool:
  """A device_data field: a mode or a number of bytes (a string from the command line, or a number)."""
  if value in ("auto", "on", "off"):
    return True
  try:
    return float(value) >= 0
  except (TypeError, ValueError):
    return False


def _spec_ok(degradations: Any, spec: str, field: str) -> None:
  try:
    degradations.parse(spec)
  except ValueError as e:
    raise ConfigError(f"config.{field}: {e}") from None


def _plain(value: Any) -> Any:
  """ConfigDicts (also inside lists, e.g. config.bins) -> plain dicts and lists for JSON."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def to_json(c: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (written to W/config.json)."""
  return json.dumps(_plain(c), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of `to_json`: dicts, also inside lists, become ConfigDicts again, other lists tuples.

  A field added to `base_config` after the config was saved takes its default (a workdir made by an older
  msnet stays usable); every saved field keeps its saved value.
  """
  saved = _with_defaults(json.loads(text), json.loads(to_json(base_config())))
  def build(value: Any) -> Any:
    if isinstance(value, dict):
      return ml_collections.ConfigDict({k: build(v) for k, v in value.items()})
    if isinstance(value, list):  # config.bins stays a list of ConfigDicts; every other sequence is a tuple
      items = [build(v) for v in value]
      return items if any(isinstance(v, ml_collections.ConfigDict) for v in items) else tuple(items)
    return value
  return build(saved)


_SAVED_WHOLE = ("sweeps",)  # mappings a config file replaces whole: a saved one gets no default entries


def _with_defaults(saved: Any, default: Any) -> Any:
  """`saved` with the keys of `default` it lacks added, recursively through dicts (lists and _SAVED_WHOLE are
  taken whole)."""
  if not (isinstance(saved, dict) and isinstance(default, dict)):
    return saved
  return {**default, **{k: v if k in _SAVED_WHOLE else _with_defaults(v, default.get(k)) for k, v in saved.items()}}
