"""Import pretrained weights from the files users have: VGG-16 from Keras' legacy .h5 or torchvision's state
dict, ResNet-50 from torchvision's state dict. `load_pretrained` picks the importer of model.arch (`IMPORTERS`,
one entry per arch) and returns the K=1 slave's variables, {"params": ...} plus ResNet-50's {"batch_stats": ...}.

Supported files:
- Keras `vgg16_weights_tf_dim_ordering_tf_kernels.h5` (keras.applications, legacy HDF5 weights format):
  one group per layer (block1_conv1 ... block5_conv3, fc1, fc2, predictions), whose `weight_names`
  attribute lists the datasets, as Keras' own loader reads them. Both layouts in circulation are read:
  the original release (`block1_conv1/block1_conv1_W_1:0`, `..._b_1:0`) and files saved by Keras 2
  (`block1_conv1/block1_conv1/kernel:0`, `bias:0`), optionally under a `model_weights` group (a full
  `model.save`). Kernels are HWIO; fc1 reads the (h, w, c) flatten of pool5, which is msnet's too.
  These weights expect model.input_norm="caffe".
- torchvision `vgg16` state dict (`features.{0,2,5,...,28}.weight/bias`, `classifier.{0,3,6}.weight/bias`)
  as `.safetensors` (read with safetensors.numpy, no torch needed) or `.pth`/`.pt` (needs torch, loaded with
  `weights_only=True`). Conv weights OIHW -> HWIO, Linear [out, in] -> [in, out]; classifier.0 reads pool5
  flattened in (c, h, w) order, so its rows are permuted to (h, w, c). These expect input_norm="torch".

Expected shapes come from the model config (width, fc_width), the number of classes and the input size,
so reduced-width files import too (the tests use them); every layer's name and shape is checked, and
the error names the layer, the file's shape and the expected one. Entries the model has no place for
(e.g. vgg16_bn's BatchNorm) are refused rather than dropped.
- torchvision `resnet50` state dict (ResNet-50 v1.5; .safetensors or .pth as above) for model.arch="resnet50",
  norm="batch", input_norm="torch": conv1, bn1, layer{1-4}.{i}.conv{1,2,3} / .bn{1,2,3} / .downsample.0 (conv) /
  .downsample.1 (bn), fc. Each BatchNorm's weight/bias become the norm's scale/bias params, its running_mean /
  running_var the batch_stats mean/var; num_batches_tracked is ignored (msnet's momentum is fixed). The names
  are derived from msnet's own variable tree (`_resnet_torch_name`), so every variable is read and checked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msnet import errors
from msnet.models.slave import build_slave

LAYERS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2",
          "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7", "fc8")
KERAS_NAMES = dict(zip(LAYERS, [f"block{n[4]}_conv{n[6]}" for n in LAYERS[:13]] + ["fc1", "fc2", "predictions"]))
TORCH_NAMES = dict(zip(LAYERS, [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
                       + ["classifier.0", "classifier.3", "classifier.6"]))


class PretrainedError(errors.UserError, ValueError):
  """A weight file does not fit the configured network (missing layer, wrong shape, unknown entries)."""


def _expected_variables(model_cfg: ml_collections.ConfigDict, num_classes: int, image_size: int) -> Any:
  """The K=1 slave's variable shapes for this config, without allocating."""
  model = build_slave(model_cfg, num_classes, 1)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def expected_shapes(model_cfg: ml_collections.ConfigDict, num_classes: int = 1000, image_size: int = 224
                    ) -> dict[str, dict[str, tuple[int, ...]]]:
  """msnet's shapes per layer (kernel HWIO / [in, out], bias) for this config, without allocating."""
  shapes = _expected_variables(model_cfg, num_classes, image_size)["params"]
  out = {}
  for name in LAYERS:
    part, lead = ("trunk", ()) if name in shapes["trunk"] else ("branches", (1,))
    out[name] = {k: v.shape[len(lead):] for k, v in shapes[part][name].items()}
  return out


