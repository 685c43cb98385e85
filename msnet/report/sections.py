"""The report's sections other than the claims: each returns its markdown lines and writes its CSV or figure."""

from __future__ import annotations

import csv
import math
import pathlib
from typing import Any, Sequence

from msnet.report import figures, stats, tables

Row = dict[str, Any]


def pct(v: float | None) -> str:
  return "-" if v is None or math.isnan(v) else f"{100.0 * v:.1f}%"


def plural(n: int, word: str) -> str:
  return f"{n} {word}{'' if n == 1 else 's'}"


def figure(lines: list[str], name: str, why_not: str | None, caption: str) -> None:
  if why_not is None:
    lines += [f"![{name}]({name}.png)", "", caption, ""]
  else:
    lines += [f"*{name} is not in this report: {why_not}.*", ""]


def write_csv(path: pathlib.Path, header: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
  with path.open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(header), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})


TABLE1_FIELDS = ("method", "c", "d", "c_prime", "d_prime", "d_gain", "d_gain_lo", "d_gain_hi", "pct_change",
                 "pct_change_lo", "pct_change_hi")


def table1_with_intervals(rows: Sequence[Row], boot: stats.Bootstrap) -> list[dict[str, Any]]:
  """Table 1's rows plus d' - d (points) and % change with their paired bootstrap intervals."""
  c, d = ("baseline", tables.CLEAN_SPEC), ("baseline", tables.JPEG10_SPEC)
  out = []
  for r in tables.table1(rows):
    m = (r["method"], tables.JPEG10_SPEC)
    gain = boot.interval(lambda a, m=m: 100.0 * (a[m] - a[d]))
    pct = boot.interval(lambda a, m=m: stats.pct_change(a[c], a[d], a[m]))
    out.append(dict(r, d_gain=gain["point"], d_gain_lo=gain["lo"], d_gain_hi=gain["hi"], pct_change_lo=pct["lo"],
                    pct_change_hi=pct["hi"]))
  return out


def n_text(rows: Sequence[Row], skipped: int | None) -> str:
  """What n covers: the test records per spec, and the source records degrade skipped as unreadable."""
  sizes = sorted({int(r["n"]) for r in rows})
  text = f"n = {' / '.join(f'{s:,}' for s in sizes)} test images per spec"
  return text + ("" if skipped is None else f" ({plural(skipped, 'source record')} skipped as unreadable)")


def table1_section(t1: Sequence[dict[str, Any]], out: pathlib.Path, scope: str) -> list[str]:
  """scope: whose numbers, with n (e.g. "This run, n = 1,000 test images per spec")."""
  write_csv(out / "table1.csv", TABLE1_FIELDS, t1)
  lines = ["## Table 1: clean and JPEG-10 top-1 per method", ""]
  if not t1:
    lines += [f"*Not computable: the results lack the baseline's `{tables.CLEAN_SPEC}` or "
              f"`{tables.JPEG10_SPEC}` row.*", ""]
  else:
    lines += [f"{scope} (top-1 %; c, d = baseline clean / JPEG-10; c', d' = the method's; "
              "% change = (d' - d) / (c - d); 95% paired bootstrap intervals, see the claims section). The "
              "AlexNet baseline is Fig. 1b's comparison, not a robustness method, and is not listed. Also in "
              "`table1.csv`.", "",
              tables.markdown(["method", "c", "d", "c'", "d'", "d' - d", "95% CI", "% change", "95% CI"],
                              [[r["method"], r["c"], r["d"], r["c_prime"], r["d_prime"], r["d_gain"],
                                tables.ci_text(dict(lo=r["d_gain_lo"], hi=r["d_gain_hi"])), r["pct_change"],
                                tables.ci_text(dict(lo=r["pct_change_lo"], hi=r["pct_change_hi"]))] for r in t1]), ""]
  lines += ["**The paper's Table 1, for reference: ImageNet validation set (50,000 images), VGG-16 except "
            "stability training (Inception) and DeepCloak; these are the paper's numbers, not this run's.**", "",
            tables.markdown(["method (paper)", "c", "d", "c'", "d'", "% change"], tables.PAPER_TABLE1), ""]
  return lines


def sweep_tables(rows: Sequence[Row], sweeps: dict[str, list[str]]) -> list[str]:
  idx = tables.index(rows)
  methods = tables.methods_in(rows)
  lines = ["## Top-1 per sweep", "",
           "Top-1 % per spec and method (n images each; 95% Wilson intervals are in `W/eval/results.csv`).", ""]
  for name, specs in sweeps.items():
    first = next((idx[(methods[0], s)] for s in specs if (methods[0], s) in idx), None) if methods else None
    n = f", n = {first['n']}" if first else ""
    lines += [f"### {name}{n}", "",
              tables.markdown(["spec", "PSNR dB", "bpp", *methods],
                              [[s, _first_field(rows, s, "psnr"), _first_field(rows, s, "bpp"),
                                *[100.0 * idx[(m, s)]["top1"] if (m, s) in idx else None for m in methods]]
                               for s in specs]), ""]
  return lines


