"""msnet.data.resident: the device-resident stream against independent references.

The coin against the host loader's NumPy coin, the mixture against `grain.MapDataset.mix` itself, the
per-epoch permutation by counting, the gathered batch against the records read from the shards, and the
same global batches on 1 device, 8 devices and 2 processes x 4 devices.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import types

import grain
import jax
import numpy as np
import pytest

from msnet import errors
from msnet.data import loader, resident, shards

from test_train import tiny_config, write_synthetic_shards

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPECS = ["clean", "jpeg:5", "jp2k:100"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("shards")
  write_synthetic_shards(root, tiny_config())
  return root


def _mesh(n: int):
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def _batches(ld: resident.ResidentLoader, positions) -> list[dict[str, np.ndarray]]:
  fn = jax.jit(ld.batch)
  return [jax.device_get(fn(ld.data, np.uint32(p))) for p in positions]


def test_coin_is_the_host_loaders_coin():
  rng = np.random.RandomState(0)
  positions = np.concatenate([np.arange(1000), rng.randint(0, 2**32, 5000, dtype=np.uint64), [2**32 - 1]])
  for seed in (0, 1, 42, 2**40 + 3):
    want = loader._coin(seed, positions.astype(np.uint64))
    got = np.asarray(resident.coin(seed, jax.numpy.asarray(positions.astype(np.uint32))))
    np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
    assert 0.45 < want.mean() < 0.55


@pytest.mark.parametrize("n", [1, 2, 3, 5, 48, 1000, 4097])
def test_permute_is_a_permutation_per_key(n):
  orders = []
  for k in range(3):
    keys = np.asarray(jax.random.bits(jax.random.key(k), (resident.ROUNDS,), jax.numpy.uint32))
    out = np.asarray(resident.permute(np.arange(n, dtype=np.uint32), np.full(n, n, np.uint32),
                                      np.full(n, resident.half_bits(n), np.uint32), np.tile(keys, (n, 1))))
    np.testing.assert_array_equal(np.sort(out), np.arange(n))
    orders.append(out)
  if n >= 5:
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], np.arange(n))


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 0.3, 0.2], [2.0, 1.0], [1.0, 0.125, 3.3]])
def test_mixture_rule_is_grains(weights):
  """(spec, draw) of every position, from Grain's own mix of ranges wide enough that a value names both."""
  span = 2**32
  mixed = grain.MapDataset.mix([grain.MapDataset.range(i * span, (i + 1) * span) for i in range(len(weights))],
                               weights)
  proportions = resident.integer_proportions(weights)
  spec_table, draw_table = resident.mixture_tables(proportions)
  period = len(spec_table)
  rng = np.random.RandomState(1)
  for k in [*range(3 * period), *rng.randint(0, 2**31, 300)]:
    q, r = divmod(int(k), period)
    spec, draw = int(spec_table[r]), q * proportions[spec_table[r]] + int(draw_table[r])
    assert mixed[int(k)] == spec * span + draw, k


def test_each_epoch_visits_every_record_once(data_root):
  gb = 16
  ld = resident.ResidentLoader(data_root, "train", SPECS, None, gb, 0, _mesh(8), False)
  n = ld.num_records
  assert n == 3 * 48
  fn = jax.jit(ld.indices)
  epochs = [np.concatenate([np.asarray(fn(ld.data, np.uint32(e * n + p))[0]) for p in range(0, n, gb)])
            for e in range(2)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])
  # Weighted: each spec's draws are its own permutation per spec epoch, in the proportions of the rule.
  weighted = resident.ResidentLoader(data_root, "train", SPECS, [1.0, 1.0, 1.0], gb, 0, _mesh(8), False)
  wfn = jax.jit(weighted.indices)
  index = np.concatenate([np.asarray(wfn(weighted.data, np.uint32(p))[0]) for p in range(0, 2 * n, gb)])
  for s in range(3):
    mine = index[(index >= 48 * s) & (index < 48 * (s + 1))]
    assert len(mine) == 96  # equal weights: 2 epochs of each spec in 2 * 144 positions
    for e in range(2):
      np.testing.assert_array_equal(np.sort(mine[48 * e:48 * (e + 1)]), np.arange(48 * s, 48 * (s + 1)))


