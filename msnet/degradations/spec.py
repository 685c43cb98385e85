"""Degradation spec strings parsed into typed, hashable, canonical objects.

Grammar (ops compose left to right with `+`):
  `clean`                      no degradation (the identity; dropped when combined with other ops)
  `jpeg:Q` `jpeg:Q@444|422|420`  IJG quality Q in 1..100, chroma subsampling (default 4:2:0)
  `jp2k:R`                     JPEG 2000, 9/7 irreversible wavelet, target compression ratio R:1 (R > 1)
  `jp2k_psnr:P`                JPEG 2000 at OpenJPEG's fixed-quality target PSNR P dB (P > 0)
  `webp:Q`                     lossy WebP at libwebp quality Q in 0..100 (0 strongest)
  `avif:Q`                     AVIF at libavif quality Q in 0..100 (0 strongest, 100 lossless)
  `jxl:D`                      JPEG XL at libjxl (butteraugli) distance D in [0, 25]: 0 lossless, 1 visually
                               lossless (cjxl's default), 25 strongest
  `noise:S`                    additive Gaussian noise, sigma S >= 0 on the 0-255 scale
  `blur:S` `blur:S@R`          Gaussian blur, sigma S > 0, kernel radius R >= 1 (default 4, as in the paper)
  `shift:DX,DY`                 crop DX >= 0 columns on the left and DY >= 0 rows on the top, then repeat the last
                               column and row back to the original size (whole pixels: exact, no resampling)
  `resize:F` `resize:F@FILTER`  scale by F in (0, 4] with Pillow's FILTER, then back to the original size with
                               the same filter (default bicubic; nearest, box, bilinear, hamming, bicubic, lanczos)

`resize` is what a photo meets between two encodes on the web (a thumbnail or a re-upload scaled down and shown
at its old size), so chains such as `jpeg:10+resize:0.5+jpeg:75` can be written. `shift` is a crop between
two uploads: it moves the second encode's 8x8 grid off the first one's (`jpeg:10+shift:3,5+jpeg:75`). The
intermediate size is
round-half-up(F x side), at least 1 pixel; both steps are Pillow's `Image.resize` on the RGB image with the named
filter (`resize:0.5` = bicubic to half size, bicubic back), so the pixels equal Pillow's exactly and no random
numbers are involved. F > 1 scales up first and back down (an interpolation round trip); F = 1 is the identity.

`str(spec)` is canonical: numbers without trailing `.0`, the jpeg default `@420` and the resize default
`@bicubic` left out and the blur radius always written (`blur:1` -> `blur:1@4`), so equal specs have one
string and one `spec_slug`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import ClassVar, Union

SUBSAMPLINGS = ("420", "422", "444")
RESIZE_FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")  # Pillow's Resampling names
MAX_RESIZE_FACTOR = 4.0  # up to 16x the pixels in the intermediate image; more is no longer a round trip
MAX_JXL_DISTANCE = 25.0  # libjxl refuses larger distances


def _num(x: float) -> str:
  """Shortest exact text of a level: 10.0 -> '10', 0.5 -> '0.5'."""
  return str(int(x)) if float(x).is_integer() else repr(float(x))


def _set_level(op: object, field: str, what: str, low: float, strict: bool = True, unit: str = "") -> None:
  """Stores op.<field> as a float after checking it is finite and > low (>= low when not strict)."""
  raw = getattr(op, field)
  value = float(raw)
  if not math.isfinite(value):
    raise ValueError(f"{what} must be a finite number, got {value!r}")
  if not (value > low if strict else value >= low):
    raise ValueError(f"{what} must be {'>' if strict else '>='} {_num(low)}{unit}, got {raw!r}")
  object.__setattr__(op, field, value)


class _Op:
  """What every op declares: its grammar name and form, the codec it encodes with (None: none), and the level
  the bin rules match (None: no rule matches). By default an op is no codec and is written `name:<number>`."""
  name: ClassVar[str] = ""
  codec: ClassVar[str | None] = None
  grammar: ClassVar[str] = ""

  @classmethod
  def from_text(cls, level: str, option: str | None) -> _Op:
    return cls(float(level))

  @property
  def level(self) -> float | None:
    return None


@dataclasses.dataclass(frozen=True)
class Clean(_Op):
  """The identity: the source pixels."""
  name: ClassVar[str] = "clean"
  grammar: ClassVar[str] = "clean"

  @classmethod
  def from_text(cls, level: str, option: str | None) -> Clean:
    return cls()

  def __str__(self) -> str:
    return "clean"


def _check_quality(op: object, what: str, low: int) -> None:
  """Stores op.quality as an int after checking it is an integer in low..100."""
  q = op.quality
  if isinstance(q, bool) or not float(q).is_integer() or not low <= q <= 100:
    raise ValueError(f"{what} quality must be an integer in {low}..100, got {q!r}")
  object.__setattr__(op, "quality", int(q))


def _quality_text(level: str, what: str, low: int) -> int:
  if not re.fullmatch(r"[0-9]+", level):
    raise ValueError(f"{what} quality must be an integer in {low}..100, got {level!r}")
  return int(level)


@dataclasses.dataclass(frozen=True)
class Jpeg(_Op):
  """Baseline JPEG at IJG quality `quality` with `subsampling` chroma ('420', '422' or '444')."""
  quality: int
  subsampling: str = "420"
  name: ClassVar[str] = "jpeg"
  codec: ClassVar[str | None] = "jpeg"
  grammar: ClassVar[str] = "jpeg:Q[@420|422|444]"

  @classmethod
  def from_text(cls, level: str, option: str | None) -> Jpeg:
    return cls(_quality_text(level, "jpeg", 1), "420" if option is None else option)

  @property
  def level(self) -> float:
    """The bin rules' scale: IJG quality (1 strongest)."""
    return float(self.quality)

  def __post_init__(self):
    _check_quality(self, "jpeg", 1)
    if self.subsampling not in SUBSAMPLINGS:
      raise ValueError(f"jpeg subsampling must be one of {SUBSAMPLINGS}, got {self.subsampling!r}")

  def __str__(self) -> str:
    return f"jpeg:{self.quality}" + ("" if self.subsampling == "420" else f"@{self.subsampling}")


