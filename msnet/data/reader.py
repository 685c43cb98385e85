"""The one image reader: a file's bytes to the RGB uint8 pixels the network sees, and what its bitstream says.

Every path that turns an image file into pixels calls `decode` (or `read_image`): `msnet predict`, external
sets, the folder and TFDS sources and so the degrade workers. A file gets one answer everywhere: the same
pixels, or the same `CorruptImageError` naming it. No input raises anything else: Pillow's many exception
types on half-readable files (malformed BMP headers, TIFFs that cannot seek to their frame, PNG text chunks
that decompress too large, ...) all become a CorruptImageError.

Decoders. JPEG files are decoded by `codecs.jpeg_decode` and JPEG 2000 files (raw J2K codestreams or JP2
containers) by `codecs.jp2k_decode`, the decoders that made the shards, so a file holding a shard's bitstream
gives the network the pixels `msnet evaluate` gave it (libjpeg-turbo through imagecodecs gives Pillow's pixels
bit for bit on 8-bit JPEGs, about 5x faster). CMYK JPEGs and every other format go through Pillow, except
16-bit PNGs and 16-bit RGB TIFFs, which Pillow reads at 8 bits by dropping the low byte (or, for grey, clips
to 255 on conversion): those go through imagecodecs' libpng / libtiff at full depth.

What every decode does, in this order:
- Pixel limit: the width and height are read from the header (JPEG SOF, J2K SIZ, Pillow's lazy open) and a
  file of more than `max_pixels` is refused before any pixel is decoded (`PixelLimitError`): a 631-byte JPEG
  can claim 30000x30000 (2.7 GB). The default is Pillow's `PIL.Image.MAX_IMAGE_PIXELS` (89,478,485), the
  convention; `config.data.max_pixels` and `--max-pixels` change it. Pillow keeps its own guard for the
  formats it decodes (it refuses more than 2 x PIL.Image.MAX_IMAGE_PIXELS), so a limit above 179 M pixels
  applies to JPEG, JPEG 2000 and the imagecodecs paths only unless PIL.Image.MAX_IMAGE_PIXELS is raised too.
- Completeness: a JPEG whose last scan has no EOI marker after it (a truncated file) is refused, as Pillow
  refuses truncated files; libjpeg would fill the missing rows with grey and say nothing. Data after EOI
  (an UltraHDR gain map, an MPF second image, trailing bytes) is not part of the primary image and is ignored.
- Bit depth: samples of more than 8 bits (12-bit JPEG, 9- to 16-bit JPEG 2000, 16-bit PNG / TIFF / PGM)
  are scaled to 8 bits by their depth b, v8 = round(v * 255 / (2^b - 1)); Pillow's 32-bit integer ("I"
  beyond 0-65535) and float images are refused, since their range is not in the file.
- EXIF orientation (tag 274, values 2-8) is applied as `PIL.ImageOps.exif_transpose` applies it, from the
  JPEG's APP1 segment or Pillow's `getexif()`; JPEG 2000 has no orientation tag.
- Colour: grey is replicated to 3 channels, alpha dropped (`degradations.as_rgb_uint8`), palette images
  expanded, CMYK / YCbCr / LAB converted by Pillow.

Bitstream (what the `bitstream` rule routes by, `degradations.bin_of_bitstream`): a JPEG's IJG quality from
its quantisation tables; a JPEG 2000 file's ratio 24 / bpp, bpp = codestream bits (COM segments and the JP2
boxes left out, as `degradations.apply` counts them) over the decoded image's pixels; no codec for anything
else, so PNG and other lossless files go to the clean bin 0.

Pillow's warnings on odd files (corrupt EXIF, ...) are Python warnings: the CLI routes them to W/logs/, the
degrade workers too (`degrade._init_worker`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import imagecodecs
import numpy as np
import PIL.Image

from msnet import degradations, errors
from msnet.degradations import codecs
from msnet.degradations.codecs import boxes as boxes_lib

JPEG_SOI = b"\xff\xd8"
J2K_SOC = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOSSLESS_FORMATS = ("PNG", "BMP", "TIFF", "PPM", "GIF", "TGA", "QOI")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: 1 GiB of 32-bit pixels / 4 / 3
ORIENTATION_TAG = 0x0112
_SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_MARKER_IN_SCAN = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")  # 0xFF 0x00 is stuffing, RSTn stays in the scan


class CorruptImageError(errors.UserError, ValueError):
  """A source image cannot be decoded; the message names the file."""


class ImageTooSmallError(CorruptImageError):
  """A source image smaller than `data.image_size` without `resize_shorter`: unusable like a corrupt one,
  so `degrade.on_corrupt` decides (skip it, or refuse it with its name)."""


class PixelLimitError(CorruptImageError):
  """The header claims more pixels than the limit (a decompression bomb, or a limit set too low)."""


@dataclasses.dataclass
class ImageFile:
  """A decoded file: RGB uint8 pixels at the file's own size and what its bitstream says."""
  path: str
  image: np.ndarray
  bitstream: dict[str, Any]  # codec (a codecs.CODECS name | None), level, bpp: bin_of_bitstream's input
  source: str                # how the bitstream rule got its bin, e.g. "bitstream: jpeg q=10"


