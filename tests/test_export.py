"""`msnet export`: the artifact reloads in a process that imports only jax, numpy and json, takes any batch size,
and gives the predictor's probabilities (within 1e-6) for a master rule, a rule fed bins from outside and the
calibrated MAP rule, whose temperatures are baked in and recorded in export.json."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import msnet
from msnet import errors, export
# setup: the tiny workdir of real checkpoints, with the calibrate stage's temperatures and a gate
from test_predict import MASTER_TEMPERATURE, NAMES, OWN_BIN_TEMPERATURES, _images, setup  # noqa: F401

RELOAD = """
import json, sys
import jax, numpy as np
assert not any(m == "msnet" or m.startswith("msnet.") for m in sys.modules)
inputs, outputs = np.load(sys.argv[2]), {}
for rule in ("ms", "bitstream", "map_cal"):
  meta = json.load(open(f"{sys.argv[1]}/{rule}/export.json"))
  exported = jax.export.deserialize(open(f"{sys.argv[1]}/{rule}/{meta['artifact']}", "rb").read())
  for n in (3, 8):
    args = [inputs["images"][:n]] + ([inputs["bins"][:n]] if "bins" in meta["inputs"] else [])
    outputs[f"{rule}-{n}"] = np.asarray(exported.call(*args))
np.savez(sys.argv[3], **outputs)
"""


def test_export_reloads_with_jax_alone(setup: dict[str, Any], tmp_path: pathlib.Path) -> None:  # noqa: F811
  workdir = setup["workdir"]
  proc = subprocess.run([sys.executable, "-m", "msnet.cli", "export", f"--workdir={workdir}", "--rule=ms",
                         f"--out={tmp_path / 'ms'}"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  export.export(workdir, "bitstream", tmp_path / "bitstream")
  export.export(workdir, "map_cal", tmp_path / "map_cal")
  meta = {r: json.loads((tmp_path / r / export.META).read_text()) for r in ("ms", "bitstream", "map_cal")}
  assert meta["ms"]["class_names"] == NAMES and meta["ms"]["input_size"] == 32
  assert meta["ms"]["inputs"] == {"images": {"shape": ["b", 32, 32, 3], "dtype": "uint8"}}
  assert meta["bitstream"]["inputs"]["bins"]["dtype"] == "int32"
  assert meta["ms"]["msnet_version"] == msnet.__version__ and "center-crop 32x32" in meta["ms"]["preprocessing"]
  assert "temperatures" not in meta["ms"]
  baked = meta["map_cal"]["temperatures"]
  assert baked["baked_in"] is True and baked["master"] == pytest.approx(MASTER_TEMPERATURE)
  assert baked["branch"] == pytest.approx(dict(zip(["clean", "jpeg", "jp2k"], OWN_BIN_TEMPERATURES)))
  assert baked["fitted_on"] == "each branch's bin"

  x, bins = _images(8, seed=9), np.array([0, 1, 2, 2, 1, 0, 1, 2], np.int32)
  np.savez(tmp_path / "in.npz", images=x, bins=bins)
  proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path), str(tmp_path / "in.npz"),
                         str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  served = np.load(tmp_path / "out.npz")
  predictor = msnet.load(workdir)
  for rule in ("ms", "bitstream", "map_cal"):
    for n in (3, 8):
      expected = predictor.predict(x[:n], rule=rule, bins=bins[:n])["probs"]
      assert served[f"{rule}-{n}"].shape == (n, 10)
      np.testing.assert_allclose(served[f"{rule}-{n}"], expected, rtol=0, atol=1e-6, err_msg=f"{rule} B={n}")


def test_export_refuses_bad_requests(setup: dict[str, Any], tmp_path: pathlib.Path) -> None:  # noqa: F811
  with pytest.raises(errors.InvalidInputError, match="unknown rule 'nope'"):
    export.export(setup["workdir"], "nope", tmp_path / "x")
  with pytest.raises(errors.MissingInputError, match="--stage=stability"):
    export.export(setup["workdir"], "stability", tmp_path / "x")
  assert not (tmp_path / "x").exists()
  proc = subprocess.run([sys.executable, "-m", "msnet.cli", "export", f"--workdir={setup['workdir']}", "--rule=ms"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and "--out=DIR is required" in proc.stderr
