"""Models: fast conv == lax.conv_general_dilated, the slave's param layout and vmapped branches, the master,
analytic FLOPs and receptive fields. Small widths, batch 2, 32x32."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msnet import config
from msnet.models import (CPU_POLICY, XLA_POLICY, ConvPolicy, build_master, build_slave, conv2d,
                          flops_per_image, layer_flops, normalize_input, receptive_fields, tile_branches)
from msnet import models
from msnet.models import layers

ALL_IM2COL = ConvPolicy(fwd=((1 << 30, "im2col"),), dx=((1 << 30, "im2col"),), dw=((1 << 30, "im2col"),),
                        dw_rows=64)
ALL_SHIFT = ConvPolicy(fwd=((1 << 30, "shift"),), dx=((1 << 30, "shift"),), dw=((1 << 30, "shift"),))


def small_cfg(**kw):
  c = config.base_config().model
  c.width, c.fc_width = 0.125, 32
  c.update(kw)
  return c


def fake_params(model, x, seed=0):
  """He-scaled random params from the shapes alone: jit(model.init) with threefry keys compiles for ~10 s
  on the 2-core machine (one threefry sampler per layer), which the tests cannot afford everywhere."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    stacked = jax.tree_util.keystr(path).startswith("['branches']")
    fan_in = int(np.prod(s.shape[1 if stacked else 0:-1])) or 1
    return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / fan_in), jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def images(b=2, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, size, size, 3), dtype=np.uint8)


