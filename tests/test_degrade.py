"""The offline degrade job: determinism over workers and reruns, kill -9 resume, parts and merge, corrupt files."""

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import PIL.Image
import pytest

from msnet import config as config_lib
from msnet import degradations
from msnet.data import degrade, shards, show, sources

SPECS = ["clean", "jpeg:10", "noise:20+jp2k:50", "blur:1@4+jpeg:30"]


def _config(**degrade_overrides):
  c = config_lib.base_config()
  c.data.max_train_examples = 40
  c.data.max_eval_examples = 50
  c.degrade.records_per_shard = 16
  c.degrade.num_workers = 0
  c.seed = 3
  c.degrade.update(degrade_overrides)
  return c


def _checksums(workdir):
  m = shards.read_json(os.path.join(workdir, "data", "manifest.json"))
  return {s["file"]: s["sha256"] for split in m["splits"].values() for e in split["specs"].values() for s in e["shards"]}


def _stats(workdir):
  """(inode, mtime_ns) of every final-named shard file."""
  out = {}
  for root, _, files in os.walk(os.path.join(workdir, "data")):
    for f in files:
      if f.endswith(shards.SHARD_SUFFIX):
        st = os.stat(os.path.join(root, f))
        out[os.path.relpath(os.path.join(root, f), workdir)] = (st.st_ino, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("inline"))
  manifest = degrade.run_degrade(_config(), w, specs=SPECS)
  return w, manifest


def test_spec_lists():
  c = config_lib.base_config()
  train = degrade.all_train_specs(c)
  assert train[0] == "clean" and {"jpeg:5", "jpeg:20", "jp2k:100", "jp2k:300"} <= set(train)
  assert len(train) == len(set(train))
  c.stages.deepcloak.train_specs = ["jpeg:7", "jpeg:10@420"]  # canonical duplicates are dropped
  assert degrade.all_train_specs(c).count("jpeg:10") == 1 and "jpeg:7" in degrade.all_train_specs(c)
  ev = degrade.all_eval_specs(c)
  assert {str(degradations.parse(s)) for s in ("clean", "jpeg:1", "jp2k:400", "noise:100", "blur:6",
                                                "blur:1@4+jp2k:200")} <= set(ev)
  c.evaluate.sweeps = ["jpeg"]
  assert degrade.all_eval_specs(c) == ["clean"] + [f"jpeg:{q}" for q in (1, 2, 3, 5, 7, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100)]


def test_records_and_manifest(inline_run):
  w, m = inline_run
  assert m["complete"] and m["seed"] == 3 and m["versions"]["imagecodecs"]
  test = m["splits"]["test"]
  assert test["num_records_used"] == 50 and test["class_names"][0] == "airplane" and test["skipped"] == []
  assert set(test["specs"]) == set(SPECS)
  jpeg = test["specs"]["jpeg:10"]
  assert jpeg["num_records"] == 50 and len(jpeg["shards"]) == 4 and jpeg["bin"] == 1
  assert 15 < jpeg["mean_psnr"] < 40 and jpeg["mean_bpp"] > 0 and jpeg["mean_ratio"] > 1
  assert test["specs"]["clean"]["mean_psnr"] == float("inf") and test["specs"]["clean"]["mean_bpp"] is None

  source = sources.open_source(_config().data, "test")
  rules = [list(b.match) for b in _config().bins]
  for spec in SPECS:
    recs = shards.open_shards(shards.spec_dir(w, "test", spec))
    assert [recs[i]["index"] for i in range(len(recs))] == list(range(50))
    for i in (0, 17, 49):
      r = recs[i]
      image, info = degradations.apply(spec, source[i]["image"], seed=3, index=i)
      np.testing.assert_array_equal(r["image"], image)
      assert r["label"] == source[i]["label"] and r["spec"] == spec
      assert r["bin"] == degradations.bin_of(spec, rules)
      assert r["bitstream_bin"] == degradations.bin_of_bitstream(info, rules)
      assert r["psnr"] == pytest.approx(info["psnr"])
  assert shards.open_shards(shards.spec_dir(w, "test", "jpeg:10"))[0]["jpeg_quality"] == 10
  assert len(shards.open_shards(shards.spec_dir(w, "train", "clean"))) == 40


def test_workers_and_rerun_identical(inline_run, tmp_path):
  w0, _ = inline_run
  before = _stats(w0)
  degrade.run_degrade(_config(), w0, specs=SPECS)  # rerun: nothing rewritten
  assert _stats(w0) == before
  w2 = str(tmp_path / "w2")
  degrade.run_degrade(_config(num_workers=2), w2, specs=SPECS)
  assert _checksums(w2) == _checksums(w0)


def test_workers_do_not_import_jax():
  import multiprocessing
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    assert pool.apply(_imports_jax) is False


def _imports_jax():
  import msnet.data.degrade  # noqa: F401
  import msnet.degradations  # noqa: F401,F811
  return "jax" in sys.modules


_KILLABLE = textwrap.dedent("""
    import sys, time
    from msnet import degradations
    from msnet.data import degrade
    sys.path.insert(0, {tests!r})
    from test_degrade import _config, SPECS
    slow = degradations.apply
    def apply(*args, **kwargs):  # slow the job down so the test can kill it mid-way
      time.sleep(0.004)
      return slow(*args, **kwargs)
    degradations.apply = apply
    degrade.run_degrade(_config(), {workdir!r}, specs=SPECS)
""")


