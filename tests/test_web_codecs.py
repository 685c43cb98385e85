"""WebP, AVIF and JPEG XL: the spec grammar, `apply` against independent decoders, the reader, rate bins."""

from __future__ import annotations

import io
import math
import time

import numpy as np
import PIL.Image
import pytest

from msnet import degradations as D
from msnet.data import reader
from msnet.degradations import codecs
from msnet.degradations.codecs import jxl, webp
from tests.test_degradations import cifar_images

WEB = ("webp:30", "avif:30", "jxl:4")


def test_grammar_levels_and_refusals():
  assert [str(D.parse(s)) for s in ("webp:0", "avif:100", "jxl:1.0", "jxl:0.5", "webp:10+jpeg:85")] == [
      "webp:0", "avif:100", "jxl:1", "jxl:0.5", "webp:10+jpeg:85"]
  assert D.spec_slug("webp:30+jxl:2.5") == "webp-30_jxl-2p5"
  assert D.parse("jpeg:10+webp:50").last_codec == D.WebP(50)
  for bad, message in (("webp:101", "0..100"), ("avif:7.5", "integer"), ("jxl:25.5", "<= 25"),
                       ("webp:5@444", "no '@' option"), ("avif:", "non-negative number")):
    with pytest.raises(ValueError, match=message):
      D.parse(bad)


@pytest.mark.parametrize("spec", WEB)
def test_apply_reports_what_an_independent_measure_gives(spec):
  """bpp from the file's length, PSNR in NumPy float64, the same bytes every time (deterministic)."""
  image = cifar_images()[3]
  out, info = D.apply(spec, image)
  data = codecs.encode(spec, image)
  assert codecs.encode(spec, image) == data
  np.testing.assert_array_equal(out, codecs.get(info["codec"]).decode(data))
  mse = np.mean((image.astype(np.float64) - out) ** 2)
  assert info["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-9)
  assert info["bpp"] == len(data) * 8 / 32 ** 2 and info["ratio"] == image.nbytes / len(data)
  assert info["level"] is None and info["lossless"] is False and info["codec"] == spec.split(":")[0]


@pytest.mark.parametrize("spec", ("webp:5", "webp:50", "webp:95", "avif:5", "avif:50", "avif:95"))
def test_pillow_decodes_the_same_bytes_to_the_same_pixels(spec):
  """Pillow's own WebP and AVIF plugins (a second decoder build) on the bytes `apply` made."""
  for image in cifar_images(16):
    data = codecs.encode(spec, image)
    theirs = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(D.apply(spec, image)[0], theirs)


def test_strength_scales_run_the_documented_way():
  """Lower WebP / AVIF quality and larger JPEG XL distance cost PSNR, averaged over 16 images; jxl:0 and
  avif:100 are lossless."""
  images = cifar_images(16)

  def mean_psnr(spec: str) -> float:
    return float(np.mean([D.apply(spec, im)[1]["psnr"] for im in images]))

  for scale in (("webp:90", "webp:50", "webp:10", "webp:0"), ("avif:90", "avif:50", "avif:10", "avif:0"),
                ("jxl:0.5", "jxl:2", "jxl:8", "jxl:25")):
    psnrs = [mean_psnr(s) for s in scale]
    assert psnrs == sorted(psnrs, reverse=True), (scale, psnrs)
  for im in images[:4]:
    for spec in ("jxl:0", "avif:100"):
      out, info = D.apply(spec, im)
      np.testing.assert_array_equal(out, im)
  assert D.apply("jxl:0", images[0])[1]["lossless"] is True


@pytest.mark.parametrize("spec", WEB)
def test_reader_sniffs_and_reads_what_apply_wrote(spec, tmp_path):
  """A file of each codec, by content and not by suffix: the shard's pixels, the codec and rate read back."""
  image = cifar_images()[5]
  path = tmp_path / "file.bin"
  path.write_bytes(codecs.encode(spec, image))
  f = reader.read_image(path)
  out, info = D.apply(spec, image)
  np.testing.assert_array_equal(f.image, out)
  assert f.bitstream == {"codec": info["codec"], "level": None, "bpp": info["bpp"]}


def test_lossless_files_are_the_clean_bin_and_lossy_ones_bin_by_rate():
  image = cifar_images()[7]
  rules = [[], ["jpeg:1-20"], ["webp:0-20", "webp@bpp:0-100"], ["jxl:8-25", "jxl@bpp:0-100"]]
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, "WEBP", lossless=True)
  lossless = {"webp": buffer.getvalue(), "jxl": codecs.encode("jxl:0", image)}
  for name, data in lossless.items():
    f = reader.decode(data, f"x.{name}")
    np.testing.assert_array_equal(f.image, image)
    assert f.bitstream["lossless"] and D.bin_of_bitstream(f.bitstream, rules) == 0, name
  assert webp.lossless(lossless["webp"]) and not webp.lossless(codecs.encode("webp:50", image))
  assert D.bin_of_bitstream(reader.decode(codecs.encode("webp:90", image), "a.webp").bitstream, rules) == 2
  assert D.bin_of_bitstream(reader.decode(codecs.encode("jxl:1", image), "a.jxl").bitstream, rules) == 3
  assert D.bin_of_bitstream(reader.decode(codecs.encode("avif:1", image), "a.avif").bitstream, rules) == 0
  # rate rules are for files only: a spec is binned by its level
  assert D.bin_of("webp:90", rules) == 0 and D.bin_of("webp:20", rules) == 2 and D.bin_of("jxl:8", rules) == 3


