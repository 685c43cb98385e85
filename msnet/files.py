"""`msnet predict` on image files: find them, read each with `msnet.data.reader` (the one image reader:
pixels and bitstream bin), and print one line (or one JSON object) per file."""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import PIL.Image
import tqdm

from msnet import degradations, errors, methods
from msnet.data.reader import ImageFile, read_image

if TYPE_CHECKING:  # the predictor imports JAX; reading files does not need it
  from msnet.predict import Predictor

SKIPPED_EXIT_CODE = 3  # `msnet predict` classified the readable files but skipped some
BITSTREAM_RULES = methods.names(bins="bitstream")  # the rules whose bins are read from each file's bitstream


def find_images(paths: Sequence[str | os.PathLike[str]]) -> list[pathlib.Path]:
  """The files named, and every image file under the directories named (recursive, sorted, hidden files
  left out; image = a suffix Pillow reads or one of `degradations.codecs`). A path that does not exist is refused."""
  readable = {*PIL.Image.registered_extensions(), *degradations.codecs.suffixes()}
  found: list[pathlib.Path] = []
  for p in map(pathlib.Path, paths):
    if p.is_dir():
      found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in readable
                      and not any(part.startswith(".") for part in f.relative_to(p).parts))
    elif p.exists():
      found.append(p)
    else:
      raise errors.MissingInputError(f"{p}: no such file or directory; give image files or directories of them")
  return found


def _record(predictor: Predictor, f: ImageFile, out: dict[str, Any], i: int, source: str) -> dict[str, Any]:
  """One file's result as a JSON-ready dict."""
  names, bins = predictor.class_names, predictor.bin_names
  branch = int(out["branch"][i])
  top = [{"class": names[c], "index": int(c), "prob": float(p)} for c, p in zip(out["top_k"][i], out["top_k_probs"][i])]
  record = {"path": f.path, "class": top[0]["class"], "index": top[0]["index"], "prob": top[0]["prob"],
            "rule": out["rule"], "branch": bins[branch] if branch >= 0 else None, "bin_source": source, "top": top}
  if out["bin_probs"] is not None:
    record["bin_probs"] = {b: float(p) for b, p in zip(bins, out["bin_probs"][i])}
  return record


def _line(record: dict[str, Any]) -> str:
  top = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in record["top"])
  return (f"{record['path']}: {record['class']} {record['prob']:.3f} | branch {record['branch'] or '-'} "
          f"({record['bin_source']}) | top {len(record['top'])}: {top}")


def predict_files(predictor: Predictor, paths: Sequence[str | os.PathLike[str]], rule: str = "ms", top: int = 5,
                  as_json: bool = False, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                  max_pixels: int | None = None) -> int:
  """Classify every image file under `paths` with `rule`, one line per file on `out`; returns how many files
  were skipped (each named on `err`). UserError when no file could be read at all. `max_pixels` (default the
  workdir config's data.max_pixels) refuses files whose header claims more pixels, before decoding."""
  if rule in methods.names(bins="true"):
    raise errors.InvalidInputError(f"rule {rule!r} routes by each image's true bin, which a file does not carry; use "
                                   "--rule=bitstream (the bin read from the file) or --rule=ms")
  predictor.params(rule)  # an unknown rule or a missing stage is refused before any file is read
  if top < 1:
    raise errors.InvalidInputError(f"--top must be >= 1, got {top}")
  files = find_images(paths)
  if not files:
    raise errors.MissingInputError(f"no image files in {', '.join(map(str, paths))}")
  rules = [list(b.match) for b in predictor.config.bins]
  limit = int(predictor.config.data.max_pixels if max_pixels is None else max_pixels)
  if limit < 1:
    raise errors.InvalidInputError(f"--max-pixels must be >= 1, got {limit}")
  batch, skipped, done = predictor.buckets[-1], 0, 0
  bar = tqdm.tqdm(total=len(files), desc="predict", unit="file", file=err, leave=False, disable=len(files) <= batch)
  for lo in range(0, len(files), batch):
    good: list[ImageFile] = []
    shaped: list[np.ndarray] = []
    for path in files[lo:lo + batch]:
      try:
        f = read_image(path, limit)
        shaped.append(predictor.shape(f.image, f.path))
        good.append(f)
      except errors.UserError as e:
        skipped += 1
        print(f"msnet predict: skipped {e}", file=err, flush=True)
    bar.update(len(files[lo:lo + batch]))
    if not good:
      continue
    bins = ([degradations.bin_of_bitstream(f.bitstream, rules) for f in good]
            if rule in BITSTREAM_RULES else None)
    result = predictor.predict(np.stack(shaped), rule=rule, top_k=top, bins=bins)
    for i, f in enumerate(good):
      # The file's bitstream routed it when the rule reads no bin network (bitstream) or the bitstream names a
      # degradation bin (hybrid); otherwise the bin network whose softmax the rule reports, if any.
      source = (f.source if bins is not None and (result["bin_probs"] is None or bins[i] != 0)
                else ("gate" if "gate" in methods.get(rule).parts else "master") if result["bin_probs"] is not None
                else "-")
      record = _record(predictor, f, result, i, source)
      print(json.dumps(record) if as_json else _line(record), file=out, flush=True)
    done += len(good)
  bar.close()
  if not done:
    raise errors.InvalidInputError(f"none of the {len(files)} files could be read as an image (each is named above)")
  if skipped:
    print(f"msnet predict: skipped {skipped} of {len(files)} files", file=err, flush=True)
  return skipped