@dataclasses.dataclass(frozen=True)
class JpegHeader:
  """What a JPEG's markers say before any pixel is decoded."""
  width: int
  height: int
  precision: int    # bits per sample: 8 or 12
  components: int
  orientation: int  # EXIF orientation 1-8 (1 when absent or unreadable)
  complete: bool    # an EOI marker follows the last scan


# EXIF orientation -> the NumPy view that `PIL.ImageOps.exif_transpose` gives (rows, columns, channels).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                    # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],                 # ROTATE_180
    4: lambda a: a[::-1],                       # FLIP_TOP_BOTTOM
    5: lambda a: a.swapaxes(0, 1),              # TRANSPOSE
    6: lambda a: np.rot90(a, -1),               # ROTATE_270 (counter-clockwise): 90 clockwise
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),                # ROTATE_90 (counter-clockwise)
}


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
  """The image as displayed: EXIF orientation applied (values outside 1-8 leave it as stored)."""
  return np.ascontiguousarray(_ORIENT.get(orientation, _ORIENT[1])(image))


def to_8_bits(image: np.ndarray, bits: int, name: str) -> np.ndarray:
  """Samples of `bits` bits scaled to uint8: round(v * 255 / (2^bits - 1)), in integer arithmetic.

  The rounding is exact: 2^bits - 1 is odd, so v * 255 / (2^bits - 1) is never halfway between integers."""
  if image.dtype == np.uint8 and bits == 8:
    return image
  if not 1 <= bits <= 16 or image.dtype.kind not in "ui":
    raise CorruptImageError(f"{name}: {bits}-bit {image.dtype} samples: msnet reads 1- to 16-bit images")
  top = (1 << bits) - 1
  if image.size and (int(image.max()) > top or int(image.min()) < 0):
    raise CorruptImageError(f"{name}: samples outside 0-{top}, the range of its {bits}-bit depth")
  return ((image.astype(np.uint32) * 255 + top // 2) // top).astype(np.uint8)


def _check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
  if width <= 0 or height <= 0:
    raise CorruptImageError(f"{name}: the header gives a size of {width}x{height} pixels")
  if width * height > max_pixels:
    raise PixelLimitError(f"{name}: {width}x{height} = {width * height:,} pixels is more than the limit of "
                          f"{max_pixels:,} (a decompression bomb, or a real image too large: raise "
                          "config.data.max_pixels or pass --max-pixels)")


def _exif_orientation(tiff: bytes) -> int:
  """The orientation tag of IFD0 of an EXIF TIFF block; 1 when it is absent or the block is malformed."""
  order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
  if order is None or len(tiff) < 8:
    return 1
  ifd = int.from_bytes(tiff[4:8], order)
  if ifd + 2 > len(tiff):
    return 1
  for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
    entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
    if len(entry) < 12:
      return 1
    if int.from_bytes(entry[:2], order) == ORIENTATION_TAG:
      return int.from_bytes(entry[8:10], order) if int.from_bytes(entry[2:4], order) == 3 else 1
  return 1


def jpeg_header(data: bytes) -> JpegHeader:
  """Walk a JPEG's marker segments (and over its scans) up to EOI: size, precision, orientation, completeness.

  ValueError when the markers are malformed or there is no frame header."""
  if not data.startswith(JPEG_SOI):
    raise ValueError("not a JPEG file (no SOI marker)")
  frame: tuple[int, int, int, int] | None = None
  orientation, complete, i, n = 1, False, 2, len(data)
  while i < n:
    if data[i] != 0xFF:
      raise ValueError(f"no marker at byte {i}")
    while i < n and data[i] == 0xFF:  # fill bytes
      i += 1
    if i >= n:
      break
    marker, i = data[i], i + 1
    if marker == 0xD9:
      complete = True
      break
    if marker in _STANDALONE_MARKERS:
      continue
    if i + 2 > n:
      break
    length = int.from_bytes(data[i:i + 2], "big")
    if length < 2:
      raise ValueError(f"marker 0xFF{marker:02X} at byte {i - 2} has length {length}")
    if i + length > n:
      break
    segment = data[i + 2:i + length]
    if marker in _SOF_MARKERS and frame is None:
      if len(segment) < 6:
        raise ValueError("frame header (SOF) too short")
      frame = (int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[1:3], "big"), segment[0], segment[5])
    elif marker == 0xE1 and segment.startswith(b"Exif\x00\x00") and orientation == 1:
      orientation = _exif_orientation(segment[6:])
    i += length
    if marker == 0xDA:  # start of scan: entropy-coded data runs to the next marker
      found = _MARKER_IN_SCAN.search(data, i)
      if found is None:
        break
      i = found.start()
  if frame is None:
    raise ValueError("no frame header (SOF) before the image data")
  return JpegHeader(*frame, orientation=orientation, complete=complete)


def j2k_header(codestream: bytes) -> tuple[int, int, int, bool]:
  """(width, height, bits per sample, signed) of a J2K codestream's SIZ segment (the deepest component)."""
  if len(codestream) < 42 or not codestream.startswith(J2K_SOC):
    raise ValueError("J2K codestream without a complete SIZ segment")
  x, y, x0, y0 = (int.from_bytes(codestream[8 + 4 * k:12 + 4 * k], "big") for k in range(4))
  count = int.from_bytes(codestream[40:42], "big")
  ssiz = codestream[42:42 + 3 * count:3]
  if count < 1 or len(ssiz) < count:
    raise ValueError("J2K SIZ segment shorter than its component count")
  return x - x0, y - y0, max((s & 0x7F) + 1 for s in ssiz), any(s & 0x80 for s in ssiz)


def _codestream(data: bytes) -> bytes:
  """The J2K codestream of a raw codestream or a JP2 container, without COM segments."""
  if data.startswith(JP2_SIGNATURE):
    boxes = boxes_lib.top_level(data, "JP2 file")
    if b"jp2c" not in boxes:
      raise ValueError("JP2 file without a contiguous codestream box (jp2c)")
    data = boxes[b"jp2c"]
  return codecs.strip_com(data)


def read_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFile:
  """Decode one file (CorruptImageError naming it when it cannot be) and read its bitstream."""
  name = str(path)
  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise CorruptImageError(f"{name}: {e.strerror or e}") from None
  return decode(data, name, max_pixels)


def decode(data: bytes | memoryview, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageFile:
  """A file's bytes decoded and its bitstream read (the module docstring says how); `name` is for messages."""
  data = bytes(data)
  try:
    if data.startswith(JPEG_SOI):
      return _decode_jpeg(data, name, max_pixels)
    if data.startswith((J2K_SOC, JP2_SIGNATURE)):
      codestream = _codestream(data)
      width, height, bits, signed = j2k_header(codestream)
      _check_pixels(width, height, max_pixels, name)
      if signed:
        raise CorruptImageError(f"{name}: signed JPEG 2000 samples: msnet reads unsigned images only")
      image = _rgb(to_8_bits(codecs.jp2k_decode(data), bits, name), name)
      bpp = len(codestream) * 8 / (image.shape[0] * image.shape[1])
      level = codecs.get("jp2k").level(codestream, bpp)
      return ImageFile(name, image, {"codec": "jp2k", "level": level, "bpp": bpp}, f"bitstream: jp2k {level:.1f}:1")
    codec = codecs.sniff(data)
    if codec is not None and codec.size is not None:
      return _decode_codec(codec, data, name, max_pixels)
  except (RuntimeError, ValueError) as e:  # imagecodecs' codec errors; bad markers, JP2 boxes, headers
    if isinstance(e, errors.UserError):
      raise
    raise CorruptImageError(f"{name}: cannot decode image: {e}") from None
  image, kind = _decode_pillow(data, name, max_pixels)
  source = "bitstream: lossless" if kind in LOSSLESS_FORMATS else f"bitstream: {kind.lower()} (not read: clean bin)"
  return ImageFile(name, image, {"codec": None}, source)


def _decode_jpeg(data: bytes, name: str, max_pixels: int) -> ImageFile:
  header = jpeg_header(data)
  if header.height == 0:
    raise CorruptImageError(f"{name}: JPEG height 0 (set by a DNL marker), which libjpeg does not read")
  _check_pixels(header.width, header.height, max_pixels, name)
  if not header.complete:
    raise CorruptImageError(f"{name}: truncated JPEG: no EOI marker after the image data")
  quality = degradations.estimate_jpeg_quality(data)
  if header.components == 4:  # CMYK / YCCK: Pillow converts it to RGB (Adobe inversion included)
    image, _ = _decode_pillow(data, name, max_pixels)
  else:
    image = orient(_rgb(to_8_bits(codecs.jpeg_decode(data), header.precision, name), name), header.orientation)
  return ImageFile(name, image, {"codec": "jpeg", "level": float(quality)}, f"bitstream: jpeg q={quality}")


def _decode_codec(codec: codecs.Codec, data: bytes, name: str, max_pixels: int) -> ImageFile:
  """WebP, AVIF, JPEG XL: the registry's decoder (the one that made the shards), its header's size checked
  first, samples scaled by their depth, the EXIF orientation applied where the decoder does not."""
  _check_pixels(*codec.size(data), max_pixels, name)
  samples = codec.decode(data)
  image = _rgb(to_8_bits(samples, codec.bits(data) if samples.dtype != np.uint8 else 8, name), name)
  if codec.orientation is not None:
    image = orient(image, _guarded_orientation(codec, data, name))
  bpp = len(data) * 8 / (image.shape[0] * image.shape[1])
  if codec.lossless(data):
    return ImageFile(name, image, {"codec": codec.name, "level": None, "bpp": bpp, "lossless": True},
                     f"bitstream: lossless {codec.name}")
  return ImageFile(name, image, {"codec": codec.name, "level": codec.level(data, bpp), "bpp": bpp},
                   f"bitstream: {codec.name} {bpp:.2f} bpp")


def _guarded_orientation(codec: codecs.Codec, data: bytes, name: str) -> int:
  try:
    return codec.orientation(data)
  except Exception as e:  # noqa: BLE001 (Pillow's EXIF parser on untrusted bytes)
    warnings.warn(f"{name}: unreadable EXIF block ({type(e).__name__}: {e}); orientation not applied", stacklevel=2)
    return 1


def _rgb(image: np.ndarray, name: str) -> np.ndarray:
  try:
    return degradations.as_rgb_uint8(image)
  except ValueError as e:
    raise CorruptImageError(f"{name}: {e}") from None


def _decode_pillow(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, str]:
  """(RGB uint8 pixels, Pillow's format name) of a file Pillow reads. Any exception of Pillow's on a bad
  file (it raises OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, ... by plugin) is a
  CorruptImageError: a half-readable file must not end a job."""
  try:
    with PIL.Image.open(io.BytesIO(data)) as im:
      kind = im.format or "unknown"
      _check_pixels(*im.size, max_pixels, name)
      array = _full_depth(im, data, name)
      if array is None:
        im.load()
        array = _pillow_pixels(im, name)
      orientation = _pillow_orientation(im, name)
  except PIL.UnidentifiedImageError:  # Pillow's own message names a BytesIO object, not the file
    raise CorruptImageError(f"{name}: not an image: neither JPEG, JPEG 2000 nor a format Pillow reads") from None
  except PIL.Image.DecompressionBombError as e:
    raise PixelLimitError(f"{name}: {e} (Pillow's own guard, 2 x PIL.Image.MAX_IMAGE_PIXELS)") from None
  except errors.UserError:
    raise
  except (MemoryError, RecursionError) as e:
    raise CorruptImageError(f"{name}: cannot decode image: {type(e).__name__}") from None
  except Exception as e:  # noqa: BLE001 (the boundary to Pillow's parsers of untrusted bytes)
    raise CorruptImageError(f"{name}: cannot decode image: {type(e).__name__}: {e}") from None
  return orient(_rgb(array, name), orientation), kind


def _pillow_orientation(im: PIL.Image.Image, name: str) -> int:
  """The EXIF orientation Pillow reads; 1 (with a warning for the log) when its EXIF block is malformed, as
  the JPEG path reads a malformed block: the pixels are fine, only the tag is lost."""
  try:
    value = im.getexif().get(ORIENTATION_TAG, 1)
  except Exception as e:  # noqa: BLE001 (Pillow's EXIF parser on untrusted bytes)
    warnings.warn(f"{name}: unreadable EXIF block ({type(e).__name__}: {e}); orientation not applied", stacklevel=2)
    return 1
  return value if isinstance(value, int) else 1


def _full_depth(im: PIL.Image.Image, data: bytes, name: str) -> np.ndarray | None:
  """The two formats Pillow reads at 8 bits by dropping bits (16-bit PNG, 16-bit RGB TIFF), decoded by
  imagecodecs at full depth and scaled to 8 bits instead, from the lazily opened header; None for the rest."""
  if data.startswith(PNG_SIGNATURE) and data[24:25] == b"\x10":  # IHDR bit depth 16
    return to_8_bits(imagecodecs.png_decode(data), 16, name)
  if im.format == "TIFF" and im.mode in ("RGB", "RGBA") and max(im.tag_v2.get(258, (8,)), default=8) == 16:
    return to_8_bits(imagecodecs.tiff_decode(data), 16, name)
  return None


def _pillow_pixels(im: PIL.Image.Image, name: str) -> np.ndarray:
  """The loaded image's samples at their own depth, scaled to 8 bits."""
  if im.mode.startswith("I;16"):
    return to_8_bits(np.asarray(im).astype(np.uint16), 16, name)
  if im.mode == "I":  # Pillow scales PGM/PPM samples to 16 bits here; other sources must be in that range
    return to_8_bits(np.asarray(im), 16, name)
  if im.mode == "F":
    raise CorruptImageError(f"{name}: floating-point pixels: their range is not in the file; save as 8 or 16 bits")
  if im.mode == "P":
    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
  elif im.mode in ("LA", "La", "PA"):
    im = im.convert("RGBA")
  elif im.mode == "1":
    im = im.convert("L")
  elif im.mode not in ("L", "RGB", "RGBA"):
    im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, RGBa: Pillow's conversion
  return np.asarray(im)