def normal(seed, shape):
  """numpy, not jax.random: every new shape would compile a threefry sampler (~1 s each here)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("policy,shape", [
    (CPU_POLICY, (3, 8, 8, 3, 16, 3)),  # plain lax conv
    (CPU_POLICY, (2, 2, 2, 16, 8, 3)),  # forward and dx by im2col, dw by XLA, through the custom VJP
    (ALL_IM2COL, (4, 4, 4, 8, 8, 3)),  # dw by chunked im2col (a scan over 4 chunks)
    (ALL_IM2COL, (2, 5, 5, 4, 6, 5)),
    (ALL_SHIFT, (2, 4, 4, 4, 6, 3)),
    (ALL_SHIFT, (2, 3, 3, 4, 6, 1)),
])
def test_fast_conv_matches_lax_fwd_and_grads(policy, shape):
  b, h, w, cin, cout, k = shape
  x, kernel, dy = normal(1, (b, h, w, cin)), normal(2, (k, k, cin, cout)), normal(3, (b, h, w, cout))

  def loss(x, kernel, pol):
    return jnp.sum(conv2d(x, kernel, policy=pol) * dy)

  ref = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(jax.jit(conv2d, static_argnames="policy")(x, kernel, policy=policy), ref,
                             rtol=1e-5, atol=1e-4)
  grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
  got, want = grad(x, kernel, policy), grad(x, kernel, XLA_POLICY)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4 * float(jnp.abs(r).max()))


@pytest.mark.parametrize("shape", [(2, 8, 8, 4), (3, 7, 5, 2)])  # odd sizes: VALID drops the last row/col
def test_block_max_pool_equals_nn_max_pool_with_ties(shape):
  """Values and gradients bit-equal to nn.max_pool (XLA's select-and-scatter), also where a window holds
  several maxima: ReLU zeros and rounded values (the gradient goes to the first maximum of each window)."""
  x = normal(1, shape)
  dy = normal(2, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  for xx in (x, jax.nn.relu(x), jnp.round(x)):
    want, want_vjp = jax.vjp(lambda v: nn.max_pool(v, (2, 2), (2, 2)), xx)
    got, got_vjp = jax.vjp(lambda v: layers.max_pool(v, 2, 2, policy=CPU_POLICY), xx)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_vjp(dy)[0], want_vjp(dy)[0])
  # overlapping windows (AlexNet's 3x3/2) keep nn.max_pool
  np.testing.assert_array_equal(layers.max_pool(x, 3, 2, policy=CPU_POLICY), nn.max_pool(x, (3, 3), (2, 2)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dot_bias_grad_equals_the_summed_gradient(dtype):
  """CPU_POLICY's bias gradient (a dot) against a float64 NumPy sum of the same cotangent, and the
  whole layer's gradients against XLA_POLICY's plain `y + b`."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((4, 16, 16, 8)), dtype)
  dy = rng.standard_normal((4, 16, 16, 32))
  grads = {}
  for name, policy in (("dot", CPU_POLICY), ("plain", XLA_POLICY)):
    layer = layers.Conv(32, dtype=dtype, policy=policy)
    params = layer.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
    out, vjp = jax.vjp(lambda p, x: layer.apply(p, x), params, x)
    grads[name] = (out, *vjp(jnp.asarray(dy, out.dtype)))
  out_dot, gp_dot, gx_dot = grads["dot"]
  out_plain, gp_plain, gx_plain = grads["plain"]
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_array_equal(np.asarray(out_dot, np.float32), np.asarray(out_plain, np.float32))
  np.testing.assert_array_equal(np.asarray(gx_dot, np.float32), np.asarray(gx_plain, np.float32))
  want = np.asarray(jnp.asarray(dy, dtype), np.float64).reshape(-1, 32).sum(0)
  got = np.asarray(gp_dot["params"]["bias"], np.float64)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
  np.testing.assert_allclose(np.asarray(gp_dot["params"]["kernel"], np.float32),
                             np.asarray(gp_plain["params"]["kernel"], np.float32), rtol=tol, atol=tol)


def test_compiler_options_select_eigen_convs_with_the_same_result():
  """compiler_options() must still be understood by this jaxlib (an unknown option is an error, a renamed
  enum would silently bring back YNNPACK convs): no YNNPACK conv fusion in the compiled step, same values."""
  x, kernel = normal(1, (2, 16, 16, 32)), normal(2, (3, 3, 32, 32))  # smaller convs do not go to YNNPACK
  f = lambda x, k: conv2d(x, k, policy=XLA_POLICY)  # noqa: E731
  fast = jax.jit(f, compiler_options=models.compiler_options())
  assert "__ynn_fusion" in jax.jit(f).lower(x, kernel).compile().as_text()  # XLA's default, what we turn off
  assert "__ynn_fusion" not in fast.lower(x, kernel).compile().as_text()
  np.testing.assert_allclose(fast(x, kernel), jax.jit(f)(x, kernel), rtol=1e-5, atol=1e-4)


def test_other_convs_go_to_lax():
  x, kernel = normal(1, (2, 15, 15, 3)), normal(2, (11, 11, 3, 4))
  ref = jax.lax.conv_general_dilated(x, kernel, (4, 4), ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv2d(x, kernel, stride=4, padding=2, policy=CPU_POLICY), ref, rtol=1e-5, atol=1e-5)
  k3 = kernel[:3, :3]
  ref = jax.lax.conv_general_dilated(x, k3, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv2d(x, k3, padding="VALID", policy=CPU_POLICY), ref, rtol=1e-5, atol=1e-5)
  # int padding (k-1)/2 at stride 1 is SAME and takes the fast path with the same result
  ref = jax.lax.conv_general_dilated(x, k3, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv2d(x, k3, padding=1, policy=ALL_IM2COL), ref, rtol=1e-5, atol=1e-4)


def test_input_norm():
  x = np.array([[[[0, 128, 255]]]], np.uint8)
  f = x.astype(np.float64)
  np.testing.assert_allclose(normalize_input(x, "standard"), (f / 255 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(normalize_input(x, "caffe"), f[..., ::-1] - [103.939, 116.779, 123.68], rtol=1e-6)
  np.testing.assert_allclose(normalize_input(x, "torch"),
                             (f / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-6)
  with pytest.raises(ValueError, match="input_norm"):
    normalize_input(x, "bogus")


def test_slave_param_tree_and_vmapped_branches():
  cfg = small_cfg()
  model = build_slave(cfg, num_classes=10, num_branches=3)
  x = images()
  params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)["params"]
  assert sorted(params) == ["branches", "trunk"]
  assert sorted(params["trunk"]) == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2",
                                     "conv3_3", "conv4_1", "conv4_2", "conv4_3"]
  assert sorted(params["branches"]) == ["conv5_1", "conv5_2", "conv5_3", "fc6", "fc7", "fc8"]
  assert params["trunk"]["conv1_1"]["kernel"].shape == (3, 3, 3, 8)
  assert params["branches"]["conv5_1"]["kernel"].shape == (3, 3, 3, 64, 64)
  assert params["branches"]["fc6"]["kernel"].shape == (3, 64, 32)
  assert params["branches"]["fc8"]["kernel"].shape == (3, 32, 10)
  # branches are initialised independently
  assert not np.allclose(params["branches"]["fc8"]["kernel"][0], params["branches"]["fc8"]["kernel"][1])
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, x)
  assert logits.shape == (3, 2, 10) and logits.dtype == jnp.float32
  # branch k of the vmapped slave == a K=1 slave holding branch k's params
  single = jax.jit(build_slave(cfg, 10, 1).apply)
  for k in range(3):
    pk = {"trunk": params["trunk"], "branches": jax.tree.map(lambda a: a[k:k + 1], params["branches"])}
    np.testing.assert_allclose(single({"params": pk}, x)[0], logits[k], rtol=1e-5, atol=1e-5)
  # trunk features, and the DeepCloak mask over their channels
  feats = jax.jit(lambda p, x: model.apply(p, x, method=model.trunk_features))({"params": params}, x)
  assert feats.shape == (2, 2, 2, 64)
  np.testing.assert_allclose(apply({"params": params}, x, feature_mask=jnp.ones(64)), logits, rtol=1e-6)
  zero = apply({"params": params}, x, feature_mask=jnp.zeros(64))
  np.testing.assert_allclose(zero[:, 0], zero[:, 1], rtol=1e-6)  # nothing of the image gets through


def test_trunk_layers_split():
  for n, first_branch in [(11, "conv5_2"), (13, "fc6"), (4, "conv3_1"), (1, "conv1_2")]:
    model = build_slave(small_cfg(trunk_layers=n), 10, 2)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images())["params"]
    assert next(iter(shapes["branches"])) == first_branch
    assert len(shapes["trunk"]) == n
  with pytest.raises(ValueError, match="trunk_layers=6.*alexnet|trunk_layers=6"):
    build_slave(small_cfg(arch="alexnet", trunk_layers=6), 10, 2)


