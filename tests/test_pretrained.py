"""Pretrained VGG-16 import: fabricated Keras .h5 (both layouts) and torchvision safetensors/.pth files with
the real layer names, checked against NumPy float64 forward passes written in each file's own layout.

The files use a reduced-width VGG-16 (the importer derives shapes from the model config) at 64x64 input,
so pool5 is 2x2 and torchvision's (c, h, w) flatten order is really exercised; the full-size name/shape
table is checked with jax.eval_shape, without allocating 138M parameters."""

import functools
import sys

import h5py
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from msnet import config
from msnet.models import build_slave, load_pretrained_vgg16
from msnet.models import pretrained

BLOCKS = [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]
CONVS = [f"block{b}_conv{i}" for b, n in BLOCKS for i in range(1, n + 1)]
TORCH_CONV = [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
SIZE, CLASSES = 64, 10


def small_cfg(input_norm):
  c = config.base_config().model
  c.variant, c.width, c.fc_width, c.input_norm = "imagenet", 0.0625, 16, input_norm
  return c


def conv_widths(width=0.0625):
  return [max(8, round(c * width)) for c, n in [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)] for _ in range(n)]


def keras_weights(seed=0):
  """{keras layer: (kernel HWIO / [in, out], bias)} with He-scaled random values."""
  rng = np.random.default_rng(seed)
  out, cin = {}, 3
  for name, cout in zip(CONVS, conv_widths()):
    out[name] = (rng.normal(size=(3, 3, cin, cout)) * np.sqrt(2 / (9 * cin)), rng.normal(size=cout) * 0.1)
    cin = cout
  side = SIZE // 32
  for name, (n_in, n_out) in zip(["fc1", "fc2", "predictions"], [(side * side * cin, 16), (16, 16), (16, CLASSES)]):
    out[name] = (rng.normal(size=(n_in, n_out)) * np.sqrt(2 / n_in), rng.normal(size=n_out) * 0.1)
  return {k: (w.astype(np.float32), b.astype(np.float32)) for k, (w, b) in out.items()}


def torch_state(seed=1):
  """torchvision's state dict layout (OIHW, [out, in], classifier.0 over the (c, h, w) flatten)."""
  rng = np.random.default_rng(seed)
  sd, cin = {}, 3
  for name, cout in zip(TORCH_CONV, conv_widths()):
    sd[f"{name}.weight"] = rng.normal(size=(cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))
    sd[f"{name}.bias"] = rng.normal(size=cout) * 0.1
    cin = cout
  side = SIZE // 32
  for name, (n_in, n_out) in zip(["classifier.0", "classifier.3", "classifier.6"],
                                 [(cin * side * side, 16), (16, 16), (16, CLASSES)]):
    sd[f"{name}.weight"] = rng.normal(size=(n_out, n_in)) * np.sqrt(2 / n_in)
    sd[f"{name}.bias"] = rng.normal(size=n_out) * 0.1
  return {k: v.astype(np.float32) for k, v in sd.items()}


def write_keras(path, weights, layout="original"):
  names = (["input_1"] + CONVS[:2] + ["block1_pool"] + CONVS[2:] + ["block5_pool", "flatten"]
           + ["fc1", "fc2", "predictions"])
  with h5py.File(path, "w") as f:
    root = f.create_group("model_weights") if layout == "keras2" else f
    root.attrs["layer_names"] = [n.encode() for n in names if n in weights or layout == "original"]
    for n in names:
      if n not in weights:
        if layout == "original":
          root.create_group(n).attrs["weight_names"] = np.array([], dtype="S1")
        continue
      g = root.create_group(n)
      wn = ([f"{n}_W_1:0", f"{n}_b_1:0"] if layout == "original" else [f"{n}/kernel:0", f"{n}/bias:0"])
      for key, value in zip(wn, weights[n]):
        g.create_dataset(key, data=value)
      if layout == "original":  # the keras2 case leaves weight_names out: the importer then scans the group
        g.attrs["weight_names"] = [w.encode() for w in wn]


