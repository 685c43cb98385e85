"""ResNet slaves: the Flax ResNets against independent PyTorch implementations with the same weights, the K-branch
slave against K separate networks, lossless re-splits over block boundaries, FLOPs and parameter counts against
torchvision's published numbers, config validation, and a few train steps through the stage loop."""

import json

import jax
import numpy as np
import pytest
import torch
from torch import nn as tnn
from torch.nn import functional as F

from msnet import config, models, study, train
from msnet.train import loop

from test_study import study_config
from test_train import tiny_config, workdir_with_data, write_synthetic_shards


def resnet_cfg(arch="resnet18", **kw):
  c = config.base_config().model
  c.arch, c.norm, c.width, c.trunk_layers = arch, "group", 0.25, 3
  c.variant = "imagenet" if arch == "resnet50" else "cifar"
  c.update(kw)
  return c


def random_params(model, x, seed=0):
  """He-scaled kernels, GroupNorm scales near 1 and biases near 0 (all random, so each is tested), from the
  shapes alone (numpy: no threefry compile per layer)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    stacked = name.startswith("['branches']")
    if name.endswith("['kernel']"):
      fan_in = int(np.prod(s.shape[1 if stacked else 0:-1]))
      return rng.normal(size=s.shape).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    centre = 1.0 if name.endswith("['scale']") else 0.0
    return (centre + 0.2 * rng.normal(size=s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def images(b=2, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, size, size, 3), dtype=np.uint8)


# --- an independent PyTorch reference ------------------------------------------------------------------------

def groups(c):
  return max(g for g in range(1, 33) if c % g == 0)


def gn(c):
  return tnn.GroupNorm(groups(c), c, eps=1e-5)


class TorchPreAct(tnn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.norm1, self.norm2 = gn(cin), gn(cout)
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.shortcut = tnn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

  def forward(self, x):
    out = F.relu(self.norm1(x))
    skip = self.shortcut(out) if self.shortcut is not None else x
    return self.conv2(F.relu(self.norm2(self.conv1(out)))) + skip


class TorchBottleneck(tnn.Module):
  def __init__(self, cin, width, stride):
    super().__init__()
    cout = 4 * width
    self.conv1, self.norm1 = tnn.Conv2d(cin, width, 1, bias=False), gn(width)
    self.conv2, self.norm2 = tnn.Conv2d(width, width, 3, stride, 1, bias=False), gn(width)
    self.conv3, self.norm3 = tnn.Conv2d(width, cout, 1, bias=False), gn(cout)
    self.shortcut = self.shortcut_norm = None
    if stride != 1 or cin != cout:
      self.shortcut, self.shortcut_norm = tnn.Conv2d(cin, cout, 1, stride, bias=False), gn(cout)

  def forward(self, x):
    out = F.relu(self.norm1(self.conv1(x)))
    out = F.relu(self.norm2(self.conv2(out)))
    out = self.norm3(self.conv3(out))
    skip = self.shortcut_norm(self.shortcut(x)) if self.shortcut is not None else x
    return F.relu(out + skip)


class TorchResNet(tnn.Module):
  """CIFAR pre-activation ResNet (bottleneck=False) or ImageNet ResNet v1.5 (bottleneck=True)."""

  def __init__(self, depths, base, num_classes, bottleneck):
    super().__init__()
    self.bottleneck = bottleneck
    if bottleneck:
      self.stem, self.stem_norm = tnn.Conv2d(3, base, 7, 2, 3, bias=False), gn(base)
    else:
      self.stem = tnn.Conv2d(3, base, 3, 1, 1, bias=False)
    blocks, cin = [], base
    for s, n in enumerate(depths):
      for i in range(n):
        stride = 2 if s > 0 and i == 0 else 1
        if bottleneck:
          blocks.append(TorchBottleneck(cin, base * 2 ** s, stride))
          cin = 4 * base * 2 ** s
        else:
          blocks.append(TorchPreAct(cin, base * 2 ** s, stride))
          cin = base * 2 ** s
    self.blocks = tnn.ModuleList(blocks)
    self.final_norm = None if bottleneck else gn(cin)
    self.fc = tnn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.stem(x)
    if self.bottleneck:
      x = F.max_pool2d(F.relu(self.stem_norm(x)), 3, 2, 1)
    for b in self.blocks:
      x = b(x)
    if self.final_norm is not None:
      x = F.relu(self.final_norm(x))
    return self.fc(x.mean((2, 3)))


def load_into_torch(net, params):
  """Copy a K=1 slave's Flax params (trunk + branch 0) into `net`."""
  flat = {**params["trunk"], **jax.tree.map(lambda a: a[0], params["branches"])}
  t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a)))
  conv = lambda m, p: m.weight.data.copy_(t(np.transpose(p["kernel"], (3, 2, 0, 1))))

  def norm(m, p):
    m.weight.data.copy_(t(p["scale"]))
    m.bias.data.copy_(t(p["bias"]))

  conv(net.stem, flat["stem"]["conv"])
  if net.bottleneck:
    norm(net.stem_norm, flat["stem"]["norm"])
  names = sorted((k for k in flat if k.startswith("block")), key=lambda k: tuple(map(int, k[5:].split("_"))))
  assert len(names) == len(net.blocks)
  for name, block in zip(names, net.blocks):
    p = flat[name]
    for sub, module in block.named_children():
      (conv if isinstance(module, tnn.Conv2d) else norm)(module, p[sub])
  if net.final_norm is not None:
    norm(net.final_norm, flat["fc_norm"])
  net.fc.weight.data.copy_(t(np.asarray(flat["fc"]["kernel"]).T))
  net.fc.bias.data.copy_(t(flat["fc"]["bias"]))