def test_tile_branches_starts_every_branch_from_the_baseline():
  model1 = build_slave(small_cfg(trunk_layers=12), 10, 1)
  x = images()
  variables = {"params": fake_params(model1, x)}
  tiled = tile_branches(variables, 3)
  assert tiled["params"]["branches"]["fc8"]["kernel"].shape == (3, 32, 10)
  logits = jax.jit(build_slave(small_cfg(trunk_layers=12), 10, 3).apply)(tiled, x)
  base = jax.jit(model1.apply)(variables, x)[0]
  for k in range(3):
    np.testing.assert_allclose(logits[k], base, rtol=1e-5, atol=1e-6)
  assert tile_branches(variables["params"], 2)["branches"]["fc6"]["bias"].shape == (2, 32)
  with pytest.raises(ValueError, match="leading axis 1"):
    tile_branches(tiled, 2)


def test_dropout_group_norm_and_bf16():
  cfg = small_cfg(norm="group", dropout=0.5, compute_dtype="bfloat16")
  model = build_slave(cfg, 10, 2)
  x = images()
  params = fake_params(build_slave(cfg, 10, 1), x)
  assert params["trunk"]["conv1_1_norm"]["scale"].shape == (8,)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))  # params stay float32
  tiled = tile_branches({"params": params}, 2)
  apply = jax.jit(model.apply, static_argnames="train")
  eval_logits = apply(tiled, x)
  assert eval_logits.dtype == jnp.float32
  np.testing.assert_allclose(eval_logits[0], eval_logits[1], rtol=1e-6)  # no dropout at eval
  train_logits = apply(tiled, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(train_logits[0], train_logits[1])  # each branch draws its own dropout mask
  f32 = jax.jit(build_slave(small_cfg(norm="group", dropout=0.5), 10, 2).apply)(tiled, x)
  np.testing.assert_allclose(eval_logits, f32, rtol=0.1, atol=0.1 * float(jnp.abs(f32).max()))
  assert layers.group_count(64) == 32 and layers.group_count(8) == 8 and layers.group_count(154) == 22


def test_fast_policy_train_grads_match_xla():
  x = images(b=4)
  labels = jnp.array([0, 1, 2, 3])
  cfg = small_cfg(trunk_layers=10)
  params = fake_params(build_slave(cfg, 10, 2), x)

  def grads(policy):
    model = build_slave(cfg, 10, 2, policy=policy)

    def loss(p):
      logits = model.apply({"params": p}, x)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[None, :, None], -1))
    return jax.jit(jax.value_and_grad(loss))(params)

  (l_fast, g_fast), (l_ref, g_ref) = grads(CPU_POLICY), grads(XLA_POLICY)
  np.testing.assert_allclose(l_fast, l_ref, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_alexnet_variants():
  cfg = small_cfg(arch="alexnet", trunk_layers=3)
  model = build_slave(cfg, 10, 2)
  params = fake_params(model, images())
  assert list(params["trunk"]) == ["conv1", "conv2", "conv3"]
  assert list(params["branches"]) == ["conv4", "conv5", "fc6", "fc7", "fc8"]
  assert params["branches"]["fc6"]["kernel"].shape == (2, 3 * 3 * 32, 32)
  assert jax.jit(model.apply)({"params": params}, images()).shape == (2, 2, 10)
  big = build_slave(small_cfg(arch="alexnet", variant="imagenet", width=1.0, fc_width=4096, trunk_layers=5), 1000, 1)
  shapes = jax.eval_shape(big.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8))["params"]
  assert shapes["trunk"]["conv1"]["kernel"].shape == (11, 11, 3, 64)
  assert shapes["branches"]["fc6"]["kernel"].shape == (1, 9216, 4096)
  n = sum(a.size for a in jax.tree.leaves(shapes))
  assert n == 61_100_840  # torchvision alexnet