def _first_field(rows: Sequence[Row], spec: str, field: str) -> float | None:
  v = next((r[field] for r in rows if r["spec"] == spec), None)
  return None if v is None or not math.isfinite(v) else float(v)


def ce_section(rows: Sequence[Row], sweeps: dict[str, list[str]], out: pathlib.Path) -> list[str]:
  ce = tables.corruption_errors(rows, sweeps)
  mce = tables.mean_ce(ce)
  write_csv(out / "ce.csv", ["method", "sweep", "ce", "rce", "mean_err"], ce)
  lines = ["## Corruption error (the robustness literature's summary)", "",
           "Per sweep, CE = sum of the method's top-1 errors over the sweep / the baseline's (Hendrycks & "
           "Dietterich's CE with this run's baseline, not AlexNet, as normaliser); relative CE first subtracts "
           "each network's own clean error. mCE and relative mCE are means over the sweeps. Below 1 is better "
           "than the baseline. Per-sweep values are in `ce.csv`.", ""]
  if not mce:
    return lines + ["*Not computable: no sweep has rows for the baseline and another method.*", ""]
  sweep_names = list(dict.fromkeys(r["sweep"] for r in ce))
  by = {(r["method"], r["sweep"]): r for r in ce}
  lines += [tables.markdown(["method", "mCE", "rel. mCE", *[f"CE {s}" for s in sweep_names]],
                            [[r["method"], r["mce"], r["rmce"],
                              *[by[(r["method"], s)]["ce"] if (r["method"], s) in by else None
                                for s in sweep_names]] for r in mce], digits=3), ""]
  best = min((r for r in mce if r["method"] not in ("baseline", "oracle") and not math.isnan(r["mce"])),
             key=lambda r: r["mce"], default=None)
  if best is not None:
    lines += [f"Lowest mCE apart from the oracle (which is told the true bin): `{best['method']}` at "
              f"{best['mce']:.3f} over {best['sweeps']} sweeps.", ""]
  return lines


def master_section(master: dict[str, Any] | None, out: pathlib.Path) -> list[str]:
  lines = ["## The master: bin accuracy", ""]
  if master is None:
    return lines + ["*W/eval/master.json is missing.*", ""]
  s = tables.master_summary(master)
  bins = s["bins"]
  if s["has_master"]:
    lines += [f"Over all evaluated specs the master picks the true bin for {pct(s['accuracy']['master'])} of "
              f"the images; the bin read from the bitstream (no network) is right for "
              f"{pct(s['accuracy']['bitstream'])}.", ""]
    figures.confusion(s["confusion"]["master"], bins, out / "master_confusion.png", "master: true vs predicted bin")
    lines += ["![master confusion](master_confusion.png)", ""]
  else:
    lines += ["*No master results (the master stage was not trained); bitstream bins only.*", "",
              f"The bin read from the bitstream is right for {pct(s['accuracy']['bitstream'])} of the images.", ""]
  figures.confusion(s["confusion"]["bitstream"], bins, out / "bitstream_confusion.png",
                    "bitstream estimate: true vs derived bin")
  lines += ["![bitstream confusion](bitstream_confusion.png)", "",
            "Summed confusion (rows: true bin, columns: predicted bin):", ""]
  for key in ("master", "bitstream") if s["has_master"] else ("bitstream",):
    lines += [f"{key}:", "", tables.markdown(["true \\ predicted", *bins],
                                            [[b, *row] for b, row in zip(bins, s["confusion"][key])]), ""]
  lines += ["Per spec (accuracy %):", "",
            tables.markdown(["spec", "true bin", "n", "master", "bitstream"],
                            [[p["spec"], bins[p["true_bin"]], p["n"],
                              None if p["master"] is None else 100.0 * p["master"],
                              None if p["bitstream"] is None else 100.0 * p["bitstream"]]
                             for p in s["per_spec"]]), ""]
  return lines


def wall_section(train_dir: pathlib.Path) -> list[str]:
  walls = tables.wall_times(train_dir)
  lines = ["## Training stages", ""]
  if not walls:
    return lines + ["*No W/train/*/DONE.json found.*", ""]
  keys = [k for k in dict.fromkeys(k for w in walls for k in w) if k not in ("stage", "wall_s")]
  total = sum(w["wall_s"] for w in walls if not math.isnan(w["wall_s"]))
  lines += [f"{len(walls)} completed stages, {total / 60:.1f} min of training wall time in all (from DONE.json).",
            "", tables.markdown(["stage", "wall s", *keys], [[w["stage"], w["wall_s"], *[w.get(k) for k in keys]]
                                                             for w in walls], digits=3), ""]
  return lines
