"""The paper's claims, each decided on this run's per-image results: criterion, point estimate, paired bootstrap
interval and a verdict read from the interval (holds / fails / undecided), never from the point estimate."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from msnet.report import stats, tables
from msnet.report.sections import plural

Row = dict[str, Any]
Interval = dict[str, float]
BASELINE = "baseline"
CLEAN = ("baseline", tables.CLEAN_SPEC)
JPEG10 = ("baseline", tables.JPEG10_SPEC)


def _estimate(label: str, ci: Interval, unit: str) -> str:
  return f"{label} {tables.fmt(ci['point'])}{unit} (95% CI {tables.ci_text(ci)})"


def _pct(method: str) -> Callable[[Mapping[Any, Any]], Any]:
  """The method's % change as a statistic of the accuracies."""
  return lambda a: stats.pct_change(a[CLEAN], a[JPEG10], a[(method, tables.JPEG10_SPEC)])


def _lookup(a: Mapping[Any, Any]) -> Callable[[Row], Any]:
  return lambda r: a[(r["method"], r["spec"])]


def differences(rows: Sequence[Row], t1: Sequence[dict[str, Any]], boot: stats.Bootstrap) -> dict[str, Interval]:
  """The differences the claims rest on, with their intervals (percentage points). Absent inputs, absent keys."""
  methods = {r["method"] for r in t1}
  out: dict[str, Interval] = {}
  da = [m for m in tables.DA_METHODS if m in methods]
  if "ms" in methods and da:
    out["MS - best DA, % change"] = boot.interval(
        lambda a: _pct("ms")(a) - np.maximum.reduce([_pct(m)(a) for m in da]))
  if {"ms", "augmix"} <= methods:
    out["MS - AugMix, % change"] = boot.interval(lambda a: _pct("ms")(a) - _pct("augmix")(a))
  if {"ms", "ams"} <= methods:
    out["AMS - MS, % change"] = boot.interval(lambda a: _pct("ams")(a) - _pct("ms")(a))
  if {"ms", "oracle"} <= methods:
    out["MS - oracle, JPEG-10 top-1"] = boot.interval(
        lambda a: 100.0 * (a[("ms", tables.JPEG10_SPEC)] - a[("oracle", tables.JPEG10_SPEC)]))
  for codec in ("jpeg", "jp2k"):
    if tables.accuracy_at_equal_psnr(rows, BASELINE, "noise", codec) is not None:
      def noise_minus(a: Mapping[Any, Any], codec: str = codec) -> Any:
        eq = tables.accuracy_at_equal_psnr(rows, BASELINE, "noise", codec, acc=_lookup(a))
        return 100.0 * (eq["mean_a"] - eq["mean_b"])
      out[f"noise - {codec}, baseline top-1 at equal PSNR"] = boot.interval(noise_minus)
  return out


