"""The paper's claims, each checked on this run's numbers with its criterion stated."""

from __future__ import annotations

import math
from typing import Any, Sequence

from msnet.report import tables
from msnet.report.sections import plural

Row = dict[str, Any]


def _verdict(ok: bool) -> str:
  return "**holds**" if ok else "**does not hold**"


def claims_section(rows: Sequence[Row], t1: Sequence[dict[str, Any]]) -> list[str]:
  """The paper's claims, each checked on this run's numbers with the criterion stated."""
  lines = ["## The paper's claims, checked on these results", ""]
  by = {r["method"]: r for r in t1}

  eq = {k: tables.accuracy_at_equal_psnr(rows, "baseline", "noise", k) for k in ("jpeg", "jp2k")}
  parts = [f"{k}: noise {100 * v['mean_a']:.1f}% vs {k} {100 * v['mean_b']:.1f}% over {v['lo']:.1f}-{v['hi']:.1f} dB"
           for k, v in eq.items() if v]
  if parts:
    ok = all(v["mean_a"] > v["mean_b"] for v in eq.values() if v)
    lines.append(f"1. *Noise hurts less than compression at equal PSNR* (mean baseline top-1 over the PSNR "
                 f"range both sweeps cover, interpolated): {'; '.join(parts)}. {_verdict(ok)}.")
  else:
    lines.append("1. *Noise hurts less than compression at equal PSNR*: cannot be checked (the noise and "
                 "compression sweeps' PSNR ranges do not overlap or are missing).")

  if "ms" in by:
    ms = by["ms"]
    gain, loss = ms["d_prime"] - ms["d"], ms["c_prime"] - ms["c"]
    lines.append(f"2. *MS improves JPEG-10 accuracy with little clean loss* (criterion: JPEG-10 gain > 0 and "
                 f"clean change >= -1 point): JPEG-10 {gain:+.1f} points, clean {loss:+.1f} points. "
                 f"{_verdict(gain > 0 and loss >= -1.0)}.")
  else:
    lines.append("2. *MS improves JPEG-10 accuracy with little clean loss*: cannot be checked (no MS rows).")

  undefined = bool(t1) and math.isnan(t1[0]["pct_change"])
  why_undefined = (f"the baseline's clean and JPEG-10 top-1 are equal ({t1[0]['c']:.1f}%), so % change is "
                   "undefined") if undefined else ""
  if undefined:
    lines.append(f"3. *AMS comes close to MS*: cannot be checked ({why_undefined}).")
  elif "ms" in by and "ams" in by:
    p_ms, p_ams = by["ms"]["pct_change"], by["ams"]["pct_change"]
    lines.append(f"3. *AMS comes close to MS* (criterion: AMS's % change >= 0.75 x MS's, the paper has "
                 f"52.5 vs 60.5): AMS {tables.fmt(p_ams)}% vs MS {tables.fmt(p_ms)}%. "
                 f"{_verdict(not math.isnan(p_ms) and p_ams >= 0.75 * p_ms)}.")
  else:
    lines.append("3. *AMS comes close to MS*: cannot be checked (MS or AMS rows missing).")

  fits = tables.combined_fit(rows)
  for number, kind, claim, want in ((4, "noise", "combined noise + compression is bounded by the worse of the two",
                                     "worse"),
                                    (5, "blur", "blur + compression is additive", "additive")):
    mine = [f for f in fits if f["pre"].split("+")[-1].split(":")[0] == kind]
    if not mine:
      lines.append(f"{number}. *{claim.capitalize()}*: cannot be checked (no {kind}+codec sweep with its "
                   f"single-degradation counterparts in the results).")
      continue
    parts = [f"{f['pre']} + {f['codec']}: worse-of-two error {f['mae_worse']:.1f}, additive error "
             f"{f['mae_additive']:.1f} points over {plural(f['levels'], 'level')}" for f in mine]
    ok = all((f["mae_worse"] < f["mae_additive"]) == (want == "worse") for f in mine)
    lines.append(f"{number}. *{claim.capitalize()}* (criterion: the {want} model predicts the baseline's "
                 f"combined accuracy with a smaller mean absolute error than the other model): "
                 f"{'; '.join(parts)}. {_verdict(ok)}.")

  da = [by[m] for m in tables.DA_METHODS if m in by]
  if undefined:
    lines.append(f"6. *MS beats the data augmentation baselines on % change*: cannot be checked ({why_undefined}).")
  elif "ms" in by and da:
    best = max(da, key=lambda r: r["pct_change"])
    lines.append(f"6. *MS beats the data augmentation baselines on % change*: MS {tables.fmt(by['ms']['pct_change'])}% "
                 f"vs best DA `{best['method']}` {tables.fmt(best['pct_change'])}%. "
                 f"{_verdict(by['ms']['pct_change'] > best['pct_change'])}.")
  else:
    lines.append("6. *MS beats the data augmentation baselines on % change*: cannot be checked (MS or DA rows "
                 "missing).")
  return lines + [""]
