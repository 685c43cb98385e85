"""JPEG 2000 encoding through OpenJPEG's C API (ctypes), for its own rate control in one encode.

imagecodecs exposes only OpenJPEG's fixed-quality mode (a target PSNR), so hitting a compression ratio
through it takes a search of several encodes. OpenJPEG itself allocates rate in one encode: after
tier-1 coding it picks the largest set of coding passes that fits the byte budget, the mode of
`opj_compress -r R` and of Pillow's `quality_mode='rates'`. This module calls that mode directly on
the libopenjp2 that the imagecodecs wheel bundles (the library msnet already decodes with), so no
compiler and no second copy of OpenJPEG is needed.

The structures below mirror `openjpeg.h` of OpenJPEG 2.x (unchanged since 2.1). `_library()` checks
the layout against the library at load time: `opj_set_default_encoder_parameters` must write exactly
`sizeof(opj_cparameters_t)` bytes and its documented defaults at the expected offsets, else it raises
instead of encoding with a wrong layout.
"""

from __future__ import annotations

import ctypes
import functools
import math
import pathlib
import threading

import numpy as np

_MAXRLVLS = 33          # OPJ_J2K_MAXRLVLS
_PATH_LEN = 4096        # OPJ_PATH_LEN
_JPWL_TILESPECS = 16    # JPWL_MAX_NO_TILESPECS
_JPWL_PACKSPECS = 16    # JPWL_MAX_NO_PACKSPECS
_CODEC_J2K = 0          # OPJ_CODEC_J2K
_CLRSPC_SRGB = 1        # OPJ_CLRSPC_SRGB
_STREAM_BUFFER = 1 << 20
COMMENT = b"-"          # the COM segment's text (7 bytes in all), stripped by msnet.degradations.codecs


class _Poc(ctypes.Structure):
  _fields_ = ([(n, ctypes.c_uint32) for n in ("resno0", "compno0", "layno1", "resno1", "compno1", "layno0",
                                               "precno0", "precno1")]
              + [("prg1", ctypes.c_int), ("prg", ctypes.c_int), ("progorder", ctypes.c_char * 5),
                 ("tile", ctypes.c_uint32)]
              + [(n, ctypes.c_int32) for n in ("tx0", "tx1", "ty0", "ty1")]
              + [(n, ctypes.c_uint32) for n in ("layS", "resS", "compS", "prcS", "layE", "resE", "compE", "prcE",
                                                 "txS", "txE", "tyS", "tyE", "dx", "dy", "lay_t", "res_t",
                                                 "comp_t", "prc_t", "tx0_t", "ty0_t")])


