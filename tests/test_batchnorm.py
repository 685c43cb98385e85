"""BatchNorm ResNets (model.norm="batch"): running statistics by torch's rule over the global batch, each branch
its own and a frozen part's unchanged, lossless re-splits, checkpoints that keep them, evaluation and predict on
them, and the CIFAR ResNet runlocal pipeline end to end."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msnet import export, models, parallel, predict, train
from msnet.data import shards
from msnet.train import checkpoint, optim, stages, state as state_lib, step as step_lib

from test_resnet import images, random_params, resnet_cfg
from test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def random_variables(model, x, seed=0):
  """test_resnet's random params plus random running statistics (mean near 0, var in [0.5, 1.5])."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["batch_stats"]
  rng = np.random.default_rng(seed + 1)

  def fill(path, s):
    if path[-1].key == "mean":
      return (0.1 * rng.normal(size=s.shape)).astype(np.float32)
    return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
  return {"params": random_params(model, x, seed), "batch_stats": jax.tree_util.tree_map_with_path(fill, shapes)}


def _leaves_equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _bn_config():
  c = tiny_config()
  c.model.update(arch="resnet18", norm="batch", width=0.125, trunk_layers=3)
  return c


def test_running_stats_follow_torchs_update_rule_over_the_global_batch():
  """Three train steps on 8 devices (2 images each): block1_1's first norm sees the stem's output, and its running
  statistics are torch's (momentum 0.1, unbiased variance) of the whole batch of 16, in float64."""
  c = _bn_config()
  model = models.build_slave(c.model, 10, 1)
  params, model_state = state_lib.split_variables(jax.device_get(model.init(jax.random.key(0), images(1))))
  mesh = parallel.make_mesh([("data", -1)])
  assert mesh.size == 8
  abstract_p, abstract_m = jax.eval_shape(lambda: params), jax.eval_shape(lambda: model_state)
  tx, schedule = optim.make_optimizer(c.stages.baseline, 10, abstract_p)
  sh = state_lib.state_shardings(state_lib.abstract_state(abstract_p, tx, abstract_m), mesh, c.sharding_rules)
  state = state_lib.state_from_params(params, tx, sh, model_state)
  fn = step_lib.make_train_step(step_lib.slave_apply(model), tx, schedule, optim.trainable_mask(abstract_p, [".*"]),
                                mesh, sh, jax.random.key(3))
  mean, var = np.zeros(8), np.ones(8)
  rng = np.random.RandomState(1)
  for _ in range(3):
    batch = {"image": rng.randint(0, 256, (16, 32, 32, 3)).astype(np.uint8),
             "label": rng.randint(0, 10, 16).astype(np.int32)}
    before = {"params": jax.device_get(state.params), **jax.device_get(state.model_state)}
    _, inter = model.apply(before, batch["image"], capture_intermediates=lambda m, name: m.name == "stem",
                           mutable=["intermediates"])
    stem = np.asarray(inter["intermediates"]["trunk"]["stem"]["__call__"][0], np.float64)
    mean = 0.9 * mean + 0.1 * stem.mean(axis=(0, 1, 2))
    var = 0.9 * var + 0.1 * stem.var(axis=(0, 1, 2), ddof=1)
    state, _ = fn(state, jax.device_put(batch, parallel.data_sharding(mesh)))
  got = jax.device_get(state.model_state)["batch_stats"]
  np.testing.assert_allclose(got["trunk"]["block1_1"]["norm1"]["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["trunk"]["block1_1"]["norm1"]["var"], var, rtol=1e-5, atol=1e-6)
  assert got["branches"]["fc_norm"]["mean"].shape == (1, 64)  # the branch's own, on the leading axis
  initial = model_state["batch_stats"]["branches"]["fc_norm"]["mean"]
  assert not np.array_equal(got["branches"]["fc_norm"]["mean"], initial)


def test_inference_uses_the_running_stats_and_training_mode_the_batchs():
  cfg = resnet_cfg(norm="batch")
  x = images(4)
  model = models.build_slave(cfg, 10, 1)
  v = random_variables(model, x)
  eval_a, eval_b = model.apply(v, x), model.apply(v, x[:2])
  np.testing.assert_allclose(eval_a[:, :2], eval_b, rtol=1e-5, atol=1e-6)  # per image: no batch statistics
  trained, updates = model.apply(v, x, train=True, norm_train=("trunk", "branches"), mutable=["batch_stats"])
  assert not np.allclose(trained, eval_a)
  frozen, same = model.apply(v, x, train=True, mutable=["batch_stats"])  # no part in training mode
  np.testing.assert_array_equal(frozen, eval_a)
  assert _leaves_equal(jax.device_get(same["batch_stats"]), v["batch_stats"])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resplit_is_lossless_and_moves_each_layers_stats_with_it(arch):
  cfg = resnet_cfg(arch, norm="batch")
  x = images(2)
  model = models.build_slave(cfg, 10, 1)
  v = random_variables(model, x)
  want = np.asarray(model.apply(v, x))
  for depth in (1, 6, 16 if arch == "resnet50" else 8):
    cut = models.resplit_params(v, model.table, depth)
    other = models.build_slave(resnet_cfg(arch, norm="batch", trunk_layers=depth), 10, 1)
    assert jax.tree.structure(cut) == jax.tree.structure(jax.eval_shape(other.init, jax.random.key(0), x))
    np.testing.assert_allclose(np.asarray(other.apply(cut, x)), want, rtol=1e-5, atol=1e-5, err_msg=str(depth))
  two = jax.tree.map(np.array, models.tile_branches(models.resplit_params(v, model.table, 1), 2))
  two["batch_stats"]["branches"]["block1_2"]["norm1"]["mean"][1] += 1.0
  with pytest.raises(ValueError, match=r"batch_stats/branches/block1_2\['norm1'\]\['mean'\] differs between the 2"):
    models.resplit_params(two, model.table, 3)


def test_checkpoint_round_trip_restores_the_stats(tmp_path):
  c = _bn_config()
  model = models.build_slave(c.model, 10, 1)
  v = random_variables(model, images(1))
  params, model_state = state_lib.split_variables(v)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  abstract_p, abstract_m = jax.eval_shape(lambda: params), jax.eval_shape(lambda: model_state)
  tx, _ = optim.make_optimizer(c.stages.baseline, 10, abstract_p)
  abstract = state_lib.abstract_state(abstract_p, tx, abstract_m)
  sh = state_lib.state_shardings(abstract, mesh, c.sharding_rules)

  class Loader:
    def get_state(self):
      return {"position": 3}

    def set_state(self, s):
      self.restored = s

  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", c.train)
  ckpts.save(5, state_lib.state_from_params(params, tx, sh, model_state), Loader())
  ckpts.wait()
  loader = Loader()
  restored = ckpts.restore(5, state_lib.abstract_like(sh, abstract), loader)
  ckpts.close()
  assert loader.restored == {"position": 3}
  assert _leaves_equal(jax.device_get(restored.model_state), model_state)
  assert _leaves_equal(stages.restore_variables(tmp_path / "ckpt"), v)


# --- the runlocal pipeline of configs/cifar10_resnet.py with BatchNorm ---------------------------------------

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bn_runlocal")
  config = f"--config={ROOT / 'configs' / 'cifar10_resnet.py'}:runlocal"
  proc = subprocess.run([sys.executable, "-m", "msnet.cli", "run", config, "--config.model.norm=batch",
                         f"--workdir={workdir}"], capture_output=True, text=True, timeout=1800, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, predict.load(workdir)


@pytest.mark.slow
def test_runlocal_pipeline_with_batchnorm_runs_end_to_end(pipeline):
  workdir, predictor = pipeline
  assert predictor.config.model.norm == "batch"
  assert (workdir / "report" / "report.md").exists()
  rows = json.loads((workdir / "eval" / "results.json").read_text())["rows"]
  assert {"baseline", "branch_jpeg", "ms", "da_fc8", "augmix"} <= {r["method"] for r in rows}


@pytest.mark.slow
def test_branch_stats_are_their_own_and_frozen_parts_keep_theirs(pipeline):
  """Each branch stage trains its branch's statistics, the frozen trunk keeps the baseline's; da_fc8 (only fc)
  keeps every statistic; augmix (everything trains) changes the trunk's."""
  workdir, predictor = pipeline
  config = predictor.config
  base = stages.load_baseline_variables(workdir, config)
  slave = stages.load_slave_variables(workdir, config)
  assert _leaves_equal(slave["batch_stats"]["trunk"], base["batch_stats"]["trunk"])
  per_branch = [jax.tree.map(lambda a, k=k: a[k], slave["batch_stats"]["branches"]) for k in range(len(config.bins))]
  assert _leaves_equal(per_branch[0], jax.tree.map(lambda a: a[0], base["batch_stats"]["branches"]))
  for i in range(len(per_branch)):
    for j in range(i + 1, len(per_branch)):
      for a, b in zip(jax.tree.leaves(per_branch[i]), jax.tree.leaves(per_branch[j])):
        assert not np.array_equal(a, b), (i, j)
  assert _leaves_equal(stages.load_variables(workdir, "da_fc8")["batch_stats"], base["batch_stats"])
  augmix = stages.load_variables(workdir, "augmix")["batch_stats"]
  assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(augmix["trunk"]),
                                                      jax.tree.leaves(base["batch_stats"]["trunk"])))


@pytest.mark.slow
def test_evaluation_predict_and_export_use_the_running_stats(pipeline, tmp_path):
  """Evaluation's clean top-1 counts, predict's and an exported artifact's probabilities equal a direct
  inference-mode apply of the loaded variables (baseline, every branch), which differs from the network on
  batch statistics."""
  workdir, predictor = pipeline
  config = predictor.config
  records = shards.open_shards(shards.spec_dir(workdir, config.data.eval_split, "clean"))
  x = np.stack([records[i]["image"] for i in range(len(records))])
  labels = np.asarray([records[i]["label"] for i in range(len(records))])
  slave = models.build_slave(config.model, int(config.data.num_classes), len(config.bins))
  logits = np.asarray(jax.jit(slave.apply)(stages.load_slave_variables(workdir, config), x))  # [K, N, C]
  single = models.build_slave(config.model, int(config.data.num_classes), 1)
  base = stages.load_baseline_variables(workdir, config)
  base_logits = np.asarray(jax.jit(single.apply)(base, x))[0]
  np.testing.assert_allclose(base_logits, logits[0], rtol=1e-4, atol=1e-4)
  rows = {r["method"]: r for r in json.loads((workdir / "eval" / "results.json").read_text())["rows"]
          if r["spec"] == "clean"}
  for k, b in enumerate(config.bins):
    assert rows[f"branch_{b.name}"]["correct1"] == int((logits[k].argmax(-1) == labels).sum()), b.name
  assert rows["baseline"]["correct1"] == int((base_logits.argmax(-1) == labels).sum())
  probs = predictor.predict(x[:16], rule="baseline")["probs"]
  np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(jnp.asarray(base_logits[:16]))), rtol=1e-4, atol=1e-5)
  branch = np.asarray(jax.nn.softmax(jnp.asarray(logits[1, :16])))
  np.testing.assert_allclose(predictor.predict(x[:16], rule=f"branch_{config.bins[1].name}")["probs"], branch,
                             rtol=1e-4, atol=1e-5)
  out = export.export(workdir, f"branch_{config.bins[1].name}", tmp_path / "export")
  artifact = jax.export.deserialize((out / export.ARTIFACT).read_bytes())
  np.testing.assert_allclose(np.asarray(artifact.call(x[:16])), branch, rtol=1e-4, atol=1e-5)
  batch_mode = np.asarray(single.apply(base, x[:16], train=True, norm_train=("trunk", "branches"),
                                       mutable=["batch_stats"])[0])[0]
  assert not np.allclose(batch_mode, base_logits[:16], atol=1e-3)


@pytest.mark.slow
def test_gate_runs_the_frozen_slave_on_its_running_stats(pipeline):
  """The gate stage carries the slave's statistics as its model state (under "slave") and keeps them."""
  workdir, predictor = pipeline
  config = predictor.config
  train.run_stage(config, workdir, "gate")
  saved = stages.load_variables(workdir, "gate")
  assert sorted(saved["params"]) == ["gate", "slave"]
  assert _leaves_equal(saved["batch_stats"]["slave"], stages.load_slave_variables(workdir, config)["batch_stats"])
