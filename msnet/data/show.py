"""`msnet show`: a PNG grid of degraded records exactly as the network receives them, with captions."""

from __future__ import annotations

import math
import os
from typing import Any

from etils import epath
import ml_collections
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from msnet.data import shards

_MIN_TILE = 128   # small images are upscaled (nearest neighbour, so pixels stay visible) to about this
_LINE = 12        # caption line height in pixels (Pillow's default bitmap font)


def render_grid(workdir: str | os.PathLike[str], split: str, spec: str, n: int,
                out_path: str | os.PathLike[str], config: ml_collections.ConfigDict) -> None:
  """Write a grid of the first `n` records of `spec` in `split`, each captioned with its label name,
  bin, PSNR and bits per pixel (and the JPEG quality read from the bitstream)."""
  source = shards.open_shards(shards.spec_dir(workdir, split, spec))
  n = min(n, len(source))
  if n < 1:
    raise ValueError(f"no records for spec {spec!r} in split {split!r}")
  manifest = shards.read_json(epath.Path(workdir) / "data" / "manifest.json") or {}
  class_names = manifest.get("splits", {}).get(split, {}).get("class_names") or []
  bin_names = [b.name for b in config.bins]

  records = [source[i] for i in range(n)]
  h, w = records[0]["image"].shape[:2]
  scale = max(1, _MIN_TILE // max(h, w))
  tile_w, tile_h = max(w * scale, 120) + 6, h * scale + 4 * _LINE + 8  # + gaps between tiles
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  title_h = 3 * _LINE + 6
  canvas = PIL.Image.new("RGB", (cols * tile_w, title_h + rows * tile_h), "white")
  draw = PIL.ImageDraw.Draw(canvas)
  font = PIL.ImageFont.load_default()
  draw.text((4, 2), f"{spec}  ({split}, {len(source)} records, {w}x{h} px shown x{scale})", fill="black", font=font)
  draw.text((4, 2 + _LINE), "label #source index, quality bin, PSNR vs source,", fill="gray", font=font)
  draw.text((4, 2 + 2 * _LINE), "bits/pixel (q~ = JPEG quality read from the bitstream)", fill="gray", font=font)
  for k, r in enumerate(records):
    x, y = (k % cols) * tile_w, title_h + (k // cols) * tile_h
    image = PIL.Image.fromarray(np.asarray(r["image"])).resize((w * scale, h * scale), PIL.Image.Resampling.NEAREST)
    canvas.paste(image, (x + (tile_w - w * scale) // 2, y))
    for line, text in enumerate(_caption(r, class_names, bin_names)):
      draw.text((x + 2, y + h * scale + 2 + line * _LINE), text, fill="black", font=font)
  canvas.save(os.fspath(out_path))


def _caption(r: dict[str, Any], class_names: list[str], bin_names: list[str]) -> list[str]:
  label = class_names[r["label"]] if r["label"] < len(class_names) else str(r["label"])
  bin_name = bin_names[r["bin"]] if r["bin"] < len(bin_names) else str(r["bin"])
  psnr = "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f}"
  bpp = "raw" if math.isnan(r["bpp"]) else f"{r['bpp']:.2f}"
  lines = [f"{label} #{r['index']}", f"bin {bin_name}", f"PSNR {psnr} dB", f"{bpp} bpp"]
  if math.isfinite(r["level"]):
    lines[-1] += f"  level~{r['level']:g}"
  return lines