def test_receptive_fields():
  vgg = {r["layer"]: (r["rf"], r["stride"]) for r in receptive_fields("vgg16", "cifar")}
  assert vgg["conv1_1"] == (3, 1) and vgg["conv1_2"] == (5, 1) and vgg["pool1"] == (6, 2)
  assert vgg["conv2_1"] == (10, 2) and vgg["pool2"] == (16, 4) and vgg["pool5"] == (212, 32)
  alex = {r["layer"]: (r["rf"], r["stride"]) for r in receptive_fields("alexnet", "imagenet")}
  assert alex["conv1"] == (11, 4) and alex["pool1"] == (19, 8) and alex["conv2"] == (51, 8)
  assert alex["pool5"] == (195, 32)
  assert receptive_fields("alexnet", "cifar")[1] == dict(layer="pool1", rf=7, stride=2)


def test_flops_and_master():
  cfg = config.base_config()
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.uint8)
  baseline = build_slave(cfg.model, 10, 1)
  slave = build_slave(cfg.model, 10, 3)
  master = build_master(cfg.master, 3)
  pb, ps, pm = (jax.eval_shape(m.init, jax.random.key(0), x) for m in (baseline, slave, master))
  fb, fs, fm = flops_per_image(baseline, pb, 32), flops_per_image(slave, ps, 32), flops_per_image(master, pm, 32)
  # analytic VGG-16 (512-512-10 head) at 32x32: 0.6275 GFLOP (../shared/reference/cpu-performance.md)
  assert fb == pytest.approx(0.627451904e9)
  assert fs == pytest.approx(0.7428e9, rel=1e-4)
  assert [r["layer"] for r in layer_flops(master, pm, 32)] == ["conv1", "conv2", "conv3", "fc1", "fc2", "fc3"]
  print(f"\nmaster {fm / 1e6:.2f} MFLOP = {100 * fm / fb:.2f}% of the baseline VGG-16, "
        f"{100 * fm / fs:.2f}% of the K=3 slave ({fs / 1e9:.4f} GFLOP)")
  assert fm / fs < 0.05
  mi = build_master(cfg.master, 3)
  p = {"params": fake_params(mi, images())}
  assert list(p["params"]) == ["conv1", "conv2", "conv3", "fc1", "fc2", "fc3"]
  out = jax.jit(mi.apply)(p, images())
  assert out.shape == (2, 3) and out.dtype == jnp.float32
  x224 = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.uint8)
  big = build_slave(small_cfg(variant="imagenet", width=1.0, fc_width=4096), 1000, 1)
  assert flops_per_image(big, jax.eval_shape(big.init, jax.random.key(0), x224), 224) == pytest.approx(30.94e9, rel=1e-3)