@dataclasses.dataclass(frozen=True)
class Jp2k(_Op):
  """JPEG 2000 (9/7 irreversible) rate-controlled to compression ratio `ratio`:1 (raw RGB bytes / codestream)."""
  ratio: float
  name: ClassVar[str] = "jp2k"
  codec: ClassVar[str | None] = "jp2k"
  grammar: ClassVar[str] = "jp2k:R"

  @property
  def level(self) -> float:
    """The bin rules' scale: the compression ratio (higher is stronger)."""
    return self.ratio

  def __post_init__(self):
    _set_level(self, "ratio", "jp2k ratio", 1)

  def __str__(self) -> str:
    return f"jp2k:{_num(self.ratio)}"


@dataclasses.dataclass(frozen=True)
class Jp2kPsnr(_Op):
  """JPEG 2000 (9/7 irreversible) at OpenJPEG's fixed-quality target PSNR `psnr` dB; no level: its ratio
  depends on the image, so no bin rule matches it."""
  psnr: float
  name: ClassVar[str] = "jp2k_psnr"
  codec: ClassVar[str | None] = "jp2k"
  grammar: ClassVar[str] = "jp2k_psnr:P"


  def __post_init__(self):
    _set_level(self, "psnr", "jp2k_psnr target", 0, unit=" dB")

  def __str__(self) -> str:
    return f"jp2k_psnr:{_num(self.psnr)}"


@dataclasses.dataclass(frozen=True)
class Noise(_Op):
  """Additive Gaussian noise, sigma on the 0-255 scale, rounded and clipped to uint8."""
  sigma: float
  name: ClassVar[str] = "noise"
  grammar: ClassVar[str] = "noise:S"

  def __post_init__(self):
    _set_level(self, "sigma", "noise sigma", 0, strict=False)

  def __str__(self) -> str:
    return f"noise:{_num(self.sigma)}"


