"""The one image reader (msnet.data.reader): odd but real files never raise anything but CorruptImageError, the
pixel limit is checked from the header, EXIF orientation and bit depth are applied, and every reader (the
file reader, the folder source, the TFDS source) gives a file the same answer."""

from __future__ import annotations

import io
import pathlib
import struct
import time
import zlib

import imagecodecs
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

from msnet.data import reader, sources
from msnet.degradations import codecs


def _image(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pil(image: np.ndarray, fmt: str, mode: str = "RGB", **kw) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(image).convert(mode).save(buf, format=fmt, **kw)
  return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
  return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bmp(**fields: int) -> bytes:
  """A valid 24-bit BMP with BITMAPINFOHEADER fields changed."""
  data = bytearray(_pil(_image(), "BMP"))
  for field, value in fields.items():
    offset, fmt = {"header_size": (14, "<I"), "width": (18, "<i"), "height": (22, "<i"), "bit_count": (28, "<H"),
                   "compression": (30, "<I"), "colors_used": (46, "<I")}[field]
    struct.pack_into(fmt, data, offset, value)
  return bytes(data)


def _reference_8_bits(values: np.ndarray, bits: int) -> np.ndarray:
  """The NumPy float64 reference of the bit-depth scaling."""
  return np.round(values.astype(np.float64) * 255 / (2 ** bits - 1)).astype(np.uint8)


# Files that Pillow half-reads, and the bombs: each must be a CorruptImageError naming the file.
def _odd_files() -> dict[str, bytes]:
  png = _pil(_image(), "PNG")
  ztxt = _png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"a" * (4 << 20)))  # 4 MB of text from 4 kB
  tiff = bytearray(_pil(_image(), "TIFF"))
  struct.pack_into("<I", tiff, 4, 10 ** 8)  # IFD0 far past the end: Pillow cannot seek to the frame
  gif = bytearray(_pil(_image(), "GIF"))
  struct.pack_into("<HH", gif, 6, 65535, 65535)  # logical screen of 4.3 billion pixels
  jpeg = bytearray(codecs.jpeg_encode(_image(), 75, "420"))
  sof = jpeg.index(b"\xff\xc0")
  struct.pack_into(">HH", jpeg, sof + 5, 30000, 30000)  # a 631-byte-style JPEG claiming 30000x30000
  j2k = bytearray(codecs.jp2k_encode_ratio(_image(), 10))
  struct.pack_into(">II", j2k, 8, 60000, 60000)  # SIZ: Xsiz, Ysiz
  return {
      "bit_count.bmp": _bmp(bit_count=7), "header_size.bmp": _bmp(header_size=1000),
      "palette.bmp": _bmp(bit_count=8, colors_used=1 << 30), "compression.bmp": _bmp(compression=9),
      "bitfields.bmp": _bmp(compression=3), "bomb.bmp": _bmp(width=100_000, height=100_000),
      "bomb.gif": bytes(gif), "text_bomb.png": png[:33] + ztxt + png[33:], "seek.tiff": bytes(tiff),
      "bomb.jpg": bytes(jpeg), "bomb.j2k": bytes(j2k), "empty.png": b"", "garbage.png": b"\x89PNG\r\n\x1a\nxyz",
      "truncated.jpg": codecs.jpeg_encode(_image(), 75, "420")[:300],
  }


@pytest.mark.parametrize("name", sorted(_odd_files()))
def test_odd_files_are_corrupt_image_errors_naming_the_file(name: str) -> None:
  with pytest.raises(reader.CorruptImageError, match=name.replace(".", r"\.")):
    reader.decode(_odd_files()[name], name)


def test_bombs_are_refused_from_the_header_before_decoding() -> None:
  for name in ("bomb.jpg", "bomb.j2k", "bomb.gif"):
    start = time.perf_counter()
    with pytest.raises(reader.PixelLimitError, match="max-pixels|MAX_IMAGE_PIXELS"):
      reader.decode(_odd_files()[name], name)
    assert time.perf_counter() - start < 1.0, name  # decoding 900 M pixels would take seconds and gigabytes


