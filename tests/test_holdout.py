"""The hold-out slice of the training split: which records, which specs, which bytes, refusals, the accessor."""

import json
import os
import shutil

import numpy as np
import PIL.Image
import pytest

from msnet import config as config_lib
from msnet import degradations, errors
from msnet.data import degrade, loader, shards, sources

CLASSES = ("a", "b", "c")
PER_CLASS = 7          # train images per class: 21 source records, in round-robin order a0 b0 c0 a1 ...
HELD_OUT = 6           # records [15, 21) are held out: shards [15, 19), [19, 21), not aligned with train's
CORRUPT = 20           # train/c/6.png, the last record: unreadable, so skipped in the holdout
SEED = 5


def _folder(root):
  """An ImageFolder with train/<class>/<k>.png (one of them empty) and a small val split."""
  rng = np.random.default_rng(0)
  for split, count in (("train", PER_CLASS), ("val", 2)):
    for c in CLASSES:
      (root / split / c).mkdir(parents=True)
      for k in range(count):
        PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{k}.png")
  (root / "train" / "c" / f"{PER_CLASS - 1}.png").write_bytes(b"")


def _config(root, holdout=HELD_OUT):
  c = config_lib.base_config()
  c.data.source, c.data.path, c.data.eval_split = "folder", str(root), "val"
  c.data.holdout_examples = holdout
  config_lib.cifar_jp2k(c)
  for b in c.bins:
    b.train_specs = b.train_specs[:1]                 # jpeg:5, jp2k:12
  c.bins[0].train_specs = ("clean", "noise:20")       # noise is seeded by the source index
  c.stages.deepcloak.train_specs = ("blur:1",)        # a stage's spec: trained on, not held out
  c.evaluate.sweeps = ()
  c.degrade.records_per_shard, c.degrade.num_workers = 4, 0
  c.seed = SEED
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(folder, workdir with the hold-out, workdir of the same config without one)."""
  tmp = tmp_path_factory.mktemp("holdout")
  _folder(tmp / "f")
  held, plain = tmp / "held", tmp / "plain"
  degrade.run_degrade(_config(tmp / "f"), held)
  degrade.run_degrade(_config(tmp / "f", holdout=0), plain)
  return tmp / "f", held, plain


def _indices(workdir, split, spec):
  recs = shards.open_shards(shards.spec_dir(workdir, split, spec))
  return [recs[i]["index"] for i in range(len(recs))]


def _manifest(workdir):
  return shards.read_json(workdir / "data" / "manifest.json")


def test_holdout_specs_are_clean_and_the_bins_train_specs():
  c = config_lib.base_config()
  c.stages.branch.train_specs = ("noise:20",)
  c.bins[1].train_specs = ("jpeg:10", "jpeg:10@420", "jpeg:20")  # canonical duplicates are dropped
  assert degrade.holdout_specs(c) == ["clean", "jpeg:10", "jpeg:20", "jp2k:100", "jp2k:150", "jp2k:200", "jp2k:300"]
  assert "noise:20" in degrade.all_train_specs(c)


def test_train_keeps_the_first_records_and_holdout_the_last(runs):
  root, held, _ = runs
  m = _manifest(held)
  assert set(m["splits"]) == {"train", "val", degrade.HOLDOUT}
  train, hold = m["splits"]["train"], m["splits"][degrade.HOLDOUT]
  n = len(CLASSES) * PER_CLASS
  assert train["num_records_used"] == n - HELD_OUT and train["skipped"] == []
  assert hold["role"] == "holdout" and hold["source_split"] == "train"
  assert hold["first_source_record"] == n - HELD_OUT and hold["num_records_used"] == HELD_OUT
  assert hold["class_names"] == list(CLASSES) and hold["num_source_records"] == n
  assert hold["skipped"] == [CORRUPT] and hold["skipped_names"] == [f"train/c/{PER_CLASS - 1}.png"]
  assert list(hold["specs"]) == sorted(["clean", "noise:20", "jpeg:5", "jp2k:12"])
  assert "blur:1@4" in train["specs"]
  kept = list(range(n - HELD_OUT, n))
  kept.remove(CORRUPT)
  for spec in hold["specs"]:
    assert hold["specs"][spec]["dir"] == f"{degrade.HOLDOUT}/{degradations.spec_slug(spec)}"
    assert _indices(held, degrade.HOLDOUT, spec) == kept
    assert _indices(held, "train", spec) == list(range(n - HELD_OUT))
  # Round-robin order: record i is of class i % 3, so the held-out records cover every class.
  source = sources.open_source(_config(root).data, "train")
  labels = [r["label"] for r in loader.holdout_source(held, "clean")]
  assert labels == [source[i]["label"] for i in kept] == [i % len(CLASSES) for i in kept]


def test_held_out_records_have_the_bytes_of_the_train_split(runs):
  root, held, plain = runs
  n = len(CLASSES) * PER_CLASS
  source = sources.open_source(_config(root).data, "train")
  for spec in degrade.holdout_specs(_config(root)):
    hold = shards.open_shards(shards.spec_dir(held, degrade.HOLDOUT, spec))
    whole = shards.open_shards(shards.spec_dir(plain, "train", spec))
    assert _indices(plain, "train", spec) == [i for i in range(n) if i != CORRUPT]
    for j in range(len(hold)):
      i = hold[j]["index"]
      assert hold.read(j) == whole.read(i)
      image, _ = degradations.apply(spec, source[i]["image"], seed=SEED, index=i)
      np.testing.assert_array_equal(hold[j]["image"], image)
    train = shards.open_shards(shards.spec_dir(held, "train", spec))
    assert [train.read(i) for i in range(len(train))] == [whole.read(i) for i in range(n - HELD_OUT)]


def test_no_holdout_no_third_split(runs):
  _, _, plain = runs
  m = _manifest(plain)
  assert set(m["splits"]) == {"train", "val"}
  assert set(m["splits"]["train"]) == {"role", "num_source_records", "num_records_used", "class_names", "specs",
                                       "skipped", "skipped_names"}
  assert m["splits"]["train"]["num_records_used"] == len(CLASSES) * PER_CLASS
  assert not (plain / "data" / degrade.HOLDOUT).exists()


def test_config_saved_before_the_field_plans_no_holdout(runs):
  root, _, _ = runs
  saved = json.loads(config_lib.to_json(_config(root, holdout=0)))
  del saved["data"]["holdout_examples"]
  header, units = degrade.plan(config_lib.from_json(json.dumps(saved)))
  assert set(header["splits"]) == {"train", "val"} and {u.split for u in units} == {"train", "val"}


def test_max_train_examples_then_holdout(runs):
  root, _, _ = runs
  c = _config(root, holdout=5)
  c.data.max_train_examples = 18
  header, units = degrade.plan(c)
  assert header["splits"]["train"]["num_records_used"] == 13
  assert header["splits"][degrade.HOLDOUT]["first_source_record"] == 13
  for split, records in (("train", range(13)), (degrade.HOLDOUT, range(13, 18))):
    covered = {spec: [i for u in units if u.split == split and u.spec == spec for i in range(u.start, u.stop)]
               for spec in header["splits"][split]["specs"]}
    assert all(v == list(records) for v in covered.values())
  assert {u.source_split for u in units if u.split == degrade.HOLDOUT} == {"train"}


@pytest.mark.parametrize("max_train, holdout", [(-1, 21), (-1, 50), (18, 18)])
def test_holdout_of_every_record_refused(runs, max_train, holdout):
  root, _, _ = runs
  c = _config(root, holdout=holdout)
  c.data.max_train_examples = max_train
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.holdout_examples: .* set it below"):
    degrade.plan(c)


@pytest.mark.parametrize("max_train, holdout", [(-1, -1), (512, 512)])
def test_validate_refuses_holdout(max_train, holdout):
  c = config_lib.base_config()
  c.data.max_train_examples, c.data.holdout_examples = max_train, holdout
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.holdout_examples"):
    config_lib.validate(c)


def test_split_named_holdout_refused(runs):
  root, _, _ = runs
  c = _config(root)
  c.data.eval_split = degrade.HOLDOUT
  with pytest.raises(config_lib.ConfigError, match="data.holdout_examples.*rename that split"):
    degrade.plan(c)


def test_rerun_has_nothing_to_do(runs, capsys):
  root, held, plain = runs
  for workdir, holdout in ((held, HELD_OUT), (plain, 0)):
    before = {p: os.stat(p).st_mtime_ns for p in (workdir / "data").rglob("*")}
    degrade.run_degrade(_config(root, holdout=holdout), workdir)
    assert "nothing to do" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in (workdir / "data").rglob("*")} == before


def test_adding_a_holdout_to_a_workdir_gives_the_holdout_run(runs, tmp_path):
  root, held, plain = runs
  w = tmp_path / "w"
  shutil.copytree(plain, w)
  degrade.run_degrade(_config(root), w)

  def files(workdir):
    return {s["file"]: s["sha256"] for e in _manifest(workdir)["splits"].values() for spec in e["specs"].values()
            for s in spec["shards"]}
  assert files(w) == files(held)
  assert sorted(p.relative_to(w) for p in w.rglob(f"*{shards.SHARD_SUFFIX}")) == sorted(
      p.relative_to(held) for p in held.rglob(f"*{shards.SHARD_SUFFIX}"))


def test_dropping_the_holdout_gives_its_records_back_to_train(runs, tmp_path):
  root, held, plain = runs
  w = tmp_path / "w"
  shutil.copytree(held, w)
  degrade.run_degrade(_config(root, holdout=0), w)
  assert _manifest(w)["splits"] == _manifest(plain)["splits"]
  with pytest.raises(errors.MissingInputError, match="holdout_examples > 0"):
    loader.holdout_source(w, "clean")  # the old holdout shards are still on disk, but no longer held out


def test_holdout_source(runs):
  _, held, plain = runs
  assert len(loader.holdout_source(held, "jpeg:5")) == HELD_OUT - 1
  assert loader.holdout_source(held, "jp2k:12")[0]["spec"] == "jp2k:12"
  with pytest.raises(errors.MissingInputError, match=r"holdout_examples > 0 and run `msnet degrade`"):
    loader.holdout_source(plain, "clean")
  with pytest.raises(errors.MissingInputError, match=r"'blur:1@4'.*bin's train_specs"):
    loader.holdout_source(held, "blur:1")
  with pytest.raises(errors.MissingInputError, match="holdout_examples > 0"):
    loader.holdout_source(held.parent / "nothing", "clean")
