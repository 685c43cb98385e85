"""`msnet.load(W).predict` and `msnet predict` on files, over a tiny workdir whose stages are real orbax
checkpoints of random params, on 8 fake CPU devices.

Proves: every rule's probabilities, branch and bin probabilities equal a float64 NumPy computation from the
models' logits (the calibrated rules at the calibrate stage's temperatures, the gate from its own checkpoint);
a rule whose stage is missing names the command that trains it; files decode to the pixels evaluate saw (a
PNG of the pixels, a JPEG made by the codec that made the shards); the bitstream rule routes a JPEG q=10 file
to the JPEG branch and a ratio-100 JPEG 2000 file to the JPEG 2000 branch without loading the master, a PNG
to the clean branch; any batch size compiles at most one program per bucket and padding never leaks; other
sizes are shaped as the sources are; bad rules, inputs and files are refused or skipped with their names.
"""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest

import msnet
from msnet import config as config_lib, degradations, errors, files, models, predict
from msnet.data import reader, sources
from msnet.degradations import codecs
from test_evaluate import _random_params  # He-scaled random params from a module's shapes

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RULES = ("baseline", "da_fc8", "deepcloak", "branch_clean", "branch_jp2k", "ms", "ams", "map", "oracle", "bitstream",
         "hybrid", "ams_cal", "map_cal", "gate", "branch_jpeg_cal")
TEMPERATURES = (0.6, 1.7, 3.2)  # the calibrate stage's, per branch (clean, jpeg, jp2k), fitted on every bin
OWN_BIN_TEMPERATURES = (1.4, 0.8, 2.1)  # each branch's on its own bin (map_cal, branch_<bin>_cal)
MASTER_TEMPERATURE = 2.5


def _config() -> Any:
  c = config_lib.base_config()
  c.model.width = 0.0625
  c.model.fc_width = 16
  c.master.conv_features = (4, 4, 4)
  c.master.fc_features = (8, 8)
  c.evaluate.global_batch = 16  # buckets 8, 16 on 8 devices
  return c


def _save_stage(workdir: pathlib.Path, stage: str, params: Any) -> None:
  """A completed stage as the train loop leaves it: ckpt/<step>/state holding {"params": ...}, and DONE.json."""
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(workdir / "train" / stage / "ckpt" / "3" / "state", {"params": params})
  (workdir / "train" / stage / "DONE.json").write_text(json.dumps({"stage": stage}))


