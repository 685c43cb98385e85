"""The report's codec section: every codec of `degradations.codecs` at its strong end, and rate against accuracy.

Two views of the single-codec sweeps (specs of one codec op, evaluated with their mean bits per pixel):
- per codec, the specs of its bin's level range: baseline, the codec's own branch, MS, the oracle and the
  bitstream rule, top-1 with its 95% Wilson interval (the row's `ci95_low` / `ci95_high`);
- the rate-accuracy figure: top-1 against the file's bits per pixel for every codec, baseline, MS and oracle.
  At 32x32 every file's headers are a large share of its bits (a flat grey 32x32 image is a 641-byte JPEG,
  5.0 bpp, and a 306-byte AVIF, 2.4 bpp), so the figure compares files as served, headers included.
And at equal bits: for each spec of a codec's bin, every other codec's spec within 15% of its mean bpp, the
baseline's top-1 difference (other - this) and MS's gain over the baseline on the other, both with paired
bootstrap intervals over the same test images (`stats.Bootstrap`); an interval holding 0 is "undecided".
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Sequence

from matplotlib.figure import Figure

from msnet import degradations
from msnet.report import stats, tables
from msnet.report.sections import figure, write_csv

Row = dict[str, Any]
METHODS = ("baseline", "branch", "ms", "oracle", "bitstream")
CURVE_METHODS = {"baseline": "-", "ms": "--", "oracle": ":"}
COLORS = {"jpeg": "tab:red", "jp2k": "tab:blue", "webp": "tab:green", "avif": "tab:purple", "jxl": "tab:orange"}
CSV_FIELDS = ("codec", "spec", "bpp", "psnr", *[f"{m}{s}" for m in METHODS for s in ("", "_lo", "_hi")],
              "ms_gain", "ms_gain_lo", "ms_gain_hi")
EQUAL_FIELDS = ("spec", "bpp", "other", "other_bpp", "baseline_difference", "lo", "hi", "ms_gain", "ms_lo", "ms_hi")
EQUAL_BITS = 1.15  # "equal bits": mean bpp within this factor


def single_codec_rows(rows: Sequence[Row], method: str, codec: str) -> list[Row]:
  """A method's rows of one-op specs of `codec`, by mean bpp."""
  return sorted((r for r in rows if r["method"] == method and r["codec"] == codec and not r["pre"]
                 and r["kind"] == r["codec"] and r["bpp"] is not None), key=lambda r: r["bpp"])


def strong_end_rows(rows: Sequence[Row], bins: Sequence[Any], boot: stats.Bootstrap) -> list[dict[str, Any]]:
  """Per codec bin, each single-codec spec in the bin: bpp, PSNR, top-1 [95% CI] of the methods and MS's paired
  gain over the baseline."""
  idx = tables.index(rows)
  rules = [list(b.match) for b in bins]
  out = []
  for i, b in enumerate(bins):
    if i == 0:  # the clean bin: what no rule matches, not a codec's strong end
      continue
    for codec in degradations.codecs.CODECS:
      for r in single_codec_rows(rows, "baseline", codec):
        if degradations.bin_of(r["spec"], rules) != i:
          continue
        row = dict(codec=codec, spec=r["spec"], bpp=r["bpp"], psnr=r["psnr"])
        for m in METHODS:
          cell = idx.get((f"branch_{b.name}" if m == "branch" else m, r["spec"]))
          row.update({m: _pct(cell, "top1"), f"{m}_lo": _pct(cell, "ci95_low"), f"{m}_hi": _pct(cell, "ci95_high")})
        gain = _gain(boot, idx, r["spec"])
        out.append(dict(row, ms_gain=gain["point"], ms_gain_lo=gain["lo"], ms_gain_hi=gain["hi"]))
  return out


def _pct(cell: Row | None, field: str) -> float | None:
  return None if cell is None or cell.get(field) is None else 100.0 * cell[field]


def _gain(boot: stats.Bootstrap, idx: dict, spec: str) -> dict[str, float]:
  """MS - baseline on `spec` in points with its paired interval (NaN without both)."""
  ms, base = ("ms", spec), ("baseline", spec)
  if ms not in idx or base not in idx:
    return dict(point=math.nan, lo=math.nan, hi=math.nan)
  return boot.interval(lambda x: 100.0 * (x[ms] - x[base]))


