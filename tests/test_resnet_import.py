"""torchvision ResNet-50 weights into msnet's BatchNorm ResNet-50: a plain torch.nn ResNet-50 v1.5 with
torchvision's module names (nothing downloaded, no torchvision) at a reduced width, its state dict imported from
.pth and .safetensors, the logits compared with torch's in eval mode; bad files refused naming the entry."""

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn as tnn

from msnet import config
from msnet.models import build_slave, load_pretrained, pretrained
from msnet.train import stages

from test_train import tiny_config

WIDTH, CLASSES, SIZE = 0.125, 5, 64


class Bottleneck(tnn.Module):
  """torchvision's Bottleneck (v1.5: the stride on conv2)."""

  def __init__(self, cin: int, mid: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = tnn.Conv2d(cin, mid, 1, bias=False), tnn.BatchNorm2d(mid)
    self.conv2, self.bn2 = tnn.Conv2d(mid, mid, 3, stride, 1, bias=False), tnn.BatchNorm2d(mid)
    self.conv3, self.bn3 = tnn.Conv2d(mid, mid * 4, 1, bias=False), tnn.BatchNorm2d(mid * 4)
    self.downsample = None
    if stride != 1 or cin != mid * 4:
      self.downsample = tnn.Sequential(tnn.Conv2d(cin, mid * 4, 1, stride, bias=False), tnn.BatchNorm2d(mid * 4))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(tnn.Module):
  """torchvision's resnet50 module tree, every width times `width` (at least 8, as msnet's `scaled`)."""

  def __init__(self, width: float, num_classes: int):
    super().__init__()
    widths = [max(8, round(c * width)) for c in (64, 128, 256, 512)]
    self.conv1, self.bn1 = tnn.Conv2d(3, widths[0], 7, 2, 3, bias=False), tnn.BatchNorm2d(widths[0])
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    cin = widths[0]
    for stage, (mid, n) in enumerate(zip(widths, (3, 4, 6, 3)), start=1):
      blocks = []
      for i in range(n):
        blocks.append(Bottleneck(cin, mid, 2 if stage > 1 and i == 0 else 1))
        cin = mid * 4
      setattr(self, f"layer{stage}", tnn.Sequential(*blocks))
    self.fc = tnn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for stage in range(1, 5):
      x = getattr(self, f"layer{stage}")(x)
    return self.fc(x.mean(dim=(2, 3)))


def torch_net(seed=0):
  """The reduced ResNet-50 with random BatchNorm affine params and running statistics (eval mode)."""
  torch.manual_seed(seed)
  net = ResNet50(WIDTH, CLASSES)
  for m in net.modules():
    if isinstance(m, tnn.BatchNorm2d):
      c = m.num_features
      m.weight.data = torch.rand(c) * 0.5 + 0.75
      m.bias.data = torch.randn(c) * 0.1
      m.running_mean.data = torch.randn(c) * 0.1
      m.running_var.data = torch.rand(c) + 0.5
      m.num_batches_tracked.fill_(7)
  return net.eval()


def model_cfg(**kw):
  c = config.base_config().model
  c.update(arch="resnet50", variant="imagenet", norm="batch", input_norm="torch", width=WIDTH, trunk_layers=8)
  c.update(kw)
  return c


def images(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)


def torch_logits(net, x):
  mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
  t = torch.from_numpy(((x.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    return net(t).numpy()


def msnet_logits(variables, cfg, x):
  return np.asarray(build_slave(cfg, CLASSES, 1).apply(variables, x)[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The torch net and its state dict as .pth and .safetensors."""
  d = tmp_path_factory.mktemp("resnet50")
  net = torch_net()
  torch.save(net.state_dict(), d / "resnet50.pth")
  save_file({k: v.numpy() for k, v in net.state_dict().items()}, str(d / "resnet50.safetensors"))
  return net, d


@pytest.mark.parametrize("name", ["resnet50.pth", "resnet50.safetensors"])
def test_imported_resnet50_matches_torch_in_eval_mode(files, name):
  net, d = files
  cfg = model_cfg()
  variables = load_pretrained(d / name, cfg, num_classes=CLASSES, image_size=SIZE)
  assert sorted(variables) == ["batch_stats", "params"]
  np.testing.assert_array_equal(variables["batch_stats"]["trunk"]["stem"]["norm"]["var"],
                                net.bn1.running_var.numpy())
  x = images()
  want = torch_logits(net, x)
  got = msnet_logits(variables, cfg, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_the_baseline_stage_imports_by_arch(files, tmp_path):
  """make_job's baseline reads config.model.pretrained with the arch's importer (IMPORTERS)."""
  _, d = files
  c = tiny_config()
  c.model.update(model_cfg(pretrained=str(d / "resnet50.safetensors")).to_dict())
  c.data.num_classes, c.data.image_size = CLASSES, SIZE
  job = stages.make_job(c, tmp_path, "baseline")
  got = job.init_variables()
  want = load_pretrained(d / "resnet50.safetensors", c.model, num_classes=CLASSES, image_size=SIZE)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  assert sorted(pretrained.IMPORTERS) == ["resnet50", "vgg16"]


def _state(net):
  return {k: v.numpy() for k, v in net.state_dict().items()}


def _refused(tmp_path, state, match, cfg=None):
  path = tmp_path / "bad.safetensors"
  save_file(state, str(path))
  with pytest.raises(pretrained.PretrainedError, match=match):
    load_pretrained(path, cfg or model_cfg(), num_classes=CLASSES, image_size=SIZE)


def test_bad_files_are_refused_naming_the_entry(files, tmp_path):
  net, _ = files
  state = _state(net)
  missing = {k: v for k, v in state.items() if k != "layer2.0.bn1.running_var"}
  _refused(tmp_path, missing, r"missing layer2\.0\.bn1\.running_var \(msnet trunk/block2_1/norm1/var\)")
  wrong = dict(state, **{"layer3.1.conv2.weight": np.zeros((32, 32, 1, 3), np.float32)})
  _refused(tmp_path, wrong, r"'layer3\.1\.conv2\.weight' \(msnet branches/block3_2/conv2/kernel\) \[out, in, h, w\] "
                            r"has shape \(32, 32, 1, 3\), the model expects \(32, 32, 3, 3\)")
  _refused(tmp_path, dict(state, **{"fc.weight": np.zeros((7, 256), np.float32)}),
           r"'fc\.weight' .* has shape \(7, 256\), the model expects \(5, 256\)")
  extra = dict(state, **{"layer4.3.conv1.weight": np.zeros((64, 256, 1, 1), np.float32)})
  _refused(tmp_path, extra, r"entries \['layer4\.3\.conv1\.weight'\] have no place")
  _refused(tmp_path, state, r"model\.norm='batch'", model_cfg(norm="group"))
  with pytest.raises(pretrained.PretrainedError, match=r"no importer for model\.arch='resnet18'"):
    load_pretrained(tmp_path / "bad.safetensors", model_cfg(arch="resnet18", variant="cifar"))
