"""msnet.train: the sharded step agrees with one device, stages train/freeze what they say, kill -9
resumes exactly, NaN stops cleanly, stability loss and DeepCloak match their definitions.

One tiny VGG-16 (cifar variant, width 0.125) on synthetic 32x32 shards written with the data module's
writer; the baseline it trains is shared by the tests that need one.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msnet import config as config_lib, degradations, errors, parallel
from msnet.data import shards
from msnet import train
from msnet.train import loop, losses, optim, stages, state as state_lib, step as step_lib

NUM_TRAIN, NUM_EVAL = 48, 16


def tiny_config():
  c = config_lib.base_config()
  config_lib.shrink_for_runlocal(c)
  c.model.width = 0.125
  c.train.global_batch = 16
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 2
  c.train.keep_checkpoints = 2
  c.evaluate.global_batch = 16
  c.stages.baseline.steps = 6
  c.stages.baseline.lr = 0.02
  c.stages.branch.steps = 2
  c.stages.deepcloak.num_examples = 24
  c.stages.deepcloak.mask_ratio = 0.1
  return c


def write_synthetic_shards(workdir: pathlib.Path, config) -> None:
  """Every spec the stages read, as one shard per spec dir; degraded copies made by the real library."""
  rng = np.random.RandomState(0)
  rules = [list(b.match) for b in config.bins]
  specs = {config.data.train_split: ["clean", *(s for b in config.bins for s in b.train_specs),
                                     *config.stages.deepcloak.train_specs],
           config.data.eval_split: ["clean"]}
  for split, n in ((config.data.train_split, NUM_TRAIN), (config.data.eval_split, NUM_EVAL)):
    size = config.data.image_size
    # Smooth random images (a bit like photos, so codecs behave) with a class-dependent brightness.
    labels = rng.randint(0, config.data.num_classes, n)
    base = rng.randint(0, 256, (n, size // 4, size // 4, 3)).repeat(4, 1).repeat(4, 2)
    images = np.clip(base * 0.5 + labels[:, None, None, None] * 12, 0, 255).astype(np.uint8)
    for spec in dict.fromkeys(specs[split]):
      records = []
      for i in range(n):
        out, info = degradations.apply(spec, images[i], seed=config.seed, index=i)
        b = degradations.bin_of(spec, rules)
        records.append(shards.encode_record(out, {
            "label": int(labels[i]), "spec": str(degradations.parse(spec)), "bin": b, "bitstream_bin": b,
            "index": i, "psnr": info["psnr"], "bpp": info["bpp"], "level": info["level"],
            "ratio": info["ratio"], "codec": info["codec"]}))
      d = shards.spec_dir(workdir, split, spec)
      d.mkdir(parents=True, exist_ok=True)
      shards.write_shard(d / shards.shard_name(0, 1), records)


def workdir_with_data(tmp: pathlib.Path, data_root: pathlib.Path) -> pathlib.Path:
  """A fresh workdir sharing the synthetic shards (symlinked W/data)."""
  tmp.mkdir(parents=True, exist_ok=True)
  (tmp / "data").symlink_to(data_root / "data")
  return tmp


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("shards")
  write_synthetic_shards(root, tiny_config())
  return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
  """A workdir whose baseline stage is complete (uninterrupted run)."""
  w = workdir_with_data(tmp_path_factory.mktemp("trained") / "w", data_root)
  result = train.run_stage(tiny_config(), w, "baseline")
  return w, result


def _flat(tree):
  return {optim.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _model_and_params(config):
  """The K=1 slave of `config` and its init params on the host.

  Init is compiled without backend optimisations, as the trainer does: truncated normals compile slowly.
  """
  from msnet import models
  model = models.build_slave(config.model, config.data.num_classes, 1)
  params = jax.device_get(jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8)),
                                  compiler_options={"xla_backend_optimization_level": 0})()["params"])
  return model, params


def _state_and_step(config, model, params, mesh):
  """A fresh train state of `params` placed on `mesh` and the jitted baseline train step."""
  abstract = jax.eval_shape(lambda: params)
  tx, schedule = optim.make_optimizer(config.stages.baseline, 10, abstract)
  sh = state_lib.state_shardings(state_lib.abstract_state(abstract, tx), mesh, config.sharding_rules)
  state = state_lib.state_from_params(params, tx, sh)
  fn = step_lib.make_train_step(step_lib.slave_apply(model), tx, schedule, optim.trainable_mask(abstract, [".*"]),
                                mesh, sh, jax.random.key(3))
  return state, fn


# (1) 8 devices == 1 device, one compilation.
def test_step_on_8_devices_matches_1_device_and_compiles_once():
  config = tiny_config()
  model, params = _model_and_params(config)
  rng = np.random.RandomState(1)
  batches = [{"image": rng.randint(0, 256, (16, 32, 32, 3)).astype(np.uint8),
              "label": rng.randint(0, 10, 16).astype(np.int32)} for _ in range(3)]

  def run(mesh):
    state, fn = _state_and_step(config, model, params, mesh)
    out = []
    for b in batches:
      state, m = fn(state, jax.device_put(b, parallel.data_sharding(mesh)))
      out.append({k: float(v) for k, v in m.items()})
    assert fn._cache_size() == 1  # no recompilation after the first step
    assert state.params["trunk"]["conv1_1"]["kernel"].sharding.mesh.size == mesh.size
    return jax.device_get(state.params), out

  mesh8 = parallel.make_mesh([("data", -1)])
  assert mesh8.size == 8
  mesh1 = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  p8, m8 = run(mesh8)
  p1, m1 = run(mesh1)
  for a, b in zip(m8, m1):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
    assert a["accuracy"] == b["accuracy"] and a["lr"] == b["lr"]
  f8, f1 = _flat(p8), _flat(p1)
  for k in f1:
    np.testing.assert_allclose(f8[k], f1[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert any(not np.array_equal(f1[k], v) for k, v in _flat(params).items())  # it did train


def _resident_feed(loader, mesh):
  repl = parallel.replicated(mesh)
  return step_lib.Feed(loader.batch, repl, repl, repl, data=loader.data)


# (1b) K steps in one scanned call == K single steps, on both data paths; the resident step is the same on
# 1 and 8 devices.
def test_k_steps_in_one_call_match_k_single_steps(data_root):
  from msnet.data import resident
  config = tiny_config()
  model, params = _model_and_params(config)
  mesh = parallel.make_mesh([("data", -1)])
  k = 3

  def call_and_steps(feed, items, batches, mesh):
    abstract = jax.eval_shape(lambda: params)
    tx, schedule = optim.make_optimizer(config.stages.baseline, 10, abstract)
    sh = state_lib.state_shardings(state_lib.abstract_state(abstract, tx), mesh, config.sharding_rules)
    args = (step_lib.slave_apply(model), tx, schedule, optim.trainable_mask(abstract, [".*"]), mesh, sh,
            jax.random.key(3))
    state, m_call = step_lib.make_train_call(*args, steps=k, feed=feed)(
        state_lib.state_from_params(params, tx, sh), feed.data, items)
    single, steps = state_lib.state_from_params(params, tx, sh), step_lib.make_train_step(*args)
    m_single = []
    for b in batches:
      single, m = steps(single, jax.device_put(b, parallel.data_sharding(mesh)))
      m_single.append(m)
    assert int(state.step) == int(single.step) == k
    np.testing.assert_allclose(np.asarray(m_call["loss"]), [float(m["loss"]) for m in m_single], rtol=1e-5)
    f_call, f_single = _flat(jax.device_get(state.params)), _flat(jax.device_get(single.params))
    # Float32 rounding only (the scan's program fuses differently); conv biases under GroupNorm have an
    # exact gradient of 0 and hold only rounding noise (~1e-6), hence the atol.
    for name in f_single:
      np.testing.assert_allclose(f_call[name], f_single[name], rtol=1e-4, atol=1e-5, err_msg=name)
    return f_call

  rng = np.random.RandomState(1)
  host = [{"image": rng.randint(0, 256, (16, 32, 32, 3)).astype(np.uint8),
           "label": rng.randint(0, 10, 16).astype(np.int32)} for _ in range(k)]
  call_and_steps(step_lib.host_feed(mesh), [jax.device_put(b, parallel.data_sharding(mesh)) for b in host], host,
                 mesh)

  per_mesh = []
  mesh1 = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  for m in (mesh, mesh1):
    ld = resident.ResidentLoader(data_root, config.data.train_split, ["clean", "jpeg:5"], [1.0, 1.0], 16,
                                 config.seed, m, True)
    positions = [next(ld) for _ in range(k)]
    gathered = [jax.device_get(jax.jit(ld.batch)(ld.data, p)) for p in positions]  # the second code path
    per_mesh.append(call_and_steps(_resident_feed(ld, m), positions, gathered, m))
  for name in per_mesh[1]:
    np.testing.assert_allclose(per_mesh[0][name], per_mesh[1][name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_call_plan_never_crosses_a_boundary():
  plan = loop._CallPlan(4, 22, [8, 7])
  steps, lengths = 0, []
  while steps < 22:
    lengths.append(plan.length(steps))
    steps += lengths[-1]
  ends = np.cumsum(lengths)
  assert set(lengths) == {1, 4} and ends[-1] == 22
  assert {7, 8, 14, 16, 21, 22} <= set(ends.tolist())  # every boundary and the end is a call end
  starts = ends - lengths
  assert not any(s < b < e for s, e in zip(starts, ends) for b in (7, 8, 14, 16, 21))


# (1c) The loop with steps_per_call on both data paths: the params of the one-step-per-call run, the same
# logged steps, DONE.json says which path and K.
@pytest.mark.parametrize("device_data", ["off", "on"])
def test_loop_steps_per_call_matches_single_steps(tmp_path, data_root, device_data):
  results, params, logged = {}, {}, {}
  for k in (1, 4):
    w = workdir_with_data(tmp_path / f"k{k}", data_root)
    config = kill_config(device_data)
    config.train.checkpoint_every_steps = 4
    config.train.log_every_steps = 3
    config.stages.master.steps = 10  # calls: 4, 4, then 1, 1 (the end)
    config.train.steps_per_call = k
    results[k] = train.run_stage(config, w, "master")
    params[k] = _flat(train.load_params(w, "master"))
    lines = [json.loads(x) for x in (w / "train" / "master" / "metrics.jsonl").read_text().splitlines()]
    logged[k] = [(x["step"], x["loss"]) for x in lines if "loss" in x and "event" not in x]
  assert results[4]["steps_per_call"] == 4 and results[1]["steps_per_call"] == 1
  assert results[4]["data_path"] == results[1]["data_path"] == {"off": "host", "on": "device"}[device_data]
  assert [s for s, _ in logged[4]] == [s for s, _ in logged[1]] == [3, 6, 9, 10]
  np.testing.assert_allclose([x for _, x in logged[4]], [x for _, x in logged[1]], rtol=1e-5)
  for name in params[1]:  # float32 rounding (see test_k_steps_in_one_call_match_k_single_steps)
    np.testing.assert_allclose(params[4][name], params[1][name], rtol=1e-4, atol=1e-5, err_msg=name)


# (5) stability loss against NumPy.
def test_stability_loss_matches_numpy():
  rng = np.random.RandomState(0)
  clean, noisy = rng.randn(6, 10).astype(np.float32) * 3, rng.randn(6, 10).astype(np.float32) * 3
  labels = rng.randint(0, 10, 6)
  alpha = 0.7

  def log_softmax(z):
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  lp, lq = log_softmax(clean), log_softmax(noisy)
  ce = -lp[np.arange(6), labels].mean()
  kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
  got = float(losses.stability_loss(jnp.asarray(clean), jnp.asarray(noisy), jnp.asarray(labels), alpha))
  np.testing.assert_allclose(got, ce + alpha * kl, rtol=1e-5)
  assert float(losses.kl_divergence(jnp.asarray(clean), jnp.asarray(clean))) == pytest.approx(0, abs=1e-6)

  images = rng.randint(0, 256, (2, 4, 4, 3)).astype(np.uint8)
  key, sigma = jax.random.key(5), 10.0
  noise = np.asarray(jax.random.normal(key, images.shape, jnp.float32))
  expect = np.clip(np.round(images.astype(np.float32) + sigma * noise), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(losses.perturb(jnp.asarray(images), key, sigma)), expect)


def test_stage_names_and_schedule():
  c = tiny_config()
  assert train.stage_names(c) == ["baseline", "branch_jpeg", "branch_jp2k", "master",
                                  "da_fc8", "da_fc67", "da_fc678", "stability", "deepcloak", "alexnet_baseline"]
  s = c.stages.baseline
  s.lr, s.warmup_steps, s.schedule = 1.0, 2, "cosine"
  sched = optim.make_schedule(s, 10)
  assert [float(sched(i)) for i in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
  assert float(sched(10)) == pytest.approx(0.0, abs=1e-6)
  assert loop.num_steps(s, 100, 16) == 6  # stage.steps wins
  s.steps = -1
  s.epochs = 2.0
  assert loop.num_steps(s, 100, 16) == 13  # ceil(2 * 100 / 16)


def test_baseline_stage_outputs(trained):
  w, result = trained
  d = w / "train" / "baseline"
  assert (d / "DONE.json").exists() and result["steps"] == 6
  assert result["images_per_s"] > 0 and result["val_accuracy"] is not None
  lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
  steps = [x["step"] for x in lines if "loss" in x and "event" not in x]
  assert steps == [2, 4, 6]
  assert all({"loss", "accuracy", "lr", "grad_norm", "images_per_s"} <= set(x) for x in lines if x.get("step") in steps
             and "event" not in x and "val_accuracy" not in x)
  assert sorted(int(p.name) for p in (d / "ckpt").iterdir() if p.name.isdigit()) == [4, 6]  # keep 2
  again = train.run_stage(tiny_config(), w, "baseline")  # complete: not retrained
  assert again == json.loads((d / "DONE.json").read_text())


# (3) the trunk is frozen in branch stages; DA stages train only their layers.
@pytest.mark.parametrize("stage,trains", [("branch_jpeg", "branches/"), ("da_fc8", "branches/fc8/")])
def test_stages_train_only_their_params(trained, stage, trains):
  w, _ = trained
  config = tiny_config()
  config.stages.da_fc8.steps = 2
  train.run_stage(config, w, stage)
  before, after = _flat(train.load_params(w, "baseline")), _flat(train.load_params(w, stage))
  assert before.keys() == after.keys()
  for k in before:
    if k.startswith(trains):
      assert not np.array_equal(before[k], after[k]), f"{stage}: {k} did not train"
    else:
      np.testing.assert_array_equal(before[k], after[k], err_msg=f"{stage}: {k} changed")


def test_load_slave_params_stacks_branch_stages(trained):
  """The K=3 slave from baseline + branch stages computes, per branch, what each stage's network does."""
  from msnet import models
  w, _ = trained
  config = tiny_config()
  for b in config.bins[1:]:
    train.run_stage(config, w, f"branch_{b.name}")  # skipped when an earlier test completed it
  slave = train.load_slave_params(w, config)
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(slave["branches"]))
  x = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  logits = models.build_slave(config.model, 10, 3).apply({"params": slave}, x)
  one = models.build_slave(config.model, 10, 1)
  for k, stage in enumerate(["baseline", "branch_jpeg", "branch_jp2k"]):
    np.testing.assert_allclose(logits[k], one.apply({"params": train.load_params(w, stage)}, x)[0],
                               rtol=1e-4, atol=1e-5, err_msg=stage)