def image_batch(seed=3):
  return np.random.default_rng(seed).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)


def ref_keras(x, w):
  """float64 NHWC/HWIO forward of Keras' VGG16 on caffe-preprocessed input; returns logits."""
  h = x.astype(np.float64)[..., ::-1] - np.array([103.939, 116.779, 123.68])
  for name in CONVS:
    k, b = (a.astype(np.float64) for a in w[name])
    hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    s = h.shape[1]
    h = np.maximum(sum(np.einsum("bhwc,cd->bhwd", hp[:, i:i + s, j:j + s], k[i, j])
                       for i in range(3) for j in range(3)) + b, 0)
    if name in ("block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3", "block5_conv3"):
      h = h.reshape(h.shape[0], s // 2, 2, s // 2, 2, -1).max((2, 4))
  h = h.reshape(h.shape[0], -1)
  for name in ("fc1", "fc2", "predictions"):
    k, b = (a.astype(np.float64) for a in w[name])
    h = h @ k + b
    if name != "predictions":
      h = np.maximum(h, 0)
  return h


def ref_torch(x, sd):
  """float64 NCHW/OIHW forward of torchvision's vgg16 (eval) on torch-normalised input."""
  h = (x.astype(np.float64) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  h = h.transpose(0, 3, 1, 2)
  pools_after = {"features.2", "features.7", "features.14", "features.21", "features.28"}
  for name in TORCH_CONV:
    k, b = sd[f"{name}.weight"].astype(np.float64), sd[f"{name}.bias"].astype(np.float64)
    hp = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
    s = h.shape[2]
    h = np.maximum(sum(np.einsum("bchw,oc->bohw", hp[:, :, i:i + s, j:j + s], k[:, :, i, j])
                       for i in range(3) for j in range(3)) + b[:, None, None], 0)
    if name in pools_after:
      h = h.reshape(h.shape[0], h.shape[1], s // 2, 2, s // 2, 2).max((3, 5))
  h = h.reshape(h.shape[0], -1)  # torch.flatten: (c, h, w) order
  for i in (0, 3, 6):
    h = h @ sd[f"classifier.{i}.weight"].astype(np.float64).T + sd[f"classifier.{i}.bias"]
    if i != 6:
      h = np.maximum(h, 0)
  return h


@functools.cache
def forward(input_norm):
  return jax.jit(build_slave(small_cfg(input_norm), CLASSES, 1).apply)


def check_logits(params, input_norm, want):
  got = np.asarray(forward(input_norm)({"params": params}, image_batch()))[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("layout", ["original", "keras2"])
def test_keras_h5_matches_numpy_reference(tmp_path, layout):
  w = keras_weights()
  path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
  write_keras(path, w, layout)
  params = load_pretrained_vgg16(path, small_cfg("caffe"), num_classes=CLASSES, image_size=SIZE)
  assert sorted(params["trunk"]) == sorted(pretrained.LAYERS[:10])
  assert params["branches"]["fc8"]["kernel"].shape == (1, 16, CLASSES)
  np.testing.assert_array_equal(params["trunk"]["conv1_1"]["kernel"], w["block1_conv1"][0])
  check_logits(params, "caffe", ref_keras(image_batch(), w))


def test_torchvision_safetensors_matches_numpy_reference(tmp_path):
  sd = torch_state()
  path = tmp_path / "vgg16.safetensors"
  save_file(sd, str(path))
  params = load_pretrained_vgg16(path, small_cfg("torch"), num_classes=CLASSES, image_size=SIZE)
  check_logits(params, "torch", ref_torch(image_batch(), sd))


def test_torchvision_pth(tmp_path):
  torch = pytest.importorskip("torch")  # CI installs msnet[torch], so this runs there
  path = tmp_path / "vgg16-397923af.pth"
  sd = torch_state()
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  params = load_pretrained_vgg16(path, small_cfg("torch"), num_classes=CLASSES, image_size=SIZE)
  check_logits(params, "torch", ref_torch(image_batch(), sd))


def test_pth_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  path = tmp_path / "vgg16-397923af.pth"
  path.write_bytes(b"not read")
  with pytest.raises(pretrained.PretrainedError, match="needs torch"):
    load_pretrained_vgg16(path, small_cfg("torch"), num_classes=CLASSES, image_size=SIZE)


def test_clear_errors(tmp_path):
  cfg = small_cfg("caffe")
  w = keras_weights()
  del w["fc2"]
  write_keras(tmp_path / "a.h5", w)
  with pytest.raises(pretrained.PretrainedError, match="missing layer 'fc2' \\(msnet fc7\\)"):
    load_pretrained_vgg16(tmp_path / "a.h5", cfg, num_classes=CLASSES, image_size=SIZE)
  w = keras_weights()
  w["block3_conv2"] = (np.zeros((3, 3, 16, 24), np.float32), np.zeros(24, np.float32))
  write_keras(tmp_path / "b.h5", w)
  with pytest.raises(pretrained.PretrainedError,
                     match=r"'block3_conv2' \(msnet conv3_2\) kernel has shape \(3, 3, 16, 24\), .*\(3, 3, 16, 16\)"):
    load_pretrained_vgg16(tmp_path / "b.h5", cfg, num_classes=CLASSES, image_size=SIZE)
  sd = torch_state()
  sd["features.1.running_mean"] = np.zeros(8, np.float32)
  save_file(sd, str(tmp_path / "bn.safetensors"))
  with pytest.raises(pretrained.PretrainedError, match="not part of torchvision's vgg16"):
    load_pretrained_vgg16(tmp_path / "bn.safetensors", small_cfg("torch"), num_classes=CLASSES, image_size=SIZE)
  sd = torch_state()
  sd["classifier.0.weight"] = sd["classifier.0.weight"][:, :64]
  save_file(sd, str(tmp_path / "c.safetensors"))
  with pytest.raises(pretrained.PretrainedError, match=r"'classifier.0.weight' \(msnet fc6\).*\(16, 64\).*\(16, 128\)"):
    load_pretrained_vgg16(tmp_path / "c.safetensors", small_cfg("torch"), num_classes=CLASSES, image_size=SIZE)
  with pytest.raises(pretrained.PretrainedError, match="unknown weight file type"):
    load_pretrained_vgg16(tmp_path / "x.npz", cfg)
  cfg.norm = "group"
  with pytest.raises(pretrained.PretrainedError, match="norm='none'"):
    load_pretrained_vgg16(tmp_path / "a.h5", cfg)


def test_full_size_name_and_shape_table():
  """The real VGG-16 files' shapes are what the importer expects at width 1, fc_width 4096, 1000 classes."""
  c = config.base_config().model
  c.variant, c.fc_width = "imagenet", 4096
  want = pretrained.expected_shapes(c, 1000, 224)
  chans = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  keras = {f"block{n[4]}_conv{n[6]}": (3, 3, chans[i], chans[i + 1]) for i, n in enumerate(pretrained.LAYERS[:13])}
  keras.update(fc1=(25088, 4096), fc2=(4096, 4096), predictions=(4096, 1000))
  assert {pretrained.KERAS_NAMES[n]: s["kernel"] for n, s in want.items()} == keras
  torch_names = {n: pretrained.TORCH_NAMES[n] for n in pretrained.LAYERS}
  assert torch_names["conv1_1"] == "features.0" and torch_names["conv5_3"] == "features.28"
  assert torch_names["fc6"] == "classifier.0" and torch_names["fc8"] == "classifier.6"
  assert sum(int(np.prod(s["kernel"])) + int(np.prod(s["bias"])) for s in want.values()) == 138_357_544
