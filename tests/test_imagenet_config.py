"""configs/imagenet_vgg16.py: the paper's setting, checked on CPU.

- The full-size config's branch train step lowers and compiles for a 2x4 (data x model) mesh with the
  branch-sharding rule, and each device holds half of every branch fc6/fc7 kernel (and its optimizer state).
- Its runlocal version runs on a TFDS dataset the test builds (resize shorter side, center crop, then
  degrade), with the baseline imported from a fabricated Keras VGG-16 .h5 file and not trained, a branch
  trained for a few steps, and an evaluation.
- Its runlocal baseline, trained from scratch, stays finite and learns on real photos (CIFAR-10 upscaled),
  where the full config's unscaled "caffe" inputs without normalisation diverge.
- With no AlexNet in its comparisons, evaluation does not ask for the AlexNet stage.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from msnet import config as config_lib, evaluate, models, parallel, train
from msnet.data import degrade, sources
from msnet.train import optim, state as state_lib, step as step_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imagenet_config(arg: str | None):
  spec = importlib.util.spec_from_file_location("imagenet_vgg16", ROOT / "configs" / "imagenet_vgg16.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_full_size_branch_step_compiles_on_2x4_mesh_with_fc_sharding():
  c = _imagenet_config("model_axis=2")
  config_lib.validate(c)
  mesh = parallel.make_mesh(c.mesh)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  model = models.build_slave(c.model, c.data.num_classes, 1)
  size = c.data.image_size
  abstract_params = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)}, jnp.zeros((1, size, size, 3), jnp.uint8))["params"])
  assert abstract_params["branches"]["fc6"]["kernel"].shape == (1, 25088, 4096)
  trainable = ("branches/.*",)
  tx, schedule = optim.make_optimizer(c.stages.branch, 100, abstract_params, trainable)
  abstract = state_lib.abstract_state(abstract_params, tx)
  shardings = state_lib.state_shardings(abstract, mesh, c.sharding_rules)

  def per_device_bytes(tree, sh_tree):
    return sum(np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sh_tree)))

  total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract_params))
  fc67 = sum(abstract_params["branches"][n]["kernel"].size * 4 for n in ("fc6", "fc7"))
  assert per_device_bytes(abstract_params, shardings.params) == total - fc67 // 2
  fc6_sh = shardings.params["branches"]["fc6"]["kernel"]
  assert fc6_sh.shard_shape((1, 25088, 4096)) == (1, 12544, 4096)
  # The momentum of a sharded kernel is sharded like it.
  momentum = [s for s, a in zip(jax.tree.leaves(shardings.opt_state), jax.tree.leaves(abstract.opt_state))
              if a.shape == (1, 25088, 4096)]
  assert momentum and all(s.shard_shape((1, 25088, 4096)) == (1, 12544, 4096) for s in momentum)

  step = step_lib.make_train_step(step_lib.slave_apply(model), tx, schedule,
                                  optim.trainable_mask(abstract_params, trainable), mesh, shardings,
                                  jax.random.key(0))
  batch = {"image": jax.ShapeDtypeStruct((8, size, size, 3), jnp.uint8, sharding=parallel.data_sharding(mesh)),
           "label": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=parallel.data_sharding(mesh))}
  compiled = step.lower(state_lib.abstract_like(shardings, abstract), batch).compile()
  assert compiled.as_text()


def _build_tfds(data_dir: pathlib.Path) -> None:
  """A 10-class ImageNet-like TFDS dataset (80x96 images), written as ArrayRecord without TensorFlow."""
  import tensorflow_datasets as tfds

  class MockImagenet(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(32, 0), "validation": self._generate_examples(12, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        img = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        yield i, {"image": io.BytesIO(buf.getvalue()), "label": i % 10}

  MockImagenet(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.mark.slow
def test_runlocal_on_mock_tfds_with_imported_baseline(tmp_path):
  import test_pretrained as tp  # the fabricated Keras VGG-16 file of the import tests

  _build_tfds(tmp_path / "tfds")
  weights_file = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
  tp.write_keras(weights_file, tp.keras_weights())
  c = _imagenet_config("runlocal")
  c.data.tfds_name, c.data.tfds_data_dir = "mock_imagenet", str(tmp_path / "tfds")
  c.data.num_classes = tp.CLASSES
  c.model.width, c.model.fc_width = 0.0625, 16  # the fabricated file's widths
  c.model.pretrained = str(weights_file)
  c.model.norm, c.model.input_norm = "none", "caffe"  # the imported network, as in the full config
  c.stages.baseline.epochs, c.stages.baseline.steps = 0, 0  # import only, as the full config does
  c.comparisons = ()
  c.sweeps = ml_collections.ConfigDict({"clean": ("clean",), "jpeg": ("jpeg:10",)})
  c.evaluate.sweeps = ("clean", "jpeg")
  c.evaluate.methods = ("baseline", "branches", "oracle", "bitstream")
  c.evaluate.global_batch = 8
  c.train.global_batch = 8
  config_lib.validate(c)
  workdir = tmp_path / "w"

  degrade.run_degrade(c, workdir)
  done = train.run_stage(c, workdir, "baseline")
  assert done["steps"] == 0
  imported = models.load_pretrained_vgg16(str(weights_file), c.model, num_classes=tp.CLASSES,
                                          image_size=c.data.image_size)
  for a, b in zip(jax.tree.leaves(train.load_params(workdir, "baseline")), jax.tree.leaves(imported), strict=True):
    np.testing.assert_array_equal(a, b)
  for b in c.bins[1:]:
    train.run_stage(c, workdir, f"branch_{b.name}")
  rows = evaluate.run_evaluate(c, workdir)
  got = {(r["method"], r["spec"]): r for r in rows}
  assert got[("baseline", "clean")]["n"] == 12 and got[("oracle", "jpeg:10")]["n"] == 12
  assert {r["method"] for r in rows} == {"baseline", "branch_clean", "branch_jpeg", "branch_jp2k", "oracle",
                                         "bitstream"}


def _write_photos(root: pathlib.Path, n: int, size: int) -> None:
  """An ImageFolder of n real photos, the same files in `train/` and `validation/`: embedded CIFAR-10 test
  images upscaled (bicubic) to size x size with Pillow, so runlocal resizes and crops them like ImageNet's."""
  cifar = sources.open_source(dict(source="embedded_cifar10", path="", tfds_name="", tfds_data_dir="",
                                   image_size=32, resize_shorter=0), "test")
  for i in range(n):
    record = cifar[i]
    photo = Image.fromarray(record["image"]).resize((size, size), Image.BICUBIC)
    for split in ("train", "validation"):
      folder = root / split / cifar.class_names[record["label"]]
      folder.mkdir(parents=True, exist_ok=True)
      photo.save(folder / f"{i:03d}.jpg", quality=95)