class _CParameters(ctypes.Structure):
  """opj_cparameters_t."""
  _fields_ = [
      ("tile_size_on", ctypes.c_int), ("cp_tx0", ctypes.c_int), ("cp_ty0", ctypes.c_int),
      ("cp_tdx", ctypes.c_int), ("cp_tdy", ctypes.c_int), ("cp_disto_alloc", ctypes.c_int),
      ("cp_fixed_alloc", ctypes.c_int), ("cp_fixed_quality", ctypes.c_int),
      ("cp_matrice", ctypes.POINTER(ctypes.c_int)), ("cp_comment", ctypes.c_char_p), ("csty", ctypes.c_int),
      ("prog_order", ctypes.c_int), ("POC", _Poc * 32), ("numpocs", ctypes.c_uint32),
      ("tcp_numlayers", ctypes.c_int), ("tcp_rates", ctypes.c_float * 100),
      ("tcp_distoratio", ctypes.c_float * 100), ("numresolution", ctypes.c_int), ("cblockw_init", ctypes.c_int),
      ("cblockh_init", ctypes.c_int), ("mode", ctypes.c_int), ("irreversible", ctypes.c_int),
      ("roi_compno", ctypes.c_int), ("roi_shift", ctypes.c_int), ("res_spec", ctypes.c_int),
      ("prcw_init", ctypes.c_int * _MAXRLVLS), ("prch_init", ctypes.c_int * _MAXRLVLS),
      ("infile", ctypes.c_char * _PATH_LEN), ("outfile", ctypes.c_char * _PATH_LEN), ("index_on", ctypes.c_int),
      ("index", ctypes.c_char * _PATH_LEN), ("image_offset_x0", ctypes.c_int), ("image_offset_y0", ctypes.c_int),
      ("subsampling_dx", ctypes.c_int), ("subsampling_dy", ctypes.c_int), ("decod_format", ctypes.c_int),
      ("cod_format", ctypes.c_int), ("jpwl_epc_on", ctypes.c_int), ("jpwl_hprot_MH", ctypes.c_int),
      ("jpwl_hprot_TPH_tileno", ctypes.c_int * _JPWL_TILESPECS), ("jpwl_hprot_TPH", ctypes.c_int * _JPWL_TILESPECS),
      ("jpwl_pprot_tileno", ctypes.c_int * _JPWL_PACKSPECS), ("jpwl_pprot_packno", ctypes.c_int * _JPWL_PACKSPECS),
      ("jpwl_pprot", ctypes.c_int * _JPWL_PACKSPECS), ("jpwl_sens_size", ctypes.c_int),
      ("jpwl_sens_addr", ctypes.c_int), ("jpwl_sens_range", ctypes.c_int), ("jpwl_sens_MH", ctypes.c_int),
      ("jpwl_sens_TPH_tileno", ctypes.c_int * _JPWL_TILESPECS), ("jpwl_sens_TPH", ctypes.c_int * _JPWL_TILESPECS),
      ("cp_cinema", ctypes.c_int), ("max_comp_size", ctypes.c_int), ("cp_rsiz", ctypes.c_int),
      ("tp_on", ctypes.c_char), ("tp_flag", ctypes.c_char), ("tcp_mct", ctypes.c_char), ("jpip_on", ctypes.c_int),
      ("mct_data", ctypes.c_void_p), ("max_cs_size", ctypes.c_int), ("rsiz", ctypes.c_uint16),
  ]


class _ImageCompParm(ctypes.Structure):
  """opj_image_cmptparm_t."""
  _fields_ = [(n, ctypes.c_uint32) for n in ("dx", "dy", "w", "h", "x0", "y0", "prec", "bpp", "sgnd")]


class _ImageComp(ctypes.Structure):
  """opj_image_comp_t."""
  _fields_ = ([(n, ctypes.c_uint32) for n in ("dx", "dy", "w", "h", "x0", "y0", "prec", "bpp", "sgnd",
                                               "resno_decoded", "factor")]
              + [("data", ctypes.POINTER(ctypes.c_int32)), ("alpha", ctypes.c_uint16)])


class _Image(ctypes.Structure):
  """opj_image_t."""
  _fields_ = ([(n, ctypes.c_uint32) for n in ("x0", "y0", "x1", "y1", "numcomps")]
              + [("color_space", ctypes.c_int), ("comps", ctypes.POINTER(_ImageComp)),
                 ("icc_profile_buf", ctypes.c_void_p), ("icc_profile_len", ctypes.c_uint32)])


_WRITE_FN = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP_FN = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_MSG_FN = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)


class OpenJpegError(RuntimeError):
  """OpenJPEG could not be loaded, does not match the expected API, or failed to encode."""


def _candidates() -> list[pathlib.Path]:
  """The libopenjp2 bundled with the imagecodecs wheel (Linux `imagecodecs.libs`, macOS `.dylibs`, Windows DLLs)."""
  import imagecodecs  # noqa: PLC0415
  package = pathlib.Path(imagecodecs.__file__).parent
  dirs = [package.parent / "imagecodecs.libs", package / ".dylibs", package]
  return sorted(p for d in dirs if d.is_dir() for p in d.iterdir()
                if p.name.startswith(("libopenjp2", "openjp2")) and (".so" in p.name or p.suffix in (".dylib", ".dll")))


