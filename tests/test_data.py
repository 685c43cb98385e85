"""Sources, the shard record format and reader, and the Grain loaders (8 fake devices from conftest)."""

import io
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import tarfile

import jax
import numpy as np
import PIL.Image
import pytest

from msnet import config as config_lib
from msnet import parallel
from msnet.data import degrade, loader, reader, shards, sources

IMAGE = 8  # synthetic shard images are 8x8


def _data_cfg(**overrides):
  d = config_lib.base_config().data.to_dict()
  d.update(overrides)
  return d


# ---- record format and shard files ----

def _meta(i, spec="clean", bin_=0):
  return {"label": i % 10, "spec": spec, "bin": bin_, "bitstream_bin": bin_, "index": i, "psnr": math.inf,
          "bpp": None, "level": None, "ratio": None, "codec": None}


def _image(i):
  """Record i is recognisable: channel 0/1 hold i, channel 2 a column ramp (shows flips)."""
  image = np.zeros((IMAGE, IMAGE, 3), np.uint8)
  image[..., 0], image[..., 1] = i % 256, i // 256
  image[..., 2] = np.arange(IMAGE)[None, :]
  return image


def _write_spec(workdir, split, spec, n, per_shard, bin_=0):
  d = shards.spec_dir(workdir, split, spec)
  d.mkdir(parents=True, exist_ok=True)
  k = -(-n // per_shard)
  for s in range(k):
    ids = range(s * per_shard, min(n, (s + 1) * per_shard))
    shards.write_shard(d / shards.shard_name(s, k), (shards.encode_record(_image(i), _meta(i, spec, bin_)) for i in ids))
  return d


def _index(images):
  images = np.asarray(images)
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def test_record_roundtrip():
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  meta = {"label": 3, "spec": "jpeg:10", "bin": 1, "bitstream_bin": 1, "index": 42, "psnr": 27.5,
          "bpp": 1.25, "level": 10.0, "ratio": 19.2, "codec": "jpeg"}
  r = shards.decode_record(shards.encode_record(image, meta))
  np.testing.assert_array_equal(r["image"], image)
  assert {k: r[k] for k in meta} == meta
  r = shards.decode_record(shards.encode_record(image, _meta(0)))
  assert r["psnr"] == math.inf and math.isnan(r["bpp"]) and math.isnan(r["level"])
  with pytest.raises(ValueError, match="uint8 HxWx3"):
    shards.encode_record(image[..., 0], meta)


def test_decode_batch_equals_per_record_decode():
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(4)]
  records = [shards.encode_record(im, {**_meta(i), "bin": i % 2}) for i, im in enumerate(images)]
  batch = shards.decode_batch(records, ["label", "bin"])
  singles = [shards.decode_record(r) for r in records]
  np.testing.assert_array_equal(batch["image"], np.stack([r["image"] for r in singles]))
  assert batch["label"].tolist() == [r["label"] for r in singles] and batch["label"].dtype == np.int32
  assert batch["bin"].tolist() == [0, 1, 0, 1]
  odd = shards.encode_record(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8), _meta(9))
  with pytest.raises(ValueError, match="one batch holds one image size"):
    shards.decode_batch(records + [odd], ["label"])
  with pytest.raises(ValueError, match="at least one record"):
    shards.decode_batch([], ["label"])


def _encode_v1(image, meta):
  """Reference: a record of format 1 as msnet wrote it before version 2 (uint32 length, JSON header, pixels)."""
  header = json.dumps({"v": 1, "h": image.shape[0], "w": image.shape[1], **meta}, separators=(",", ":")).encode()
  return struct.pack("<I", len(header)) + header + image.tobytes()