def torch_logits(net, x):
  xt = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).astype(np.float32))
  with torch.no_grad():
    return net((xt / 255.0 - 0.5) / 0.25).numpy()


@pytest.mark.parametrize("arch,depths,width,size,base", [
    ("resnet18", (2, 2, 2, 2), 0.25, 32, 16),
    ("resnet50", (3, 4, 6, 3), 0.125, 64, 8),
])
def test_resnet_matches_torch(arch, depths, width, size, base):
  cfg = resnet_cfg(arch, width=width, trunk_layers=3)
  model = models.build_slave(cfg, 10, 1)
  x = images(2, size)
  params = random_params(model, x)
  got = np.asarray(jax.jit(model.apply)({"params": params}, x))[0]
  net = TorchResNet(depths, base, 10, bottleneck=arch == "resnet50").eval()
  load_into_torch(net, params)
  want = torch_logits(net, x)
  assert np.abs(want).max() > 0.1  # the logits carry signal
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_k_branch_slave_equals_k_networks_sharing_the_trunk():
  cfg = resnet_cfg(trunk_layers=5)
  x = images()
  slave = models.build_slave(cfg, 10, 3)
  params = random_params(slave, x, seed=1)  # every branch its own random block3_*, block4_*, fc
  logits = np.asarray(jax.jit(slave.apply)({"params": params}, x))
  one = jax.jit(models.build_slave(cfg, 10, 1).apply)
  for k in range(3):
    single = {"trunk": params["trunk"], "branches": jax.tree.map(lambda a: a[k:k + 1], params["branches"])}
    np.testing.assert_allclose(logits[k], np.asarray(one({"params": single}, x))[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits[0], logits[1], atol=1e-3)


def test_resplit_is_lossless_over_block_boundaries():
  cfg = resnet_cfg(trunk_layers=3)
  table = models.model_table(cfg, 10)
  x = images()
  base = random_params(models.build_slave(cfg, 10, 1), x, seed=2)
  reference = np.asarray(jax.jit(models.build_slave(cfg, 10, 1).apply)({"params": base}, x))
  assert models.registry.cut_layers(table) == [f"block{s}_{i}" for s in range(1, 5) for i in (1, 2)]
  for depth, first_branch in ((1, "block1_2"), (5, "block3_2"), (8, "fc_norm")):
    moved = models.resplit_params(base, table, depth)
    assert sorted(moved["trunk"]) == sorted(models.trunk_weight_layers(table, depth))
    assert first_branch in moved["branches"]
    assert all(a.shape[0] == 1 for a in jax.tree.leaves(moved["branches"]))
    logits = jax.jit(models.build_slave(resnet_cfg(trunk_layers=depth), 10, 1).apply)({"params": moved}, x)
    np.testing.assert_allclose(np.asarray(logits), reference, rtol=1e-5, atol=1e-6)
    back = models.resplit_params(moved, table, 3)
    assert jax.tree.structure(back) == jax.tree.structure(base)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(base)))
  with pytest.raises(ValueError, match=r"trunk_layers=9: must be in \[1, 8\], the number of residual blocks"):
    models.resplit_params(base, table, 9)


def test_flops_and_params_match_torchvision_resnet50():
  """torchvision documents ResNet-50 as 25,557,032 params and 4.09 GMACs at 224x224 (GroupNorm has BatchNorm's
  affine params); the CIFAR pre-activation ResNet-18: 11.17 M params, 0.56 GMACs at 32x32."""
  model = models.build_slave(resnet_cfg("resnet50", width=1.0), 1000, 1)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 224, 224, 3), np.uint8))["params"]
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == 25_557_032
  assert models.flops_per_image(model, shapes, 224) == pytest.approx(2 * 4.09e9, rel=2e-3)
  model = models.build_slave(resnet_cfg(width=1.0), 10, 1)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8))["params"]
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) / 1e6 == pytest.approx(11.17, abs=0.01)
  assert models.flops_per_image(model, shapes, 32) == pytest.approx(2 * 0.5555e9, rel=2e-3)
  # Branches count K times: K=3 adds twice the branch blocks' FLOPs.
  rows = models.layer_flops(model, shapes, 32)
  k3 = models.build_slave(resnet_cfg(width=1.0), 10, 3)
  shapes3 = jax.eval_shape(k3.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8))["params"]
  branch = sum(r["flops"] for r in rows if r["layer"] in shapes["branches"])
  assert models.flops_per_image(k3, shapes3, 32) == pytest.approx(models.flops_per_image(model, shapes, 32)
                                                                   + 2 * branch)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  x = images()
  f32 = models.build_slave(resnet_cfg(), 10, 1)
  bf16 = models.build_slave(resnet_cfg(compute_dtype="bfloat16"), 10, 1)
  params = random_params(f32, x, seed=3)
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), x)["params"]
  assert {a.dtype for a in jax.tree.leaves(shapes)} == {np.dtype("float32")}
  want = np.asarray(jax.jit(f32.apply)({"params": params}, x))
  got = jax.jit(bf16.apply)({"params": params}, x)
  assert got.dtype == np.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=0.05 * float(np.abs(want).max()))