def _train_baseline(c: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[float]:
  """Degrade the clean splits, train the baseline stage; the logged training losses."""
  config_lib.validate(c)
  degrade.run_degrade(c, workdir, specs=["clean"])
  train.run_stage(c, workdir, "baseline")
  rows = [json.loads(line) for line in (workdir / "train" / "baseline" / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if "loss" in r and "event" not in r]


@pytest.mark.slow
def test_runlocal_baseline_learns_on_real_photos(tmp_path):
  _write_photos(tmp_path / "photos", 48, 80)
  c = _imagenet_config("runlocal")
  c.data.source, c.data.path, c.data.num_classes = "folder", str(tmp_path / "photos"), 10
  c.degrade.num_workers = 0
  assert not c.model.pretrained and c.stages.baseline.steps == 4 and c.train.log_every_steps == 2
  losses = _train_baseline(c, tmp_path / "w")
  assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[1] < losses[0], losses
  # The same photos show the risk: the imported network's unscaled inputs, no normalisation, from scratch.
  c.model.input_norm, c.model.norm = "caffe", "none"
  with pytest.raises(train.NonFiniteLossError, match="loss nan"):
    _train_baseline(c, tmp_path / "w_caffe")


def test_evaluation_follows_comparisons_without_alexnet(tmp_path):
  c = _imagenet_config(None)
  plan = evaluate.make_plan(c, tmp_path)  # nothing trained: every planned method lists its missing stages
  assert set(plan.missing) == {"baseline", "branches", "ms", "ams", "map", "oracle", "bitstream", *c.comparisons}
  assert "alexnet_baseline" not in plan.missing
