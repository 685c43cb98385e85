"""`msnet evaluate --external` on tiny trees of each layout, and the report's CE / mCE table.

Proves: every readable file is counted once in its (corruption, severity) cell, classes are matched to the
workdir's by name, other sizes are resized and cropped as the data config says, an unreadable file is skipped
and counted, each method's top-1 per image equals a NumPy recomputation from the models' logits on the files'
pixels (decoded by Pillow here) with the bin read from each file's JPEG tables, the oracle is left out, W's own
data and results stay untouched, a rerun skips finished cells, bad sets are refused with the reason, and the
report's CE and mCE equal a hand computation with the right normaliser.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from msnet import config as config_lib, errors, models
from msnet.evaluate import external
from msnet.report import external as report_external
from msnet.report import run as report_run
from msnet.report import stats
from test_evaluate import _random_params, _softmax, stand_in_networks  # random params, NumPy softmax, stand-in loaders

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GLOBAL_BATCH = 8        # 1 per fake device; cells of 5-7 files: padded batches, one with an unreadable file
DONE_STAGES = ("baseline", "branch_jpeg", "branch_jp2k", "master")
METHODS = ("baseline", "branch_clean", "branch_jpeg", "branch_jp2k", "ms", "ams", "map", "bitstream")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config() -> Any:
  c = config_lib.base_config()
  c.data.image_size = 32
  c.data.resize_shorter = 32   # a 48x64 file is resized to 32x43, then center-cropped
  c.model.width = 0.0625
  c.model.fc_width = 16
  c.master.conv_features = (4, 4, 4)
  c.master.fc_features = (8, 8)
  c.evaluate.methods = ("baseline", "branches", "ms", "ams", "map", "oracle", "bitstream")
  c.evaluate.global_batch = GLOBAL_BATCH
  return c


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(image: np.ndarray, quality: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
  """What the network must see: Pillow's decode, a 48x64 image resized (bicubic) to 32x43 and center-cropped."""
  image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  if image.shape[:2] == (48, 64):
    image = np.asarray(Image.fromarray(image).resize((43, 32), Image.Resampling.BICUBIC))[:, 5:37]
  return image


class Model:
  """The random-param models and a NumPy reference of every method, unsharded on one device."""

  def __init__(self, cfg: Any):
    self.slave, self.single = models.build_slave(cfg.model, 10, 3), models.build_slave(cfg.model, 10, 1)
    self.master = models.build_master(cfg.master, 3)
    rng = np.random.default_rng(1)
    base = _random_params(self.single, rng)
    self.params = dict(baseline=base, slave=dict(_random_params(self.slave, rng), trunk=base["trunk"]),
                       master=_random_params(self.master, rng))

  def probs(self, x: np.ndarray, bitstream_bin: np.ndarray) -> dict[str, np.ndarray]:
    p, x = self.params, jnp.asarray(x)
    branch = _softmax(np.asarray(self.slave.apply({"params": p["slave"]}, x)))        # [K, B, C]
    pbin = _softmax(np.asarray(self.master.apply({"params": p["master"]}, x)))        # [B, K]
    rows = np.arange(len(x))
    return {"baseline": _softmax(np.asarray(self.single.apply({"params": p["baseline"]}, x)))[0],
            "branch_clean": branch[0], "branch_jpeg": branch[1], "branch_jp2k": branch[2],
            "ms": branch[np.argmax(pbin, -1), rows], "ams": branch.max(0),
            "map": np.einsum("bk,kbc->bc", pbin, branch), "bitstream": branch[bitstream_bin, rows]}


