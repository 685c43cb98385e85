"""The report's transcoding section: images compressed more than once (the `transcode` sweep).

The bitstream rule reads only the last encode, so a strong first encode behind a mild last one
(`jpeg:10+jpeg:90`) is routed to the clean branch; the master sees pixels and may still find it. Per chain
the section shows top-1 of the baseline, MS, the bitstream rule, the hybrid rule and the oracle, how often
the bitstream and the master route to the true bin (W/eval/master.json), and MS - bitstream with its paired
bootstrap interval (the report's resamples, `stats.Bootstrap`), and says in a sentence where the bitstream
rule fails and whether the master does. Plain Python over the result rows, like the rest of the report.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure

from msnet import degradations
from msnet.report import figures, stats, tables
from msnet.report.sections import figure, pct, write_csv

Row = dict[str, Any]
SWEEP = "transcode"
METHODS = ("baseline", "ms", "bitstream", "hybrid", "oracle")
CSV_FIELDS = ("spec", "true_bin", "bitstream_routed", "master_routed", *METHODS, "ms_minus_bitstream", "ci_lo",
              "ci_hi")
MOSTLY = 0.5  # a router "fails" on a chain when it sends fewer than half of the images to the true bin


def transcode_rows(rows: Sequence[Row], specs: Sequence[str], master: Mapping[str, Any] | None,
                   boot: stats.Bootstrap) -> list[dict[str, Any]]:
  """Per spec of the sweep: top-1 % per method (None when not evaluated), the true bin's name, the fractions
  of images the bitstream and the master route to it, and MS - bitstream in points with its interval."""
  idx = tables.index(rows)
  bins, cells = (master or {}).get("bins", []), (master or {}).get("specs", {})
  out = []
  for spec in specs:
    cell = cells.get(spec, {})
    row = dict(spec=spec, true_bin=bins[cell["true_bin"]] if "true_bin" in cell and bins else None,
               bitstream_routed=cell.get("bitstream_accuracy"), master_routed=cell.get("master_accuracy"),
               **{m: 100.0 * idx[(m, spec)]["top1"] if (m, spec) in idx else None for m in METHODS})
    ms, bit = ("ms", spec), ("bitstream", spec)
    ci = (boot.interval(lambda a: 100.0 * (a[ms] - a[bit])) if ms in idx and bit in idx
          else dict(point=math.nan, lo=math.nan, hi=math.nan))
    out.append(dict(row, ms_minus_bitstream=ci["point"], ci_lo=ci["lo"], ci_hi=ci["hi"]))
  return out


def chain_sentence(r: Mapping[str, Any]) -> str:
  """Where the bitstream rule fails on this chain and whether the master does, from the routing fractions and
  the interval of MS - bitstream."""
  head = f"`{r['spec']}`"
  if r["bitstream_routed"] is None or r["true_bin"] is None:
    return f"{head}: no routing results in W/eval/master.json."
  bit_fails = r["bitstream_routed"] < MOSTLY
  text = (f"{head} (true bin `{r['true_bin']}`): the bitstream rule "
          + (f"fails: it reads the last encode only and routes {pct(r['bitstream_routed'])} of the images to the "
             "true bin" if bit_fails else f"routes {pct(r['bitstream_routed'])} of the images to the true bin"))
  if r["master_routed"] is None:
    return text + "; no master was evaluated."
  master_fails = r["master_routed"] < MOSTLY
  verb = ("fails too" if bit_fails else "fails") if master_fails else "does not fail"
  text += f"; the master {verb}: it routes {pct(r['master_routed'])}"
  if math.isnan(r["ms_minus_bitstream"]):
    return text + "."
  verdict = stats.decide(dict(lo=r["ci_lo"], hi=r["ci_hi"]))
  opposite = stats.decide(dict(lo=-r["ci_hi"], hi=-r["ci_lo"]))
  outcome = ("MS is better" if verdict == "holds" else "the bitstream rule is better" if opposite == "holds"
             else "no difference is decided")
  return text + f". MS - bitstream {r['ms_minus_bitstream']:+.1f} points {_ci(r)}: {outcome}."


def overall(rows: Sequence[Row], specs: Sequence[str], boot: stats.Bootstrap) -> list[str]:
  """Mean top-1 over the sweep's chains of hybrid against MS and the bitstream rule, with intervals."""
  have = {(r["method"], r["spec"]) for r in rows}
  lines = []
  for other in ("ms", "bitstream"):
    if not all((m, s) in have for m in ("hybrid", other) for s in specs):
      continue
    ci = boot.interval(lambda a, o=other: 100.0 * sum(a[("hybrid", s)] - a[(o, s)] for s in specs) / len(specs))
    lines.append(f"hybrid - {other}, mean over the {len(specs)} specs: {ci['point']:+.1f} points "
                 f"{tables.ci_text(ci)}.")
  return lines