# (6) DeepCloak.
def test_deepcloak_mask(trained):
  w, _ = trained
  config = tiny_config()
  result = train.run_stage(config, w, "deepcloak")
  mask = train.load_feature_mask(w)
  sensitivity = np.load(w / "train" / "deepcloak" / "sensitivity.npy")
  channels = mask.shape[0]
  assert mask.shape == sensitivity.shape == (channels,) and mask.dtype == np.float32
  n = max(1, round(config.stages.deepcloak.mask_ratio * channels))
  assert int((mask == 0).sum()) == n == result["masked"] and set(np.unique(mask)) <= {0.0, 1.0}
  assert sensitivity[mask == 0].min() >= sensitivity[mask == 1].max()
  assert result["pairs"] == config.stages.deepcloak.num_examples
  from msnet import models
  model = models.build_slave(config.model, config.data.num_classes, 1)
  feats = model.apply({"params": train.load_params(w, "baseline")}, jnp.zeros((1, 32, 32, 3), jnp.uint8),
                      method="trunk_features")
  assert feats.shape[-1] == channels


# (4) NaN/Inf stops with a message; the last good checkpoint stays. (The master stage: same loop, quick to
# compile.)
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_root):
  w = workdir_with_data(tmp_path / "w", data_root)
  config = tiny_config()
  config.stages.master.lr = 1e30
  config.stages.master.schedule = "constant"
  config.train.checkpoint_every_steps = 1
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint: step"):
    train.run_stage(config, w, "master")
  d = w / "train" / "master"
  assert not (d / "DONE.json").exists()
  bad = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if "non_finite" in x][0]
  saved = sorted(int(p.name) for p in (d / "ckpt").iterdir() if p.name.isdigit())
  assert saved and max(saved) < bad["step"]
  restored = stages.restore_params(d / "ckpt", max(saved))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))


