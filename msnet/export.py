"""`msnet export`: one rule of a trained workdir as a serialized `jax.export` artifact, for serving without msnet.

DIR/model.jaxexport holds the rule's function with its params (and BatchNorm running statistics) closed over as
constants: uint8 images [b, S, S, 3] (and, for the rules routed by a bin given from outside, int32 bins [b]) in,
float32 class probabilities [b, C] out, for any batch size b (a symbolic dimension). Every rule of `msnet.predict`
exports, the calibrated ones (ams_cal, map_cal, branch_<bin>_cal) with the calibrate stage's temperatures baked in as
constants too, and gate with the gate's network. It is traced with plain XLA convolutions
(`models.XLA_POLICY`), which every platform lowers, not the CPU formulations msnet trains with.
DIR/export.json says what the caller must know: class names, input size, the resizing the caller does, the
inputs, the rule, the temperatures baked in (calibrated rules), the versions. Loading needs JAX alone:

  exported = jax.export.deserialize(open("DIR/model.jaxexport", "rb").read())
  probs = exported.call(images)            # images: uint8 [b, S, S, 3]; bins too for oracle / bitstream
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import msnet
from msnet import errors, models, predict

ARTIFACT = "model.jaxexport"
META = "export.json"


def _preprocessing(config: Any) -> str:
  size, shorter = int(config.data.image_size), int(config.data.resize_shorter)
  if shorter > 0:
    return (f"RGB uint8 (grey replicated, alpha dropped); resize the shorter side to {shorter} (Pillow bicubic), "
            f"then center-crop {size}x{size}. Input normalisation is inside the model.")
  return (f"RGB uint8 (grey replicated, alpha dropped); center-crop {size}x{size}; smaller images are not "
          "supported (the model was trained on images of that size). Input normalisation is inside the model.")


def export(workdir: Any, rule: str, out: Any, platforms: Sequence[str] | None = None) -> pathlib.Path:
  """Write DIR/model.jaxexport and DIR/export.json for `rule` of workdir W; returns DIR.

  `platforms` (default: this machine's backend) are the platforms the artifact runs on, e.g. ("cpu", "cuda").
  """
  predictor = predict.load(workdir)
  predictor.check_rule(rule)
  config = predictor.config
  host = jax.device_get(predictor.params(rule))
  spec = predict.rule_functions(config, policy=models.XLA_POLICY)[rule]
  fn = spec.fn
  size = predictor.image_size
  (b,) = jax.export.symbolic_shape("b")
  args = [jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8)]
  with_bins = spec.bins is not None
  if with_bins:
    args.append(jax.ShapeDtypeStruct((b,), jnp.int32))

  def serve(images: jax.Array, *bins: jax.Array) -> jax.Array:
    given = bins[0] if bins else jnp.zeros(images.shape[:1], jnp.int32)
    return fn(host, images, given)["probs"]

  try:
    exported = jax.export.export(jax.jit(serve), platforms=platforms)(*args)
  except ValueError as e:  # an unknown platform name
    raise errors.InvalidInputError(f"export: cannot lower rule {rule!r} for platforms {platforms}: {e}") from None
  try:
    artifact = exported.serialize()
  except ImportError as e:  # jax serializes with flatbuffers, which jax itself does not require
    raise errors.UserError(f"export: {e} (pip install flatbuffers)") from None
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / ARTIFACT).write_bytes(artifact)
  inputs = {"images": {"shape": ["b", size, size, 3], "dtype": "uint8"}}
  if with_bins:
    inputs["bins"] = {"shape": ["b"], "dtype": "int32", "values": "the bin index of each image in bin_names: the "
                      + ("bin read from its bitstream (msnet.files.read_image, degradations.bin_of_bitstream)"
                         if spec.bins == "bitstream" else "true bin")}
  meta = {"rule": rule, "artifact": ARTIFACT, "class_names": predictor.class_names, "bin_names": predictor.bin_names,
          "input_size": size, "inputs": inputs,
          "output": {"probs": {"shape": ["b", int(config.data.num_classes)], "dtype": "float32"}},
          "preprocessing": _preprocessing(config), "platforms": list(exported.platforms),
          "msnet_version": msnet.__version__, "jax_version": jax.__version__,
          "load": f"jax.export.deserialize(open('{ARTIFACT}', 'rb').read()).call(images"
                  + (", bins)" if with_bins else ")")}
  if spec.temperatures:  # constants of the artifact, recorded so a reader knows which calibration it holds
    which = spec.temperatures[0]  # "branch": fitted on every bin (ams_cal); "own_bin": each branch on its own
    meta["temperatures"] = {"baked_in": True, "fitted_on": "every bin" if which == "branch" else "each branch's bin",
                            "branch": dict(zip(predictor.bin_names, map(float, host["temperatures"][which])))}
    if "master" in spec.temperatures:
      meta["temperatures"]["master"] = float(host["temperatures"]["master"])
  (out / META).write_text(json.dumps(meta, indent=1) + "\n")
  return out