def claims_section(rows: Sequence[Row], t1: Sequence[dict[str, Any]], boot: stats.Bootstrap) -> list[str]:
  """The differences table, then each claim with its criterion, estimate, interval and verdict."""
  lines = ["## The paper's claims, decided on these results", "",
           "Every interval is a paired percentile bootstrap over the test images (all methods and specs resampled "
           f"jointly, {boot.resamples:,} resamples, seed {boot.seed}, {100 * boot.level:.0f}%). A claim "
           "**holds** when its whole interval meets the criterion, **fails** when the whole interval misses it, "
           "and is **undecided** when the interval straddles the threshold. A resample where the baseline does "
           "not degrade (c <= d) has no % change; it counts against both ends of the interval.", ""]
  if boot.resamples == 0:
    lines += ["*No per-image results in W/eval/correct/ (an evaluation from before they were kept): no "
              "intervals, so every claim is undecided. Rerun `msnet evaluate`, which evaluates again the specs "
              "that lack them.*", ""]
  diffs = differences(rows, t1, boot)
  if diffs:
    lines += ["Differences the claims rest on (percentage points):", "",
              tables.markdown(["difference", "estimate", "95% CI"],
                              [[k, v["point"], tables.ci_text(v)] for k, v in diffs.items()]), ""]
  by = {r["method"]: r for r in t1}
  undefined = bool(t1) and math.isnan(t1[0]["pct_change"])
  why_undefined = (f"the baseline's JPEG-10 top-1 ({t1[0]['d']:.1f}%) is not below its clean top-1 "
                   f"({t1[0]['c']:.1f}%), so % change is undefined") if undefined else ""

  parts = [(k, v) for k, v in diffs.items() if k.startswith("noise - ")]
  if parts:
    lines.append(_claim(1, "Noise hurts less than compression at equal PSNR",
                        "the baseline's mean top-1 over the PSNR range both sweeps cover (interpolated) is higher "
                        "under noise, for each codec: noise - codec > 0",
                        [(_estimate(label.split(",")[0], ci, " points"), stats.decide(ci)) for label, ci in parts]))
  else:
    lines.append("1. *Noise hurts less than compression at equal PSNR*: cannot be checked (the noise and "
                 "compression sweeps' PSNR ranges do not overlap or are missing).")

  if "ms" in by:
    gain = boot.interval(lambda a: 100.0 * (a[("ms", tables.JPEG10_SPEC)] - a[JPEG10]))
    clean = boot.interval(lambda a: 100.0 * (a[("ms", tables.CLEAN_SPEC)] - a[CLEAN]))
    lines.append(_claim(2, "MS improves JPEG-10 accuracy with little clean loss",
                        "JPEG-10 gain d' - d > 0 and clean change c' - c > -1 point",
                        [(_estimate("JPEG-10 gain", gain, " points"), stats.decide(gain)),
                         (_estimate("clean change", clean, " points"), stats.decide(clean, -1.0))]))
  else:
    lines.append("2. *MS improves JPEG-10 accuracy with little clean loss*: cannot be checked (no MS rows).")

  if undefined:
    lines.append(f"3. *AMS comes close to MS*: cannot be checked ({why_undefined}).")
  elif "ms" in by and "ams" in by:
    close = boot.interval(lambda a: _pct("ams")(a) - 0.75 * _pct("ms")(a))
    lines.append(_claim(3, "AMS comes close to MS",
                        "AMS's % change >= 0.75 x MS's (the paper has 52.5 vs 60.5): AMS - 0.75 MS > 0",
                        [(f"AMS {tables.fmt(by['ams']['pct_change'])}% vs MS {tables.fmt(by['ms']['pct_change'])}%; "
                          + _estimate("AMS - 0.75 MS", close, " points"), stats.decide(close))]))
  else:
    lines.append("3. *AMS comes close to MS*: cannot be checked (MS or AMS rows missing).")

  fits = tables.combined_fit(rows)
  for number, kind, claim, want, other in (
      (4, "noise", "combined noise + compression is bounded by the worse of the two", "worse", "additive"),
      (5, "blur", "blur + compression is additive", "additive", "worse")):
    mine = [i for i, f in enumerate(fits) if f["pre"].split("+")[-1].split(":")[0] == kind]
    if not mine:
      lines.append(f"{number}. *{claim.capitalize()}*: cannot be checked (no {kind}+codec sweep with its "
                   f"single-degradation counterparts in the results).")
      continue
    parts = []
    for i in mine:
      f = fits[i]
      ci = boot.interval(lambda a, i=i: (lambda g: g[f"mae_{other}"] - g[f"mae_{want}"])(
          tables.combined_fit(rows, acc=_lookup(a))[i]))
      parts.append((f"{f['pre']} + {f['codec']}: {want} error {f[f'mae_{want}']:.1f}, {other} error "
                    f"{f[f'mae_{other}']:.1f} over {plural(f['levels'], 'level')}; "
                    + _estimate(f"{other} - {want}", ci, " points"), stats.decide(ci)))
    lines.append(_claim(number, claim.capitalize(),
                        f"the {want} model predicts the baseline's combined accuracy with a smaller mean absolute "
                        f"error than the {other} model: {other} error - {want} error > 0", parts))

  if undefined:
    lines.append(f"6. *MS beats the data augmentation baselines on % change*: cannot be checked ({why_undefined}).")
  elif "MS - best DA, % change" in diffs:
    ci = diffs["MS - best DA, % change"]
    lines.append(_claim(6, "MS beats the data augmentation baselines on % change",
                        "MS's % change - the best DA's (the best taken in each resample) > 0",
                        [(_estimate("MS - best DA", ci, " points"), stats.decide(ci))]))
  else:
    lines.append("6. *MS beats the data augmentation baselines on % change*: cannot be checked (MS or DA rows "
                 "missing).")
  augmix = "MS beats AugMix on % change (beyond the paper: AugMix is from 2020)"
  if undefined and {"ms", "augmix"} <= set(by):  # only runs that trained AugMix have this claim
    lines.append(f"7. *{augmix}*: cannot be checked ({why_undefined}).")
  elif "MS - AugMix, % change" in diffs:
    ci = diffs["MS - AugMix, % change"]
    lines.append(_claim(7, augmix, "MS's % change - AugMix's > 0",
                        [(_estimate("MS - AugMix", ci, " points"), stats.decide(ci))]))
  return lines + [""]


def _claim(number: int, claim: str, criterion: str, parts: Sequence[tuple[str, str]]) -> str:
  """One numbered claim: criterion, each part's estimate with its verdict, the claim's verdict (all parts)."""
  verdict = stats.combine([v for _, v in parts])
  body = "; ".join(f"{text}: {v}" for text, v in parts)
  return f"{number}. *{claim}* (criterion: {criterion}): {body}. **{verdict}**."