# (2) SIGTERM (preemption save), then SIGKILL mid-stage, rerun the same command: same final params as an
# uninterrupted run. The master stage (a weighted mixture of three specs, labels = bins) compiles quickly.
KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from msnet.train import step as step_lib
def slow(make):  # slow steps down so the kill lands mid-stage, after a checkpoint
  def made(*a, **k):
    fn = make(*a, **k)
    def step(*args):
      out = fn(*args)
      time.sleep(0.3)
      return out
    return step
  return made
step_lib.make_train_step = slow(step_lib.make_train_step)
step_lib.make_train_call = slow(step_lib.make_train_call)
from test_train import kill_config
from msnet import train
train.run_stage(kill_config({device_data!r}), {workdir!r}, "master")
"""


def kill_config(device_data="off"):
  c = tiny_config()
  c.stages.master.steps = 8
  c.train.eval_every_epoch = False
  c.train.device_data = device_data
  return c


@pytest.mark.parametrize("device_data", ["off", "on"])
def test_sigkill_resume_matches_uninterrupted(tmp_path, data_root, device_data):
  w = workdir_with_data(tmp_path / "w", data_root)
  script = tmp_path / "run.py"
  script.write_text(KILL_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), workdir=str(w),
                                       device_data=device_data))
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache")}  # reruns skip compiling
  d = w / "train" / "master"

  def saved():
    return sorted(int(p.name) for p in (d / "ckpt").iterdir() if p.name.isdigit()) if (d / "ckpt").exists() else []

  def start_and_wait(after: int):
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (saved() and saved()[-1] > after):
      assert proc.poll() is None, proc.stdout.read().decode()
      time.sleep(0.05)
    return proc

  # SIGTERM: the run saves where it is and stops.
  proc = start_and_wait(0)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0].decode()
  assert proc.returncode != 0 and "Preempted" in out, out
  events = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
  preempted = [e["step"] for e in events if e.get("event") == "preempted"]
  assert preempted and saved()[-1] == preempted[0] < kill_config().stages.master.steps

  # SIGKILL after the resumed run wrote a newer checkpoint, then the same command again.
  proc = start_and_wait(preempted[0])
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (d / "DONE.json").exists()
  last = saved()[-1]
  assert last < kill_config().stages.master.steps
  rerun = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert json.loads((d / "DONE.json").read_text())["resumed_from_step"] >= last

  assert json.loads((d / "DONE.json").read_text())["data_path"] == {"off": "host", "on": "device"}[device_data]
  ref_dir = workdir_with_data(tmp_path / "ref", data_root)
  train.run_stage(kill_config(device_data), ref_dir, "master")  # uninterrupted
  ref, got = _flat(train.load_params(ref_dir, "master")), _flat(train.load_params(w, "master"))
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_bfloat16_compute_keeps_float32_params():
  """model.compute_dtype='bfloat16': the step runs (also on XLA:CPU), params and updates stay float32,
  and the loss is the float32 run's to bf16 precision."""
  rng = np.random.RandomState(2)
  batch = {"image": rng.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8), "label": rng.randint(0, 10, 8).astype(np.int32)}
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  losses_by_dtype = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config()
    config.model.compute_dtype = dtype
    state, fn = _state_and_step(config, *_model_and_params(config), mesh)
    state, metrics = fn(state, jax.device_put(batch, parallel.data_sharding(mesh)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert np.isfinite(float(metrics["loss"]))
    losses_by_dtype[dtype] = float(metrics["loss"])
  np.testing.assert_allclose(losses_by_dtype["bfloat16"], losses_by_dtype["float32"], rtol=0.05)


# (7) The stages beyond the paper: the learned gate and the calibrate stage.
def _complete_slave_and_master(w, config):
  for stage in ["branch_jpeg", "branch_jp2k", "master"]:
    train.run_stage(config, w, stage)  # skipped when an earlier test completed it


def test_gate_trains_only_the_gate_and_outputs_the_gated_mixture(trained):
  from msnet import models
  w, _ = trained
  config = tiny_config()
  _complete_slave_and_master(w, config)
  result = train.run_stage(config, w, "gate")
  assert result["steps"] == config.stages.gate.steps
  saved = train.load_params(w, "gate")
  master, slave = train.load_params(w, "master"), train.load_slave_params(w, config)
  for k, v in _flat(saved["slave"]).items():  # the branches are frozen
    np.testing.assert_array_equal(v, _flat(slave)[k], err_msg=k)
  gate = train.load_gate_params(w)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(gate), jax.tree.leaves(master)))
  # The stage's output is log sum_k g_k p_k, recomputed in float64 NumPy from the two networks.
  x = np.random.RandomState(2).randint(0, 256, (5, 32, 32, 3)).astype(np.uint8)
  gate_net = models.build_master(config.master, 3)
  slave_net = models.build_slave(config.model, 10, 3)
  out = np.asarray(step_lib.gate_apply(gate_net, slave_net)(saved, {}, x, False, jax.random.key(0))[0])

  def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  g = softmax(gate_net.apply({"params": gate}, x))
  p = softmax(slave_net.apply({"params": slave}, x))
  np.testing.assert_allclose(out, np.log(np.einsum("bk,kbc->bc", g, p)), rtol=1e-4, atol=1e-5)