def _check_layout(lib: ctypes.CDLL) -> None:
  """Raise unless the library's opj_cparameters_t has our size and its defaults at our offsets."""
  size = ctypes.sizeof(_CParameters)
  raw = (ctypes.c_ubyte * (size + 256))(*([0xA5] * (size + 256)))
  lib.opj_set_default_encoder_parameters(raw)
  overrun = bytes(raw[size:]) != b"\xa5" * 256
  params = _CParameters.from_buffer(raw)
  defaults = dict(numresolution=6, cblockw_init=64, cblockh_init=64, roi_compno=-1, subsampling_dx=1,
                  subsampling_dy=1, decod_format=-1, cod_format=-1, tcp_numlayers=0, cp_disto_alloc=0)
  wrong = {k: getattr(params, k) for k, v in defaults.items() if getattr(params, k) != v}
  if overrun or raw[size - 1] == 0xA5 or wrong:
    raise OpenJpegError(
        f"libopenjp2 {lib.opj_version().decode()}: opj_cparameters_t does not match msnet's OpenJPEG 2.x "
        f"layout (size {size} bytes; fields off: {wrong or 'none'}; bytes written past the end: {overrun}). "
        "Install the imagecodecs version pinned in pyproject.toml.")


@functools.cache
def _library(path: str | None = None) -> ctypes.CDLL:
  """libopenjp2 (default: imagecodecs' copy) with its prototypes declared and its layout checked, once."""
  if path is None:
    found = _candidates()
    if not found:
      raise OpenJpegError("libopenjp2 not found beside the imagecodecs package (imagecodecs.libs/, .dylibs/): "
                          "msnet encodes JPEG 2000 with the OpenJPEG that the imagecodecs wheel bundles")
    path = str(found[0])
  try:
    lib = ctypes.CDLL(path)
  except OSError as e:
    raise OpenJpegError(f"cannot load libopenjp2 from {path}: {e}") from e
  p = ctypes.c_void_p
  for name, res, args in (
      ("opj_version", ctypes.c_char_p, []),
      ("opj_set_default_encoder_parameters", None, [p]),
      ("opj_image_create", ctypes.POINTER(_Image), [ctypes.c_uint32, ctypes.POINTER(_ImageCompParm), ctypes.c_int]),
      ("opj_image_destroy", None, [p]),
      ("opj_create_compress", p, [ctypes.c_int]),
      ("opj_destroy_codec", None, [p]),
      ("opj_setup_encoder", ctypes.c_int, [p, ctypes.POINTER(_CParameters), p]),
      ("opj_start_compress", ctypes.c_int, [p, p, p]),
      ("opj_encode", ctypes.c_int, [p, p]),
      ("opj_end_compress", ctypes.c_int, [p, p]),
      ("opj_set_error_handler", ctypes.c_int, [p, _MSG_FN, p]),
      ("opj_stream_create", p, [ctypes.c_size_t, ctypes.c_int]),
      ("opj_stream_destroy", None, [p]),
      ("opj_stream_set_write_function", None, [p, _WRITE_FN]),
      ("opj_stream_set_skip_function", None, [p, _SKIP_FN]),
      ("opj_stream_set_seek_function", None, [p, _SEEK_FN]),
  ):
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = res, args
  version = lib.opj_version().decode()
  if not version.startswith("2."):
    raise OpenJpegError(f"{path} is OpenJPEG {version}; msnet's binding follows the 2.x API")
  _check_layout(lib)
  return lib


def version(library: str | None = None) -> str:
  """The version of the libopenjp2 msnet encodes with."""
  return _library(library).opj_version().decode()


def num_resolutions(height: int, width: int) -> int:
  """Wavelet resolutions (decomposition levels + 1): imagecodecs' rule, min(6, log2(min side) - 2) >= 1."""
  return max(1, min(6, int(math.log2(max(1, min(height, width)))) - 2))


@functools.lru_cache(maxsize=64)
def _component_params(height: int, width: int) -> ctypes.Array:
  """opj_image_cmptparm_t x 3 for an 8-bit unsigned RGB image (cached: building them costs more than encoding)."""
  comp = _ImageCompParm(dx=1, dy=1, w=width, h=height, prec=8, bpp=8, sgnd=0)
  return (_ImageCompParm * 3)(comp, comp, comp)


class _Sink:
  """The output stream's callbacks: a growable buffer with a position (OpenJPEG may seek back)."""

  def __init__(self) -> None:
    self.buffer, self.pos = bytearray(), 0
    self.write = _WRITE_FN(self._write)
    self.skip = _SKIP_FN(self._skip)
    self.seek = _SEEK_FN(self._seek)

  def _write(self, data: int, size: int, _user: int) -> int:
    end = self.pos + size
    if end > len(self.buffer):
      self.buffer.extend(bytes(end - len(self.buffer)))
    self.buffer[self.pos:end] = ctypes.string_at(data, size)
    self.pos = end
    return size

  def _skip(self, size: int, _user: int) -> int:
    self.pos += size
    return size

  def _seek(self, pos: int, _user: int) -> int:
    self.pos = pos
    return 1