def _softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
  workdir = tmp_path_factory.mktemp("w")
  cfg = _config()
  (workdir / "config.json").write_text(config_lib.to_json(cfg))
  (workdir / "data").mkdir()
  (workdir / "data" / "manifest.json").write_text(json.dumps({"splits": {"test": {"class_names": NAMES}}}))
  single, master = models.build_slave(cfg.model, 10, 1), models.build_master(cfg.master, 3)
  rng = np.random.default_rng(0)
  base = _random_params(single, rng)
  params = {"baseline": base, "master": _random_params(master, rng),
            **{s: dict(_random_params(single, rng), trunk=base["trunk"])
               for s in ("branch_jpeg", "branch_jp2k", "da_fc8")}}
  slave = models.build_slave(cfg.model, 10, 3)
  slave_params = dict(base, branches=jax.tree.map(lambda *b: np.concatenate(b), base["branches"],
                                                  params["branch_jpeg"]["branches"], params["branch_jp2k"]["branches"]))
  gate = _random_params(master, rng)
  for stage, p in params.items():
    _save_stage(workdir, stage, p)
  _save_stage(workdir, "gate", {"gate": gate, "slave": slave_params})  # as the gate stage saves: the frozen slave too
  (workdir / "train" / "calibrate").mkdir()
  (workdir / "train" / "calibrate" / "DONE.json").write_text(json.dumps(
      {"stage": "calibrate", "temperatures": TEMPERATURES, "own_bin_temperatures": OWN_BIN_TEMPERATURES,
       "master_temperature": MASTER_TEMPERATURE}))
  mask = np.ones(base["trunk"]["conv4_3"]["bias"].shape, np.float32)
  mask[::3] = 0.0
  (workdir / "train" / "deepcloak").mkdir()
  np.save(workdir / "train" / "deepcloak" / "feature_mask.npy", mask)
  (workdir / "train" / "deepcloak" / "DONE.json").write_text("{}")
  f_single = jax.jit(lambda p, x, m=None: single.apply({"params": p}, x, feature_mask=m))
  f_slave = jax.jit(lambda p, x: slave.apply({"params": p}, x))
  f_master = jax.jit(lambda p, x: master.apply({"params": p}, x))

  def reference(rule: str, x: np.ndarray, bins: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """(probs, branch, bin_probs) in float64 NumPy from the models' logits on one device."""
    x = jnp.asarray(x)
    rows = np.arange(len(x))
    none = np.full(len(x), -1)
    if rule in ("baseline", "da_fc8"):
      return _softmax(f_single(params[rule], x))[0], none, None
    if rule == "deepcloak":
      return _softmax(f_single(base, x, mask))[0], none, None
    logits = np.asarray(f_slave(slave_params, x), np.float64)  # [K, B, C]
    branch = _softmax(logits)
    tempered = _softmax(logits / np.asarray(TEMPERATURES)[:, None, None])
    own = _softmax(logits / np.asarray(OWN_BIN_TEMPERATURES)[:, None, None])
    master_logits = np.asarray(f_master(params["master"], x), np.float64)
    pbin = _softmax(master_logits)
    if rule.startswith("branch_"):
      name = rule[len("branch_"):].removesuffix("_cal")
      k = ["clean", "jpeg", "jp2k"].index(name)
      return (own if rule.endswith("_cal") else branch)[k], np.full(len(x), k), None
    if rule in ("map_cal", "gate"):  # MAP with the calibrated master over tempered branches; with the gate
      weights = (_softmax(master_logits / MASTER_TEMPERATURE) if rule == "map_cal"
                 else _softmax(f_master(gate, x)))
      return np.einsum("bk,kbc->bc", weights, own if rule == "map_cal" else branch), weights.argmax(-1), weights
    if rule in ("ms", "map"):
      probs = branch[pbin.argmax(-1), rows] if rule == "ms" else np.einsum("bk,kbc->bc", pbin, branch)
      return probs, pbin.argmax(-1), pbin
    if rule in ("ams", "ams_cal"):
      per_branch = tempered if rule == "ams_cal" else branch
      probs = per_branch.max(0)
      return probs, per_branch[:, rows, probs.argmax(-1)].argmax(0), None
    if rule == "hybrid":  # the bitstream's bin where it is a degradation bin, else the master's
      route = np.where(bins != 0, bins, pbin.argmax(-1))
      return branch[route, rows], route, pbin
    return branch[bins, rows], bins, None

  return dict(workdir=workdir, cfg=cfg, reference=reference)


@pytest.fixture(scope="module")
def predictor(setup: dict[str, Any]) -> predict.Predictor:
  return msnet.load(setup["workdir"])


def _images(n: int, seed: int = 1, size: int = 32) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _check(out: dict[str, Any], ref: tuple[np.ndarray, np.ndarray, Any], rule: str) -> None:
  probs, branch, bin_probs = ref
  np.testing.assert_allclose(out["probs"], probs, atol=1e-5, err_msg=rule)
  assert out["probs"].dtype == np.float32
  np.testing.assert_array_equal(out["branch"], branch, err_msg=rule)
  np.testing.assert_array_equal(out["top_k"][:, 0], probs.argmax(-1), err_msg=rule)
  np.testing.assert_allclose(out["top_k_probs"], np.take_along_axis(probs, out["top_k"], -1), atol=1e-5)
  assert (np.diff(out["top_k_probs"], axis=-1) <= 0).all()
  if bin_probs is None:
    assert out["bin_probs"] is None, rule
  else:
    np.testing.assert_allclose(out["bin_probs"], bin_probs, atol=1e-5, err_msg=rule)


def test_every_rule_matches_numpy(setup: dict[str, Any], predictor: predict.Predictor) -> None:
  assert predictor.class_names == NAMES
  assert set(predictor.rules) == {*RULES, "branch_jpeg", "branch_clean_cal", "branch_jp2k_cal"}  # trained stages' only
  x = _images(5)
  bins = np.array([0, 1, 2, 1, 0])
  outs = {}
  for rule in RULES:
    outs[rule] = predictor.predict(x, rule=rule, top_k=3, bins=bins)
    assert outs[rule]["top_k"].shape == (5, 3)
    _check(outs[rule], setup["reference"](rule, x, bins), rule)
  # The temperatures and the gate change the probabilities, so the references above can tell them apart.
  for rule, uncalibrated in (("ams_cal", "ams"), ("map_cal", "map"), ("gate", "map"), ("branch_jpeg_cal", None)):
    other = outs[uncalibrated]["probs"] if uncalibrated else setup["reference"]("branch_jpeg", x)[0]
    assert np.abs(outs[rule]["probs"] - other).max() > 1e-3, rule
  assert np.abs(outs["map_cal"]["bin_probs"] - outs["map"]["bin_probs"]).max() > 1e-3


def test_missing_extension_stage_names_its_command(tmp_path: pathlib.Path) -> None:
  """Without the calibrate or gate stage, their rules say which `msnet train` to run, and that calibrate needs
  a hold-out when the workdir has none; they load nothing."""
  for holdout in (0, 100):
    workdir = tmp_path / f"holdout{holdout}"
    cfg = _config()
    cfg.data.holdout_examples = holdout
    (workdir / "train").mkdir(parents=True)
    (workdir / "config.json").write_text(config_lib.to_json(cfg))
    for stage in ("baseline", "branch_jpeg", "branch_jp2k", "master"):
      (workdir / "train" / stage).mkdir()
      (workdir / "train" / stage / "DONE.json").write_text("{}")
    p = msnet.load(workdir)
    assert {"ms", "map", "ams", "branch_jpeg"} <= set(p.rules) and not {"ams_cal", "map_cal", "gate"} & set(p.rules)
    for rule in ("ams_cal", "map_cal", "branch_jpeg_cal"):
      with pytest.raises(errors.MissingInputError) as e:
        p.predict(_images(1), rule=rule)
      assert f"rule {rule!r} needs the training stage(s) calibrate, not complete in {workdir}" in str(e.value)
      assert f"run `msnet train --workdir={workdir} --stage=calibrate` first" in str(e.value)
      assert ("config.data.holdout_examples > 0" in str(e.value)) == (holdout == 0)
    with pytest.raises(errors.MissingInputError, match=r"rule 'gate' needs .* --stage=gate` first \(rules that"):
      p.predict(_images(1), rule="gate")
    assert p.loaded == []


def test_bitstream_reads_files_without_the_master(setup: dict[str, Any], tmp_path: pathlib.Path) -> None:
  """Files decode to evaluate's pixels (a PNG of them; a JPEG made by the shards' codec), and the bitstream
  rule takes each file's bin from its own bytes: JPEG q=10 -> jpeg, ratio-100 JPEG 2000 -> jp2k, PNG -> clean."""
  p = msnet.load(setup["workdir"])
  x = _images(2, seed=2)
  PIL.Image.fromarray(x[0]).save(tmp_path / "a.png")
  (tmp_path / "b.jpg").write_bytes(codecs.jpeg_encode(x[1], 10, "420"))
  big = _images(1, seed=3, size=96)[0]
  codestream = codecs.jp2k_encode_ratio(big, 100)
  (tmp_path / "c.jp2").write_bytes(codestream)
  read = [files.read_image(tmp_path / n) for n in ("a.png", "b.jpg", "c.jp2")]
  np.testing.assert_array_equal(read[0].image, x[0])
  np.testing.assert_array_equal(read[1].image, degradations.apply("jpeg:10", x[1])[0])  # the shard's pixels
  assert read[1].source == "bitstream: jpeg q=10" and read[0].source == "bitstream: lossless"
  _, info = degradations.apply("jp2k:100", big)
  assert read[2].bitstream["bpp"] == pytest.approx(info["bpp"])

  out = io.StringIO()
  assert files.predict_files(p, [tmp_path], rule="bitstream", top=2, as_json=True, out=out) == 0
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  assert [r["branch"] for r in records] == ["clean", "jpeg", "jp2k"]
  assert "master" not in p.loaded and p.loaded == ["slave"]
  pixels = np.stack([x[0], read[1].image, sources.shape(read[2].image, 32, 0, "c")])
  probs, _, _ = setup["reference"]("bitstream", pixels, np.array([0, 1, 2]))
  for r, ref in zip(records, probs):
    assert r["index"] == ref.argmax() and r["class"] == NAMES[ref.argmax()]
    assert r["prob"] == pytest.approx(ref.max(), abs=1e-5)
    assert [t["index"] for t in r["top"]] == list(np.argsort(-ref)[:2])


def test_jp2_container_counts_the_codestream_only(tmp_path: pathlib.Path) -> None:
  """A JP2 file's boxes and COM segments are not bits of the image: bpp is what `apply` measures."""
  image = _images(1, seed=4, size=64)[0]
  codestream = codecs.jp2k_encode_ratio(image, 50)
  com = b"\xff\x64" + (4 + 20).to_bytes(2, "big") + b"\x00\x01" + b"x" * 20  # a COM segment after SIZ
  siz_end = 4 + int.from_bytes(codestream[4:6], "big")  # SOC, then SIZ: marker, length
  with_com = codestream[:siz_end] + com + codestream[siz_end:]
  box = lambda kind, payload: (8 + len(payload)).to_bytes(4, "big") + kind + payload  # noqa: E731
  ihdr = box(b"ihdr", (64).to_bytes(4, "big") * 2 + (3).to_bytes(2, "big") + bytes([7, 7, 0, 0]))
  colr = box(b"colr", bytes([1, 0, 0]) + (16).to_bytes(4, "big"))
  jp2 = (reader.JP2_SIGNATURE + box(b"ftyp", b"jp2 " + bytes(4) + b"jp2 ") + box(b"jp2h", ihdr + colr)
         + box(b"jp2c", with_com))
  (tmp_path / "x.jp2").write_bytes(jp2)
  read = files.read_image(tmp_path / "x.jp2")
  np.testing.assert_array_equal(read.image, codecs.jp2k_decode(codestream))
  bpp = len(codestream) * 8 / 64 ** 2
  assert read.bitstream == {"codec": "jp2k", "level": 24 / bpp, "bpp": bpp}


def test_any_batch_size_compiles_per_bucket_only(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.chdir(setup["workdir"].parent)
  p = msnet.load(setup["workdir"].name, rules=["baseline"])  # a relative workdir
  assert p.buckets == [8, 16]
  assert predict.buckets(256, 1) == [8, 16, 32, 64, 128, 256]
  assert predict.buckets(100, 3) == [9, 18, 33, 66, 102] and predict.buckets(4, 1) == [4]
  x = _images(37, seed=5)
  ref = setup["reference"]("baseline", x)
  for n in (1, 3, 8, 9, 16, 20, 37):
    _check(p.predict(x[:n], rule="baseline"), tuple(r[:n] if r is not None else None for r in ref), f"B={n}")
  assert p.traces == {"baseline": 2}
  empty = p.predict(x[:0], rule="baseline")
  assert empty["probs"].shape == (0, 10) and empty["top_k"].shape == (0, 5)


def test_other_sizes_are_shaped_as_the_sources(setup: dict[str, Any], predictor: predict.Predictor) -> None:
  rng = np.random.default_rng(6)
  images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (36, 33), dtype=np.uint8),
            rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)]
  grey = np.repeat(images[1][..., None], 3, 2)
  expected = np.stack([sources.shape(images[0], 32, 0, "a"), sources.shape(grey, 32, 0, "b"), images[2][..., :3]])
  out = predictor.predict(images, rule="baseline")
  _check(out, setup["reference"]("baseline", expected), "shaped")
  with pytest.raises(sources.ImageTooSmallError, match=r"images\[0\]: image is 20x40.*resize_shorter"):
    predictor.predict([np.zeros((20, 40, 3), np.uint8)], rule="baseline")

  resizing = predict.Predictor(setup["workdir"], _config(), NAMES, 16)
  resizing.config.data.resize_shorter = 48
  shaped = resizing.shape(images[0])
  np.testing.assert_array_equal(shaped, sources.shape(images[0], 32, 48, "a"))
  assert not np.array_equal(shaped, expected[0])


