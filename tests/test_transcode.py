"""Images compressed more than once: the `resize` op against Pillow, chains of encodes against Pillow's codecs,
the true bin against the bin a receiver reads, the `hybrid` rule against NumPy (alone, in `msnet evaluate` and
in `msnet predict` on files) and the report's transcoding section against a direct paired bootstrap."""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from PIL import Image

from msnet import config as config_lib, decision, degradations as D, evaluate, files
from msnet.evaluate import plan as plan_lib
from msnet.report import stats, transcode as report_transcode
from test_degradations import cifar_images, pillow_jpeg
from test_evaluate import RECORDS, _counts, _softmax, setup, trained  # noqa: F401 (fixtures)

CIFAR_BINS = [[], ["jpeg:1-20"], ["jp2k:12-inf"]]  # config.cifar_jp2k's bins


# -------------------------------------------------------------------------------------------------- resize

@pytest.mark.parametrize("shape, factor, small", [
    ((32, 32), 0.5, (16, 16)), ((32, 32), 0.3, (10, 10)), ((20, 33), 0.5, (17, 10)),  # 16.5 rounds up
    ((32, 32), 1.7, (54, 54)), ((5, 3), 0.1, (1, 1)),  # at least one pixel
])
@pytest.mark.parametrize("resample", ["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"])
def test_resize_equals_pillow_down_and_back(shape, factor, small, resample):
  img = np.ascontiguousarray(np.tile(cifar_images()[3], (2, 2, 1))[:shape[0], :shape[1]])
  method = getattr(Image.Resampling, resample.upper())
  expected = np.asarray(Image.fromarray(img).resize(small, method).resize(shape[::-1], method))
  spec = f"resize:{factor}" + ("" if resample == "bicubic" else f"@{resample}")
  out, info = D.apply(spec, img)
  assert out.shape == img.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)
  assert info["codec"] is None and info["bpp"] is None and info["psnr"] == pytest.approx(D.psnr(img, expected))
  np.testing.assert_array_equal(D.apply(spec, img)[0], out)  # deterministic: no random numbers


def test_resize_by_one_is_the_identity_and_a_downscale_loses_detail():
  img = cifar_images()[5]
  out, info = D.apply("resize:1", img)
  np.testing.assert_array_equal(out, img)
  assert info["psnr"] == math.inf
  assert 15 < D.apply("resize:0.5", img)[1]["psnr"] < 40


@pytest.mark.parametrize("text, canonical, slug", [
    ("resize:0.50", "resize:0.5", "resize-0p5"), ("resize:0.5@bicubic", "resize:0.5", "resize-0p5"),
    ("resize:0.25@lanczos", "resize:0.25@lanczos", "resize-0p25flanczos"), ("resize:2.0", "resize:2", "resize-2"),
    ("jpeg:10+resize:0.5+jpeg:75", "jpeg:10+resize:0.5+jpeg:75", "jpeg-10_resize-0p5_jpeg-75"),
])
def test_resize_parses_to_one_canonical_string(text, canonical, slug):
  spec = D.parse(text)
  assert str(spec) == canonical and D.parse(canonical) == spec and D.spec_slug(text) == slug
  assert spec.ops[-1] == D.parse(canonical).ops[-1]


@pytest.mark.parametrize("bad, named", [
    ("resize:0", "resize factor must be > 0"), ("resize:4.5", "resize factor must be <= 4"),
    ("resize:0.5@cubic", "resize filter must be one of"), ("resize", "'resize'"), ("resize:-1", "resize:-1"),
    ("resize:0.5@", "resize filter"),
])
def test_resize_errors_name_the_bad_part(bad, named):
  with pytest.raises(ValueError, match=named):
    D.parse(bad)


# ------------------------------------------------------------------------------------------- chains of encodes