def test_resume_after_kill_9(inline_run, tmp_path):
  w0, _ = inline_run
  w = str(tmp_path / "killed")
  script = _KILLABLE.format(tests=os.path.dirname(__file__), workdir=w)
  proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while time.time() < deadline and proc.poll() is None:
    done = [f for f in _stats(w) if os.path.exists(os.path.join(w, f) + ".json")]
    if len(done) >= 5:
      break
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(w, "data", "manifest.json")), "the job finished before the kill"
  # Every file with a final name is complete: all its records read back.
  for f in _stats(w):
    recs = shards.open_shards(os.path.join(w, f))
    assert all(recs[i]["image"].shape == (32, 32, 3) for i in range(len(recs)))
  complete = {f: s for f, s in _stats(w).items() if os.path.exists(os.path.join(w, f) + ".json")}
  assert len(complete) >= 5

  degrade.run_degrade(_config(), w, specs=SPECS)
  after = _stats(w)
  assert {f: after[f] for f in complete} == complete  # complete shards were not rewritten
  assert _checksums(w) == _checksums(w0)
  assert not [f for _, _, fs in os.walk(w) for f in fs if ".tmp" in f]  # partial shards were redone


def test_parts_merge_equals_single_run(inline_run, tmp_path):
  w0, m0 = inline_run
  w = str(tmp_path / "parts")
  part0 = degrade.run_degrade(_config(num_shards=2, shard_index=0), w, specs=SPECS)
  assert part0["part"] == 0 and not os.path.exists(os.path.join(w, "data", "manifest.json"))
  with pytest.raises(degrade.PartsMissingError):
    degrade.merge_manifests(w)
  degrade.run_degrade(_config(num_shards=2, shard_index=1), w, specs=SPECS)  # the last part merges
  merged = degrade.merge_manifests(w, verify=True)
  assert _checksums(w) == _checksums(w0)
  strip = lambda m: {k: v for k, v in m.items() if k != "num_parts"}
  assert strip(merged) == strip(m0) and merged["num_parts"] == 2


def test_changed_config_redoes_shards(inline_run, tmp_path):
  """Shards of another seed or size are never reused: fingerprints differ, stale files are removed."""
  w = str(tmp_path / "w")
  degrade.run_degrade(_config(records_per_shard=32), w, specs=["jpeg:10"])
  c = _config()
  c.seed = 4
  m = degrade.run_degrade(c, w, specs=["jpeg:10"])
  files = sorted(os.listdir(os.path.join(w, "data", "test", "jpeg-10")))
  assert [f for f in files if not f.endswith(".json")] == [shards.shard_name(k, 4) for k in range(4)]
  assert m["seed"] == 4 and len(shards.open_shards(shards.spec_dir(w, "test", "jpeg:10"))) == 50


def test_new_pixels_version_redoes_shards(tmp_path, monkeypatch):
  """Shards written before `apply` changed its pixels (PIXELS_VERSION bumped) are rewritten, not reused."""
  w = str(tmp_path / "w")
  degrade.run_degrade(_config(), w, specs=["jp2k:10"])
  before = _stats(w)
  assert degrade.run_degrade(_config(), w, specs=["jp2k:10"]) and _stats(w) == before  # current: reused
  monkeypatch.setattr(degradations, "PIXELS_VERSION", degradations.PIXELS_VERSION + 1)
  m = degrade.run_degrade(_config(), w, specs=["jp2k:10"])
  after = _stats(w)
  assert m["degradations"] == degradations.PIXELS_VERSION and after.keys() == before.keys()
  assert all(after[f] != before[f] for f in before)


@pytest.fixture
def corrupt_folder(tmp_path):
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for c in ("a", "b"):
      (tmp_path / "f" / split / c).mkdir(parents=True)
      for i in range(5):
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
        (tmp_path / "f" / split / c / f"{i}.png").write_bytes(buf.getvalue())
  (tmp_path / "f" / "val" / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  c = config_lib.base_config()
  c.data.source, c.data.path, c.data.image_size, c.data.eval_split = "folder", str(tmp_path / "f"), 16, "val"
  c.degrade.records_per_shard, c.degrade.num_workers = 4, 0
  return c, tmp_path


def test_corrupt_skip_and_raise(corrupt_folder):
  c, tmp = corrupt_folder
  m = degrade.run_degrade(c, str(tmp / "w"), specs=["clean", "jpeg:50"])
  val = m["splits"]["val"]
  assert val["skipped"] == [5]  # round-robin order: a/0 b/0 a/1 b/1 a/2 b/2 ...
  for spec in ("clean", "jpeg:50"):
    assert val["specs"][spec]["num_records"] == 9
    recs = shards.open_shards(shards.spec_dir(tmp / "w", "val", spec))
    assert [recs[i]["index"] for i in range(9)] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
  c.degrade.on_corrupt = "raise"
  with pytest.raises(sources.CorruptImageError, match="val/b/2.png"):
    degrade.run_degrade(c, str(tmp / "w_raise"), specs=["clean"])


def test_show_grid(inline_run, tmp_path):
  w, _ = inline_run
  out = tmp_path / "grid.png"
  show.render_grid(w, "test", "jpeg:10", 9, out, _config())
  with PIL.Image.open(out) as im:
    assert im.size[0] >= 3 * 128 and im.size[1] >= 3 * 128
    assert np.asarray(im).std() > 10


def test_spec_subset_runs_accumulate_in_manifest(tmp_path):
  w = str(tmp_path / "w")
  degrade.run_degrade(_config(), w, specs=["clean"])
  m = degrade.run_degrade(_config(), w, specs=["jpeg:10"])
  assert set(m["splits"]["test"]["specs"]) == {"clean", "jpeg:10"}