def test_bad_rules_and_inputs_are_refused(setup: dict[str, Any], predictor: predict.Predictor) -> None:
  x = _images(2)
  with pytest.raises(errors.InvalidInputError, match=r"unknown rule 'mss'.*'ms'.*'bitstream'"):
    predictor.predict(x, rule="mss")
  workdir = setup["workdir"]
  with pytest.raises(errors.MissingInputError, match=rf"'da_fc67'.*msnet train --workdir={workdir} --stage=da_fc67"):
    predictor.predict(x, rule="da_fc67")
  with pytest.raises(errors.MissingInputError, match="alexnet_baseline"):
    msnet.load(workdir, rules=["alexnet_baseline"])
  for rule in ("oracle", "bitstream"):
    with pytest.raises(errors.InvalidInputError, match=rf"rule '{rule}' .*pass bins=\[B\]"):
      predictor.predict(x, rule=rule)
  with pytest.raises(errors.InvalidInputError, match=r"bins must be 2 integers in \[0, 3\)"):
    predictor.predict(x, rule="oracle", bins=[0, 3])
  with pytest.raises(errors.InvalidInputError, match=r"bins must be 2 integers"):
    predictor.predict(x, rule="oracle", bins=[0])
  with pytest.raises(errors.InvalidInputError, match=r"images\[0\]: image must be uint8, got dtype float32"):
    predictor.predict(x.astype(np.float32), rule="baseline")
  with pytest.raises(errors.InvalidInputError, match=r"one image: images\[None\]"):
    predictor.predict(x[0], rule="baseline")
  with pytest.raises(errors.MissingInputError, match="config.json not found"):
    msnet.load(workdir / "train")