def test_the_limit_is_a_parameter_with_pillows_default() -> None:
  assert reader.DEFAULT_MAX_PIXELS == PIL.Image.MAX_IMAGE_PIXELS
  image = _image(24, 40)
  for data in (codecs.jpeg_encode(image, 90, "444"), _pil(image, "PNG"), codecs.jp2k_encode_ratio(image, 5)):
    assert reader.decode(data, "x", max_pixels=24 * 40).image.shape == (24, 40, 3)
    with pytest.raises(reader.PixelLimitError, match="960 pixels is more than the limit of 959"):
      reader.decode(data, "x", max_pixels=24 * 40 - 1)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_files_raise_only_corrupt_image_errors() -> None:
  """A deterministic fuzz: 40 byte-mutated or cut copies of a file of each format decode to RGB uint8 or raise
  CorruptImageError; nothing else, and nothing hangs (a J2K header whose marker length is 0 once looped)."""
  image = _image()
  seeds = {"bmp": _pil(image, "BMP"), "bmp8": _pil(image, "BMP", "P"), "png": _pil(image, "PNG"),
           "gif": _pil(image, "GIF"), "tiff": _pil(image, "TIFF"), "tiffz": _pil(image, "TIFF", compression="tiff_deflate"),
           "webp": _pil(image, "WEBP"), "ppm": _pil(image, "PPM"), "ico": _pil(image, "ICO"),
           "jpg": codecs.jpeg_encode(image, 75, "420"), "j2k": codecs.jp2k_encode_ratio(image, 10),
           "webp-vp8": codecs.encode("webp:50", image), "avif": codecs.encode("avif:50", image),
           "jxl": codecs.encode("jxl:2", image), "jxl-lossless": codecs.encode("jxl:0", image)}
  rng = np.random.default_rng(0)
  decoded = 0
  for name, data in seeds.items():
    for _ in range(40):
      b = bytearray(data)
      for _ in range(int(rng.integers(1, 5))):
        b[int(rng.integers(0, min(len(b), 200)))] = int(rng.integers(0, 256))
      if rng.random() < 0.2:
        b = b[:int(rng.integers(1, len(b)))]
      try:
        out = reader.decode(bytes(b), name, max_pixels=4_000_000).image
      except reader.CorruptImageError:
        continue
      assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
      decoded += 1
  assert decoded > 0  # the mutations leave some files readable: both outcomes were exercised


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow_exif_transpose(orientation: int) -> None:
  image = _image(24, 40)
  exif = PIL.Image.Exif()
  exif[reader.ORIENTATION_TAG] = orientation
  for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
    kw = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    data = _pil(image, fmt, exif=exif.tobytes(), **kw)
    with PIL.Image.open(io.BytesIO(data)) as im:
      expected = np.asarray(PIL.ImageOps.exif_transpose(im).convert("RGB"))
    got = reader.decode(data, f"o{orientation}.{fmt}").image
    np.testing.assert_array_equal(got, expected, err_msg=f"{fmt} orientation {orientation}")
    assert got.shape[:2] == ((40, 24) if orientation >= 5 else (24, 40))


def test_jpeg_orientation_keeps_the_bitstream() -> None:
  exif = PIL.Image.Exif()
  exif[reader.ORIENTATION_TAG] = 6
  data = _pil(_image(), "JPEG", quality=30, exif=exif.tobytes())
  f = reader.decode(data, "phone.jpg")
  assert f.bitstream == {"codec": "jpeg", "level": 30}


def test_more_than_8_bits_scaled_by_depth() -> None:
  rng = np.random.default_rng(1)
  ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
  got = reader.decode(imagecodecs.png_encode(ramp), "ramp.png").image
  np.testing.assert_array_equal(got, np.repeat(_reference_8_bits(ramp, 16)[..., None], 3, axis=2))
  assert (got == 255).mean() < 0.01  # Pillow's conversion made this 99.6% white
  rgb16 = rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16)
  for name, data in (("rgb16.png", imagecodecs.png_encode(rgb16)), ("rgb16.tif", imagecodecs.tiff_encode(rgb16))):
    np.testing.assert_array_equal(reader.decode(data, name).image, _reference_8_bits(rgb16, 16), err_msg=name)
  grey16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
  np.testing.assert_array_equal(reader.decode(imagecodecs.tiff_encode(grey16), "g.tif").image[..., 0],
                                _reference_8_bits(grey16, 16))
  for bits in (9, 12, 16):
    samples = rng.integers(0, 2 ** bits, (16, 16, 3), dtype=np.uint16)
    data = imagecodecs.jpeg2k_encode(samples, bitspersample=bits, level=0)  # lossless: the samples come back
    f = reader.decode(data, f"{bits}.jp2")
    np.testing.assert_array_equal(f.image, _reference_8_bits(samples, bits), err_msg=f"{bits}-bit JPEG 2000")
  samples = rng.integers(0, 4096, (16, 16, 3), dtype=np.uint16)
  data = imagecodecs.jpeg8_encode(samples, level=95, bitspersample=12)
  np.testing.assert_array_equal(reader.decode(data, "12.jpg").image,
                                _reference_8_bits(imagecodecs.jpeg8_decode(data), 12))