def equal_bits_rows(rows: Sequence[Row], bins: Sequence[Any], boot: stats.Bootstrap) -> list[dict[str, Any]]:
  """For each spec in a codec's bin, every later codec's (registry order) spec nearest in mean bpp when within
  EQUAL_BITS of it: the baseline's paired difference (other - this) and MS's paired gain on the other, in points."""
  rules = [list(b.match) for b in bins]
  idx = tables.index(rows)
  names = list(degradations.codecs.CODECS)
  out = []
  for i, codec in enumerate(names):
    for r in single_codec_rows(rows, "baseline", codec):
      if not degradations.bin_of(r["spec"], rules):
        continue
      for other in names[i + 1:]:
        candidates = single_codec_rows(rows, "baseline", other)
        if not candidates:
          continue
        near = min(candidates, key=lambda c: abs(math.log(c["bpp"] / r["bpp"])))
        if abs(math.log(near["bpp"] / r["bpp"])) > math.log(EQUAL_BITS):
          continue
        a, b = ("baseline", near["spec"]), ("baseline", r["spec"])
        diff = boot.interval(lambda x, a=a, b=b: 100.0 * (x[a] - x[b]))
        gain = _gain(boot, idx, near["spec"])
        out.append(dict(spec=r["spec"], bpp=r["bpp"], other=near["spec"], other_bpp=near["bpp"],
                        baseline_difference=diff["point"], lo=diff["lo"], hi=diff["hi"],
                        ms_gain=gain["point"], ms_lo=gain["lo"], ms_hi=gain["hi"]))
  return out


def rate_accuracy(rows: Sequence[Row], path: pathlib.Path) -> str | None:
  """Top-1 against bits per pixel (log), one colour per codec, one line style per method."""
  fig = Figure(figsize=(7.5, 5))
  ax = fig.add_subplot()
  drawn = 0
  for codec in degradations.codecs.CODECS:
    for method, style in CURVE_METHODS.items():
      pts = single_codec_rows(rows, method, codec)
      if pts:
        ax.plot([r["bpp"] for r in pts], [100.0 * r["top1"] for r in pts], linestyle=style, marker=".",
                color=COLORS.get(codec), label=f"{degradations.codecs.get(codec).title} {method}")
        drawn += 1
  if not drawn:
    return "no single-codec sweep rows with a bit rate"
  ax.set_xscale("log")
  ax.set_xlabel("bits per pixel of the file (log scale, mean over images, headers included)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("Rate against accuracy: baseline (solid), MS (dashed), oracle (dotted)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return None


def _cell(r: dict[str, Any], m: str) -> str:
  return "-" if r[m] is None else f"{r[m]:.1f} [{r[f'{m}_lo']:.1f}, {r[f'{m}_hi']:.1f}]"


def _interval(point: float, lo: float, hi: float) -> str:
  if math.isnan(point):
    return "-"
  verdict = "undecided" if lo <= 0 <= hi else ("higher" if lo > 0 else "lower")
  return f"{point:+.1f} [{lo:+.1f}, {hi:+.1f}] {verdict}"


def codec_section(rows: Sequence[Row], bins: Sequence[Any], boot: stats.Bootstrap, out: pathlib.Path) -> list[str]:
  """The section's lines (nothing when the run has no single-codec sweep beyond JPEG and JPEG 2000)."""
  if not any(single_codec_rows(rows, "baseline", c) for c in degradations.codecs.CODECS if c not in ("jpeg", "jp2k")):
    return []
  strong = strong_end_rows(rows, bins, boot)
  write_csv(out / "codecs.csv", CSV_FIELDS, strong)
  lines = ["## Codecs at their strong end", "",
           "Each codec's specs in its bin: top-1 % [95% Wilson interval] of the baseline, the codec's own branch, "
           "MS, the oracle and the bitstream rule, and what MS gets back over the baseline in points [95% paired "
           "bootstrap interval] (`codecs.csv`). bpp counts whole files, headers included.", "",
           "| spec | bpp | PSNR | " + " | ".join(METHODS) + " | MS - baseline |",
           "|---|---|---|" + "---|" * (len(METHODS) + 1)]
  lines += [f"| `{r['spec']}` | {r['bpp']:.2f} | {r['psnr']:.1f} | " + " | ".join(_cell(r, m) for m in METHODS)
            + f" | {_interval(r['ms_gain'], r['ms_gain_lo'], r['ms_gain_hi'])} |" for r in strong]
  lines.append("")
  figure(lines, "rate_accuracy", rate_accuracy(rows, out / "rate_accuracy.png"),
         "Top-1 against bits per pixel for every codec: at equal bits, the codec with the higher curve hurts "
         "the classifier less; the gap from solid to dashed is what master-slave gets back.")
  equal = equal_bits_rows(rows, bins, boot)
  if equal:
    write_csv(out / "codecs_equal_bits.csv", EQUAL_FIELDS, equal)
    lines += [f"At equal bits: each spec of a codec's bin against every other codec's spec within "
              f"{100 * (EQUAL_BITS - 1):.0f}% of its mean bpp; the baseline's top-1 on the other minus on this one "
              "(higher: the other codec hurts the classifier less at these bits), and MS's gain over the baseline "
              "on the other, in points [95% paired bootstrap interval] (`codecs_equal_bits.csv`).", "",
              "| spec (bpp) | other codec's spec (bpp) | baseline: other - this | MS - baseline on the other |",
              "|---|---|---|---|"]
    lines += [f"| `{r['spec']}` ({r['bpp']:.2f}) | `{r['other']}` ({r['other_bpp']:.2f}) | "
              f"{_interval(r['baseline_difference'], r['lo'], r['hi'])} | "
              f"{_interval(r['ms_gain'], r['ms_lo'], r['ms_hi'])} |" for r in equal]
    lines.append("")
  return lines
