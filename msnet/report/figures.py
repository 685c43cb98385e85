"""The paper's figures as PNGs, drawn from result rows (matplotlib's object API: no pyplot, no global backend).

Each function returns None when it wrote its figure, or a sentence saying why it could not (which the
report prints in place of the figure).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from msnet.report import tables

Row = dict[str, Any]

STYLE = {
    "baseline": dict(color="black", marker="o"),
    "ms": dict(color="tab:red", marker="s"),
    "ams": dict(color="tab:blue", marker="^"),
    "map": dict(color="tab:green", marker="v"),
    "oracle": dict(color="tab:purple", marker="x", linestyle=":"),
    "bitstream": dict(color="tab:orange", marker="+", linestyle=":"),
    "alexnet_baseline": dict(color="tab:brown", marker="D"),
}
KIND_STYLE = {
    "jpeg": dict(color="tab:red", marker="s"),
    "jp2k": dict(color="tab:blue", marker="^"),
    "noise": dict(color="tab:green", marker="o"),
    "blur": dict(color="tab:purple", marker="v"),
}
JPEG_BLOCK = 8


def _save(fig: Figure, path: pathlib.Path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _percent(rows: Sequence[Row]) -> list[float]:
  return [100.0 * r["top1"] for r in rows]


def fig1a(rows: Sequence[Row], path: pathlib.Path, method: str = "baseline") -> str | None:
  """One network over the four single degradations, x = mean PSNR of the degraded input (Fig. 1a)."""
  fig = Figure(figsize=(6, 4.2))
  ax = fig.add_subplot()
  drawn = 0
  for kind, style in KIND_STYLE.items():
    pts = [r for r in tables.single_rows(rows, method, kind) if r["psnr"] is not None and math.isfinite(r["psnr"])]
    pts.sort(key=lambda r: r["psnr"])
    if pts:
      ax.plot([r["psnr"] for r in pts], _percent(pts), label=kind, **style)
      drawn += 1
  if not drawn:
    return f"no single-degradation rows of method {method!r} with a finite PSNR"
  clean = tables.index(rows).get((method, tables.CLEAN_SPEC))
  if clean is not None:
    ax.axhline(100.0 * clean["top1"], color="grey", linestyle="--", label="clean")
  ax.set_xlabel("PSNR of the degraded input (dB, mean over images)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title(f"{method}: accuracy against input PSNR")
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, path)
  return None


def _codec_axis(ax: Any, kind: str, levels: Sequence[float]) -> None:
  """x axis of a compression sweep: JPEG quality (linear), JPEG 2000 ratio (log, ticks at the levels run).

  Both put stronger compression on the left.
  """
  ax.set_xlabel("JPEG quality" if kind == "jpeg" else "JPEG 2000 compression ratio (log scale)")
  if kind == "jp2k":
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted(set(levels)), [f"{v:g}" for v in sorted(set(levels))])
  ax.set_ylabel("top-1 accuracy (%)")
  ax.grid(alpha=0.3)


def _method_curves(rows: Sequence[Row], path: pathlib.Path, methods: Sequence[str], title: str) -> str | None:
  kinds = [k for k in ("jpeg", "jp2k") if any(r["kind"] == k and not r["pre"] for r in rows)]
  present = [m for m in methods if any(r["method"] == m for r in rows)]
  if not kinds or not present:
    return "no JPEG or JPEG 2000 sweep rows for " + ", ".join(methods)
  fig = Figure(figsize=(5.2 * len(kinds), 4.2))
  for i, kind in enumerate(kinds):
    ax = fig.add_subplot(1, len(kinds), i + 1)
    levels = []
    for m in present:
      pts = tables.single_rows(rows, m, kind)
      if pts:
        levels += [tables.x_of(r) for r in pts]
        ax.plot([tables.x_of(r) for r in pts], _percent(pts), label=m, **STYLE.get(m, {}))
    _codec_axis(ax, kind, levels)
    ax.set_title(kind)
    ax.legend()
  fig.suptitle(title)
  _save(fig, path)
  return None


def fig1b(rows: Sequence[Row], path: pathlib.Path) -> str | None:
  """VGG-16 (baseline) vs AlexNet over JPEG and JPEG 2000 (Fig. 1b); needs "alexnet_baseline" rows."""
  if not any(r["method"] == "alexnet_baseline" for r in rows):
    return ("this run has no AlexNet results (no rows of method 'alexnet_baseline' in W/eval/results.json): "
            "add 'alexnet_baseline' to config.comparisons (configs/demo.py has it) and run `msnet train` and "
            "`msnet evaluate` again; the stages already trained are kept")
  return _method_curves(rows, path, ["baseline", "alexnet_baseline"], "VGG-16 (baseline) vs AlexNet")


def fig1c(receptive_fields: Sequence[dict[str, Any]] | None, path: pathlib.Path) -> str | None:
  """Receptive field per layer of each network against the 8x8 JPEG block (Fig. 1c), one panel per arch."""
  if not receptive_fields:
    return "W/eval/receptive_fields.json is missing or empty (written by `msnet evaluate`)"
  archs = list(dict.fromkeys(net["arch"] for net in receptive_fields))
  fig = Figure(figsize=(6 * len(archs), 4.4))
  for i, arch in enumerate(archs):
    ax = fig.add_subplot(1, len(archs), i + 1)
    for net in (n for n in receptive_fields if n["arch"] == arch):
      layers = net["layers"]
      ax.plot(range(len(layers)), [l["rf"] for l in layers], marker="o",
              linestyle="-" if net["variant"] == "imagenet" else "--", label=f"{arch} ({net['variant']})")
    longest = max((n["layers"] for n in receptive_fields if n["arch"] == arch), key=len)
    ax.set_xticks(range(len(longest)), [l["layer"] for l in longest], rotation=60, fontsize=7)
    ax.axhline(JPEG_BLOCK, color="tab:red", linestyle=":", label="JPEG block (8 px)")
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_ylabel("receptive field (input pixels, one side)")
    ax.set_title(f"{arch}: receptive field per layer")
    ax.grid(alpha=0.3)
    ax.legend()
  _save(fig, path)
  return None


def fig3(rows: Sequence[Row], path: pathlib.Path) -> str | None:
  """Baseline vs MS, AMS, MAP (and the oracle and bitstream bounds) over JPEG and JPEG 2000 (Fig. 3)."""
  return _method_curves(rows, path, ["baseline", "ms", "ams", "map", "oracle", "bitstream"],
                        "Decision rules over compression")


FIG4_PRE = {"noise", "blur"}  # the pre-degradations of the paper's Fig. 4


def fig4(rows: Sequence[Row], path: pathlib.Path, methods: Sequence[str] = ("baseline", "ms")) -> str | None:
  """Combined degradations against the single ones (Fig. 4): one panel per (pre-degradation, codec).

  Fig. 4 is noise or blur before a codec; chains that encode or resize before the last codec (the transcode
  sweep) have a figure of their own."""
  chains = sorted({(r["pre"], r["codec"], r["kind"]) for r in rows if r["pre"] and r["codec"]
                   and {op.split(":")[0] for op in r["pre"].split("+")} <= FIG4_PRE})
  if not chains:
    return "no combined-degradation rows (sweeps like noise_jpeg, blur_jp2k) in the results"
  methods = [m for m in methods if any(r["method"] == m for r in rows)]
  idx = tables.index(rows)
  cols = min(2, len(chains))
  nrows = -(-len(chains) // cols)
  fig = Figure(figsize=(5.2 * cols, 4.0 * nrows))
  for i, (pre, codec, kind) in enumerate(chains):
    ax = fig.add_subplot(nrows, cols, i + 1)
    for m in methods:
      style = dict(STYLE.get(m, {}))
      style.pop("linestyle", None)
      combined = sorted((r for r in rows if r["method"] == m and r["pre"] == pre and r["kind"] == kind),
                        key=tables.x_of)
      ax.plot([tables.x_of(r) for r in combined], _percent(combined), label=f"{m}: {pre} + {kind}", **style)
      alone = tables.single_rows(rows, m, kind)
      if alone:
        ax.plot([tables.x_of(r) for r in alone], _percent(alone), linestyle="--", alpha=0.6,
                label=f"{m}: {kind} alone", **style)
      pre_row = idx.get((m, pre))
      if pre_row is not None:
        ax.axhline(100.0 * pre_row["top1"], color=style.get("color"), linestyle=":",
                   label=f"{m}: {pre} alone")
    _codec_axis(ax, kind, [tables.x_of(r) for r in rows if r["kind"] == kind])
    ax.set_title(f"{pre} + {kind}")
    ax.legend(fontsize=7)
  _save(fig, path)
  return None


def confusion(matrix: Sequence[Sequence[int]], bins: Sequence[str], path: pathlib.Path, title: str) -> None:
  """A bin confusion matrix (rows: true bin, columns: predicted), counts written in the cells."""
  fig = Figure(figsize=(1.2 * len(bins) + 2.5, 1.1 * len(bins) + 1.5))
  ax = fig.add_subplot()
  ax.imshow(matrix, cmap="Blues")
  for i, row in enumerate(matrix):
    for j, v in enumerate(row):
      ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(bins)), bins)
  ax.set_yticks(range(len(bins)), bins)
  ax.set_xlabel("predicted bin")
  ax.set_ylabel("true bin")
  ax.set_title(title)
  _save(fig, path)


def training_curve(metrics_path: pathlib.Path, path: pathlib.Path) -> str | None:
  """A stage's training loss and its per-epoch validation top-1 against epochs: has the baseline converged?"""
  if not metrics_path.exists():
    return f"no {metrics_path}"
  records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
  steps = [r for r in records if r.get("event") is None]  # the final "done" record repeats the last values
  train = [r for r in steps if "loss" in r]
  val = [r for r in steps if "val_accuracy" in r]
  if not train:
    return f"{metrics_path} holds no training steps"
  fig = Figure(figsize=(6, 4.2))
  ax = fig.add_subplot()
  ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], color="tab:gray", label="training loss")
  ax.set_xlabel("epoch")
  ax.set_ylabel("training loss")
  if val:
    acc = ax.twinx()
    acc.plot([r["epoch"] for r in val], [100.0 * r["val_accuracy"] for r in val], color="black", marker="o",
             label="validation top-1")
    acc.set_ylabel("validation top-1 (%)")
    acc.legend(loc="center right")
  ax.legend(loc="upper right")
  _save(fig, path)
  return None