def test_rate_rules_parse_and_must_be_disjoint_per_scale():
  assert D.parse_bin_rule("webp@bpp:0-1.5") == D.BinRule("webp", 0, 1.5, rate=True)
  D.bins.check_disjoint([["webp:0-20"], ["webp@bpp:0-2"]])  # a level range and a rate range never collide
  with pytest.raises(ValueError, match="overlaps"):
    D.bins.check_disjoint([["avif@bpp:0-2"], ["avif@bpp:1.5-3"]])
  with pytest.raises(ValueError, match="kind@bpp:lo-hi"):
    D.parse_bin_rule("webp@psnr:0-2")


@pytest.mark.parametrize("shape", [(32, 32), (17, 45), (300, 200), (8, 8), (1, 1), (64, 128)])
def test_jxl_header_gives_the_encoded_size(shape):
  """The SizeHeader parse (div8, ratio and U32 forms) against the array that was encoded."""
  image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
  for spec in ("jxl:0", "jxl:3"):
    h = jxl.header(codecs.encode(spec, image))
    assert (h.height, h.width, h.bits, h.orientation, h.xyb) == (*shape, 8, 1, spec == "jxl:3")


def test_jxl_and_avif_deep_samples_are_scaled_by_their_depth():
  import imagecodecs  # noqa: PLC0415
  samples = np.random.default_rng(1).integers(0, 4096, (12, 10, 3)).astype(np.uint16)
  reference = np.floor(samples.astype(np.float64) * 255 / 4095 + 0.5).astype(np.uint8)
  data = imagecodecs.jpegxl_encode(samples, lossless=True, bitspersample=12)
  assert jxl.header(data).bits == 12
  np.testing.assert_array_equal(reader.decode(data, "deep.jxl").image, reference)
  ten = samples >> 2
  data = imagecodecs.avif_encode(ten, level=100, bitspersample=10, speed=8)
  np.testing.assert_array_equal(reader.decode(data, "deep.avif").image,
                                np.floor(ten.astype(np.float64) * 255 / 1023 + 0.5).astype(np.uint8))


def test_pixel_limit_is_read_from_each_header_before_decoding():
  image = cifar_images()[0]
  big = np.zeros((64, 48, 3), np.uint8)
  for spec in WEB:
    data = codecs.encode(spec, big)
    with pytest.raises(reader.PixelLimitError, match="64x48|48x64"):
      reader.decode(data, "big", max_pixels=64 * 48 - 1)
    assert reader.decode(data, "big", max_pixels=64 * 48).image.shape == (64, 48, 3)
  # a VP8X canvas claiming 16384x16384 over a 32x32 frame: refused from the header, at once
  data = bytearray(codecs.encode("webp:50", image))
  vp8x = b"VP8X" + (10).to_bytes(4, "little") + b"\x00" * 4 + (16383).to_bytes(3, "little") * 2
  bomb = b"RIFF" + (len(data) - 8 + len(vp8x)).to_bytes(4, "little") + b"WEBP" + vp8x + bytes(data[12:])
  start = time.perf_counter()
  with pytest.raises(reader.PixelLimitError, match="16384x16384"):
    reader.decode(bomb, "bomb.webp")
  assert time.perf_counter() - start < 1.0


