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

from msnet.degradations.spec import Jp2k, Jpeg, Spec, parse

BIN_KINDS = ("jpeg", "jp2k")
_RULE = re.compile(r"(\w+):([0-9]*\.?[0-9]+)-([0-9]*\.?[0-9]+|inf)")


@dataclasses.dataclass(frozen=True)
class BinRule:
  kind: str   # "jpeg" or "jp2k"
  lo: float   # inclusive level range: JPEG quality, or JPEG 2000 ratio
  hi: float

  def matches(self, kind: str | None, level: float | None) -> bool:
    return kind == self.kind and level is not None and self.lo <= level <= self.hi


@functools.lru_cache(maxsize=256)
def parse_bin_rule(rule: str) -> BinRule:
  """`"jpeg:5-20"` -> BinRule("jpeg", 5, 20), `"jp2k:80-inf"` -> BinRule("jp2k", 80, inf); ValueError naming
  the rule if malformed."""
  m = _RULE.fullmatch(rule.strip()) if isinstance(rule, str) else None
  if m is None:
    raise ValueError(f"bad bin rule {rule!r}: expected 'kind:lo-hi' with kind in {BIN_KINDS} and hi a number "
                     "or 'inf', e.g. 'jpeg:1-20', 'jp2k:80-inf'")
  kind, lo, hi = m.group(1), float(m.group(2)), float(m.group(3))
  if kind not in BIN_KINDS:
    raise ValueError(f"bad bin rule {rule!r}: unknown kind {kind!r}, expected one of {BIN_KINDS}")
  if lo > hi:
    raise ValueError(f"bad bin rule {rule!r}: empty range, {lo:g} > {hi:g}")
  return BinRule(kind, lo, hi)


def check_disjoint(bin_rules: Sequence[Iterable[str]]) -> None:
  """ValueError naming both rules and bins if rules of two bins overlap (first match would decide silently)."""
  seen: list[tuple[int, str, BinRule]] = []
  for i, rules in enumerate(bin_rules):
    for rule in rules:
      r = parse_bin_rule(rule)
      for j, other, o in seen:
        if j != i and r.kind == o.kind and r.lo <= o.hi and o.lo <= r.hi:
          raise ValueError(f"bin rule {rule!r} of bin {i} overlaps {other!r} of bin {j}: a spec in both would "
                           f"silently go to bin {j}; make the two ranges disjoint")
      seen.append((i, rule, r))


def _first_match(kind: str | None, level: float | None, bin_rules: Iterable[Iterable[str]]) -> int:
  for i, rules in enumerate(bin_rules):
    if any(parse_bin_rule(r).matches(kind, level) for r in rules):
      return i
  return 0


def _codec_bin(op: object, bin_rules: Sequence[Sequence[str]]) -> int:
  """Bin of one op by its nominal level; 0 for ops that are no codec (`jp2k_psnr` has no ratio: no rule)."""
  if isinstance(op, Jpeg):
    return _first_match("jpeg", op.quality, bin_rules)
  if isinstance(op, Jp2k):
    return _first_match("jp2k", op.ratio, bin_rules)
  return 0


def bin_of(spec: str | Spec, bin_rules: Iterable[Iterable[str]]) -> int:
  """The true bin of a spec: that of its last codec op in a degradation bin (a strong first encode is not
  hidden by a mild last one), else 0."""
  rules = [list(r) for r in bin_rules]
  return next((b for b in (_codec_bin(op, rules) for op in reversed(parse(spec).ops)) if b != 0), 0)


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