class Cell:
  """The files of one cell as written, in the order external sets are read (class name, then file name)."""

  def __init__(self, model: Model, blobs: list[tuple[str, bytes, int]], rng: np.random.Generator):
    """blobs: (file name, bytes, bitstream bin). Half of the files go to the class the baseline predicts (so
    top-1 is often right and the comparison can see a wrong pixel), the others to a random class."""
    self.pixels = np.stack([_pixels(b) for _, b, _ in blobs])
    pred = np.argmax(model.probs(self.pixels, np.zeros(len(blobs), int))["baseline"], -1)
    labels = np.where(np.arange(len(blobs)) % 2 == 0, pred, rng.integers(0, 10, len(blobs)))
    order = sorted(range(len(blobs)), key=lambda i: (CLASSES[labels[i]], blobs[i][0]))
    self.files = [(CLASSES[labels[i]], blobs[i][0], blobs[i][1]) for i in order]
    self.pixels, self.labels = self.pixels[order], labels[order]
    self.bins = np.array([blobs[i][2] for i in order])

  def write(self, directory: pathlib.Path) -> None:
    for cls, name, data in self.files:
      (directory / cls).mkdir(parents=True, exist_ok=True)
      (directory / cls / name).write_bytes(data)

  def correct(self, model: Model) -> dict[str, np.ndarray]:
    return {m: np.argmax(p, -1) == self.labels for m, p in model.probs(self.pixels, self.bins).items()}


def _blobs(rng: np.random.Generator, n: int, kind: str) -> list[tuple[str, bytes, int]]:
  """n random 32x32 images as PNG (clean bin) or JPEG q10 (the JPEG bin, 1) / q50 (clean: jpeg is 1-20)."""
  out = []
  for i in range(n):
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    if kind == "png":
      out.append((f"img{i}.png", _png(image), 0))
    else:
      quality = int(kind[4:])
      out.append((f"img{i}.jpg", _jpeg(image, quality), 1 if quality <= 20 else 0))
  return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
  """One workdir, one tree per layout, each evaluated once."""
  workdir, sets = tmp_path_factory.mktemp("w"), tmp_path_factory.mktemp("sets")
  cfg = _config()
  (workdir / "data").mkdir()
  manifest = {"splits": {"test": {"class_names": list(CLASSES), "specs": {}}}}
  (workdir / "data" / "manifest.json").write_text(json.dumps(manifest))
  (workdir / "config.json").write_text(config_lib.to_json(cfg) + "\n")
  for stage in DONE_STAGES:
    (workdir / "train" / stage).mkdir(parents=True)
    (workdir / "train" / stage / "DONE.json").write_text("{}")
  model = Model(cfg)
  rng = np.random.default_rng(0)

  # imagenet-c, with one corruption under a group directory (noise/gaussian_noise/...), as some copies are.
  big = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
  inet = {"gaussian_noise:1": Cell(model, _blobs(rng, 4, "png") + [("big.png", _png(big), 0)], rng),
          "gaussian_noise:2": Cell(model, _blobs(rng, 5, "png"), rng),
          "jpeg_compression:1": Cell(model, _blobs(rng, 6, "jpeg50"), rng),
          "jpeg_compression:2": Cell(model, _blobs(rng, 6, "jpeg10"), rng)}
  for spec, cell in inet.items():
    corruption, severity = spec.split(":")
    group = sets / "inet" / ("noise" if corruption == "gaussian_noise" else "")
    cell.write(group / corruption / severity)
  broken = sets / "inet" / "jpeg_compression" / "2" / inet["jpeg_compression:2"].files[0][0] / "broken.jpg"
  broken.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")

  # cifar10-c: 5 severities x 3 images per corruption, labels repeated as CIFAR-10-C's are.
  c10 = {}
  for corruption in ("fog", "snow"):
    images, labels = [], []
    for s in range(1, 6):
      cell = Cell(model, _blobs(rng, 3, "png"), rng)
      c10[f"{corruption}:{s}"] = cell
      images.append(cell.pixels)
      labels.append(cell.labels)
    (sets / "c10c").mkdir(exist_ok=True)
    np.save(sets / "c10c" / f"{corruption}.npy", np.concatenate(images))
  labels = np.concatenate([c10[f"fog:{s}"].labels for s in range(1, 6)])
  for s in range(1, 6):  # one labels.npy for both corruptions: snow's cells take fog's labels
    c10[f"snow:{s}"].labels = c10[f"fog:{s}"].labels
  np.save(sets / "c10c" / "labels.npy", labels.astype(np.int64))

  folder = {"folder": Cell(model, _blobs(rng, 3, "png") + _blobs(rng, 3, "jpeg10")[:2], rng)}
  folder["folder"].write(sets / "mine")

  p = model.params
  with pytest.MonkeyPatch.context() as mp:
    stand_in_networks(mp, p)
    out = {name: external.run_external(cfg, workdir, sets / name, layout=layout)
           for name, layout in (("inet", None), ("c10c", None), ("mine", "folder"))}
  return dict(workdir=workdir, sets=sets, cfg=cfg, model=model, rows=out, broken=broken,
              cells={"inet": inet, "c10c": c10, "mine": folder})