def load_pretrained_vgg16(path: str | os.PathLike, model_cfg: ml_collections.ConfigDict, *,
                          num_classes: int = 1000, image_size: int = 224) -> dict[str, Any]:
  """K=1 slave params {"trunk": ..., "branches": ...} (float32 numpy) from a Keras .h5 or torchvision file."""
  if model_cfg.arch != "vgg16" or model_cfg.norm != "none":
    raise PretrainedError(f"pretrained VGG-16 weights need model.arch='vgg16' and model.norm='none', got "
                          f"arch={model_cfg.arch!r}, norm={model_cfg.norm!r}")
  path = os.fspath(path)
  want = expected_shapes(model_cfg, num_classes, image_size)
  ext = os.path.splitext(path)[1].lower()
  if ext in (".h5", ".hdf5"):
    layers = _from_keras(path, want)
  elif ext in (".safetensors", ".pth", ".pt"):
    layers = _from_torch(path, want)
  else:
    raise PretrainedError(f"{path}: unknown weight file type {ext!r}; expected .h5/.hdf5 (Keras), "
                          ".safetensors or .pth/.pt (torchvision)")
  model = build_slave(model_cfg, num_classes, 1)
  trunk = {spec.name for spec in model.table[:model.trunk_size]}
  params: dict[str, Any] = {"trunk": {}, "branches": {}}
  for name, leaves in layers.items():
    if name in trunk:
      params["trunk"][name] = leaves
    else:
      params["branches"][name] = {k: v[None] for k, v in leaves.items()}
  return params