_messages = threading.local()


@_MSG_FN
def _on_error(message: bytes, _user: int) -> None:
  _messages.errors.append(message.decode(errors="replace").strip())


def encode(image: np.ndarray, *, ratio: float | None = None, psnr: float | None = None,
           library: str | None = None) -> bytes:
  """One-layer J2K codestream of an HxWx3 uint8 image: 9/7 irreversible wavelet, RGB->YCC transform.

  Exactly one of `ratio` (OpenJPEG rate allocation: the codestream, headers included, fits
  H*W*3 / ratio bytes when that is above the smallest encode) or `psnr` (fixed-quality mode, target
  PSNR in dB). Code-blocks 64x64, LRCP, no precincts, `num_resolutions(H, W)` resolutions and a
  1-byte comment: OpenJPEG counts the main header in the budget, and its default 33-byte version
  string would take budget from the image only for `codecs` to strip it. The codestream is the one
  Pillow writes with `irreversible=True, mct=1, no_jp2=True, comment=COMMENT`, the same resolutions
  and `quality_mode='rates'|'dB'` when both use the same libopenjp2 build (builds may round the rate
  allocation's floats differently: about 1 in 200 codestreams then differs by a byte). `library`: path
  of another libopenjp2 2.x to encode with.
  """
  if (ratio is None) == (psnr is None):
    raise ValueError("give exactly one of ratio= and psnr=")
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
  level = float(ratio if ratio is not None else psnr)
  if not math.isfinite(level) or level <= 0:
    raise ValueError(f"the JPEG 2000 {'ratio' if ratio is not None else 'PSNR'} must be finite and > 0, got {level}")
  lib = _library(library)
  height, width = image.shape[:2]
  params = _CParameters()
  lib.opj_set_default_encoder_parameters(ctypes.byref(params))
  params.tcp_numlayers = 1
  if ratio is not None:
    params.cp_disto_alloc, params.tcp_rates[0] = 1, level
  else:
    params.cp_fixed_quality, params.tcp_distoratio[0] = 1, level
  params.irreversible, params.tcp_mct = 1, b"\x01"
  params.numresolution = num_resolutions(height, width)
  params.cp_comment = COMMENT

  image_ptr = lib.opj_image_create(3, _component_params(height, width), _CLRSPC_SRGB)
  if not image_ptr:
    raise OpenJpegError(f"opj_image_create failed for a {height}x{width} image")
  codec = stream = None
  sink = _Sink()
  _messages.errors = []
  try:
    img = image_ptr.contents
    img.x0, img.y0, img.x1, img.y1 = 0, 0, width, height
    planes = image.transpose(2, 0, 1).astype(np.int32, order="C")  # OpenJPEG holds each component as int32 samples
    comps = img.comps
    for c in range(3):
      ctypes.memmove(comps[c].data, planes[c].ctypes.data, planes[c].nbytes)
    codec = lib.opj_create_compress(_CODEC_J2K)
    lib.opj_set_error_handler(codec, _on_error, None)
    stream = lib.opj_stream_create(_STREAM_BUFFER, 0)
    lib.opj_stream_set_write_function(stream, sink.write)
    lib.opj_stream_set_skip_function(stream, sink.skip)
    lib.opj_stream_set_seek_function(stream, sink.seek)
    ok = (lib.opj_setup_encoder(codec, ctypes.byref(params), image_ptr)
          and lib.opj_start_compress(codec, image_ptr, stream)
          and lib.opj_encode(codec, stream)
          and lib.opj_end_compress(codec, stream))
    if not ok:
      raise OpenJpegError(f"OpenJPEG could not encode a {height}x{width} image at "
                          f"{'ratio' if ratio is not None else 'PSNR'} {level:g}: "
                          f"{'; '.join(_messages.errors) or 'no message'}")
  finally:
    if stream:
      lib.opj_stream_destroy(stream)
    if codec:
      lib.opj_destroy_codec(codec)
    lib.opj_image_destroy(image_ptr)
  return bytes(sink.buffer)