@dataclasses.dataclass(frozen=True)
class Blur(_Op):
  """Gaussian blur: sigma in pixels, kernel radius (kernel size 2 * radius + 1)."""
  sigma: float
  radius: int = 4
  name: ClassVar[str] = "blur"
  grammar: ClassVar[str] = "blur:S[@R]"

  @classmethod
  def from_text(cls, level: str, option: str | None) -> Blur:
    if option is not None and not re.fullmatch(r"[0-9]+", option):
      raise ValueError(f"blur radius must be an integer >= 1, got {option!r}")
    return cls(float(level), 4 if option is None else int(option))

  def __post_init__(self):
    _set_level(self, "sigma", "blur sigma", 0)
    if isinstance(self.radius, bool) or not float(self.radius).is_integer() or self.radius < 1:
      raise ValueError(f"blur radius must be an integer >= 1, got {self.radius!r}")
    object.__setattr__(self, "radius", int(self.radius))

  def __str__(self) -> str:
    return f"blur:{_num(self.sigma)}@{self.radius}"


@dataclasses.dataclass(frozen=True)
class Resize(_Op):
  """Scale by `factor` with Pillow's `resample` filter, then back to the original size with the same filter."""
  factor: float
  resample: str = "bicubic"
  name: ClassVar[str] = "resize"
  grammar: ClassVar[str] = "resize:F[@FILTER]"

  @classmethod
  def from_text(cls, level: str, option: str | None) -> Resize:
    return cls(float(level), "bicubic" if option is None else option)

  def __post_init__(self):
    _set_level(self, "factor", "resize factor", 0)
    if self.factor > MAX_RESIZE_FACTOR:
      raise ValueError(f"resize factor must be <= {_num(MAX_RESIZE_FACTOR)} (a scale and back), got {self.factor!r}")
    if self.resample not in RESIZE_FILTERS:
      raise ValueError(f"resize filter must be one of {RESIZE_FILTERS}, got {self.resample!r}")

  def __str__(self) -> str:
    return f"resize:{_num(self.factor)}" + ("" if self.resample == "bicubic" else f"@{self.resample}")


@dataclasses.dataclass(frozen=True)
class _Quality(_Op):
  """A codec at an integer quality 0..100 (0 strongest) of its library's own scale."""
  quality: int

  def __post_init__(self):
    _check_quality(self, self.name, 0)

  @classmethod
  def from_text(cls, level: str, option: str | None) -> _Quality:
    return cls(_quality_text(level, cls.name, 0))

  @property
  def level(self) -> float:
    """The bin rules' scale: the library's quality (0 strongest)."""
    return float(self.quality)

  def __str__(self) -> str:
    return f"{self.name}:{self.quality}"


@dataclasses.dataclass(frozen=True)
class WebP(_Quality):
  """Lossy WebP (VP8) at libwebp quality `quality` 0..100 (0 strongest), libwebp's default method 4."""
  name: ClassVar[str] = "webp"
  codec: ClassVar[str | None] = "webp"
  grammar: ClassVar[str] = "webp:Q"


@dataclasses.dataclass(frozen=True)
class Avif(_Quality):
  """AVIF (AV1 intra, 8-bit 4:2:0) at libavif quality `quality` 0..100 (0 strongest, 100 lossless)."""
  name: ClassVar[str] = "avif"
  codec: ClassVar[str | None] = "avif"
  grammar: ClassVar[str] = "avif:Q"


@dataclasses.dataclass(frozen=True)
class Jxl(_Op):
  """JPEG XL at libjxl butteraugli distance `distance` in [0, 25] (0 lossless, 1 visually lossless, 25 strongest)."""
  distance: float
  name: ClassVar[str] = "jxl"
  codec: ClassVar[str | None] = "jxl"
  grammar: ClassVar[str] = "jxl:D"

  def __post_init__(self):
    _set_level(self, "distance", "jxl distance", 0, strict=False)
    if self.distance > MAX_JXL_DISTANCE:
      raise ValueError(f"jxl distance must be <= {_num(MAX_JXL_DISTANCE)} (libjxl's maximum), got {self.distance!r}")

  @property
  def level(self) -> float:
    """The bin rules' scale: the distance (higher is stronger)."""
    return self.distance

  def __str__(self) -> str:
    return f"jxl:{_num(self.distance)}"