def misaligned(rows: Sequence[Row], specs: Sequence[str], boot: stats.Bootstrap) -> list[str]:
  """Per chain with a crop (`shift`) between its encodes whose aligned twin (the chain without the crop) is in the
  sweep: misaligned - aligned top-1 of the baseline, MS, the bitstream rule and the oracle, with intervals."""
  have = {(r["method"], r["spec"]) for r in rows}
  lines = []
  for spec in specs:
    ops = degradations.parse(spec).ops
    if not any(isinstance(op, degradations.Shift) for op in ops):
      continue
    aligned = str(degradations.Spec(tuple(op for op in ops if not isinstance(op, degradations.Shift))))
    if aligned not in specs:
      continue
    parts = []
    for m in ("baseline", "ms", "bitstream", "oracle"):
      if (m, spec) in have and (m, aligned) in have:
        ci = boot.interval(lambda a, m=m: 100.0 * (a[(m, spec)] - a[(m, aligned)]))
        parts.append(f"{m} {ci['point']:+.1f} {tables.ci_text(ci)}")
    if parts:
      lines.append(f"- `{spec}` - `{aligned}` (the second grid moved against the first): " + "; ".join(parts)
                   + " points.")
  return lines


def transcode_figure(table: Sequence[Mapping[str, Any]], path: pathlib.Path) -> str | None:
  """Grouped bars: top-1 per chain and method."""
  methods = [m for m in METHODS if any(r[m] is not None for r in table)]
  if not methods:
    return "no method has results on the transcode sweep"
  fig = Figure(figsize=(max(6.0, 1.3 * len(table)), 4.2))
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / len(methods)
  for j, m in enumerate(methods):
    xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(table))]
    ax.bar(xs, [r[m] or 0.0 for r in table], width, label=m, color=figures.STYLE.get(m, {}).get("color"))
  ax.set_xticks(range(len(table)))
  ax.set_xticklabels([r["spec"].replace("+", "+\n") for r in table], fontsize=7)
  ax.set_ylabel("top-1 %")
  ax.set_title("Images compressed more than once")
  ax.legend(fontsize=7)
  figures._save(fig, path)
  return None


def transcode_section(rows: Sequence[Row], sweeps: Mapping[str, Sequence[str]], master: Mapping[str, Any] | None,
                      boot: stats.Bootstrap, out: pathlib.Path) -> list[str]:
  """The section's markdown lines, `transcode.csv` and `transcode.png`; [] when the results lack the sweep."""
  if SWEEP not in sweeps:
    return []
  specs = list(sweeps[SWEEP])
  table = transcode_rows(rows, specs, master, boot)
  write_csv(out / "transcode.csv", CSV_FIELDS, table)
  shown = [m for m in METHODS if any(r[m] is not None for r in table)]
  lines = ["## Images compressed more than once", "",
           "The `transcode` sweep: chains of encodes as an image meets them on the web. The bitstream rule reads "
           "only the last encode; the true bin (the oracle's route) is the degradation the image carries, its last "
           "encode in a degradation bin. Top-1 %; routed = the share of images the bitstream / the master send "
           "to the true bin; MS - bitstream in points with its 95% paired bootstrap interval. Also in "
           "`transcode.csv`.", "",
           tables.markdown(["spec", "true bin", "bitstream routed", "master routed", *shown, "MS - bitstream",
                            "95% CI"],
                           [[r["spec"], r["true_bin"] or "-", _percent(r["bitstream_routed"]),
                             _percent(r["master_routed"]), *[r[m] for m in shown], r["ms_minus_bitstream"],
                             _ci(r)] for r in table]), ""]
  lines += [f"- {chain_sentence(r)}" for r in table if "+" in r["spec"]] + [""]
  hybrid = overall(rows, specs, boot)
  lines += [*hybrid, ""] if hybrid else []
  shifted = misaligned(rows, specs, boot)
  if shifted:
    lines += ["Misaligned re-encodes, against the same encodes with their grids aligned (95% paired bootstrap "
              "intervals; an interval holding 0 is undecided):", "", *shifted, ""]
  figure(lines, "transcode", transcode_figure(table, out / "transcode.png"),
         "Top-1 per chain of encodes: baseline, MS, the bitstream rule, the hybrid rule and the oracle.")
  return lines


def _ci(r: Mapping[str, Any]) -> str:
  return tables.ci_text(dict(lo=r["ci_lo"], hi=r["ci_hi"]))


def _percent(fraction: float | None) -> float | None:
  return None if fraction is None else 100.0 * fraction