def test_study_takes_block_depths():
  c = study_config()
  c.model.update(dict(arch="resnet18", norm="group", trunk_layers=4))
  c.comparisons = ()
  c.study.trunk_layers = (2, 4, 8)
  study.check_study(c)
  c.study.trunk_layers = (2, 9)
  with pytest.raises(config.ConfigError, match=r"config\.study\.trunk_layers: 9 is not in \[1, 8\] \(resnet18 "
                     r"residual blocks\)"):
    study.check_study(c)


def _resnet_config(**model):
  c = config.base_config()
  c.model.update({**dict(arch="resnet18", norm="group", trunk_layers=4), **model})
  c.comparisons = ("da_fc8", "stability", "deepcloak")
  return c


def test_resnet_config_validates_and_bad_fields_are_refused():
  config.validate(_resnet_config())
  config.validate(_resnet_config(arch="resnet34", trunk_layers=16))
  for fields, message in [
      (dict(trunk_layers=9), r"config\.model\.trunk_layers: must be in \[1, 8\] \(resnet18 residual blocks\)"),
      (dict(arch="resnet34", trunk_layers=17), r"config\.model\.trunk_layers: must be in \[1, 16\]"),
      (dict(norm="none"), r"config\.model\.norm: resnet18 takes group"),
      (dict(variant="imagenet"), r"config\.model\.variant: resnet18 takes cifar"),
      (dict(dropout=0.5), r"config\.model\.dropout: resnet18 has no dropout layer"),
      (dict(arch="resnet101"), r"config\.model\.arch: 'resnet101' is not one of"),
  ]:
    with pytest.raises(config.ConfigError, match=message):
      config.validate(_resnet_config(**fields))
  c = _resnet_config()
  c.comparisons = ("da_fc67",)
  with pytest.raises(config.ConfigError, match=r"config\.comparisons: 'da_fc67' fine-tunes layers resnet18"):
    config.validate(c)


def test_resnet_slave_trains_through_the_stage_loop(tmp_path):
  """Baseline, a branch (trunk frozen) and da_fc8 (only the classifier) of a ResNet-18 slave, a few steps each."""
  c = tiny_config()
  c.model.update(arch="resnet18", norm="group", width=0.125, trunk_layers=6)
  c.comparisons = ("da_fc8",)
  c.stages.baseline.steps, c.stages.da_fc8.steps = 4, 2
  config.validate(c)
  write_synthetic_shards(tmp_path / "root", c)
  w = workdir_with_data(tmp_path / "w", tmp_path / "root")
  result = train.run_stage(c, w, "baseline")
  assert result["steps"] == 4
  losses = [json.loads(x)["loss"] for x in (loop.stage_dir(w, "baseline") / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x and "event" not in x]
  assert losses and all(np.isfinite(losses))
  base = train.load_params(w, "baseline")
  assert sorted(base["trunk"]) == ["block1_1", "block1_2", "block2_1", "block2_2", "block3_1", "block3_2", "stem"]
  # The depth study's cost of one branch at a block boundary: a K=2 slave's FLOPs minus the K=1 one's.
  for depth, first in ((2, "block2_1"), (8, "fc")):
    cost = study.branch_cost(c, w, depth)
    cfg = study.depth_config(c, depth)
    cut = models.resplit_params(base, models.model_table(cfg.model, 10), depth)
    one, two = (models.build_slave(cfg.model, 10, k) for k in (1, 2))
    extra = models.flops_per_image(two, models.tile_branches(cut, 2), 32) - models.flops_per_image(one, cut, 32)
    assert cost["first_branch_layer"] == first
    assert cost["branch_mflops"] * 1e6 == pytest.approx(extra)
  for stage, trains in (("branch_jpeg", "branches/"), ("da_fc8", "branches/fc/")):
    train.run_stage(c, w, stage)
    after = train.load_params(w, stage)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(after)):
      name = "/".join(str(getattr(k, "key", k)) for k in path) + "/"
      if name.startswith(trains):
        assert not np.array_equal(a, b), f"{stage}: {name} did not train"
      else:
        np.testing.assert_array_equal(a, b, err_msg=f"{stage}: {name} changed")