def test_fast_conv_under_batch_sharding():
  """The custom VJP (with its scan over batch chunks) partitions over a sharded batch (8 fake devices)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  n = len(jax.devices())
  x, kernel, dy = normal(1, (2 * n, 4, 4, 8)), normal(2, (3, 3, 8, 8)), normal(3, (2 * n, 4, 4, 8))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  grad = jax.jit(jax.grad(lambda x, k, p: jnp.sum(conv2d(x, k, policy=p) * dy), (0, 1)), static_argnums=2)
  got, want = grad(xs, kernel, ALL_IM2COL), grad(x, kernel, XLA_POLICY)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4 * float(jnp.abs(r).max()))


def test_resplit_params_moves_the_cut_without_changing_the_logits():
  """One network cut at several depths, both ways: the same logits as the network it was cut from."""
  cfg = small_cfg(trunk_layers=7, norm="group")  # GroupNorm params must move with their conv
  table = models.model_table(cfg, 10)
  x = images()
  base = fake_params(build_slave(cfg, 10, 1), x)
  reference = jax.jit(build_slave(cfg, 10, 1).apply)({"params": base}, x)

  def logits(params, depth, k):
    return jax.jit(build_slave(small_cfg(trunk_layers=depth, norm="group"), 10, k).apply)({"params": params}, x)

  for depth, first_branch in ((1, "conv1_2"), (4, "conv3_1"), (13, "fc6")):
    moved = models.resplit_params(base, table, depth)
    assert sorted(moved["trunk"]) == sorted(n + s for n in models.trunk_weight_layers(table, depth)
                                            for s in ("", "_norm"))
    assert first_branch in moved["branches"] and moved["branches"][first_branch]["kernel"].shape[0] == 1
    np.testing.assert_allclose(logits(moved, depth, 1), reference, rtol=1e-5, atol=1e-6)
    back = models.resplit_params(moved, table, 7)
    assert jax.tree.structure(back) == jax.tree.structure(base)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(base)))
  deep_to_shallow = models.resplit_params(models.resplit_params(base, table, 13), table, 1)
  np.testing.assert_allclose(logits(deep_to_shallow, 1, 1), reference, rtol=1e-5, atol=1e-6)

  # K=3 branches tiled from the baseline, one of them fine-tuned after the cut: conv3_* may rejoin the trunk
  # (equal in every branch), conv5_1 stays per branch.
  slave = tile_branches(models.resplit_params(base, table, 4), 3)
  kernel = slave["branches"]["conv5_1"]["kernel"]
  tuned = kernel.at[1].add(normal(1, kernel.shape[1:]) * 0.05)  # He scale here: ~0.06
  slave = {**slave, "branches": {**slave["branches"], "conv5_1": {**slave["branches"]["conv5_1"], "kernel": tuned}}}
  at7 = models.resplit_params(slave, table, 7)
  assert at7["branches"]["fc8"]["kernel"].shape[0] == 3 and "conv3_1" in at7["trunk"]
  np.testing.assert_allclose(logits(at7, 7, 3), logits(slave, 4, 3), rtol=1e-5, atol=1e-6)
  assert not np.allclose(logits(at7, 7, 3)[1], reference[0], atol=1e-3)  # the tuned branch is kept

  # A layer trained per branch cannot join the one-copy trunk; foreign params and depths are refused.
  with pytest.raises(ValueError, match=r"branches/conv5_1\['kernel'\] differs between the 3 branches"):
    models.resplit_params(slave, table, 11)
  alexnet = models.model_table(small_cfg(arch="alexnet"), 10)
  with pytest.raises(ValueError, match=r"trunk layers \['conv1', 'conv2'\] are not in the params"):
    models.resplit_params(base, alexnet, 2)
  with pytest.raises(ValueError, match="trunk_layers=14"):
    models.resplit_params(base, table, 14)