def _check(path: str, src: str, name: str, what: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
  if tuple(got) != tuple(want):
    raise PretrainedError(f"{path}: layer {src!r} (msnet {name}) {what} has shape {tuple(got)}, the model "
                          f"expects {tuple(want)} (check model.width / fc_width, num_classes, image_size)")


def _keras_kind(weight_name: str) -> str | None:
  tail = weight_name.split("/")[-1].split(":")[0]
  if tail == "kernel" or re.fullmatch(r".*_W(_\d+)?", tail):
    return "kernel"
  if tail == "bias" or re.fullmatch(r".*_b(_\d+)?", tail):
    return "bias"
  return None


def _read_keras(path: str) -> dict[str, dict[str, np.ndarray]]:
  """{keras layer name: {"kernel", "bias"}} for every layer that has weights."""
  import h5py  # pylint: disable=g-import-not-at-top

  def text(v: Any) -> str:
    return v.decode("utf8") if isinstance(v, bytes) else str(v)

  out = {}
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f
    names = [text(n) for n in root.attrs["layer_names"]] if "layer_names" in root.attrs else list(root.keys())
    for name in names:
      g = root[name]
      if "weight_names" in g.attrs:
        weight_names = [text(n) for n in g.attrs["weight_names"]]
      else:
        weight_names = []
        g.visititems(lambda n, obj: weight_names.append(n) if isinstance(obj, h5py.Dataset) else None)
      if not weight_names:
        continue  # input, pooling and flatten layers
      arrays = {}
      for wn in weight_names:
        kind = _keras_kind(wn)
        if kind is None or kind in arrays:
          raise PretrainedError(f"{path}: layer {name!r} has weights {weight_names}; expected one kernel "
                                "(kernel:0 or *_W_1:0) and one bias (bias:0 or *_b_1:0)")
        arrays[kind] = np.asarray(g[wn], np.float32)
      out[name] = arrays
  return out


def _from_keras(path: str, want: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, dict[str, np.ndarray]]:
  found = _read_keras(path)
  unknown = sorted(set(found) - set(KERAS_NAMES.values()))
  if unknown:
    raise PretrainedError(f"{path}: layers {unknown} are not part of VGG-16 (expected {list(KERAS_NAMES.values())})")
  layers = {}
  for name, src in KERAS_NAMES.items():
    if src not in found:
      hint = " (a *_notop file has no fc1/fc2/predictions)" if name.startswith("fc") else ""
      raise PretrainedError(f"{path}: missing layer {src!r} (msnet {name}){hint}; the file has {sorted(found)}")
    arrays = found[src]
    for kind in ("kernel", "bias"):
      if kind not in arrays:
        raise PretrainedError(f"{path}: layer {src!r} (msnet {name}) has no {kind}")
      _check(path, src, name, kind, arrays[kind].shape, want[name][kind])
    layers[name] = arrays
  return layers


def _read_torch(path: str) -> dict[str, np.ndarray]:
  if path.lower().endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise PretrainedError(f"{path}: reading a .pth file needs torch (pip install 'msnet[torch]'), or convert "
                          "it to .safetensors (safetensors.torch.save_file(state_dict, 'vgg16.safetensors'))"
                          ) from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise PretrainedError(f"{path}: expected a state dict, got {type(state).__name__}")
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _from_torch(path: str, want: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, dict[str, np.ndarray]]:
  state = _read_torch(path)
  known = {f"{src}.{p}" for src in TORCH_NAMES.values() for p in ("weight", "bias")}
  unknown = sorted(set(state) - known)
  if unknown:
    raise PretrainedError(f"{path}: entries {unknown[:8]}{' ...' if len(unknown) > 8 else ''} are not part of "
                          "torchvision's vgg16 (vgg16_bn and other variants are not supported)")
  channels = want["conv5_3"]["kernel"][-1]
  layers = {}
  for name, src in TORCH_NAMES.items():
    for p in ("weight", "bias"):
      if f"{src}.{p}" not in state:
        raise PretrainedError(f"{path}: missing {src}.{p} (msnet {name}); the file has {sorted(state)}")
    w, b = np.asarray(state[f"{src}.weight"], np.float32), np.asarray(state[f"{src}.bias"], np.float32)
    kshape = want[name]["kernel"]
    if name.startswith("conv"):
      _check(path, f"{src}.weight", name, "weight [out, in, h, w]", w.shape, (kshape[3], kshape[2], *kshape[:2]))
      kernel = w.transpose(2, 3, 1, 0)
    else:
      _check(path, f"{src}.weight", name, "weight [out, in]", w.shape, kshape[::-1])
      kernel = w.T
      if name == "fc6":  # rows in (c, h, w) order -> (h, w, c)
        side = int(round((kshape[0] // channels) ** 0.5))
        kernel = kernel.reshape(channels, side, side, -1).transpose(1, 2, 0, 3).reshape(kshape)
    _check(path, f"{src}.bias", name, "bias", b.shape, want[name]["bias"])
    layers[name] = {"kernel": np.ascontiguousarray(kernel), "bias": b}
  return layers


# msnet's names inside a ResNet-50 row -> torchvision's module (after "layer<s>.<i>."), and leaf names.
_BLOCK_MODULES = {"conv1": "conv1", "conv2": "conv2", "conv3": "conv3", "norm1": "bn1", "norm2": "bn2",
                  "norm3": "bn3", "shortcut": "downsample.0", "shortcut_norm": "downsample.1"}
_STEM_MODULES = {"conv": "conv1", "norm": "bn1"}
_TORCH_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _resnet_torch_name(group: str, inner: tuple[str, ...], leaf: str) -> str:
  """torchvision's state-dict key of msnet's ResNet-50 variable group/inner.../leaf (e.g. block2_1/shortcut/kernel
  -> layer2.0.downsample.0.weight)."""
  if group == "stem":
    module = _STEM_MODULES[inner[0]]
  elif group == "fc":
    module = "fc"
  else:
    stage, index = re.fullmatch(r"block(\d)_(\d+)", group).groups()
    module = f"layer{stage}.{int(index) - 1}.{_BLOCK_MODULES[inner[0]]}"
  return f"{module}.{_TORCH_LEAVES[leaf]}"


# By rank: (msnet axes in torch's order, torch axes in msnet's order, torch's layout): conv OIHW <-> HWIO,
# Linear [out, in] <-> [in, out]; vectors as they are.
_TORCH_LAYOUTS = {4: ((3, 2, 0, 1), (2, 3, 1, 0), "[out, in, h, w]"), 2: ((1, 0), (1, 0), "[out, in]"),
                  1: ((0,), (0,), "vector")}


def load_pretrained_resnet50(path: str | os.PathLike, model_cfg: ml_collections.ConfigDict, *,
                             num_classes: int = 1000, image_size: int = 224) -> dict[str, Any]:
  """K=1 slave variables {"params", "batch_stats"} (float32 numpy) from torchvision's resnet50 state dict."""
  if (model_cfg.arch, model_cfg.norm, model_cfg.input_norm) != ("resnet50", "batch", "torch"):
    raise PretrainedError(f"torchvision ResNet-50 weights need model.arch='resnet50', model.norm='batch' and "
                          f"model.input_norm='torch', got arch={model_cfg.arch!r}, norm={model_cfg.norm!r}, "
                          f"input_norm={model_cfg.input_norm!r}")
  path = os.fspath(path)
  if os.path.splitext(path)[1].lower() not in (".safetensors", ".pth", ".pt"):
    raise PretrainedError(f"{path}: torchvision ResNet-50 weights are read from .safetensors or .pth/.pt files")
  state = _read_torch(path)
  used: set[str] = set()

  def convert(key_path: Any, want: jax.ShapeDtypeStruct) -> np.ndarray:
    names = [k.key for k in key_path]  # collection, part, group, inner..., leaf
    part, group, inner, leaf = names[1], names[2], tuple(names[3:-1]), names[-1]
    src, where = _resnet_torch_name(group, inner, leaf), "/".join(names[1:])
    if src not in state:
      raise PretrainedError(f"{path}: missing {src} (msnet {where}); the file is not torchvision's resnet50 state "
                            "dict at this model.width / num_classes")
    shape = want.shape[1:] if part == "branches" else want.shape
    to_torch, to_msnet, layout = _TORCH_LAYOUTS[len(shape)]
    _check(path, src, where, layout, np.shape(state[src]), tuple(shape[i] for i in to_torch))
    used.add(src)
    array = np.ascontiguousarray(np.asarray(state[src], np.float32).transpose(to_msnet))
    return array[None] if part == "branches" else array

  variables = jax.tree_util.tree_map_with_path(convert, _expected_variables(model_cfg, num_classes, image_size))
  ignored = {k for k in state if k.endswith(".num_batches_tracked")}
  if unknown := sorted(set(state) - used - ignored):
    raise PretrainedError(f"{path}: entries {unknown[:8]}{' ...' if len(unknown) > 8 else ''} have no place in "
                          "msnet's ResNet-50 (torchvision's resnet50 only; other depths and variants are refused)")
  return variables


# model.arch -> its importer: (path, model config, num_classes=, image_size=) -> the K=1 slave's variables.
IMPORTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "vgg16": lambda *args, **kw: {"params": load_pretrained_vgg16(*args, **kw)},
    "resnet50": load_pretrained_resnet50,
}


def load_pretrained(path: str | os.PathLike, model_cfg: ml_collections.ConfigDict, *, num_classes: int = 1000,
                    image_size: int = 224) -> dict[str, Any]:
  """The K=1 slave variables of config.model.pretrained, by the importer of model.arch."""
  if model_cfg.arch not in IMPORTERS:
    raise PretrainedError(f"model.pretrained: no importer for model.arch={model_cfg.arch!r} (pretrained weights "
                          f"import for {sorted(IMPORTERS)})")
  return IMPORTERS[model_cfg.arch](path, model_cfg, num_classes=num_classes, image_size=image_size)