def test_record_layout_is_the_documented_fixed_header():
  """An independent parse (struct, the byte offsets of the format in shards.py) reads what was encoded."""
  image = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  meta = {"label": 3, "spec": "blur:1@4+jpeg:10", "bin": 1, "bitstream_bin": 2, "index": 2**31 - 1,
          "psnr": 27.5, "bpp": 1.25, "level": 10.0, "ratio": 19.2, "codec": "jpeg"}
  data = shards.encode_record(image, meta)
  fields = struct.unpack_from("<4sHHHHHHiiiidddd", data)
  assert struct.calcsize("<4sHHHHHHiiiidddd") == 64
  assert fields == (b"MSNR", 3, 5, 7, 16, 4, 0, 3, 1, 2, 2**31 - 1, 10.0, 27.5, 1.25, 19.2)
  assert data[64:64 + 105] == image.tobytes() and data[64 + 105:] == b"blur:1@4+jpeg:10jpeg"
  external = shards.decode_record(shards.encode_record(image, {"label": -1, "bin": 0, "bitstream_bin": 2}))
  assert (external["spec"], external["index"], external["codec"]) == ("", -1, None) and math.isnan(external["level"])
  assert math.isnan(external["psnr"]) and math.isnan(external["bpp"]) and math.isnan(external["ratio"])
  with pytest.raises(ValueError, match=r"record index must be in \[-1, 2\*\*31\)"):
    shards.encode_record(image, {**meta, "index": 2**31})
  with pytest.raises(ValueError, match=r"unknown keys \['lable'\], missing \['label'\]"):
    shards.encode_record(image, {"lable": 3, "bin": 0, "bitstream_bin": 0})


def test_decode_batch_flips_while_copying():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
  records = [shards.encode_record(im, _meta(i)) for i, im in enumerate(images)]
  flip = np.array([1, 0, 0, 1, 1, 0], bool)
  batch = shards.decode_batch(records, ["index", "label"], flip=flip)
  np.testing.assert_array_equal(batch["image"], np.where(flip[:, None, None, None], images[:, :, ::-1], images))
  assert batch["index"].tolist() == list(range(6)) and batch["index"].dtype == np.int32
  with pytest.raises(KeyError, match="integer header fields"):
    shards.decode_batch(records, ["psnr"])


def test_batched_range_and_array_reads_equal_the_written_records(tmp_path):
  d = _write_spec(tmp_path, "train", "clean", 45, 10)
  src = shards.open_shards(d)
  written = [shards.encode_record(_image(i), _meta(i)) for i in range(45)]
  ids = [44, 0, 13, 13, 9, 10, 31]
  assert src.read_batch(ids) == [written[i] for i in ids] and src.read_batch([]) == []
  assert src.read_range(8, 33) == written[8:33] and src.read_range(5, 5) == []
  arrays = src.read_arrays(7, 41)
  np.testing.assert_array_equal(arrays["image"], np.stack([_image(i) for i in range(7, 41)]))
  assert arrays["label"].tolist() == [i % 10 for i in range(7, 41)] and set(arrays) == {"image", *shards.ARRAY_FIELDS}
  every = shards.spec_arrays(tmp_path, "train", "clean")
  assert _index(every["image"]).tolist() == list(range(45)) and every["bin"].dtype == np.int32
  with pytest.raises(IndexError, match="out of range"):
    src.read_batch([45])


def test_old_format_shards_are_refused_with_the_rewrite_command(tmp_path):
  d = shards.spec_dir(tmp_path, "test", "clean")
  d.mkdir(parents=True)
  old = [_encode_v1(_image(i), _meta(i)) for i in range(3)]
  shards.write_shard(d / shards.shard_name(0, 1), old)
  with pytest.raises(shards.StaleRecordError, match=re.escape(
      f"record format 1 (a JSON header per record); this msnet reads record format 3: rewrite the shards with "
      f"`msnet degrade --workdir={tmp_path}`")):
    shards.open_shards(d)
  with pytest.raises(ValueError, match="record format 1"):
    shards.decode_batch(old, ["label"])
  with pytest.raises(ValueError, match="no MSNR magic"):
    shards.decode_record(b"\0" * 80)
  version_2 = bytearray(shards.encode_record(_image(0), _meta(0)))
  version_2[4:6] = (2).to_bytes(2, "little")
  with pytest.raises(ValueError, match="record format 2; this msnet reads record format 3"):
    shards.decode_record(bytes(version_2))


def test_degrade_rewrites_old_format_shards_in_place(tmp_path, monkeypatch):
  """What the refusal says works: `msnet degrade` on a workdir of format-1 shards rewrites them."""
  c = config_lib.base_config()
  c.data.max_train_examples, c.data.max_eval_examples, c.degrade.num_workers = 6, 6, 0
  with monkeypatch.context() as m:
    m.setattr(shards, "FORMAT_VERSION", 1)
    m.setattr(shards, "encode_record", _encode_v1)
    degrade.run_degrade(c, tmp_path, specs=["jpeg:50"])
  with pytest.raises(shards.StaleRecordError, match="msnet degrade"):
    shards.open_shards(shards.spec_dir(tmp_path, "test", "jpeg:50"))
  manifest = degrade.run_degrade(c, tmp_path, specs=["jpeg:50"])
  assert manifest["format"] == shards.FORMAT_VERSION
  src = shards.open_shards(shards.spec_dir(tmp_path, "test", "jpeg:50"))
  assert [src[i]["index"] for i in range(6)] == list(range(6)) and src[0]["codec"] == "jpeg"