def test_chains_equal_pillow_and_report_the_last_encode():
  img = cifar_images()[11]
  first, _ = pillow_jpeg(img, 10, 2)
  expected, data = pillow_jpeg(first, 90, 2)
  out, info = D.apply("jpeg:10+jpeg:90", img)
  np.testing.assert_array_equal(out, expected)
  assert info["codec"] == "jpeg" and info["level"] == 90
  assert info["bpp"] == len(data) * 8 / (32 * 32) and info["psnr"] == pytest.approx(D.psnr(img, expected))

  bicubic = Image.Resampling.BICUBIC
  resized = np.asarray(Image.fromarray(first).resize((16, 16), bicubic).resize((32, 32), bicubic))
  expected, data = pillow_jpeg(resized, 75, 2)
  out, info = D.apply("jpeg:10+resize:0.5+jpeg:75", img)
  np.testing.assert_array_equal(out, expected)
  assert info["level"] == 75 and info["bpp"] == len(data) * 8 / (32 * 32)

  jp2k, jp2k_info = D.apply("jp2k:20", img)
  expected, data = pillow_jpeg(jp2k, 90, 2)
  out, info = D.apply("jp2k:20+jpeg:90", img)
  np.testing.assert_array_equal(out, expected)
  assert info["codec"] == "jpeg" and info["level"] == 90 and info["ratio"] == img.nbytes / len(data)
  assert info["ratio"] != jp2k_info["ratio"]


@pytest.mark.parametrize("spec, true_bin, read_bin", [
    ("jpeg:10+jpeg:90", 1, 0), ("jpeg:5+jpeg:75", 1, 0), ("jpeg:10+resize:0.5+jpeg:75", 1, 0),
    ("jp2k:20+jpeg:90", 2, 0),                           # a strong first encode hidden behind a mild last one
    ("jpeg:90+jpeg:10", 1, 1), ("jp2k:20+jpeg:10", 1, 1), ("jpeg:10+jp2k:20", 2, 2),  # the later strong one
    ("jpeg:90+jpeg:75", 0, 0), ("jpeg:10", 1, 1), ("jpeg:90", 0, 0), ("noise:10+jpeg:10+blur:1", 1, 1),
    ("resize:0.5", 0, 0),
])
def test_true_bin_is_the_degradation_carried_and_the_bitstream_the_last_encode(spec, true_bin, read_bin):
  _, info = D.apply(spec, cifar_images()[2])
  assert D.bin_of(spec, CIFAR_BINS) == true_bin
  assert D.bin_of_bitstream(info, CIFAR_BINS) == read_bin


def test_every_cifar_config_has_a_transcode_sweep_that_hides_a_strong_encode():
  for c in (config_lib.base_config(), _cifar_config()):
    config_lib.validate(c)
    rules = [list(b.match) for b in c.bins]
    specs = [str(D.parse(s)) for s in c.sweeps.transcode]
    assert "transcode" not in c.evaluate.sweeps  # evaluated only when asked for
    hidden = [s for s in specs if D.bin_of(s, rules) != 0 and D.bin_of(str(D.parse(s).last_codec), rules) == 0]
    assert {"jpeg:10+jpeg:90", "jpeg:5+jpeg:75", "jpeg:10+resize:0.5+jpeg:75"} <= set(hidden)
    assert any(s.startswith("jp2k:") for s in hidden) and {"jpeg:10", "jpeg:90", "jpeg:90+jpeg:10"} <= set(specs)


def _cifar_config() -> Any:
  c = config_lib.base_config()
  config_lib.cifar_jp2k(c)
  return c


# ------------------------------------------------------------------------------------------------ hybrid rule

def ref_hybrid(branch_logits: np.ndarray, master_logits: np.ndarray, bitstream_bins: np.ndarray) -> np.ndarray:
  route = np.where(bitstream_bins != 0, bitstream_bins, np.argmax(master_logits, -1))
  return _softmax(np.asarray(branch_logits, np.float64))[route, np.arange(len(route))]


@pytest.mark.parametrize("seed", [0, 1])
def test_hybrid_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  bl = (rng.normal(size=(3, 24, 10)) * 3).astype(np.float32)
  ml = (rng.normal(size=(24, 3)) * 2).astype(np.float32)
  bb = rng.integers(0, 3, 24)
  out = np.asarray(decision.hybrid(bl, ml, bb))
  assert out.shape == (24, 10) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref_hybrid(bl, ml, bb), rtol=1e-5, atol=1e-6)
  # Where the bitstream reads a degradation bin it decides; where it reads clean, MS decides.
  np.testing.assert_allclose(out[bb == 0], np.asarray(decision.ms(bl, ml))[bb == 0], rtol=1e-6)
  np.testing.assert_allclose(out[bb != 0], np.asarray(decision.oracle(bl, bb))[bb != 0], rtol=1e-6)