def test_web_suffixes_are_listed_for_predict(tmp_path):
  from msnet import files  # noqa: PLC0415
  image = cifar_images()[1]
  for spec in WEB:
    (tmp_path / f"a.{codecs.get(spec.split(':')[0]).suffixes[0][1:]}").write_bytes(codecs.encode(spec, image))
  assert sorted(p.name for p in files.find_images([tmp_path])) == ["a.avif", "a.jxl", "a.webp"]


def _synthetic_rows(n: int = 400):
  """Per-image correctness of a few methods on specs of two codecs, and the rows `msnet evaluate` writes."""
  from msnet.evaluate import results  # noqa: PLC0415
  rng = np.random.default_rng(0)
  accuracy = {"clean": 0.9, "jpeg:10": 0.5, "jpeg:20": 0.6, "webp:10": 0.7, "webp:50": 0.85,
              "jpeg:10+shift:3,5+jpeg:75": 0.55, "jpeg:10+jpeg:75": 0.5}
  bpp = {"clean": None, "jpeg:10": 5.0, "jpeg:20": 6.0, "webp:10": 4.8, "webp:50": 9.0,
         "jpeg:10+shift:3,5+jpeg:75": 9.5, "jpeg:10+jpeg:75": 9.4}
  correct, rows = {}, []
  for spec, p in accuracy.items():
    for method, gain in (("baseline", 0.0), ("ms", 0.1), ("oracle", 0.12), ("bitstream", 0.05),
                         ("branch_jpeg", 0.1), ("branch_webp", 0.1)):
      c = rng.random(n) < min(1.0, p + gain)
      correct[(method, spec)] = c
      lo, hi = results.wilson(int(c.sum()), n)
      rows.append(dict(method=method, spec=spec, **results.spec_fields(spec), top1=float(c.mean()), n=n,
                       ci95_low=lo, ci95_high=hi, psnr=30.0, bpp=bpp[spec]))
  return rows, correct


def test_codec_section_tables_the_strong_end_and_compares_at_equal_bits(tmp_path):
  import ml_collections  # noqa: PLC0415
  from msnet.report import codecs as report_codecs, run as report_run, transcode  # noqa: PLC0415
  rows, correct = _synthetic_rows()
  bins = [ml_collections.ConfigDict(dict(name=name, match=match)) for name, match in
          (("clean", ()), ("jpeg", ("jpeg:1-20",)), ("webp", ("webp:0-20", "webp@bpp:0-5")))]
  boot = report_run.bootstrap_of(rows, correct)
  strong = report_codecs.strong_end_rows(rows, bins, boot)
  assert [r["spec"] for r in strong] == ["jpeg:10", "jpeg:20", "webp:10"]  # webp:50 is outside its bin
  webp10 = strong[2]
  own = np.mean(correct[("branch_webp", "webp:10")]) * 100
  assert webp10["branch"] == pytest.approx(own) and webp10["branch_lo"] < own < webp10["branch_hi"]
  gain = 100 * (np.mean(correct[("ms", "webp:10")]) - np.mean(correct[("baseline", "webp:10")]))
  assert webp10["ms_gain"] == pytest.approx(gain) and webp10["ms_gain_lo"] < gain < webp10["ms_gain_hi"]
  equal = report_codecs.equal_bits_rows(rows, bins, boot)  # jpeg:20 (6.0 bpp) has no webp spec within 15%
  assert [(r["spec"], r["other"]) for r in equal] == [("jpeg:10", "webp:10")]
  expected = 100 * (np.mean(correct[("baseline", "webp:10")]) - np.mean(correct[("baseline", "jpeg:10")]))
  assert equal[0]["baseline_difference"] == pytest.approx(expected) and equal[0]["lo"] < expected < equal[0]["hi"]
  lines = report_codecs.codec_section(rows, bins, boot, tmp_path)
  assert (tmp_path / "rate_accuracy.png").exists() and (tmp_path / "codecs.csv").exists()
  assert any("`webp:10`" in line for line in lines)
  shifted = transcode.misaligned(rows, ["jpeg:10+shift:3,5+jpeg:75", "jpeg:10+jpeg:75"], boot)
  assert len(shifted) == 1 and "`jpeg:10+shift:3,5+jpeg:75` - `jpeg:10+jpeg:75`" in shifted[0]