def _splitmix64_top_bit(seed: int, position: int) -> bool:
  """Reference: splitmix64 finaliser in Python integers (Steele, Lea, Flood 2014)."""
  m = 2**64
  z = (position + seed * 0x9E3779B97F4A7C15) % m
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m
  return bool((z ^ (z >> 31)) >> 63)


def test_flip_coin_is_splitmix64_and_fair():
  positions = np.arange(0, 20000, dtype=np.uint64)
  for seed in (0, 7, 2**40 + 3):
    coins = loader._coin(seed, positions)
    assert coins[:50].tolist() == [_splitmix64_top_bit(seed, p) for p in range(50)]
    assert abs(coins.mean() - 0.5) < 0.02  # 20000 fair coins: 4.5 standard deviations
  assert (loader._coin(0, positions) != loader._coin(1, positions)).mean() > 0.45


def test_write_and_open_shards(tmp_path):
  d = _write_spec(tmp_path, "test", "jpeg:10", 25, 10, bin_=1)
  assert sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp")) == []
  files = shards.shard_files(d)
  assert [f.name for f in files] == [shards.shard_name(k, 3) for k in range(3)]
  src = shards.open_shards(d)
  assert len(src) == 25
  r = src[13]
  assert set(r) >= {"image", "label", "spec", "bin", "bitstream_bin", "index", "psnr", "bpp", "level"}
  assert r["image"].dtype == np.uint8 and r["image"].shape == (IMAGE, IMAGE, 3)
  assert (r["index"], r["label"], r["spec"], r["bin"]) == (13, 3, "jpeg:10", 1)
  assert [src[i]["index"] for i in range(25)] == list(range(25))  # source-index order
  assert len(shards.open_shards(files[2])) == 5
  info = shards.write_shard(tmp_path / "x.array_record", [b"a", b"bc"])
  assert info["num_records"] == 2 and info["sha256"] == shards.sha256_file(tmp_path / "x.array_record")
  files[1].unlink()
  with pytest.raises(FileNotFoundError, match="incomplete shard set"):
    shards.open_shards(d)
  with pytest.raises(FileNotFoundError, match="msnet degrade"):
    shards.open_shards(tmp_path / "nothing")


def test_shard_writers_never_replace_an_equal_file(tmp_path):
  """A final name already holding the same bytes (another writer's) is kept; other bytes (stale) are replaced."""
  path = tmp_path / "s.array_record"
  first = shards.write_shard(path, [b"a", b"bc"])
  inode = os.stat(path).st_ino
  assert shards.write_shard(path, [b"a", b"bc"]) == first and os.stat(path).st_ino == inode
  changed = shards.write_shard(path, [b"a", b"bd"])
  assert changed["sha256"] != first["sha256"] and changed["sha256"] == shards.sha256_file(path)
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_temp_names_are_per_writer_and_dead_writers_are_cleaned(tmp_path):
  names = {shards.temp_path(tmp_path / "x").name for _ in range(100)}
  assert len(names) == 100 and all(n.startswith(f"x.tmp-{socket.gethostname()}-{os.getpid()}-") for n in names)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                        check=True)
  host = socket.gethostname()
  files = {"mine": f"x.tmp-{host}-{os.getpid()}-0123abcd",  # a running writer: this test
           "dead": f"x.json.tmp-{host}-{dead.stdout.strip()}-0123abcd",
           "other_host": f"x.tmp-not-{host}-{dead.stdout.strip()}-0123abcd",
           "final": "x"}
  for name in files.values():
    (tmp_path / name).write_bytes(b"")
  shards.remove_dead_temps(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files[k] for k in ("mine", "other_host", "final"))


# ---- sources ----

def test_embedded_cifar10():
  src = sources.open_source(_data_cfg(), "test")
  assert len(src) == 10000
  assert src.class_names == sorted(src.class_names) and len(src.class_names) == 10
  # Round-robin over classes: any prefix is class-balanced; labels are sorted-class indices.
  assert [src[i]["label"] for i in range(20)] == list(range(10)) * 2
  for i in (0, 5, 4321, 9999):
    r = src[i]
    assert r["image"].dtype == np.uint8 and r["image"].shape == (32, 32, 3)
    assert f"/{src.class_names[r['label']]}/" in src.names[i]


