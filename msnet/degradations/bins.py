"""Quality bins: the master network's label, from a spec or from what a receiver reads in the bitstream.

A rule `kind:lo-hi` matches a codec op when its kind is `kind` and its level lies in [lo, hi]: for `jpeg`
the IJG quality (1-100, 1 strongest), for `jp2k` the JPEG 2000 compression ratio R:1 (`hi` may be `inf`,
the strong end of that scale). Bin i holds a list of rules (any may match); bins are tried in order and the
first match wins; bin 0 takes the rest (clean, noise, blur, codecs no rule matches).

A chain that encodes more than once has two bins. `bin_of_bitstream` is what a receiver reads: the last
encode only (`jpeg:10+jpeg:90` reads as quality 90, bin 0). `bin_of`, the true bin (the master's label and
the oracle's route), is the degradation the image carries: the bin of the chain's last codec op that falls in
a degradation bin (not bin 0), else 0. A mild re-encode does not remove a strong encode's artefacts, so
`jpeg:10+jpeg:90` and `jpeg:10+resize:0.5+jpeg:75` are JPEG-bin images and `jp2k:20+jpeg:90` (at 32x32) a
JPEG 2000 one; of two strong encodes the later one's artefacts lie on top, so `jp2k:20+jpeg:10` is JPEG's.
For chains with one codec both are the last codec's bin, as before.
Files of codecs that do not store their level (WebP, AVIF, JPEG XL: quantisers, not the quality setting) are
binned by a receiver through rate rules, `webp@bpp:0-1.5`: the bits per pixel of the file. Rate rules never
match a spec (`bin_of`), level rules match both; a lossless file is bin 0.
A bin with no rules never matches by rule. Configs extend a codec's strongest bin to the strong end of its
scale (`jpeg:1-20`, `jp2k:80-inf`): a spec stronger than any bin's training range is still that codec's
degradation, and sending it to the clean bin would make the oracle no upper bound. `check_disjoint`
refuses rules of two bins that overlap, where the order of the bins would silently decide.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from msnet.degradations import codecs
from msnet.degradations.spec import Spec, parse

BIN_KINDS = tuple(codecs.CODECS)
_RULE = re.compile(r"(\w+)(@bpp)?:([0-9]*\.?[0-9]+)-([0-9]*\.?[0-9]+|inf)")


@dataclasses.dataclass(frozen=True)
class BinRule:
  kind: str   # a codec of `codecs.CODECS`
  lo: float   # inclusive range: on the op's `level` scale (JPEG quality, JPEG 2000 ratio, WebP quality, ...),
  hi: float   # or of a file's bits per pixel when `rate`
  rate: bool = False

  def matches(self, kind: str | None, level: float | None) -> bool:
    return kind == self.kind and level is not None and self.lo <= level <= self.hi

  def __str__(self) -> str:
    return f"{self.kind}{'@bpp' if self.rate else ''}:{self.lo:g}-{self.hi:g}"


@functools.lru_cache(maxsize=256)
def parse_bin_rule(rule: str) -> BinRule:
  """`"jpeg:5-20"` -> BinRule("jpeg", 5, 20), `"jp2k:80-inf"` -> BinRule("jp2k", 80, inf), `"webp@bpp:0-1.5"`
  -> BinRule("webp", 0, 1.5, rate=True); ValueError naming the rule if malformed."""
  m = _RULE.fullmatch(rule.strip()) if isinstance(rule, str) else None
  if m is None:
    raise ValueError(f"bad bin rule {rule!r}: expected 'kind:lo-hi' or 'kind@bpp:lo-hi' with kind in {BIN_KINDS} "
                     "and hi a number or 'inf', e.g. 'jpeg:1-20', 'jp2k:80-inf', 'webp@bpp:0-1.5'")
  kind, rate, lo, hi = m.group(1), m.group(2) is not None, float(m.group(3)), float(m.group(4))
  if kind not in BIN_KINDS:
    raise ValueError(f"bad bin rule {rule!r}: unknown kind {kind!r}, expected one of {BIN_KINDS}")
  if lo > hi:
    raise ValueError(f"bad bin rule {rule!r}: empty range, {lo:g} > {hi:g}")
  return BinRule(kind, lo, hi, rate)


def check_disjoint(bin_rules: Sequence[Iterable[str]]) -> None:
  """ValueError naming both rules and bins if rules of two bins overlap (first match would decide silently)."""
  seen: list[tuple[int, str, BinRule]] = []
  for i, rules in enumerate(bin_rules):
    for rule in rules:
      r = parse_bin_rule(rule)
      for j, other, o in seen:
        if j != i and (r.kind, r.rate) == (o.kind, o.rate) and r.lo <= o.hi and o.lo <= r.hi:
          raise ValueError(f"bin rule {rule!r} of bin {i} overlaps {other!r} of bin {j}: a spec in both would "
                           f"silently go to bin {j}; make the two ranges disjoint")
      seen.append((i, rule, r))


def _first_match(kind: str | None, level: float | None, bin_rules: Iterable[Iterable[str]], rate: bool = False) -> int:
  for i, rules in enumerate(bin_rules):
    if any((r := parse_bin_rule(rule)).rate == rate and r.matches(kind, level) for rule in rules):
      return i
  return 0


def _codec_bin(op: Any, bin_rules: Sequence[Sequence[str]]) -> int:
  """Bin of one op by its nominal level; 0 for ops that are no codec (`jp2k_psnr` has no ratio: no rule)."""
  return 0 if op.codec is None else _first_match(op.codec, op.level, bin_rules)


def bin_of(spec: str | Spec, bin_rules: Iterable[Iterable[str]]) -> int:
  """The true bin of a spec: that of its last codec op in a degradation bin (a strong first encode is not
  hidden by a mild last one), else 0."""
  rules = [list(r) for r in bin_rules]
  return next((b for b in (_codec_bin(op, rules) for op in reversed(parse(spec).ops)) if b != 0), 0)


def bin_of_bitstream(info: Mapping[str, Any], bin_rules: Iterable[Iterable[str]]) -> int:
  """Bin from what a receiver reads: the codec and the level read from its bytes (`codecs.Codec.level`: JPEG's
  quality estimate, JPEG 2000's ratio 24 / bpp) by the level rules, else its bits per pixel by the `@bpp`
  rules; 0 for raw pixels, a lossless file, or neither rule matching."""
  if info.get("lossless"):
    return 0
  rules = [list(r) for r in bin_rules]
  level, bpp = info.get("level"), info.get("bpp")
  by_level = _first_match(info.get("codec"), level, rules) if _finite(level) else 0
  return by_level or (_first_match(info.get("codec"), bpp, rules, rate=True) if _finite(bpp) else 0)


def _finite(x: float | None) -> bool:
  return x is not None and math.isfinite(x)
