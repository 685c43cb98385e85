"""The offline degrade job: determinism over workers and reruns, kill -9 resume, parts and merge, corrupt files."""

import io
import os
import re
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
  assert shards.open_shards(shards.spec_dir(w, "test", "jpeg:10"))[0]["level"] == 10
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
    def apply(*args, **kwargs):  # slow the job down so the test can kill it (or start another) mid-way
      time.sleep({sleep})
      return slow(*args, **kwargs)
    degradations.apply = apply
    degrade.run_degrade(_config(), {workdir!r}, specs=SPECS)
""")


def test_resume_after_kill_9(inline_run, tmp_path):
  w0, _ = inline_run
  w = str(tmp_path / "killed")
  script = _KILLABLE.format(tests=os.path.dirname(__file__), workdir=w, sleep=0.004)
  proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
  _wait_for_complete_shards(w, proc, 5)
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


def _wait_for_complete_shards(workdir, proc, n):
  deadline = time.time() + 60
  while time.time() < deadline and proc.poll() is None:
    if len([f for f in _stats(workdir) if os.path.exists(os.path.join(workdir, f) + ".json")]) >= n:
      return
    time.sleep(0.01)


def test_two_writers_at_once_write_single_writer_bytes(inline_run, tmp_path):
  """A second job started on the same workdir mid-way: both finish, every shard as a single writer's."""
  w0, _ = inline_run
  w = str(tmp_path / "two")
  script = _KILLABLE.format(tests=os.path.dirname(__file__), workdir=w, sleep=0.03)
  first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  _wait_for_complete_shards(w, first, 1)
  second = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
  outs = [p.communicate(timeout=300)[0] for p in (first, second)]
  assert first.returncode == second.returncode == 0, outs
  planned = re.search(r"(\d+) to write", outs[1])
  assert planned and int(planned.group(1)) > 0, f"the second job started after the first ended: {outs[1]}"
  assert _checksums(w) == _checksums(w0)
  degrade.merge_manifests(w, verify=True)  # every file holds the bytes its manifest entry says
  assert not [f for _, _, fs in os.walk(w) for f in fs if ".tmp" in f]


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
  before, old = _stats(w), _checksums(w)
  assert degrade.run_degrade(_config(), w, specs=["jp2k:10"]) and _stats(w) == before  # current: reused
  apply = degradations.apply

  def new_pixels(*args, **kwargs):  # the new version: every pixel one higher (mod 256)
    image, info = apply(*args, **kwargs)
    return image + np.uint8(1), info
  monkeypatch.setattr(degradations, "apply", new_pixels)
  monkeypatch.setattr(degradations, "PIXELS_VERSION", degradations.PIXELS_VERSION + 1)
  m = degrade.run_degrade(_config(), w, specs=["jp2k:10"])
  new = _checksums(w)
  assert m["degradations"] == degradations.PIXELS_VERSION and new.keys() == old.keys()
  assert all(new[f] != old[f] for f in old)
  degrade.merge_manifests(w, verify=True)  # the files on disk are the new ones
  source = sources.open_source(_config().data, "test")
  recs = shards.open_shards(shards.spec_dir(w, "test", "jp2k:10"))
  np.testing.assert_array_equal(recs[7]["image"], apply("jp2k:10", source[7]["image"], seed=3, index=7)[0] + 1)


def _encoded(image, fmt, **params):
  buf = io.BytesIO()
  image.save(buf, fmt, **params)
  return buf.getvalue()