def _png(array):
  buf = io.BytesIO()
  PIL.Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


def _jpeg(array):
  buf = io.BytesIO()
  PIL.Image.fromarray(array).save(buf, "JPEG", quality=90)
  return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
  """split/class/* with RGB, greyscale, RGBA and a corrupt file; also as a .tar.gz."""
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (12, 12), dtype=np.uint8)
  rgba = rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)
  files = {"val/cat/a.png": _png(rgb), "val/cat/b.png": _png(grey), "val/dog/a.png": _png(rgba),
           "val/dog/b.jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "val/dog/c.jpg": _jpeg(rgb),
           "train/cat/x.png": _png(rgb)}
  root = tmp_path / "folder"
  for name, data in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  with tarfile.open(tmp_path / "folder.tar.gz", "w:gz") as tar:
    tar.add(root / "val", arcname="val")
  return root, tmp_path / "folder.tar.gz", {"rgb": rgb, "grey": grey, "rgba": rgba}


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_folder_source(image_folder, kind):
  root, tar, arrays = image_folder
  src = sources.open_source(_data_cfg(source="folder", path=str(root if kind == "dir" else tar), image_size=12), "val")
  assert src.class_names == ["cat", "dog"] and len(src) == 5
  # Round-robin order: cat/a, dog/a, cat/b, dog/b, dog/c.
  assert [n.rsplit("/", 2)[-2:] for n in src.names] == [["cat", "a.png"], ["dog", "a.png"], ["cat", "b.png"],
                                                        ["dog", "b.jpg"], ["dog", "c.jpg"]]
  np.testing.assert_array_equal(src[0]["image"], arrays["rgb"])
  np.testing.assert_array_equal(src[1]["image"], arrays["rgba"][..., :3])   # alpha dropped
  np.testing.assert_array_equal(src[2]["image"], np.repeat(arrays["grey"][..., None], 3, 2))  # grey -> RGB
  assert [src[i]["label"] for i in (0, 1, 2, 4)] == [0, 1, 0, 1]
  with pytest.raises(sources.CorruptImageError, match="dog/b.jpg"):
    src[3]
  assert src.relative_names == ["val/cat/a.png", "val/dog/a.png", "val/cat/b.png", "val/dog/b.jpg", "val/dog/c.jpg"]


def test_resize_and_crop(tmp_path):
  rng = np.random.default_rng(1)
  (tmp_path / "s" / "c").mkdir(parents=True)
  (tmp_path / "s" / "c" / "wide.png").write_bytes(_png(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)))
  cfg = dict(source="folder", path=str(tmp_path))
  assert sources.open_source(_data_cfg(**cfg, image_size=16, resize_shorter=20), "s")[0]["image"].shape == (16, 16, 3)
  big = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  (tmp_path / "s" / "c" / "wide.png").write_bytes(_png(big))
  np.testing.assert_array_equal(sources.open_source(_data_cfg(**cfg, image_size=32), "s")[0]["image"],
                                big[4:36, 14:46])  # no resize: center crop
  with pytest.raises(sources.ImageTooSmallError, match="wide.png: image is 40x60, smaller than config.data.image_size=48"):
    sources.open_source(_data_cfg(**cfg, image_size=48), "s")[0]


