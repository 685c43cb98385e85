"""Degradation spec strings parsed into typed, hashable, canonical objects.

Grammar (ops compose left to right with `+`):
  `clean`                      no degradation (the identity; dropped when combined with other ops)
  `jpeg:Q` `jpeg:Q@444|422|420`  IJG quality Q in 1..100, chroma subsampling (default 4:2:0)
  `jp2k:R`                     JPEG 2000, 9/7 irreversible wavelet, target compression ratio R:1 (R > 1)
  `jp2k_psnr:P`                JPEG 2000 at OpenJPEG's fixed-quality target PSNR P dB (P > 0)
  `noise:S`                    additive Gaussian noise, sigma S >= 0 on the 0-255 scale
  `blur:S` `blur:S@R`          Gaussian blur, sigma S > 0, kernel radius R >= 1 (default 4, as in the paper)
  `resize:F` `resize:F@FILTER`  scale by F in (0, 4] with Pillow's FILTER, then back to the original size with
                               the same filter (default bicubic; nearest, box, bilinear, hamming, bicubic, lanczos)

`resize` is what a photo meets between two encodes on the web (a thumbnail or a re-upload scaled down and shown
at its old size), so chains such as `jpeg:10+resize:0.5+jpeg:75` can be written. The intermediate size is
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


@dataclasses.dataclass(frozen=True)
class Clean:
  """The identity: the source pixels."""
  name: ClassVar[str] = "clean"

  def __str__(self) -> str:
    return "clean"


@dataclasses.dataclass(frozen=True)
class Jpeg:
  """Baseline JPEG at IJG quality `quality` with `subsampling` chroma ('420', '422' or '444')."""
  quality: int
  subsampling: str = "420"
  name: ClassVar[str] = "jpeg"

  def __post_init__(self):
    if isinstance(self.quality, bool) or not float(self.quality).is_integer() or not 1 <= self.quality <= 100:
      raise ValueError(f"jpeg quality must be an integer in 1..100, got {self.quality!r}")
    object.__setattr__(self, "quality", int(self.quality))
    if self.subsampling not in SUBSAMPLINGS:
      raise ValueError(f"jpeg subsampling must be one of {SUBSAMPLINGS}, got {self.subsampling!r}")

  def __str__(self) -> str:
    return f"jpeg:{self.quality}" + ("" if self.subsampling == "420" else f"@{self.subsampling}")


@dataclasses.dataclass(frozen=True)
class Jp2k:
  """JPEG 2000 (9/7 irreversible) rate-controlled to compression ratio `ratio`:1 (raw RGB bytes / codestream)."""
  ratio: float
  name: ClassVar[str] = "jp2k"

  def __post_init__(self):
    _set_level(self, "ratio", "jp2k ratio", 1)

  def __str__(self) -> str:
    return f"jp2k:{_num(self.ratio)}"


@dataclasses.dataclass(frozen=True)
class Jp2kPsnr:
  """JPEG 2000 (9/7 irreversible) at OpenJPEG's fixed-quality target PSNR `psnr` dB."""
  psnr: float
  name: ClassVar[str] = "jp2k_psnr"

  def __post_init__(self):
    _set_level(self, "psnr", "jp2k_psnr target", 0, unit=" dB")

  def __str__(self) -> str:
    return f"jp2k_psnr:{_num(self.psnr)}"


@dataclasses.dataclass(frozen=True)
class Noise:
  """Additive Gaussian noise, sigma on the 0-255 scale, rounded and clipped to uint8."""
  sigma: float
  name: ClassVar[str] = "noise"

  def __post_init__(self):
    _set_level(self, "sigma", "noise sigma", 0, strict=False)

  def __str__(self) -> str:
    return f"noise:{_num(self.sigma)}"


@dataclasses.dataclass(frozen=True)
class Blur:
  """Gaussian blur: sigma in pixels, kernel radius (kernel size 2 * radius + 1)."""
  sigma: float
  radius: int = 4
  name: ClassVar[str] = "blur"

  def __post_init__(self):
    _set_level(self, "sigma", "blur sigma", 0)
    if isinstance(self.radius, bool) or not float(self.radius).is_integer() or self.radius < 1:
      raise ValueError(f"blur radius must be an integer >= 1, got {self.radius!r}")
    object.__setattr__(self, "radius", int(self.radius))

  def __str__(self) -> str:
    return f"blur:{_num(self.sigma)}@{self.radius}"


@dataclasses.dataclass(frozen=True)
class Resize:
  """Scale by `factor` with Pillow's `resample` filter, then back to the original size with the same filter."""
  factor: float
  resample: str = "bicubic"
  name: ClassVar[str] = "resize"

  def __post_init__(self):
    _set_level(self, "factor", "resize factor", 0)
    if self.factor > MAX_RESIZE_FACTOR:
      raise ValueError(f"resize factor must be <= {_num(MAX_RESIZE_FACTOR)} (a scale and back), got {self.factor!r}")
    if self.resample not in RESIZE_FILTERS:
      raise ValueError(f"resize filter must be one of {RESIZE_FILTERS}, got {self.resample!r}")

  def __str__(self) -> str:
    return f"resize:{_num(self.factor)}" + ("" if self.resample == "bicubic" else f"@{self.resample}")


Op = Union[Clean, Jpeg, Jp2k, Jp2kPsnr, Noise, Blur, Resize]
CODECS = (Jpeg, Jp2k, Jp2kPsnr)


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
  def last_codec(self) -> Jpeg | Jp2k | Jp2kPsnr | None:
    """The last compression op of the chain (what a receiver's bitstream shows), or None."""
    return next((op for op in reversed(self.ops) if isinstance(op, CODECS)), None)


_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_KNOWN = "clean, jpeg:Q[@420|422|444], jp2k:R, jp2k_psnr:P, noise:S, blur:S[@R], resize:F[@FILTER]"


def _parse_op(token: str, spec: str) -> Op:
  name, colon, arg = token.partition(":")
  where = f"in spec {spec!r}"
  if name == "clean":
    if colon:
      raise ValueError(f"'clean' takes no level, got {token!r} {where}")
    return Clean()
  if name not in ("jpeg", "jp2k", "jp2k_psnr", "noise", "blur", "resize"):
    raise ValueError(f"unknown degradation {name!r} {where}; known: {_KNOWN}")
  level, at, extra = arg.partition("@")
  if not re.fullmatch(_NUMBER, level):
    raise ValueError(f"{name} needs a non-negative number level ({name}:<level>), got {token!r} {where}")
  if at and name not in ("jpeg", "blur", "resize"):
    raise ValueError(f"{name} takes no '@' option, got {token!r} {where}")
  try:
    if name == "jpeg":
      if not re.fullmatch(r"[0-9]+", level):
        raise ValueError(f"jpeg quality must be an integer in 1..100, got {level!r}")
      return Jpeg(int(level), extra if at else "420")
    if name == "jp2k":
      return Jp2k(float(level))
    if name == "jp2k_psnr":
      return Jp2kPsnr(float(level))
    if name == "noise":
      return Noise(float(level))
    if name == "resize":
      return Resize(float(level), extra if at else "bicubic")
    if at and not re.fullmatch(r"[0-9]+", extra):
      raise ValueError(f"blur radius must be an integer >= 1, got {extra!r}")
    return Blur(float(level), int(extra) if at else 4)
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
  return "_".join(parts).replace(".", "p").replace("+", "")