def test_to_8_bits_refuses_samples_beyond_the_depth() -> None:
  with pytest.raises(reader.CorruptImageError, match="outside 0-511"):
    reader.to_8_bits(np.array([[512]], np.uint16), 9, "x")
  np.testing.assert_array_equal(reader.to_8_bits(np.arange(512, dtype=np.uint16), 9, "x"),
                                _reference_8_bits(np.arange(512), 9))


def _ultrahdr_like(primary: np.ndarray) -> bytes:
  """A JPEG followed by a second one (a gain map), as an UltraHDR / MPO file stores it (Pillow's MPO writer)."""
  buf = io.BytesIO()
  PIL.Image.fromarray(primary).save(buf, format="MPO", save_all=True, quality=90,
                                    append_images=[PIL.Image.fromarray(primary[::2, ::2])])
  return buf.getvalue()


def test_one_answer_per_file_from_every_reader(tmp_path: pathlib.Path) -> None:
  """The file reader (predict, external sets) and the folder source (degrade) decide alike, file by file."""
  image = _image(32, 48)
  full = codecs.jpeg_encode(image, 80, "420")
  files = {"truncated.jpg": full[:len(full) * 2 // 3], "ultrahdr.jpg": _ultrahdr_like(image),
           "plain.jpg": full, "plain.png": _pil(image, "PNG"), "bomb.jpg": _odd_files()["bomb.jpg"],
           "ramp16.png": imagecodecs.png_encode(np.arange(0, 65536, 16, dtype=np.uint16).reshape(32, 128)[:, :48])}
  (tmp_path / "test" / "a").mkdir(parents=True)
  for name, data in files.items():
    (tmp_path / "test" / "a" / name).write_bytes(data)
  src = sources.open_source({"source": "folder", "path": str(tmp_path), "image_size": 32, "resize_shorter": 0,
                             "tfds_name": "", "tfds_data_dir": ""}, "test")
  answers = {}
  for i, path in enumerate(src.names):
    try:
      by_source = ("pixels", src[i]["image"])
    except reader.CorruptImageError as e:
      by_source = ("refused", type(e))
    try:
      by_file = ("pixels", sources.shape(reader.read_image(path).image, 32, 0, path))
    except reader.CorruptImageError as e:
      by_file = ("refused", type(e))
    assert by_source[0] == by_file[0], path
    if by_source[0] == "pixels":
      np.testing.assert_array_equal(by_source[1], by_file[1])
    else:
      assert by_source[1] is by_file[1]
    answers[pathlib.Path(path).name] = by_source[0]
  assert answers == {"bomb.jpg": "refused", "plain.jpg": "pixels", "plain.png": "pixels", "ramp16.png": "pixels",
                     "truncated.jpg": "refused", "ultrahdr.jpg": "pixels"}
  np.testing.assert_array_equal(reader.read_image(tmp_path / "test" / "a" / "ultrahdr.jpg").image,
                                np.asarray(PIL.Image.open(io.BytesIO(files["ultrahdr.jpg"])).convert("RGB")))


def test_8_bit_jpegs_decode_as_pillow_decodes_them() -> None:
  """The sources moved from Pillow to libjpeg-turbo through imagecodecs for JPEG: the same pixels, so shards
  written before are unchanged (4:2:0, 4:4:4 and grey)."""
  for seed, (subsampling, mode) in enumerate((("420", "RGB"), ("444", "RGB"), ("444", "L"))):
    image = _image(33, 47, seed)
    data = _pil(image, "JPEG", mode, quality=60, subsampling={"420": 2, "444": 0}[subsampling])
    expected = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(reader.decode(data, "x.jpg").image, expected)
