"""`msnet report`: W/report/report.md, table1.csv, ce.csv and PNG figures from the result files alone.

Reads W/eval/results.json, W/eval/master.json, W/eval/receptive_fields.json and W/train/*/DONE.json; imports
no JAX or model code, so a report can be rebuilt anywhere from a copied workdir. Every number in the text
is computed from those files; the only typed-in numbers are the paper's Table 1, labelled as such.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Any, Sequence

import ml_collections

from msnet.report import figures, tables

Row = dict[str, Any]


def _read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.exists() else None


def _pct(v: float | None) -> str:
  return "-" if v is None or math.isnan(v) else f"{100.0 * v:.1f}%"


def _plural(n: int, word: str) -> str:
  return f"{n} {word}{'' if n == 1 else 's'}"


def _figure(lines: list[str], name: str, why_not: str | None, caption: str) -> None:
  if why_not is None:
    lines += [f"![{name}]({name}.png)", "", caption, ""]
  else:
    lines += [f"*{name} is not in this report: {why_not}.*", ""]


def _write_csv(path: pathlib.Path, header: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
  with path.open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(header), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})


def _table1_section(rows: Sequence[Row], out: pathlib.Path) -> tuple[list[str], list[dict[str, Any]]]:
  t1 = tables.table1(rows)
  _write_csv(out / "table1.csv", ["method", "c", "d", "c_prime", "d_prime", "pct_change"], t1)
  lines = ["## Table 1: clean and JPEG-10 top-1 per method", ""]
  if not t1:
    lines += [f"*Not computable: the results lack the baseline's `{tables.CLEAN_SPEC}` or "
              f"`{tables.JPEG10_SPEC}` row.*", ""]
  else:
    lines += ["This run (top-1 %; c, d = baseline clean / JPEG-10; c', d' = the method's; "
              "% change = (d' - d) / (c - d)). Also in `table1.csv`.", "",
              tables.markdown(["method", "c", "d", "c'", "d'", "% change"],
                              [[r["method"], r["c"], r["d"], r["c_prime"], r["d_prime"], r["pct_change"]]
                               for r in t1]), ""]
  lines += ["**The paper's Table 1, for reference: ImageNet validation set (50,000 images), VGG-16 except "
            "stability training (Inception) and DeepCloak; these are the paper's numbers, not this run's.**", "",
            tables.markdown(["method (paper)", "c", "d", "c'", "d'", "% change"], tables.PAPER_TABLE1), ""]
  return lines, t1


def _sweep_tables(rows: Sequence[Row], sweeps: dict[str, list[str]]) -> list[str]:
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


def _ce_section(rows: Sequence[Row], sweeps: dict[str, list[str]], out: pathlib.Path) -> list[str]:
  ce = tables.corruption_errors(rows, sweeps)
  mce = tables.mean_ce(ce)
  _write_csv(out / "ce.csv", ["method", "sweep", "ce", "rce", "mean_err"], ce)
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


def _master_section(master: dict[str, Any] | None, out: pathlib.Path) -> list[str]:
  lines = ["## The master: bin accuracy", ""]
  if master is None:
    return lines + ["*W/eval/master.json is missing.*", ""]
  s = tables.master_summary(master)
  bins = s["bins"]
  if s["has_master"]:
    lines += [f"Over all evaluated specs the master picks the true bin for {_pct(s['accuracy']['master'])} of "
              f"the images; the bin read from the bitstream (no network) is right for "
              f"{_pct(s['accuracy']['bitstream'])}.", ""]
    figures.confusion(s["confusion"]["master"], bins, out / "master_confusion.png", "master: true vs predicted bin")
    lines += ["![master confusion](master_confusion.png)", ""]
  else:
    lines += ["*No master results (the master stage was not trained); bitstream bins only.*", "",
              f"The bin read from the bitstream is right for {_pct(s['accuracy']['bitstream'])} of the images.", ""]
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


def _verdict(ok: bool) -> str:
  return "**holds**" if ok else "**does not hold**"


def _claims_section(rows: Sequence[Row], t1: Sequence[dict[str, Any]]) -> list[str]:
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
             f"{f['mae_additive']:.1f} points over {_plural(f['levels'], 'level')}" for f in mine]
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


def _wall_section(train_dir: pathlib.Path) -> list[str]:
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


def run_report(config: ml_collections.ConfigDict, workdir: Any) -> pathlib.Path:
  """Write W/report/report.md with its figures and tables; returns the report's path."""
  workdir = pathlib.Path(workdir)
  results = _read_json(workdir / "eval" / "results.json")
  if results is None:
    raise FileNotFoundError(f"{workdir / 'eval' / 'results.json'} not found: run `msnet evaluate` first")
  # A spec without records has no accuracy (null); it cannot be drawn or tabulated.
  rows = [r for r in results["rows"] if r["top1"] is not None]
  meta = results["meta"]
  out = workdir / "report"
  out.mkdir(parents=True, exist_ok=True)
  sweeps = meta.get("sweeps") or {name: list(config.sweeps[name]) for name in config.evaluate.sweeps}

  lines = ["# msnet report", "",
           f"Model: {config.model.arch} ({config.model.variant}), {config.data.num_classes} classes, "
           f"data source {config.data.source}. Evaluated {len(meta.get('specs', sweeps))} specs x "
           f"{len(tables.methods_in(rows))} methods on {_plural(meta.get('devices', 0), 'device')} "
           f"in {meta.get('wall_s', math.nan):.0f} s (that call of `msnet evaluate`).", ""]
  missing = meta.get("missing") or {}
  if missing:
    lines += ["Methods not evaluated (their training stage is not complete):", ""]
    lines += [f"- `{m}`: {why}" for m, why in missing.items()] + [""]
  flops = meta.get("flops") or {}
  if flops.get("slave") and flops.get("master"):
    lines += [f"The master costs {100 * flops['master'] / flops['slave']:.2f}% of the slave's FLOPs per image "
              f"({flops['master'] / 1e6:.2f} vs {flops['slave'] / 1e6:.2f} MFLOP).", ""]

  t1_lines, t1 = _table1_section(rows, out)
  lines += t1_lines
  lines += ["## Figures", ""]
  idx = tables.index(rows)
  clean = idx.get(("baseline", tables.CLEAN_SPEC))
  _figure(lines, "fig1a", figures.fig1a(rows, out / "fig1a.png"),
          "Fig. 1a analog: the baseline over JPEG, JPEG 2000, noise and blur against the input's PSNR"
          + (f" (clean top-1 {_pct(clean['top1'])}, dashed)." if clean else "."))
  _figure(lines, "fig1b", figures.fig1b(rows, out / "fig1b.png"),
          "Fig. 1b analog: VGG-16 vs AlexNet over JPEG quality and JPEG 2000 ratio.")
  rf = _read_json(workdir / "eval" / "receptive_fields.json")
  _figure(lines, "fig1c", figures.fig1c(rf, out / "fig1c.png"), _rf_caption(rf))
  _figure(lines, "fig3", figures.fig3(rows, out / "fig3.png"),
          "Fig. 3 analog: baseline, MS, AMS, MAP, and the oracle and bitstream routings over compression.")
  _figure(lines, "fig4", figures.fig4(rows, out / "fig4.png"),
          "Fig. 4 analog: combined degradations (solid) against the codec alone (dashed) and the first "
          "degradation alone (dotted), baseline and MS.")

  lines += _claims_section(rows, t1)
  lines += _ce_section(rows, sweeps, out)
  lines += _master_section(_read_json(workdir / "eval" / "master.json"), out)
  lines += _sweep_tables(rows, sweeps)
  lines += _wall_section(workdir / "train")
  path = out / "report.md"
  path.write_text("\n".join(lines).rstrip() + "\n")
  return path


def _rf_caption(rf: Sequence[dict[str, Any]] | None) -> str:
  """Fig. 1c's caption: where each network's receptive field first spans more than one JPEG block."""
  parts = []
  for net in rf or []:
    first = next((l for l in net["layers"] if l["rf"] > figures.JPEG_BLOCK), None)
    pool = next((l for l in net["layers"] if "pool" in l["layer"]), None)
    if first is not None:
      parts.append(f"{net['arch']} ({net['variant']}) exceeds 8 pixels at `{first['layer']}` (RF {first['rf']})"
                   + (f", RF {pool['rf']} after its first pooling layer `{pool['layer']}`" if pool else ""))
  return ("Fig. 1c analog: receptive field per layer against the 8x8 JPEG block"
          + (": " + "; ".join(parts) + "." if parts else "."))