def test_predict_files_skips_bad_files(predictor: predict.Predictor, tmp_path: pathlib.Path) -> None:
  PIL.Image.fromarray(_images(1)[0]).save(tmp_path / "good.png")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "broken.jpg").write_bytes(codecs.jpeg_encode(_images(1)[0], 50, "420")[:40])
  (tmp_path / "notes.txt").write_text("not an image")  # not an image suffix: not picked from a directory
  (tmp_path / "text.png").write_text("not an image either")
  out, err = io.StringIO(), io.StringIO()
  assert files.predict_files(predictor, [tmp_path], rule="ms", top=3, out=out, err=err) == 2
  lines = out.getvalue().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'good.png'}: ")
  assert "| branch " in lines[0] and "(master) | top 3: " in lines[0]
  assert f"skipped {tmp_path / 'sub' / 'broken.jpg'}: cannot decode image" in err.getvalue()
  assert f"skipped {tmp_path / 'text.png'}: not an image: neither JPEG" in err.getvalue()
  assert "skipped 2 of 3 files" in err.getvalue()
  with pytest.raises(errors.InvalidInputError, match="none of the 1 files"):
    files.predict_files(predictor, [tmp_path / "sub"], out=out, err=err)
  with pytest.raises(errors.MissingInputError, match="nowhere.jpg: no such file"):
    files.predict_files(predictor, [tmp_path / "nowhere.jpg"], out=out, err=err)
  with pytest.raises(errors.InvalidInputError, match="true bin"):
    files.predict_files(predictor, [tmp_path], rule="oracle", out=out, err=err)
  out = io.StringIO()
  assert files.predict_files(predictor, [tmp_path / "good.png"], rule="gate", top=1, as_json=True, out=out) == 0
  (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
  assert record["bin_source"] == "gate" and record["rule"] == "gate"
  assert record["branch"] == max(record["bin_probs"], key=record["bin_probs"].get)


def test_odd_files_are_skipped_and_the_rest_printed(predictor: predict.Predictor, tmp_path: pathlib.Path) -> None:
  """Files Pillow half-reads and decompression bombs, in one batch with good files: the good ones are classified
  and printed, every odd one is named and skipped (test_reader.py makes the files)."""
  from test_reader import _odd_files  # noqa: PLC0415 (the odd files of the reader tests)
  odd = _odd_files()
  for name, data in odd.items():
    (tmp_path / name).write_bytes(data)
  for k in range(3):
    PIL.Image.fromarray(_images(1, seed=k)[0]).save(tmp_path / f"good{k}.png")
  out, err = io.StringIO(), io.StringIO()
  assert files.predict_files(predictor, [tmp_path], rule="ms", top=1, out=out, err=err) == len(odd)
  assert sorted(pathlib.Path(line.split(": ")[0]).name for line in out.getvalue().splitlines()) == [
      "good0.png", "good1.png", "good2.png"]
  for name in odd:
    assert f"skipped {tmp_path / name}: " in err.getvalue(), name
  assert "pixels is more than the limit of 89,478,485" in err.getvalue()
  out, err = io.StringIO(), io.StringIO()
  with pytest.raises(errors.InvalidInputError, match="none of the 1 files"):
    files.predict_files(predictor, [tmp_path / "good0.png"], out=out, err=err, max_pixels=32 * 32 - 1)
  assert "1,024 pixels is more than the limit of 1,023" in err.getvalue()


def test_cli_predict(setup: dict[str, Any], tmp_path: pathlib.Path) -> None:
  PIL.Image.fromarray(_images(1)[0]).save(tmp_path / "a.png")
  (tmp_path / "b.jpg").write_bytes(codecs.jpeg_encode(_images(1, seed=7)[0], 10, "420"))
  (tmp_path / "c.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  cli = [sys.executable, "-m", "msnet.cli", "predict", f"--workdir={setup['workdir']}"]
  run = lambda *a: subprocess.run([*cli, *a], capture_output=True, text=True, timeout=600)  # noqa: E731
  proc = run("--rule=bitstream", "--top=2", "--json", str(tmp_path))
  assert proc.returncode == files.SKIPPED_EXIT_CODE, proc.stderr[-2000:]
  records = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [(pathlib.Path(r["path"]).name, r["branch"], r["bin_source"]) for r in records] == [
      ("a.png", "clean", "bitstream: lossless"), ("b.jpg", "jpeg", "bitstream: jpeg q=10")]
  assert all(len(r["top"]) == 2 for r in records)
  assert f"skipped {tmp_path / 'c.jpg'}" in proc.stderr
  proc = run(str(tmp_path / "a.png"), str(tmp_path / "missing.png"))
  assert proc.returncode == 2 and "missing.png: no such file" in proc.stderr
  proc = run("--max-pixels=1000", str(tmp_path / "a.png"))
  assert proc.returncode == 2 and "1,024 pixels is more than the limit of 1,000" in proc.stderr