def test_tfds_source(tmp_path):
  import tensorflow_datasets as tfds

  class TinyImages(tfds.core.GeneratorBasedBuilder):
    """A 2-class dataset written by the test (PNG bytes: no TensorFlow needed to build or read it)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=["ant", "bee"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": io.BytesIO(_png(np.full((10, 14, 3), 20 * i, np.uint8))), "label": i % 2}

  TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = sources.open_source(_data_cfg(source="tfds", tfds_name="tiny_images", tfds_data_dir=str(tmp_path),
                                      image_size=10), "test")
  assert len(src) == 3 and src.class_names == ["ant", "bee"] and src.relative_names == ["test[0]", "test[1]", "test[2]"]
  got = sorted((int(src[i]["image"][0, 0, 0]), src[i]["label"]) for i in range(3))
  assert got == [(0, 0), (20, 1), (40, 0)]
  assert src[0]["image"].shape == (10, 10, 3)  # 10x14 center-cropped
  # The records are decoded by msnet's reader (reader.decode), as folder files are: the pixel limit applies.
  limited = sources.open_source(_data_cfg(source="tfds", tfds_name="tiny_images", tfds_data_dir=str(tmp_path),
                                          image_size=10, max_pixels=139), "test")
  with pytest.raises(reader.PixelLimitError, match=r"tfds:tiny_images/test\[1\]: 14x10 = 140 pixels"):
    limited[1]


# ---- loaders ----

@pytest.fixture(scope="module")
def shard_workdir(tmp_path_factory):
  w = tmp_path_factory.mktemp("w")
  _write_spec(w, "test", "clean", 203, 50)
  _write_spec(w, "train", "clean", 64, 20, bin_=0)
  _write_spec(w, "train", "jpeg:10", 48, 20, bin_=1)
  return w


def _collect_eval(w, global_batch, mesh):
  batches = list(loader.eval_batches(w, "test", "clean", global_batch, mesh))
  for b in batches:
    assert b["image"].shape == (global_batch, IMAGE, IMAGE, 3) and b["mask"].dtype == bool
    assert b["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  ids = np.concatenate([_index(b["image"]) for b in batches])[mask]
  labels = np.concatenate([np.asarray(b["label"]) for b in batches])[mask]
  return batches, ids, labels


def test_eval_every_record_once_8_devices(shard_workdir):
  assert jax.device_count() == 8
  batches, ids, labels = _collect_eval(shard_workdir, 16, parallel.make_mesh([("data", -1)]))
  assert len(batches) == 13  # ceil(203 / 16), last one padded
  assert ids.tolist() == list(range(203)) and labels.tolist() == [i % 10 for i in range(203)]


def test_eval_every_record_once_1_device(shard_workdir):
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  batches, ids, _ = _collect_eval(shard_workdir, 10, mesh)
  assert len(batches) == 21 and ids.tolist() == list(range(203))


def test_eval_process_parts(shard_workdir):
  """3 simulated processes: disjoint contiguous parts, the same number of batches each."""
  source = shards.open_shards(shards.spec_dir(shard_workdir, "test", "clean"))
  n, count, local = len(source), 3, 8
  per = -(-n // count)
  parts = [list(loader.local_eval_batches(source, min(p * per, n), min((p + 1) * per, n), local, -(-per // local)))
           for p in range(count)]
  assert len({len(p) for p in parts}) == 1
  ids = [i for p in parts for b in p for i in _index(b["image"])[b["mask"]]]
  assert ids == list(range(n))


def test_eval_batch_must_divide(shard_workdir):
  with pytest.raises(ValueError, match="divisible by the 'data' mesh axis size \\(8\\)"):
    next(loader.eval_batches(shard_workdir, "test", "clean", 12, parallel.make_mesh([("data", -1)])))


def test_train_loader_epoch_flip_and_restore(shard_workdir):
  mesh = parallel.make_mesh([("data", -1)])
  make = lambda: loader.TrainLoader(shard_workdir, "train", ["clean"], None, 16, 7, mesh, True, 0)
  tl = make()
  assert tl.num_records == 64
  first = [next(tl) for _ in range(4)]
  ids = np.concatenate([_index(b["image"]) for b in first])
  assert sorted(ids.tolist()) == list(range(64))  # one epoch: a permutation
  ramps = np.concatenate([np.asarray(b["image"])[:, 0, :, 2] for b in first])
  flipped = (ramps[:, 0] == IMAGE - 1).sum()
  assert 10 < flipped < 54 and all((r == np.arange(IMAGE)).all() or (r == np.arange(IMAGE)[::-1]).all() for r in ramps)
  assert first[0]["label"].dtype == np.int32 and first[0]["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  state = tl.get_state()
  expected = [next(tl) for _ in range(3)]  # crosses into the second epoch
  restored = make()
  restored.set_state(state)
  for e in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["image"], e["image"])
    np.testing.assert_array_equal(got["label"], e["label"])


def test_train_mixture_and_bin_labels(shard_workdir):
  mesh = parallel.make_mesh([("data", -1)])
  tl = loader.TrainLoader(shard_workdir, "train", ["clean", "jpeg:10"], [3.0, 1.0], 16, 0, mesh, False, 0,
                          label_key="bin")
  bins = np.concatenate([np.asarray(next(tl)["label"]) for _ in range(4)])
  assert (bins == 1).sum() == 16  # exactly 1/4 from jpeg:10 (bin 1)


def test_train_process_parts_form_the_global_batch(shard_workdir):
  """Simulated 2 processes read disjoint halves of exactly the records 1 process reads per step."""
  src = [shards.open_shards(shards.spec_dir(shard_workdir, "train", s)) for s in ("clean", "jpeg:10")]
  one = loader.train_dataset(src, None, 3, True, 16, 0, 1)
  two = [loader.train_dataset(src, None, 3, True, 8, p, 2) for p in range(2)]
  for step in range(9):
    parts = [two[p][step] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), one[step]["image"])


def test_train_loader_mp_prefetch_matches_threads(shard_workdir):
  mesh = parallel.make_mesh([("data", -1)])
  a = loader.TrainLoader(shard_workdir, "train", ["clean"], None, 16, 1, mesh, True, 0)
  b = loader.TrainLoader(shard_workdir, "train", ["clean"], None, 16, 1, mesh, True, 1)
  for _ in range(3):
    np.testing.assert_array_equal(next(a)["image"], next(b)["image"])
  state = b.get_state()
  after = next(b)
  c = loader.TrainLoader(shard_workdir, "train", ["clean"], None, 16, 1, mesh, True, 1)
  c.set_state(state)
  np.testing.assert_array_equal(next(c)["image"], after["image"])


# Today's host-path order, recorded with the loader of commit 8604086 (Grain's threaded iterator over
# format-1 shards) on `shard_workdir` with label_key="bin": per batch of 16, the stream id of each record
# (index + 64 * bin: clean 0..63, jpeg:10 64..111) and whether it was flipped.
RECORDED = {
  (("clean",), None, 7): (
    "23 32 26 47 25 9 27 46 42 49 8 53 14 16 36 38 55 17 5 57 3 21 60 61 63 2 24 30 29 0 6 34 43 41 22 28 "
    "56 37 12 52 44 1 45 58 11 33 31 7 40 18 13 20 10 62 19 48 35 15 50 4 39 59 54 51 17 59 32 20 39 50 "
    "12 52 26 8 6 27 11 4 1 33 14 53 61 43 57 51 18 42 2 13 23 0 7 35 48 15 45 19 28 10 63 62 37 47 60 9 "
    "25 3 21 58 49 36 54 31 16 46 38 5 34 55 22 56 29 44 24 30 40 41 28 21 20 54 17 19 0 27 25 43 38 63 "
    "16 24 46 2 11 5 15 31 58 52 45 22 13 34 33 47 1 55 61 51",
    "0110110011100101001011011001011010001100010011101110001101001100010001100111011000101110001101011111"
    "110011000011110010000111101101011110000000100001101000001011"),
  (("clean", "jpeg:10"), None, 3): (
    "4 7 27 57 67 109 42 78 53 76 89 63 16 107 61 25 14 30 100 23 51 105 69 6 19 22 46 47 48 90 31 65 98 "
    "91 33 62 71 73 40 83 2 43 10 9 32 103 5 77 106 92 37 70 11 97 38 85 18 86 87 58 36 59 45 44 74 111 "
    "49 35 21 41 56 110 102 8 1 24 15 101 80 72 75 50 34 0 12 28 93 99 54 3 104 60 20 79 95 13 108 68 84 "
    "29 88 52 81 17 39 94 96 82 26 55 64 66 13 27 12 102 53 65 97 8 85 41 47 103 10 22 49 50",
    "0111100110010101100001000100111100010100100001101111000111010010000101111000110001111110011100110111"
    "0000101001001100000011110001"),
  (("clean", "jpeg:10"), (3.0, 1.0), 5): (
    "30 63 59 87 60 12 25 96 17 5 1 90 18 61 22 111 57 19 7 89 36 28 54 73 27 4 58 91 49 3 45 110 26 56 0 "
    "106 15 53 62 82 16 37 41 72 35 13 47 83 21 33 31 78 8 48 38 80 43 11 20 100 10 52 42 102 51 34 39 "
    "104 40 29 2 81 23 14 9 69 50 32 24 79 44 46 6 67 55 23 32 85 26 47 25 103 9 27 46 68 42 49 8 84 53 "
    "14 16 66 36 38 55 88 17 5 57 94 3 21 60 93 61 63 2 64 24 30 29 70 0 6 34 98 43 41 22 107 28 56 37 "
    "105 12 52 44 86 1 45 58 92 11 33 31 99 7 40 18 101 13 20 10 76 62 19 48 74",
    "0000001000101110100100111010101111011001110000000011111110110000101001100000010101110100010111011010"
    "110000110011100100001101010111001010111101111011000101011000"),
}


@pytest.mark.parametrize("args", list(RECORDED))
def test_host_path_keeps_todays_order_and_flips(shard_workdir, args):
  specs, weights, seed = args
  ids, flips = (np.array(RECORDED[args][0].split(), int), np.array(list(RECORDED[args][1]), int))
  mesh = parallel.make_mesh([("data", -1)])
  tl = loader.TrainLoader(shard_workdir, "train", list(specs), weights and list(weights), 16, seed, mesh, True, 0,
                          label_key="bin")
  batches = [next(tl) for _ in range(len(ids) // 16)]
  assert tl.get_state() == {"next_index": len(batches)}  # the state Grain's threaded iterator saved
  got = np.concatenate([_index(b["image"]) + 64 * np.asarray(b["label"]) for b in batches])
  ramps = np.concatenate([np.asarray(b["image"])[:, 0, :, 2] for b in batches])
  np.testing.assert_array_equal(got, ids)
  np.testing.assert_array_equal(ramps[:, 0] == IMAGE - 1, flips.astype(bool))
  assert all((r == np.arange(IMAGE)).all() or (r == np.arange(IMAGE)[::-1]).all() for r in ramps)


@pytest.mark.parametrize("lengths,weights,seed", [([64], None, 7), ([64, 48], None, 3), ([64, 48], [3.0, 1.0], 5),
                                                  ([7, 30, 11], [0.7, 0.2, 0.1], 2**32 - 4), ([1, 5], [1.0, 1.0], 0)])
def test_stream_ids_are_grains_ids(lengths, weights, seed):
  """The NumPy ids of the threaded path equal Grain's pipeline over several epochs, from any position."""
  n = 6 * sum(lengths)
  reference = loader.id_dataset(lengths, weights, seed).repeat()
  want = np.array([reference[i] for i in range(n)])
  ids = loader._StreamIds(lengths, weights, seed)
  np.testing.assert_array_equal(ids(np.arange(n)), want)
  positions = np.random.default_rng(0).permutation(n)[:50]
  np.testing.assert_array_equal(loader._StreamIds(lengths, weights, seed)(positions), want[positions])


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 65536, 65537, 70001])
def test_vectorised_permutation_is_grains_index_shuffle(n):
  """Grain's C++ index_shuffle, element by element, is the reference (65537: its 16-bit block, where index
  65536 aliases 0 and the 'permutation' repeats an element: matched too)."""
  from grain.experimental import index_shuffle
  for seed in (0, 1, 12345, 2**31 + 7, 2**32 - 1):
    want = np.fromiter((index_shuffle(j, n - 1, seed, 4) for j in range(n)), np.int64, count=n)
    np.testing.assert_array_equal(loader._permutation(n, seed), want)