def _results(evaluated: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
  path = evaluated["workdir"] / "eval" / "external" / name / "results.json"
  results = json.loads(path.read_text())
  return results, stats.load_correct(path.parent)


@pytest.mark.parametrize("name, layout, skipped", [("inet", "imagenet-c", {"jpeg_compression:2": 1}),
                                                   ("c10c", "cifar10-c", {}), ("mine", "folder", {})])
def test_each_image_matches_numpy(evaluated: dict[str, Any], name: str, layout: str, skipped: dict[str, int]
                                  ) -> None:
  results, correct = _results(evaluated, name)
  meta, cells = results["meta"], evaluated["cells"][name]
  assert meta["layout"] == layout and meta["name"] == name
  assert meta["specs"] == list(cells) and set(meta["methods"]) == set(METHODS)
  assert meta["missing"] == {"oracle": external.NO_ORACLE}
  assert meta["skipped"] == {s: skipped.get(s, 0) for s in cells}
  assert results["rows"] == json.loads(json.dumps(evaluated["rows"][name]))
  for spec, cell in cells.items():
    mine = {r["method"]: r for r in results["rows"] if r["spec"] == spec}
    assert set(mine) == set(METHODS)
    for m, per_image in cell.correct(evaluated["model"]).items():
      r = mine[m]
      assert r["n"] == len(cell.labels), (spec, m)
      assert np.array_equal(correct[(m, spec)], per_image), (spec, m)
      assert r["correct1"] == int(per_image.sum()) and r["top1"] == pytest.approx(per_image.mean())
    corruption, _, severity = spec.partition(":")
    assert (mine["ms"]["kind"], mine["ms"]["level"], mine["ms"]["sweeps"]) == (
        (corruption, float(severity), [corruption]) if severity else ("folder", None, ["folder"]))
  assert meta["sweeps"] == {k: [s for s in cells if s.partition(":")[0] == k]
                            for k in dict.fromkeys(s.partition(":")[0] for s in cells)}


@pytest.mark.parametrize("name", ["inet", "c10c", "mine"])
def test_pixels_labels_and_order(evaluated: dict[str, Any], name: str) -> None:
  """Each cell's records are its files' pixels (the 48x64 one resized and cropped), the workdir's label of their
  class folder, in class then file order."""
  layout, cells = external.open_set(evaluated["sets"] / name, None, list(CLASSES), evaluated["cfg"])
  expected = evaluated["cells"][name]
  assert [c.spec for c in cells] == list(expected)
  for c in cells:
    readable = [i for i, n in enumerate(c.source.names) if not n.endswith("broken.jpg")]
    assert len(readable) == len(expected[c.spec].labels)
    images = np.stack([c.source[i]["image"] for i in readable])
    assert np.array_equal(images, expected[c.spec].pixels), c.spec
    assert [c.source[i]["label"] for i in readable] == expected[c.spec].labels.tolist()
    if layout != "cifar10-c":
      assert [pathlib.Path(c.source.names[i]).name for i in readable] == [f for _, f, _ in expected[c.spec].files]


def test_bins_from_bitstream_and_unreadable_file_named(evaluated: dict[str, Any]) -> None:
  log = (evaluated["workdir"] / "eval" / "external" / "inet" / "cells.jsonl").read_text().splitlines()
  cells = {c["spec"]: c for c in map(json.loads, log)}
  # JPEG q10 files go to the JPEG bin, q50 and PNG to the clean one: read from each file's tables.
  assert cells["jpeg_compression:2"]["routing"]["bitstream"] == [0, 6, 0]
  assert cells["jpeg_compression:1"]["routing"]["bitstream"] == [6, 0, 0]
  assert cells["gaussian_noise:1"]["routing"]["bitstream"] == [5, 0, 0]
  assert sum(cells["gaussian_noise:1"]["routing"]["master"]) == 5
  broken = cells["jpeg_compression:2"]
  assert (broken["records"], broken["skipped"]) == (7, 1)
  assert broken["skipped_files"] == [str(evaluated["broken"])]


def test_workdir_own_files_untouched_and_rerun_skips(evaluated: dict[str, Any], monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
  workdir = evaluated["workdir"]
  assert sorted(p.name for p in (workdir / "eval").iterdir()) == ["external"]
  assert sorted(p.name for p in (workdir / "data").iterdir()) == ["manifest.json"]
  assert sorted(p.name for p in (workdir / "eval" / "external" / "inet" / "correct").iterdir()) == [
      "gaussian_noise-1.npz", "gaussian_noise-2.npz", "jpeg_compression-1.npz", "jpeg_compression-2.npz"]
  p = evaluated["model"].params
  stand_in_networks(monkeypatch, p)
  calls = []

  class Evaluated(Exception):
    """Raised by the stand-in of evaluate_batches: a cell was evaluated."""

  def stand_in(*args: Any, **kwargs: Any) -> None:
    calls.append(args[-1])
    raise Evaluated

  monkeypatch.setattr(external, "evaluate_batches", stand_in)
  rows = external.run_external(evaluated["cfg"], workdir, evaluated["sets"] / "mine", layout="folder")
  assert calls == [] and rows == evaluated["rows"]["mine"]
  # Another set under the same name is another cell: evaluated again.
  with pytest.raises(Evaluated):
    external.run_external(evaluated["cfg"], workdir, evaluated["sets"] / "inet", name="mine")
  assert calls == ["gaussian_noise:1"]


def _tree(root: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
  for rel, data in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
  return root


def test_detect_layout(tmp_path: pathlib.Path) -> None:
  png = _png(np.zeros((32, 32, 3), np.uint8))
  assert external.detect_layout(_tree(tmp_path / "a", {"fog/3/cat/x.png": png})) == "imagenet-c"
  assert external.detect_layout(_tree(tmp_path / "b", {"weather/fog/3/cat/x.png": png})) == "imagenet-c"
  assert external.detect_layout(_tree(tmp_path / "c", {"cat/x.png": png})) == "folder"
  assert external.detect_layout(_tree(tmp_path / "d", {"labels.npy": b"", "fog.npy": b""})) == "cifar10-c"
  with pytest.raises(errors.InvalidInputError, match="ambiguous layout.*fog.*cat"):
    external.detect_layout(_tree(tmp_path / "e", {"fog/3/cat/x.png": png, "cat/x.png": png}))
  with pytest.raises(errors.InvalidInputError, match="ambiguous layout.*labels.npy"):
    external.detect_layout(_tree(tmp_path / "f", {"labels.npy": b"", "cat/x.png": png}))
  (tmp_path / "g").mkdir()
  with pytest.raises(errors.MissingInputError, match="empty set"):
    external.detect_layout(tmp_path / "g")


def _npy(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


def test_bad_sets_refused_with_the_reason(evaluated: dict[str, Any], tmp_path: pathlib.Path) -> None:
  cfg, workdir = evaluated["cfg"], evaluated["workdir"]
  png = _png(np.zeros((32, 32, 3), np.uint8))

  def run(root: pathlib.Path, layout: str | None = None, name: str | None = None) -> None:
    external.run_external(cfg, workdir, root, layout=layout, name=name)

  with pytest.raises(errors.MissingInputError, match="no such directory"):
    run(tmp_path / "absent")
  with pytest.raises(errors.InvalidInputError, match="--layout=imagenet: unknown layout; use one of imagenet-c"):
    run(_tree(tmp_path / "a", {"cat/x.png": png}), layout="imagenet")
  with pytest.raises(errors.InvalidInputError, match="--name=a/b"):
    run(tmp_path / "a", name="a/b")
  with pytest.raises(errors.InvalidInputError, match=r"1 class folder\(s\) the workdir does not know: zebra"):
    run(_tree(tmp_path / "b", {"fog/1/cat/x.png": png, "fog/1/zebra/x.png": png}))
  with pytest.raises(errors.MissingInputError, match="no images in <class>/ folders"):
    run(_tree(tmp_path / "c", {"cat/notes.txt": b"x"}))
  labels = _npy(np.zeros(10, np.int64))
  with pytest.raises(errors.InvalidInputError, match=r"fog.npy: expected uint8 images of shape \(10, H, W, 3\).*"
                                                    r"uint8 \(10, 32, 32\)"):
    run(_tree(tmp_path / "d", {"labels.npy": labels, "fog.npy": _npy(np.zeros((10, 32, 32), np.uint8))}))
  with pytest.raises(errors.InvalidInputError, match=r"fog.npy: expected .* got float32 \(10, 32, 32, 3\)"):
    run(_tree(tmp_path / "e", {"labels.npy": labels, "fog.npy": _npy(np.zeros((10, 32, 32, 3), np.float32))}))
  with pytest.raises(errors.InvalidInputError, match=r"labels.npy: expected integer class indices in \[0, 10\)"):
    run(_tree(tmp_path / "f", {"labels.npy": _npy(np.full(10, 12)), "fog.npy": b""}))
  with pytest.raises(errors.MissingInputError, match="labels.npy not found"):
    run(_tree(tmp_path / "g", {"fog.npy": b""}), layout="cifar10-c")
  with pytest.raises(errors.InvalidInputError, match="CIFAR-10-C labels are CIFAR-10 class indices.*n01440764"):
    external.open_set(tmp_path / "e", "cifar10-c", ["n01440764", "n01443537"], cfg)


def test_cli_external_flags(evaluated: dict[str, Any]) -> None:
  """A misplaced flag and a bad set are one line and exit code 2, before any model is loaded."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("MSNET_")}
  env["JAX_PLATFORMS"] = "cpu"
  for args, message in ((["--layout=folder"], "give --external=PATH"),
                        ([f"--external={evaluated['sets'] / 'absent'}"], "no such directory")):
    proc = subprocess.run([sys.executable, "-m", "msnet.cli", "evaluate", f"--workdir={evaluated['workdir']}", *args],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("msnet evaluate: ") and message in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# The report's table.

TOP1 = {  # method -> {spec: top1}, two corruptions x two severities and one extra corruption
    "alexnet_baseline": {"fog:1": 0.50, "fog:2": 0.30, "snow:1": 0.40, "snow:2": 0.20, "spatter:1": 0.60},
    "baseline": {"fog:1": 0.70, "fog:2": 0.50, "snow:1": 0.60, "snow:2": 0.40, "spatter:1": 0.80},
    "ms": {"fog:1": 0.75, "fog:2": 0.60, "snow:1": 0.62, "snow:2": 0.38, "spatter:1": 0.90},
}


def _external_results(workdir: pathlib.Path, top1: dict[str, dict[str, float]], name: str = "c10c") -> None:
  rows = [dict(method=m, spec=s, sweeps=[s.split(":")[0]], kind=s.split(":")[0], level=float(s.split(":")[1]),
               codec="", codec_level=None, pre="", top1=v, top5=None, n=100, correct1=round(100 * v), correct5=None,
               ci95_low=None, ci95_high=None, psnr=None, bpp=None)
          for m, cells in top1.items() for s, v in cells.items()]
  specs = list(next(iter(top1.values())))
  sweeps = {k: [s for s in specs if s.startswith(k + ":")] for k in dict.fromkeys(s.split(":")[0] for s in specs)}
  meta = dict(name=name, source="/sets/c10c", layout="cifar10-c", methods=list(top1), missing={}, sweeps=sweeps,
              specs=specs, skipped={s: 0 for s in specs})
  out = workdir / "eval" / "external" / name
  out.mkdir(parents=True)
  (out / "results.json").write_text(json.dumps({"rows": rows, "meta": meta}))


def test_ce_and_mce_by_hand(tmp_path: pathlib.Path) -> None:
  _external_results(tmp_path, TOP1)
  (tmp_path / "report").mkdir()
  lines = report_external.external_sections(tmp_path / "eval", tmp_path / "report")
  text = "\n".join(lines)
  assert "normalised by this workdir's AlexNet baseline" in text and "leaves out the extra corruptions spatter" in text
  table = {(r["method"], r["corruption"]): r for r in
           csv.DictReader((tmp_path / "report" / "external_c10c.csv").open())}
  # CE_fog(ms) = (0.25 + 0.40) / (0.50 + 0.70); CE_snow(ms) = (0.38 + 0.62) / (0.60 + 0.80); mCE without spatter.
  ce_fog, ce_snow = 0.65 / 1.20, 1.00 / 1.40
  assert float(table[("ms", "fog")]["ce"]) == pytest.approx(ce_fog)
  assert float(table[("ms", "snow")]["ce"]) == pytest.approx(ce_snow)
  assert float(table[("ms", "spatter")]["ce"]) == pytest.approx(0.10 / 0.40)
  assert float(table[("ms", "mean")]["ce"]) == pytest.approx((ce_fog + ce_snow) / 2)
  assert float(table[("alexnet_baseline", "mean")]["ce"]) == pytest.approx(1.0)
  assert float(table[("ms", "fog")]["top1"]) == pytest.approx(0.675)
  assert float(table[("ms", "mean")]["top1"]) == pytest.approx((0.675 + 0.50 + 0.90) / 3)
  assert {r["normaliser"] for r in table.values()} == {"alexnet_baseline"}
  assert "| ms | 0.628 | 0.542 | 0.714 | 0.250 |" in text

  # Without the AlexNet baseline: normalised by the baseline, and said so.
  _external_results(tmp_path, {m: v for m, v in TOP1.items() if m != "alexnet_baseline"}, name="other")
  lines = report_external.external_sections(tmp_path / "eval", tmp_path / "report")
  assert "normalised by this run's `baseline`, not by AlexNet" in "\n".join(lines)
  rows = {(r["method"], r["corruption"]): r for r in
          csv.DictReader((tmp_path / "report" / "external_other.csv").open())}
  assert float(rows[("ms", "fog")]["ce"]) == pytest.approx(0.65 / 0.80)
  assert rows[("ms", "fog")]["normaliser"] == "baseline"



def test_report_has_the_external_table(evaluated: dict[str, Any], tmp_path: pathlib.Path) -> None:
  """`msnet report` on a workdir with external results: a section per set and its CSV."""
  eval_dir = tmp_path / "eval"
  eval_dir.mkdir()
  row = dict(method="baseline", spec="clean", sweeps=["clean"], kind="clean", level=None, codec="", codec_level=None,
             pre="", top1=0.5, top5=0.9, n=10, correct1=5, correct5=9, ci95_low=0.2, ci95_high=0.8, psnr=None, bpp=None)
  (eval_dir / "results.json").write_text(json.dumps({"rows": [row], "meta": {"specs": ["clean"]}}))
  ext = evaluated["workdir"] / "eval" / "external"
  for name in ("inet", "mine"):
    (eval_dir / "external" / name).mkdir(parents=True)
    (eval_dir / "external" / name / "results.json").write_text((ext / name / "results.json").read_text())
  cfg = _config()
  cfg.evaluate.sweeps = ("clean",)
  text = report_run.run_report(cfg, tmp_path).read_text()
  assert "## External set `inet`" in text and "## External set `mine`" in text
  assert "normalised by this run's `baseline`" in text and "oracle" in text
  assert (tmp_path / "report" / "external_inet.csv").exists()
