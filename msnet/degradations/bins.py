"""Quality bins: the master network's label, from a spec or from what a receiver reads in the bitstream.

A rule `kind:lo-hi` matches the last codec of a chain when its kind is `kind` and its level lies in
[lo, hi]: for `jpeg` the IJG quality, for `jp2k` the JPEG 2000 compression ratio R:1. Bin i holds a
list of rules (any may match); bins are tried in order and the first match wins; bin 0 takes the rest
(clean, noise, blur, codecs no rule matches). A bin with no rules never matches by rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from msnet.degradations.spec import Jp2k, Jpeg, Spec, parse

BIN_KINDS = ("jpeg", "jp2k")
_RULE = re.compile(r"(\w+):([0-9]*\.?[0-9]+)-([0-9]*\.?[0-9]+)")


@dataclasses.dataclass(frozen=True)
class BinRule:
  kind: str   # "jpeg" or "jp2k"
  lo: float   # inclusive level range: JPEG quality, or JPEG 2000 ratio
  hi: float

  def matches(self, kind: str | None, level: float | None) -> bool:
    return kind == self.kind and level is not None and self.lo <= level <= self.hi


@functools.lru_cache(maxsize=256)
def parse_bin_rule(rule: str) -> BinRule:
  """`"jpeg:5-20"` -> BinRule("jpeg", 5, 20); ValueError naming the rule if malformed."""
  m = _RULE.fullmatch(rule.strip()) if isinstance(rule, str) else None
  if m is None:
    raise ValueError(f"bad bin rule {rule!r}: expected 'kind:lo-hi' with kind in {BIN_KINDS}, e.g. 'jpeg:5-20'")
  kind, lo, hi = m.group(1), float(m.group(2)), float(m.group(3))
  if kind not in BIN_KINDS:
    raise ValueError(f"bad bin rule {rule!r}: unknown kind {kind!r}, expected one of {BIN_KINDS}")
  if lo > hi:
    raise ValueError(f"bad bin rule {rule!r}: empty range, {lo:g} > {hi:g}")
  return BinRule(kind, lo, hi)


def _first_match(kind: str | None, level: float | None, bin_rules: Iterable[Iterable[str]]) -> int:
  for i, rules in enumerate(bin_rules):
    if any(parse_bin_rule(r).matches(kind, level) for r in rules):
      return i
  return 0


def bin_of(spec: str | Spec, bin_rules: Iterable[Iterable[str]]) -> int:
  """Bin of a spec by its last codec op and nominal level (`jp2k_psnr` has no ratio: no rule matches it)."""
  op = parse(spec).last_codec
  if isinstance(op, Jpeg):
    return _first_match("jpeg", op.quality, bin_rules)
  if isinstance(op, Jp2k):
    return _first_match("jp2k", op.ratio, bin_rules)
  return 0


def bin_of_bitstream(info: Mapping[str, Any], bin_rules: Iterable[Iterable[str]]) -> int:
  """Bin from what a receiver reads: codec + JPEG quality estimate, or JPEG 2000 ratio 24 / bpp; 0 for raw pixels."""
  codec = info.get("codec")
  level = None
  if codec == "jpeg":
    q = info.get("jpeg_quality")
    level = q if q is not None and q >= 1 else None
  elif codec == "jp2k":
    bpp = info.get("bpp")
    level = 24.0 / bpp if bpp is not None and math.isfinite(bpp) and bpp > 0 else None
  return 0 if level is None else _first_match(codec, level, bin_rules)