def _bad_folder(root):
  """An ImageFolder whose val split mixes images of unusual modes and sizes with files msnet cannot use.

  Returns {val file: the 16x16 RGB image msnet must read from it, by Pillow's own conversion and center
  crop}; the files missing from it must be skipped.
  """
  rng = np.random.default_rng(0)
  rgb = lambda h, w: PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  palette = rgb(16, 16).convert("P", palette=PIL.Image.Palette.ADAPTIVE)
  palette.info["transparency"] = 3
  grey16 = PIL.Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16))
  usable = {"a/0.png": (rgb(16, 16), "PNG"), "a/1.png": (palette, "PNG"),
            "a/2.jpg": (rgb(20, 24).convert("CMYK"), "JPEG"), "a/3.png": (rgb(16, 16).convert("LA"), "PNG"),
            "b/0.png": (grey16, "PNG"), "b/5.jpeg": (rgb(18, 17).convert("L"), "JPEG")}
  jpeg = _encoded(rgb(16, 16), "JPEG")
  unusable = {"a/4.jpg": jpeg[:len(jpeg) // 2], "b/1.png": b"", "b/2.png": b"\x89PNG\r\n\x1a\n truncated",
              "b/3.jpg": b"a text file\n", "b/4.png": _encoded(rgb(8, 12), "PNG")}  # 8x12 < image_size
  expected = {}
  for name, (image, fmt) in usable.items():
    (root / "val" / name).parent.mkdir(parents=True, exist_ok=True)
    (root / "val" / name).write_bytes(_encoded(image, fmt))
    with PIL.Image.open(root / "val" / name) as im:
      array = np.asarray(im.convert("RGB"))
    if image.mode.startswith("I;16"):  # scaled by its bit depth (NumPy float64), not clipped by Pillow's convert
      array = np.repeat(np.round(np.asarray(image) / 65535 * 255).astype(np.uint8)[..., None], 3, axis=2)
    top, left = (array.shape[0] - 16) // 2, (array.shape[1] - 16) // 2
    expected[f"val/{name}"] = array[top:top + 16, left:left + 16]
  for name, data in unusable.items():
    (root / "val" / name).write_bytes(data)
  for c in ("a", "b"):
    (root / "train" / c).mkdir(parents=True)
    for i in range(3):
      (root / "train" / c / f"{i}.png").write_bytes(_encoded(rgb(16, 16), "PNG"))
  return expected


@pytest.fixture
def corrupt_folder(tmp_path):
  expected = _bad_folder(tmp_path / "f")
  c = config_lib.base_config()
  c.data.source, c.data.path, c.data.image_size, c.data.eval_split = "folder", str(tmp_path / "f"), 16, "val"
  c.degrade.records_per_shard, c.degrade.num_workers = 4, 0
  c.evaluate.sweeps = []
  return c, tmp_path, expected


def test_unusable_files_skipped_named_and_said(corrupt_folder, capsys):
  from msnet import pipeline
  c, tmp, expected = corrupt_folder
  pipeline.degrade(c, tmp / "w")
  m = shards.read_json(tmp / "w" / "data" / "manifest.json")
  val = m["splits"]["val"]
  # Round-robin order: a/0 b/0 a/1 b/1 a/2 b/2 a/3 b/3 a/4 b/4 b/5.
  order = ["val/a/0.png", "val/b/0.png", "val/a/1.png", "val/b/1.png", "val/a/2.jpg", "val/b/2.png",
           "val/a/3.png", "val/b/3.jpg", "val/a/4.jpg", "val/b/4.png", "val/b/5.jpeg"]
  bad = [i for i, name in enumerate(order) if name not in expected]
  assert val["skipped"] == bad and val["skipped_names"] == [order[i] for i in bad]
  assert m["splits"]["train"]["skipped"] == m["splits"]["train"]["skipped_names"] == []
  for spec in val["specs"]:
    recs = shards.open_shards(shards.spec_dir(tmp / "w", "val", spec))
    assert [recs[i]["index"] for i in range(len(recs))] == [i for i, name in enumerate(order) if name in expected]
  clean = shards.open_shards(shards.spec_dir(tmp / "w", "val", "clean"))
  for j in range(len(clean)):
    np.testing.assert_array_equal(clean[j]["image"], expected[order[clean[j]["index"]]])
  said = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
  assert said == [f"[msnet] degrade skipped 5 of 11 files of split 'val' that cannot be used "
                  f"(degrade.on_corrupt='skip'): {', '.join(order[i] for i in bad)}; all of them in "
                  f"{tmp / 'w' / 'data' / 'manifest.json'} (splits.val.skipped_names)"]


@pytest.mark.parametrize("bad, fix", [("b/4.png", "image is 8x12, smaller than config.data.image_size=16; set "
                                                  "config.data.resize_shorter"),
                                      ("b/3.jpg", "not an image: neither JPEG")])
def test_unusable_file_refused_with_its_name(corrupt_folder, bad, fix):
  c, tmp, _ = corrupt_folder
  for name in ("a/4.jpg", "b/1.png", "b/2.png", "b/3.jpg", "b/4.png"):
    if name != bad:
      (tmp / "f" / "val" / name).unlink()
  c.degrade.on_corrupt = "raise"
  with pytest.raises(sources.CorruptImageError, match=f"val/{bad}: {fix}.*on_corrupt='skip' skips it"):
    degrade.run_degrade(c, str(tmp / "w"), specs=["clean"])


def test_sidecars_without_names_get_them_from_the_source(corrupt_folder):
  """Shards degraded before skipped files were named are reused; the manifest names their skipped files."""
  c, tmp, _ = corrupt_folder
  w = str(tmp / "w")
  first = degrade.run_degrade(c, w, specs=["clean"])
  for car in (tmp / "w" / "data").glob("*/clean/*.json"):
    shards.write_json(car, {k: v for k, v in shards.read_json(car).items() if k != "skipped_names"})
  (tmp / "w" / "data" / "manifest.json").unlink()
  before = _stats(w)
  assert degrade.run_degrade(c, w, specs=["clean"]) == first and _stats(w) == before


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


def test_worker_warnings_go_to_the_log_not_the_terminal(corrupt_folder, capfd):
  """Pillow warns (DecompressionBombWarning) on a PNG claiming 10000x10000 before msnet refuses it by its
  header: in a worker process that warning goes to W/logs/, not to the terminal the workers share."""
  import struct
  import zlib
  from msnet import pipeline
  c, tmp, _ = corrupt_folder
  png = bytearray(_encoded(PIL.Image.new("RGB", (16, 16)), "PNG"))
  struct.pack_into(">II", png, 16, 10_000, 10_000)  # IHDR width, height
  struct.pack_into(">I", png, 29, zlib.crc32(bytes(png[12:29])))
  (tmp / "f" / "val" / "a" / "9.png").write_bytes(bytes(png))
  c.degrade.num_workers = 1
  pipeline.degrade(c, tmp / "w")
  out, err = capfd.readouterr()
  assert "DecompressionBombWarning" not in out + err
  log = (tmp / "w" / "logs" / "degrade-part0-workers.log").read_text()
  assert "DecompressionBombWarning" in log
  val = shards.read_json(tmp / "w" / "data" / "manifest.json")["splits"]["val"]
  assert "val/a/9.png" in val["skipped_names"]