def _batches(loader_, steps):
  return [{k: np.asarray(v) for k, v in next(loader_).items()} for _ in range(steps)]


@pytest.mark.parametrize("specs,weights,label_key", [(["clean"], None, "label"),
                                                     (["clean", "jpeg:10"], None, "bin"),
                                                     (["clean", "jpeg:10"], [3.0, 1.0], "label")])
def test_host_cache_gives_the_streamed_batches_and_states(shard_workdir, specs, weights, label_key):
  """Cached and streamed loaders: the same batches bit for bit over two epochs and more, and either one's
  state resumes the other at the same next batch."""
  mesh = parallel.make_mesh([("data", -1)])

  def make(cache):
    tl = loader.TrainLoader(shard_workdir, "train", specs, weights, 16, 11, mesh, True, 0, label_key=label_key,
                            host_cache=cache)
    assert tl.cached == (cache == "on")
    return tl
  cached, streamed = make("on"), make("off")
  steps = 2 * cached.num_records // 16 + 3
  want = _batches(streamed, steps)
  got = _batches(cached, steps)
  for w, g in zip(want, got):
    assert g["image"].dtype == w["image"].dtype and g["label"].dtype == w["label"].dtype == np.int32
    np.testing.assert_array_equal(g["image"], w["image"])
    np.testing.assert_array_equal(g["label"], w["label"])
  assert len({tuple(_index(b["image"])) for b in got}) == steps  # the stream moves: no repeated batch
  assert cached.get_state() == streamed.get_state() == {"next_index": steps}
  for source, target in (("off", "on"), ("on", "off")):
    a, b = make(source), make(target)
    _batches(a, 5)
    b.set_state(a.get_state())
    for w, g in zip(want[5:9], _batches(b, 4)):
      np.testing.assert_array_equal(g["image"], w["image"])
      np.testing.assert_array_equal(g["label"], w["label"])