def test_calibrate_needs_a_holdout(trained):
  w, _ = trained
  config = tiny_config()
  _complete_slave_and_master(w, config)
  with pytest.raises(errors.MissingInputError, match="holdout_examples"):
    train.run_stage(config, w, "calibrate")


def test_calibrate_stage_fits_each_branch_on_held_out_records(trained, monkeypatch):
  """Temperatures from the stage equal a float64 fit on the records' logits computed here, bins weighted
  equally; the hold-out split is stood in for by the synthetic training shards of the same specs."""
  from msnet import calibration, degradations, models
  from msnet.data import degrade, loader
  from msnet.train import calibrate
  w, _ = trained
  config = tiny_config()
  _complete_slave_and_master(w, config)
  monkeypatch.setattr(loader, "holdout_source",
                      lambda workdir, spec: shards.open_shards(shards.spec_dir(workdir, config.data.train_split, spec)))
  result = train.run_stage(config, w, "calibrate")
  loaded = calibrate.load_temperatures(w, 3)
  assert loaded["branch"].tolist() == pytest.approx(result["temperatures"])
  assert loaded["own_bin"].tolist() == pytest.approx(result["own_bin_temperatures"])
  specs = degrade.holdout_specs(config)
  assert sorted(result["records"]) == sorted(specs)
  slave = models.build_slave(config.model, 10, 3)
  params = train.load_slave_params(w, config)
  rules = [list(b.match) for b in config.bins]
  per_bin = {k: sum(degradations.bin_of(s, rules) == k for s in specs) for k in range(3)}
  logits, labels, weights = [], [], []
  for spec in specs:
    src = shards.open_shards(shards.spec_dir(w, config.data.train_split, spec))
    x = np.stack([src[i]["image"] for i in range(len(src))])
    logits.append(np.asarray(slave.apply({"params": params}, x), np.float64))   # [K, N, C]
    labels.append(np.array([src[i]["label"] for i in range(len(src))]))
    weights.append(np.full(len(src), 1.0 / (per_bin[degradations.bin_of(spec, rules)] * len(src))))
  logits, labels, weights = np.concatenate(logits, 1), np.concatenate(labels), np.concatenate(weights)
  spec_bins = np.concatenate([np.full(len(shards.open_shards(shards.spec_dir(w, config.data.train_split, s))),
                                      degradations.bin_of(s, rules)) for s in specs])
  for k in range(3):
    assert result["temperatures"][k] == pytest.approx(calibration.fit_temperature(logits[k], labels, weights),
                                                      rel=1e-3)
    own = spec_bins == k
    assert result["own_bin_temperatures"][k] == pytest.approx(
        calibration.fit_temperature(logits[k][own], labels[own], weights[own]), rel=1e-3)
  assert all(b["nll_all_bins_calibrated"] <= b["nll_all_bins_raw"] + 1e-9 for b in result["branches"])


def test_clock_rate_leaves_out_what_comes_before_the_first_tick_and_each_exclusion(monkeypatch):
  """Images/s against a scripted perf_counter: compilation before the first finished call and every excluded
  span (validation, a second program's compiling call) are not training time."""
  from msnet.train import metrics as metrics_lib  # noqa: PLC0415
  now = iter([0.0, 30.0, 40.0, 50.0])  # window at start; ticks after the first call, the second, the last
  monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: next(now))
  clock = metrics_lib.Clock(start_step=0)
  clock.exclude(25.0)        # before the first tick: inside the compile that the first tick already drops
  clock.tick(7)              # t=30
  clock.tick(14)             # t=40
  clock.exclude(6.0)         # a second program compiled between t=40 and t=50
  clock.tick(18)             # t=50
  assert clock.rate(gb=100) == pytest.approx((18 - 7) * 100 / (50 - 30 - 6))