@dataclasses.dataclass(frozen=True)
class Shift(_Op):
  """Crop `dx` columns on the left and `dy` rows on the top, repeat the last column and row to the old size."""
  dx: int
  dy: int
  name: ClassVar[str] = "shift"
  grammar: ClassVar[str] = "shift:DX,DY"
  level_pattern: ClassVar[str] = r"[0-9]+,[0-9]+"

  def __post_init__(self):
    for field in ("dx", "dy"):
      v = getattr(self, field)
      if isinstance(v, bool) or not float(v).is_integer() or v < 0:
        raise ValueError(f"shift {field} must be an integer >= 0 (whole pixels), got {v!r}")
      object.__setattr__(self, field, int(v))

  @classmethod
  def from_text(cls, level: str, option: str | None) -> Shift:
    dx, dy = level.split(",")
    return cls(int(dx), int(dy))

  def __str__(self) -> str:
    return f"shift:{self.dx},{self.dy}"


Op = Union[Clean, Jpeg, Jp2k, Jp2kPsnr, WebP, Avif, Jxl, Noise, Blur, Resize, Shift]
# The grammar: every op by its name. An op whose `codec` is set encodes through that entry of
# `degradations.codecs.CODECS`; its `level` is what the bin rules match.
OPS: dict[str, type] = {op.name: op for op in (Clean, Jpeg, Jp2k, Jp2kPsnr, WebP, Avif, Jxl, Noise, Blur, Resize,
                                                Shift)}


@dataclasses.dataclass(frozen=True)
class Spec:
  """A chain of degradations applied left to right; `str()` is the canonical spec string."""
  ops: tuple[Op, ...]

  def __post_init__(self):
    ops = tuple(op for op in self.ops if not isinstance(op, Clean)) or (Clean(),)
    object.__setattr__(self, "ops", ops)

  def __str__(self) -> str:
    return "+".join(str(op) for op in self.ops)

  def __add__(self, other: Spec | str) -> Spec:
    return Spec(self.ops + parse(other).ops)

  @property
  def last_codec(self) -> Op | None:
    """The last compression op of the chain (what a receiver's bitstream shows), or None."""
    return next((op for op in reversed(self.ops) if op.codec is not None), None)


_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_KNOWN = ", ".join(op.grammar for op in OPS.values())


def _parse_op(token: str, spec: str) -> Op:
  name, colon, arg = token.partition(":")
  where = f"in spec {spec!r}"
  op = OPS.get(name)
  if op is None:
    raise ValueError(f"unknown degradation {name!r} {where}; known: {_KNOWN}")
  if op is Clean:
    if colon:
      raise ValueError(f"'clean' takes no level, got {token!r} {where}")
    return Clean()
  level, at, option = arg.partition("@")
  if not re.fullmatch(getattr(op, "level_pattern", _NUMBER), level):
    what = "two whole numbers of pixels" if op is Shift else "a non-negative number level"
    raise ValueError(f"{name} needs {what} ({op.grammar}), got {token!r} {where}")
  if at and "@" not in op.grammar:
    raise ValueError(f"{name} takes no '@' option, got {token!r} {where}")
  try:
    return op.from_text(level, option if at else None)
  except ValueError as e:
    raise ValueError(f"{e} (token {token!r} {where})") from None


@functools.lru_cache(maxsize=4096)
def _parse_str(spec: str) -> Spec:
  text = spec.strip()
  if not text:
    raise ValueError("empty degradation spec ''; use 'clean' for none")
  tokens = [t.strip() for t in text.split("+")]
  if any(not t for t in tokens):
    raise ValueError(f"empty degradation between '+' in spec {spec!r}")
  return Spec(tuple(_parse_op(t, spec) for t in tokens))


def parse(spec: str | Spec) -> Spec:
  """Spec string (or Spec) -> Spec; ValueError names the bad token."""
  if isinstance(spec, Spec):
    return spec
  if not isinstance(spec, str):
    raise ValueError(f"a degradation spec must be a string, got {type(spec).__name__} {spec!r}")
  return _parse_str(spec)


_SLUG_OP = {"jp2k_psnr": "jp2kpsnr"}


def spec_slug(spec: str | Spec) -> str:
  """Filesystem-safe, unique name of a spec: `blur:1@4+jpeg:10` -> `blur-1r4_jpeg-10`."""
  parts = []
  for op in parse(spec).ops:
    name, _, rest = str(op).partition(":")
    level, at, option = rest.partition("@")
    sep = {"blur": "r", "jpeg": "s", "resize": "f"}.get(name, "") if at else ""
    parts.append(_SLUG_OP.get(name, name) + (f"-{level}{sep}{option}" if rest else ""))
  return "_".join(parts).replace(".", "p").replace(",", "c").replace("+", "")