def test_host_cache_on_1_device_gives_the_8_device_stream(shard_workdir):
  one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  make = lambda mesh, cache: loader.TrainLoader(shard_workdir, "train", ["clean", "jpeg:10"], [1.0, 2.0], 16, 4,
                                                mesh, True, 0, host_cache=cache)
  for w, g in zip(_batches(make(parallel.make_mesh([("data", -1)]), "off"), 16), _batches(make(one, "on"), 16)):
    np.testing.assert_array_equal(g["image"], w["image"])
    np.testing.assert_array_equal(g["label"], w["label"])


def test_host_cache_reader_matches_the_shard_reader_per_process(shard_workdir):
  """Simulated 2 processes: each process's cached batch equals its batch read from the shards (the flips
  by stream position)."""
  src = [shards.open_shards(shards.spec_dir(shard_workdir, "train", s)) for s in ("clean", "jpeg:10")]
  ids = np.random.default_rng(3).integers(0, sum(len(s) for s in src), 8)
  for p in range(2):
    cached = loader._CachedReader(src, "bin", 5, 8, p, 2)
    streamed = loader._BatchReader(src, {"label": "bin"}, 5, 8, p, 2)
    for k in range(3):
      want, got = streamed(k, ids), cached(k, ids)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])


def test_host_cache_budget(shard_workdir, monkeypatch):
  assert 0 < loader.available_memory() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  src = [shards.open_shards(shards.spec_dir(shard_workdir, "train", s)) for s in ("clean", "jpeg:10")]
  assert loader.cache_bytes(src, False) == (64 + 48) * (IMAGE * IMAGE * 3 + 4)
  nbytes = loader.cache_bytes(src, True)
  assert nbytes == (64 + 48) * (2 * IMAGE * IMAGE * 3 + 4)  # with flips, a mirrored copy of every image
  assert loader.use_host_cache("on", 10**15) and not loader.use_host_cache("off", 0)
  assert loader.use_host_cache(str(nbytes), nbytes) and not loader.use_host_cache(nbytes - 1, nbytes)
  monkeypatch.setattr(loader, "available_memory", lambda: 4 * nbytes)
  assert loader.use_host_cache("auto", nbytes) and not loader.use_host_cache("auto", nbytes + 1)
  mesh = parallel.make_mesh([("data", -1)])
  for budget, cached in ((nbytes, True), (nbytes - 1, False)):
    tl = loader.TrainLoader(shard_workdir, "train", ["clean", "jpeg:10"], None, 16, 0, mesh, True, 0,
                            host_cache=budget)
    assert tl.cached == cached