def test_batch_is_the_records_flipped_by_the_coin(data_root):
  gb, seed = 16, 5
  ld = resident.ResidentLoader(data_root, "train", SPECS, [0.5, 0.3, 0.2], gb, seed, _mesh(8), True)
  srcs = [shards.open_shards(shards.spec_dir(data_root, "train", s)) for s in SPECS]
  records = [src[i] for src in srcs for i in range(len(src))]
  for p in (0, 16, 400):
    batch = _batches(ld, [p])[0]
    index = np.asarray(jax.jit(ld.indices)(ld.data, np.uint32(p))[0])
    flip = loader._coin(seed, np.arange(p, p + gb, dtype=np.uint64))
    assert 0 < flip.sum() < gb
    for row, (i, f) in enumerate(zip(index, flip)):
      want = records[i]["image"][:, ::-1] if f else records[i]["image"]
      np.testing.assert_array_equal(batch["image"][row], want)
      assert batch["label"][row] == records[i]["label"]
  bins = resident.ResidentLoader(data_root, "train", SPECS, [1.0, 1.0, 1.0], gb, seed, _mesh(8), True,
                                 label_key="bin")
  index = np.asarray(jax.jit(bins.indices)(bins.data, np.uint32(0))[0])
  np.testing.assert_array_equal(_batches(bins, [0])[0]["label"], [records[i]["bin"] for i in index])


def test_same_batches_on_1_and_8_devices_and_resume(data_root):
  positions = [0, 16, 144, 1600]
  one = resident.ResidentLoader(data_root, "train", SPECS, [0.5, 0.3, 0.2], 16, 3, _mesh(1), True)
  eight = resident.ResidentLoader(data_root, "train", SPECS, [0.5, 0.3, 0.2], 16, 3, _mesh(8), True)
  for a, b in zip(_batches(one, positions), _batches(eight, positions)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for _ in range(3):
    next(eight)
  state = eight.get_state()
  assert state == {"epoch": 0, "position": 48}
  fresh = resident.ResidentLoader(data_root, "train", SPECS, [0.5, 0.3, 0.2], 16, 3, _mesh(8), True)
  fresh.set_state(state)
  assert next(fresh) == next(eight) == 48
  with pytest.raises(ValueError, match="host data path"):
    fresh.set_state({"next_index": 3})


MP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
from msnet import parallel
parallel.maybe_initialize_distributed()
from jax.experimental import multihost_utils
from msnet.data import resident
mesh = parallel.make_mesh([("data", -1)])
ld = resident.ResidentLoader({root!r}, "train", {specs!r}, [0.5, 0.3, 0.2], 16, 3, mesh, True)
fn = jax.jit(ld.batch, out_shardings=parallel.replicated(mesh))
out = {{}}
for p in {positions!r}:
  b = fn(ld.data, np.uint32(p))
  out.update({{f"{{k}}-{{p}}": np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in b.items()}})
if jax.process_index() == 0:
  np.savez({out!r}, **out)
"""


def test_same_batches_on_2_processes_x_4_devices(data_root, tmp_path):
  positions = [0, 16, 144, 1600]
  script = tmp_path / "mp.py"
  script.write_text(MP_SCRIPT.format(tests=str(ROOT / "tests"), root=str(data_root), specs=SPECS,
                                     positions=positions, out=str(tmp_path / "mp.npz")))
  env = {k: v for k, v in os.environ.items() if not k.startswith("MSNET_")}
  proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "--processes", "2", "--devices-per-process", "4",
                         "--", sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  one = resident.ResidentLoader(data_root, "train", SPECS, [0.5, 0.3, 0.2], 16, 3, _mesh(1), True)
  with np.load(tmp_path / "mp.npz") as got:
    for p, want in zip(positions, _batches(one, positions)):
      for k, v in want.items():
        np.testing.assert_array_equal(got[f"{k}-{p}"], v, err_msg=f"{k} at {p}")


def test_device_data_setting():
  cpu = types.SimpleNamespace(platform="cpu", memory_stats=lambda: None)
  gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 4000})
  assert not resident.use_device_data("auto", 10, cpu)
  assert resident.use_device_data("auto", 1000, gpu) and not resident.use_device_data("auto", 1001, gpu)
  assert not resident.use_device_data("off", 1, gpu)
  assert resident.use_device_data("on", 10**9, cpu)
  with pytest.raises(errors.UserError, match="device_data='on'"):
    resident.use_device_data("on", 4001, gpu)
  assert resident.use_device_data("2e3", 2000, cpu) and not resident.use_device_data(2000, 2001, gpu)
