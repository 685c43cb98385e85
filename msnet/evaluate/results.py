"""Spec metadata, per-cell statistics, the resume log (cells.jsonl) and the result files."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np

from msnet import calibration, degradations
from msnet.data import shards

ROW_FIELDS = ("method", "spec", "sweeps", "kind", "level", "codec", "codec_level", "pre", "top1", "top5", "n",
              "correct1", "correct5", "ci95_low", "ci95_high", "psnr", "bpp", "ece")
Z95 = 1.959963984540054
CORRECT_DIR = "correct"


def spec_fields(spec: str) -> dict[str, Any]:
  """Kind and level of the last op, the last codec and its level, and the chain before the last op."""
  s = degradations.parse(spec)
  last, codec = s.ops[-1], s.last_codec
  return dict(kind=last.name, level=_level(last), codec=codec.name if codec else "",
              codec_level=_level(codec) if codec else None,
              pre=str(degradations.Spec(s.ops[:-1])) if len(s.ops) > 1 else "")


def _level(op: Any) -> float | None:
  """The op's level: JPEG quality, JPEG 2000 ratio or PSNR target, noise or blur sigma; None for clean."""
  fields = dataclasses.fields(op)
  return float(getattr(op, fields[0].name)) if fields else None


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion k/n."""
  if n == 0:
    return math.nan, math.nan
  p = k / n
  denom = 1.0 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
  return max(0.0, center - half), min(1.0, center + half)


def spec_stats(workdir: pathlib.Path, split: str, spec: str) -> dict[str, Any]:
  """Record count, mean finite PSNR and mean bpp of a spec's eval shards, from W/data/manifest.json.

  Specs the manifest does not list (shards written by hand) are summarised from their records.
  """
  manifest = shards.read_json(workdir / "data" / "manifest.json") or {}
  entry = manifest.get("splits", {}).get(split, {}).get("specs", {}).get(spec)
  if entry is not None:
    return dict(records=int(entry["num_records"]), psnr=_finite_or_none(entry["mean_psnr"]),
                bpp=_finite_or_none(entry["mean_bpp"]))
  source = shards.open_shards(shards.spec_dir(workdir, split, spec))
  psnr = np.array([source[i]["psnr"] for i in range(len(source))], np.float64)
  bpp = np.array([source[i]["bpp"] for i in range(len(source))], np.float64)
  psnr, bpp = psnr[np.isfinite(psnr)], bpp[np.isfinite(bpp)]
  return dict(records=len(source), psnr=float(psnr.mean()) if psnr.size else None,
              bpp=float(bpp.mean()) if bpp.size else None)


def skipped_records(workdir: pathlib.Path, split: str) -> list[int] | None:
  """Source indices of the split's records that degrade skipped as unreadable (absent from every spec), or None
  without a manifest: what n does not cover."""
  manifest = shards.read_json(workdir / "data" / "manifest.json") or {}
  entry = manifest.get("splits", {}).get(split)
  return None if entry is None or "skipped" not in entry else [int(i) for i in entry["skipped"]]


def _finite_or_none(v: Any) -> float | None:
  return float(v) if v is not None and math.isfinite(float(v)) else None


# ---------------------------------------------------------------------------------------------------------
# Resume log and output files.


def read_cells(path: pathlib.Path) -> dict[str, dict[str, Any]]:
  """spec -> its latest finished cell; a torn last line (crash mid-write) is ignored."""
  cells: dict[str, dict[str, Any]] = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        cell = json.loads(line)
      except json.JSONDecodeError:
        continue
      cells[cell["spec"]] = cell
  return cells


def append_cell(path: pathlib.Path, cell: dict[str, Any]) -> None:
  """Append one line; a torn line left by a crash is first closed so the new one stays readable."""
  torn = False
  if path.exists() and path.stat().st_size > 0:
    with path.open("rb") as f:
      f.seek(-1, 2)
      torn = f.read(1) != b"\n"
  with path.open("a") as f:
    f.write(("\n" if torn else "") + json.dumps(cell) + "\n")
    f.flush()


def correct_path(eval_dir: pathlib.Path, spec: str, slug: str | None = None) -> pathlib.Path:
  """The per-image file of a spec; `slug` names the file of a cell that is no degradation spec (an external
  set's "gaussian_noise:3")."""
  return eval_dir / CORRECT_DIR / f"{slug or degradations.spec_slug(spec)}.npz"


def write_correct(eval_dir: pathlib.Path, spec: str, correct: dict[str, np.ndarray], slug: str | None = None
                  ) -> None:
  """W/eval/correct/<spec slug>.npz: every method's top-1 per record of one spec, packed 8 to a byte.

  Keys: "spec" (canonical), "n" and "top1.<method>" (np.packbits of bool [n], record order); read by
  msnet.report.stats.load_correct. Written whole before the spec's cells.jsonl line, so a logged cell
  always has its file.
  """
  path = correct_path(eval_dir, spec, slug)
  path.parent.mkdir(parents=True, exist_ok=True)
  n = {len(v) for v in correct.values()}
  if len(n) != 1:
    raise ValueError(f"evaluate: methods of spec {spec!r} have per-image results of different lengths {sorted(n)}")
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("wb") as f:
    np.savez(f, spec=np.array(spec), n=np.array(n.pop()),
             **{f"top1.{m}": np.packbits(np.asarray(v, bool)) for m, v in correct.items()})
  tmp.replace(path)


def rows_of(cell: dict[str, Any], sweeps: list[str]) -> list[dict[str, Any]]:
  """One result row per method of a finished spec; `ece` is None for a method without a confidence histogram
  (one with a trunk of its own, or a cell evaluated before histograms were kept)."""
  rows = []
  reliability = cell.get("reliability", {})
  for method, c in cell["counts"].items():
    n, k1, k5 = c["n"], c["correct1"], c["correct5"]
    lo, hi = wilson(k1, n)
    rows.append(dict(method=method, spec=cell["spec"], sweeps=sweeps, **cell["fields"],
                     top1=k1 / n if n else math.nan, top5=k5 / n if n else math.nan, n=n, correct1=k1,
                     correct5=k5, ci95_low=lo, ci95_high=hi, psnr=cell["quality"]["psnr"],
                     bpp=cell["quality"]["bpp"],
                     ece=calibration.ece(reliability[method]) if method in reliability else None))
  return rows


def _json_safe(v: Any) -> Any:
  """NaN/inf -> None so results.json stays standard JSON."""
  if isinstance(v, float) and not math.isfinite(v):
    return None
  if isinstance(v, dict):
    return {k: _json_safe(x) for k, x in v.items()}
  if isinstance(v, list):
    return [_json_safe(x) for x in v]
  return v


def write_results(out: pathlib.Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
  (out / "results.json").write_text(json.dumps(_json_safe({"rows": rows, "meta": meta}), indent=1) + "\n")
  with (out / "results.csv").open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(ROW_FIELDS))
    w.writeheader()
    for r in _json_safe(rows):
      w.writerow({k: ";".join(v) if isinstance(v, list) else ("" if v is None else v) for k, v in r.items()})