def test_hybrid_bad_bins_give_nan_rows_and_bad_shapes_are_refused():
  rng = np.random.default_rng(2)
  bl, ml = rng.normal(size=(3, 4, 5)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
  out = np.asarray(decision.hybrid(bl, ml, np.array([0, 3, -1, 2])))
  assert np.isnan(out[1]).all() and np.isnan(out[2]).all() and not np.isnan(out[[0, 3]]).any()
  with pytest.raises(ValueError, match=r"bitstream_bins must be \[B\] = \(4,\)"):
    decision.hybrid(bl, ml, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="master_logits must be"):
    decision.hybrid(bl, ml[:, :2], np.zeros(4, np.int32))


def test_hybrid_needs_the_master_stage(tmp_path: pathlib.Path):
  c = config_lib.base_config()
  c.evaluate.methods = ("bitstream", "hybrid")
  for stage in ("baseline", "branch_jpeg", "branch_jp2k"):
    (tmp_path / "train" / stage).mkdir(parents=True)
    (tmp_path / "train" / stage / "DONE.json").write_text("{}")
  plan = plan_lib.make_plan(c, tmp_path)
  assert plan.routed == ["bitstream"] and plan.missing == {"hybrid": "stage(s) not trained: master"}
  (tmp_path / "train" / "master").mkdir()
  (tmp_path / "train" / "master" / "DONE.json").write_text("{}")
  plan = plan_lib.make_plan(c, tmp_path)
  assert plan.routed == ["bitstream", "hybrid"] and plan.master and not plan.missing


def test_evaluate_hybrid_matches_numpy(trained: dict[str, Any]):
  """The rule inside `msnet evaluate`'s shared step: counts and per-image top-1 from the records' bitstream bins
  and the master's logits."""
  cfg = config_lib.from_json(config_lib.to_json(trained["cfg"]))
  cfg.evaluate.methods = ("ms", "bitstream", "hybrid")
  cfg.evaluate.sweeps = ("jpeg",)
  workdir, p, apply = trained["workdir"], trained["params"], trained["apply"]
  rows = evaluate.run_evaluate(cfg, workdir)
  correct = {(r["method"], r["spec"]): r for r in rows}
  assert {r["method"] for r in rows} == {"ms", "bitstream", "hybrid"}
  for spec in ("jpeg:10", "jpeg:50"):
    d = trained["data"][spec]
    x = jnp.asarray(d["image"])
    probs = ref_hybrid(apply["slave"](p["slave"], x), apply["master"](p["master"], x), d["bitstream_bin"])
    top1, top5, _ = _counts(probs, d["label"])
    row = correct[("hybrid", spec)]
    assert (row["correct1"], row["correct5"], row["n"]) == (top1, top5, RECORDS)


# ------------------------------------------------------------------------------------------- msnet predict files

class _FakePredictor:
  """What `files.predict_files` reads of a predictor; records the bins it was given and routes as hybrid does."""

  def __init__(self):
    self.config = config_lib.base_config()
    self.buckets, self.class_names, self.given = [8], [str(i) for i in range(10)], []
    self.bin_names = ["clean", "jpeg", "jp2k"]

  def params(self, rule: str) -> None:
    return None

  def shape(self, image: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(image).resize((32, 32)))

  def predict(self, x: np.ndarray, rule: str, top_k: int, bins: Any) -> dict[str, Any]:
    self.given.append(bins)
    n = len(x)
    probs = np.full((n, 10), 0.1, np.float32)
    branch = np.where(np.asarray(bins) != 0, bins, 0)
    return {"rule": rule, "probs": probs, "top_k": np.zeros((n, top_k), np.int32), "top_k_probs": probs[:, :top_k],
            "branch": branch, "bin_probs": np.full((n, 3), 1 / 3, np.float32)}


def test_predict_files_hybrid_reads_each_files_bitstream(tmp_path: pathlib.Path):
  img = cifar_images()[4]
  for name, quality in (("q10.jpg", 10), ("q90.jpg", 90)):
    (tmp_path / name).write_bytes(pillow_jpeg(img, quality, 2)[1])
  PIL.Image.fromarray(img).save(tmp_path / "lossless.png")
  fake, out, err = _FakePredictor(), io.StringIO(), io.StringIO()
  assert files.predict_files(fake, [tmp_path], rule="hybrid", as_json=True, out=out, err=err) == 0
  assert fake.given == [[0, 1, 0]]  # lossless.png, q10.jpg, q90.jpg: only q10 is read as a strong encode
  sources = [json.loads(line)["bin_source"] for line in out.getvalue().splitlines()]
  assert sources == ["master", "bitstream: jpeg q=10", "master"]


# ----------------------------------------------------------------------------------------------------- report

def _report_case(n: int = 40) -> tuple[list[dict[str, Any]], dict[tuple[str, str], np.ndarray], dict[str, Any]]:
  """Per-image results where MS recovers a hidden strong encode the bitstream misses, and a chain where both
  route alike."""
  rng = np.random.default_rng(7)
  specs = ["jpeg:10", "jpeg:10+jpeg:90", "jpeg:90+jpeg:10"]
  correct = {(m, s): rng.random(n) < 0.5 for m in report_transcode.METHODS for s in specs}
  correct[("ms", "jpeg:10+jpeg:90")] = rng.random(n) < 0.95
  correct[("bitstream", "jpeg:10+jpeg:90")] = rng.random(n) < 0.2
  correct[("ms", "jpeg:90+jpeg:10")] = correct[("bitstream", "jpeg:90+jpeg:10")]
  rows = [dict(method=m, spec=s, top1=float(v.mean())) for (m, s), v in correct.items()]
  master = {"bins": ["clean", "jpeg", "jp2k"],
            "specs": {"jpeg:10": dict(true_bin=1, bitstream_accuracy=1.0, master_accuracy=0.9),
                      "jpeg:10+jpeg:90": dict(true_bin=1, bitstream_accuracy=0.0, master_accuracy=0.85),
                      "jpeg:90+jpeg:10": dict(true_bin=1, bitstream_accuracy=1.0, master_accuracy=0.25)}}
  return rows, correct, master


def test_transcode_section_matches_a_direct_bootstrap(tmp_path: pathlib.Path):
  rows, correct, master = _report_case()
  boot = stats.paired_bootstrap(correct, resamples=400, seed=3)
  lines = report_transcode.transcode_section(rows, {"transcode": ["jpeg:10", "jpeg:10+jpeg:90", "jpeg:90+jpeg:10"]},
                                             master, boot, tmp_path)
  text = "\n".join(lines)
  with (tmp_path / "transcode.csv").open() as f:
    table = {r["spec"]: r for r in csv.DictReader(f)}
  # The same draws as the report's resamples (one [B, n] block for small n), recomputed in NumPy.
  draws = np.random.default_rng(3).integers(0, 40, (400, 40))
  for spec in ("jpeg:10", "jpeg:10+jpeg:90", "jpeg:90+jpeg:10"):
    ms, bit = correct[("ms", spec)], correct[("bitstream", spec)]
    diffs = 100.0 * (ms[draws].mean(1) - bit[draws].mean(1))
    r = table[spec]
    assert float(r["ms_minus_bitstream"]) == pytest.approx(100.0 * (ms.mean() - bit.mean()))
    assert float(r["ci_lo"]) == pytest.approx(np.quantile(diffs, 0.025, method="lower"))
    assert float(r["ci_hi"]) == pytest.approx(np.quantile(diffs, 0.975, method="higher"))
    assert float(r["hybrid"]) == pytest.approx(100.0 * correct[("hybrid", spec)].mean()) and r["true_bin"] == "jpeg"
  assert "`jpeg:10+jpeg:90` (true bin `jpeg`): the bitstream rule fails: it reads the last encode only and routes " \
         "0.0% of the images to the true bin; the master does not fail: it routes 85.0%. MS - bitstream +" in text
  assert text.count("MS is better") == 1
  assert "`jpeg:90+jpeg:10` (true bin `jpeg`): the bitstream rule routes 100.0% of the images to the true bin; " \
         "the master fails: it routes 25.0%. MS - bitstream +0.0 points [0.0, 0.0]: no difference is decided." in text
  assert "- `jpeg:10` " not in text  # a single encode is a reference, not a chain
  hybrid_ms = [line for line in lines if line.startswith("hybrid - ms, mean over the 3 specs")]
  expected = 100.0 * np.mean([correct[("hybrid", s)].mean() - correct[("ms", s)].mean() for s in table])
  assert len(hybrid_ms) == 1 and f"{expected:+.1f} points" in hybrid_ms[0]
  assert (tmp_path / "transcode.png").stat().st_size > 0 and "![transcode](transcode.png)" in text


def test_transcode_section_only_with_the_sweep(tmp_path: pathlib.Path):
  rows, correct, master = _report_case()
  boot = stats.paired_bootstrap(correct, resamples=10, seed=0)
  assert report_transcode.transcode_section(rows, {"jpeg": ["jpeg:10"]}, master, boot, tmp_path) == []
  assert not (tmp_path / "transcode.csv").exists()
  # Without master.json the routing is unknown and said so; MS - bitstream is still computed.
  lines = report_transcode.transcode_section(rows, {"transcode": ["jpeg:10+jpeg:90"]}, None, boot, tmp_path)
  assert "- `jpeg:10+jpeg:90`: no routing results in W/eval/master.json." in lines


@pytest.mark.parametrize("dx,dy", [(0, 0), (3, 5), (1, 0), (0, 7), (8, 8), (31, 2)])
def test_shift_equals_a_crop_padded_by_its_edge(dx, dy):
  """The documented border rule against NumPy's own crop and edge padding."""
  image = cifar_images()[2]
  out, info = D.apply(f"shift:{dx},{dy}", image)
  reference = np.pad(image[dy:, dx:], ((0, dy), (0, dx), (0, 0)), mode="edge")
  np.testing.assert_array_equal(out, reference)
  assert info["codec"] is None and (info["psnr"] == math.inf) == (dx == dy == 0)


def test_shift_grammar_and_refusals():
  assert str(D.parse("jpeg:10+shift:3,5+jpeg:75")) == "jpeg:10+shift:3,5+jpeg:75"
  assert D.spec_slug("jpeg:10+shift:3,5+jpeg:75") == "jpeg-10_shift-3c5_jpeg-75"
  for bad in ("shift:3", "shift:-1,2", "shift:1.5,2", "shift:3,5@edge"):
    with pytest.raises(ValueError, match="shift"):
      D.parse(bad)
  with pytest.raises(ValueError, match="crops the whole 32x32 image"):
    D.apply("shift:32,0", cifar_images()[0])


def test_misaligned_reencode_moves_the_grid_and_keeps_the_strong_bin():
  """The second JPEG's grid off the first one's: other pixels than the aligned chain, shifting by a whole
  block (8, 8) lines the grids up again, and the true bin is the strong first encode's."""
  image = cifar_images()[4]
  first = D.apply("jpeg:10", image)[0]
  misaligned = D.apply("jpeg:10+shift:3,5+jpeg:75", image)[0]
  np.testing.assert_array_equal(misaligned, D.apply("jpeg:75", D.apply("shift:3,5", first)[0])[0])
  assert not np.array_equal(misaligned, D.apply("jpeg:10+jpeg:75", image)[0])
  rules = [[], ["jpeg:1-20"]]
  info = D.apply("jpeg:10+shift:3,5+jpeg:75", image)[1]
  assert D.bin_of("jpeg:10+shift:3,5+jpeg:75", rules) == 1 and D.bin_of_bitstream(info, rules) == 0
  assert D.bin_of("webp:10+jpeg:85", [[], ["jpeg:1-20"], ["webp:0-20", "webp@bpp:0-3"]]) == 2