def test_read_arrays_into_given_arrays(shard_workdir):
  src = shards.open_shards(shards.spec_dir(shard_workdir, "train", "clean"))
  whole = src.read_arrays(fields=["label"])
  images, labels = np.zeros((70, IMAGE, IMAGE, 3), np.uint8), np.zeros(70, np.int32)
  got = src.read_arrays(10, 40, ["label"], out={"image": images[3:33], "label": labels[3:33]})
  assert got["image"].base is images
  np.testing.assert_array_equal(images[3:33], whole["image"][10:40])
  np.testing.assert_array_equal(labels[3:33], whole["label"][10:40])
  assert not images[:3].any() and not images[33:].any()
  with pytest.raises(ValueError, match=r"read_arrays out: \['image'\] must be C-contiguous"):
    src.read_arrays(0, 8, ["label"], out={"image": images[0:16:2], "label": labels[:8]})
  with pytest.raises(ValueError, match=r"\['label'\]"):
    src.read_arrays(0, 8, ["label"], out={"image": images[:8], "label": labels[:8].astype(np.int64)})
  with pytest.raises(ValueError, match=r"decode_batch out: .* of shape \(2, 8, 8, 3\)"):
    shards.decode_batch(src.read_batch([0, 1]), ["label"], out=images[:3])


def test_host_cache_config_field():
  c = config_lib.base_config()
  assert c.train.host_cache == "auto"
  for ok in ("auto", "on", "off", "2e9", "0"):
    c.train.host_cache = ok
    config_lib.validate(c)
  for bad in ("yes", "-1", "1e9 bytes"):
    c.train.host_cache = bad
    with pytest.raises(config_lib.ConfigError, match="train.host_cache"):
      config_lib.validate(c)
  c.train.host_cache, c.train.num_workers = "on", 2
  with pytest.raises(config_lib.ConfigError, match="train.host_cache: 'on' reads .* num_workers"):
    config_lib.validate(c)
