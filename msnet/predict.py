"""Use a trained workdir outside the pipeline: `msnet.load(W).predict(images, rule="ms")`.

A rule is a way to get class probabilities from the workdir's trained networks: every decision rule that
`msnet evaluate` reports (ms, ams, map, oracle, bitstream, hybrid, branch_<bin>; beyond the paper ams_cal, map_cal,
branch_<bin>_cal with the calibrate stage's temperatures and gate with the learned gate) and every single network
whose stage was trained (baseline, da_fc8, da_fc67, da_fc678, stability, deepcloak, alexnet_baseline): the
table in `msnet.methods`. Which stages a rule needs is `evaluate.make_plan`'s answer, so a rule runs here exactly
when evaluate would run it, and its probabilities are computed by the same models and the same rule function
(the table's, which evaluation's jitted step calls too).

Params are loaded on a rule's first use (bitstream loads no master; the temperatures and the gate's network are
parts of their own, loaded only by the rules that read them), placed on the config's mesh and run
in one jitted function per rule. Batches are padded to a few bucket sizes (powers of two from 8, multiples
of the mesh's data axis, capped at `max_batch`; larger inputs are chunked), so any batch size compiles at
most `len(buckets)` programs per rule; every op is per image (no batch statistics), so padding rows cannot
change the real rows, and they are dropped. One process: the arrays are put from and fetched to this host.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msnet import config as config_lib, decision, degradations, errors, methods, models, parallel
from msnet import train as train_lib
from msnet.data import shards
from msnet.data.sources import shape as _shape
from msnet.evaluate import plan as plan_lib
from msnet.train import calibrate

BIN_POSTERIOR_PARTS = ("master", "gate")  # a rule reading one of these reports its softmax as `bin_probs`
NO_BRANCH = -1  # `branch` of a single network


@dataclasses.dataclass(frozen=True)
class _Rule:
  """How a rule runs: the evaluate method whose stages it needs, the param parts it reads, its function, where
  the bins it routes by come from and the temperatures it divides by (as msnet.methods.Method's)."""
  method: str
  parts: tuple[str, ...]
  fn: Callable[[dict[str, Any], jax.Array, jax.Array], dict[str, Any]]
  bins: str | None = None
  temperatures: tuple[str, ...] = ()


def _softmax(logits: jax.Array) -> jax.Array:
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _no_branch(x: jax.Array) -> jax.Array:
  return jnp.full((x.shape[0],), NO_BRANCH, jnp.int32)


def rule_functions(config: ml_collections.ConfigDict, policy: models.ConvPolicy | None = None
                   ) -> dict[str, _Rule]:
  """Every rule of this config -> its pure function (params parts, uint8 images [B, S, S, 3], bins [B]) ->
  {"probs" [B, C], "branch" [B], "bin_probs" [B, K] or None}. `policy` picks conv formulations (export
  uses plain XLA convs, which every platform lowers)."""
  num_classes, bin_names = int(config.data.num_classes), [b.name for b in config.bins]
  single = models.build_slave(config.model, num_classes, 1, policy=policy)
  slave = models.build_slave(config.model, num_classes, len(bin_names), policy=policy)
  master = models.build_master(config.master, len(bin_names), policy=policy)
  alexnet = models.build_slave(config_lib.alexnet_model(config), num_classes, 1, policy=policy)

  def network(model: Any, part: str) -> Callable[..., dict[str, Any]]:
    def fn(p, x, bins):
      return {"probs": _softmax(model.apply(p[part], x)[0]), "branch": _no_branch(x), "bin_probs": None}
    return fn

  def deepcloak(p, x, bins):
    logits = single.apply(p["baseline"], x, feature_mask=p["feature_mask"])[0]
    return {"probs": _softmax(logits), "branch": _no_branch(x), "bin_probs": None}

  def branch(k: int, calibrated: bool) -> Callable[..., dict[str, Any]]:
    def fn(p, x, bins):  # the slave cut to its k-th branch (params and running statistics): only it runs
      one = {c: {**v, "branches": jax.tree.map(lambda a: a[k:k + 1], v["branches"])} if "branches" in v else v
             for c, v in p["slave"].items()}
      logits = single.apply(one, x)
      if calibrated:
        logits = decision.temper(logits, p["temperatures"]["own_bin"][k:k + 1])  # calibrated on its own bin
      return {"probs": _softmax(logits[0]), "branch": jnp.full((x.shape[0],), k, jnp.int32), "bin_probs": None}
    return fn

  def routed(rule: methods.Method) -> Callable[..., dict[str, Any]]:
    def fn(p, x, bins):  # the rule's function in msnet.methods, the one evaluation's step calls
      return rule.fn(methods.Inputs(
          slave.apply(p["slave"], x),  # [K, B, C]
          master.apply({"params": p["master"]}, x).astype(jnp.float32) if "master" in rule.parts else None,
          master.apply({"params": p["gate"]}, x) if "gate" in rule.parts else None,  # the gate: the master's arch
          p.get("temperatures"), bins if rule.bins else None))
    return fn

  rules: dict[str, _Rule] = {}
  for m in methods.METHODS.values():
    if m.kind == methods.NETWORK:
      fn = deepcloak if m.name == "deepcloak" else network(alexnet if m.name == "alexnet_baseline" else single, m.name)
      rules[m.name] = _Rule(m.name, m.parts, fn)
  for k, b in enumerate(bin_names):
    rules[f"branch_{b}"] = _Rule("branches", ("slave",), branch(k, calibrated=False))
  for k, b in enumerate(bin_names):  # a branch at its temperature needs what ams_cal needs: branches, calibrate
    rules[f"branch_{b}_cal"] = _Rule("ams_cal", ("slave", "temperatures"), branch(k, calibrated=True),
                                     temperatures=("own_bin",))
  for m in methods.METHODS.values():
    if m.kind == methods.RULE:
      rules[m.name] = _Rule(m.name, m.parts, routed(m), m.bins, m.temperatures)
  return rules


def buckets(max_batch: int, data_size: int, smallest: int = 8) -> list[int]:
  """Padded batch sizes: powers of two from `smallest` (a few padded rows cost less than one more compile),
  rounded up to a multiple of the mesh's data axis, up to max_batch (itself rounded up)."""
  cap = -(-max_batch // data_size) * data_size
  sizes, n = [], smallest
  while True:
    size = min(-(-n // data_size) * data_size, cap)
    if not sizes or size != sizes[-1]:
      sizes.append(size)
    if size == cap:
      return sizes
    n *= 2


class Predictor:
  """Class probabilities of a trained workdir's rules on uint8 images; build it with `msnet.load`."""

  def __init__(self, workdir: pathlib.Path, config: ml_collections.ConfigDict, class_names: list[str],
               max_batch: int):
    self.workdir, self.config, self.class_names = workdir, config, class_names
    self.bin_names = [b.name for b in config.bins]
    self.image_size = int(config.data.image_size)
    self.mesh = parallel.make_mesh(config.mesh)
    self.buckets = buckets(max_batch, self.mesh.shape["data"])
    self.traces: dict[str, int] = {}    # compiles per rule (a test checks the bucketing)
    self.loaded: list[str] = []         # param parts loaded so far, in order
    self._rules = rule_functions(config)
    self._params: dict[str, Any] = {}   # part -> params (master, gate) or variables (networks) placed on the mesh
    self._jitted: dict[str, Callable[..., dict[str, Any]]] = {}
    # Every method evaluate knows, so make_plan says which stages each rule lacks whatever the config lists.
    every = ml_collections.ConfigDict(config.to_dict())
    every.evaluate.methods = methods.names()
    self._plan = plan_lib.make_plan(every, workdir)

  @property
  def rules(self) -> list[str]:
    """The rules whose training stages are complete in the workdir."""
    return [r for r, spec in self._rules.items() if spec.method not in self._plan.missing]

  def check_rule(self, rule: str) -> None:
    """InvalidInputError for an unknown rule, MissingInputError (naming the stages to train) for one that
    cannot run yet."""
    if rule not in self._rules:
      raise errors.InvalidInputError(f"unknown rule {methods.unknown(rule, self._rules)} (the rules of its config); "
                                     f"this workdir's rules are {self.rules}")
    method = self._rules[rule].method
    if method in self._plan.missing:
      stages = self._plan.missing[method].partition(": ")[2].split(", ")  # make_plan: "stage(s) not trained: a, b"
      command = f"msnet train --workdir={self.workdir} " + " ".join(f"--stage={s}" for s in stages)
      hint = ""
      if "calibrate" in stages and self.config.data.get("holdout_examples", 0) <= 0:
        hint = (" (calibrate fits its temperatures on held-out training images, and this workdir holds none: its "
                "data must be degraded with config.data.holdout_examples > 0 before the stages are trained, as "
                "configs/cifar10_beyond.py does)")
      raise errors.MissingInputError(f"rule {rule!r} needs the training stage(s) {', '.join(stages)}, not complete "
                                     f"in {self.workdir}; run `{command}` first{hint} (rules that can run: "
                                     f"{self.rules})")

  def params(self, rule: str) -> dict[str, Any]:
    """The parts of `rule`'s params, loaded on first use and placed on the mesh."""
    self.check_rule(rule)
    for part in self._rules[rule].parts:
      if part not in self._params:
        self._params[part] = self._place(part, self._load(part))
        self.loaded.append(part)
    return {part: self._params[part] for part in self._rules[rule].parts}

  def _load(self, part: str) -> Any:
    """A network's variables ({"params"}, plus "batch_stats" with BatchNorm); the master's and gate's params."""
    if part == "baseline":
      return train_lib.load_baseline_variables(self.workdir, self.config)
    if part == "slave":
      return train_lib.load_slave_variables(self.workdir, self.config)
    if part == "feature_mask":
      return np.asarray(train_lib.load_feature_mask(self.workdir), np.float32)
    if part == "temperatures":
      return calibrate.load_temperatures(self.workdir, len(self.bin_names))
    if part == "gate":
      return train_lib.load_gate_params(self.workdir)
    if part == "master":
      return train_lib.load_params(self.workdir, part)
    return train_lib.load_variables(self.workdir, part)

  def _place(self, part: str, params: Any) -> Any:
    if part in ("feature_mask", "temperatures"):
      return jax.device_put(params, parallel.replicated(self.mesh))
    def place(tree: Any) -> Any:
      return jax.device_put(tree, parallel.param_shardings(tree, self.mesh, self.config.sharding_rules))
    return place(params) if part in ("master", "gate") else {c: place(v) for c, v in params.items()}

  def _step(self, rule: str, params: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    if rule not in self._jitted:
      fn = self._rules[rule].fn

      def traced(p, x, bins):
        self.traces[rule] = self.traces.get(rule, 0) + 1
        return fn(p, x, bins)

      data = parallel.data_sharding(self.mesh)
      self._jitted[rule] = jax.jit(traced, in_shardings=(jax.tree.map(lambda a: a.sharding, params), data, data),
                                   out_shardings=data, compiler_options=models.compiler_options())
    return self._jitted[rule]

  def shape(self, image: Any, name: str = "image") -> np.ndarray:
    """One image as the network sees it: RGB uint8 (grey replicated, alpha dropped), then resized and
    center-cropped exactly as the workdir's data config did its source images."""
    try:
      rgb = degradations.as_rgb_uint8(image)
    except ValueError as e:
      raise errors.InvalidInputError(f"{name}: {e}") from None
    return _shape(rgb, self.image_size, int(self.config.data.resize_shorter), name)

  def _batch(self, images: Any) -> np.ndarray:
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (
        self.image_size, self.image_size, 3):
      return images
    if isinstance(images, np.ndarray) and images.ndim != 4:
      raise errors.InvalidInputError(f"images must be uint8 [B, H, W, 3] (one image: images[None]) or a list of "
                                     f"images, got an array of shape {images.shape}")
    shaped = [self.shape(x, f"images[{i}]") for i, x in enumerate(images)]
    s = self.image_size
    return np.stack(shaped) if shaped else np.zeros((0, s, s, 3), np.uint8)

  def _bins(self, rule: str, bins: Any, n: int) -> np.ndarray:
    if not self._rules[rule].bins:
      return np.zeros(n, np.int32)
    if bins is None:
      raise errors.InvalidInputError(f"rule {rule!r} routes each image by a bin given from outside: pass bins=[B] "
                                     f"integer bin indices in [0, {len(self.bin_names)}) ({self.bin_names}); "
                                     "`msnet predict` reads them from each file's bitstream")
    bins = np.asarray(bins)
    if bins.shape != (n,) or not np.issubdtype(bins.dtype, np.integer) or (
        n and (bins.min() < 0 or bins.max() >= len(self.bin_names))):
      raise errors.InvalidInputError(f"bins must be {n} integers in [0, {len(self.bin_names)}) ({self.bin_names}), "
                                     f"one per image; got dtype {bins.dtype}, shape {bins.shape}, values "
                                     f"{np.unique(bins)[:8].tolist()}")
    return bins.astype(np.int32)

  def predict(self, images: Any, rule: str = "ms", top_k: int = 5, bins: Any = None) -> dict[str, Any]:
    """Class probabilities of `rule` on uint8 images [B, H, W, 3] (or a list of images of any sizes).

    Returns `probs` [B, C] float32, `top_k` [B, k] class indices by decreasing probability (ties: lower
    index) and `top_k_probs` [B, k], `branch` [B] int32 (the branch each image used: ms / map / map_cal the
    master's most probable bin, gate the gate's, oracle / bitstream the given bin, hybrid the given bin where
    it is not 0 and else the master's, ams / ams_cal the branch whose (calibrated) probability gave the top-1
    class, branch_<bin> / branch_<bin>_cal that bin, a single network -1) and `bin_probs` [B, K] (the
    master's softmax, at its temperature for map_cal; the gate's for gate; None for rules that read neither).
    `bins` [B] is required by oracle, bitstream and hybrid (the bitstream's bins).
    """
    params = self.params(rule)
    if top_k < 1:
      raise errors.InvalidInputError(f"top_k must be >= 1, got {top_k}")
    x = self._batch(images)
    n = x.shape[0]
    b = self._bins(rule, bins, n)
    step = self._step(rule, params)
    data = parallel.data_sharding(self.mesh)
    parts: list[dict[str, Any]] = []
    for lo in range(0, n, self.buckets[-1]):
      chunk = min(self.buckets[-1], n - lo)
      size = next(s for s in self.buckets if s >= chunk)
      pad = ((0, size - chunk),)
      out = step(params, jax.device_put(np.pad(x[lo:lo + chunk], pad + ((0, 0),) * 3), data),
                 jax.device_put(np.pad(b[lo:lo + chunk], pad), data))
      parts.append({k: None if v is None else np.asarray(v)[:chunk] for k, v in out.items()})
    num_classes, num_bins = int(self.config.data.num_classes), len(self.bin_names)
    probs = np.concatenate([p["probs"] for p in parts]) if parts else np.zeros((0, num_classes), np.float32)
    branch = np.concatenate([p["branch"] for p in parts]) if parts else np.zeros(0, np.int32)
    bin_probs = None
    if set(BIN_POSTERIOR_PARTS) & set(self._rules[rule].parts):
      bin_probs = np.concatenate([p["bin_probs"] for p in parts]) if parts else np.zeros((0, num_bins), np.float32)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :min(top_k, num_classes)]
    return {"rule": rule, "probs": probs, "top_k": order.astype(np.int32),
            "top_k_probs": np.take_along_axis(probs, order, axis=-1), "branch": branch, "bin_probs": bin_probs}


def class_names_of(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> list[str]:
  """Class names from the degrade's manifest (the eval split's, else the train split's); "0".."C-1" without
  one."""
  manifest = shards.read_json(workdir / "data" / "manifest.json") or {}
  splits = manifest.get("splits", {})
  for split in (config.data.eval_split, config.data.train_split):
    names = splits.get(split, {}).get("class_names")
    if names:
      return list(names)
  return [str(i) for i in range(int(config.data.num_classes))]


def load(workdir: Any, rules: Sequence[str] | None = None, max_batch: int | None = None) -> Predictor:
  """A Predictor over workdir W: W/config.json, the manifest's class names and, for each of `rules`, its
  params now (None: each rule's on its first `predict`). `max_batch` (default config.evaluate.global_batch)
  caps the images per device call."""
  workdir = pathlib.Path(workdir).absolute()  # orbax restores from absolute paths only
  saved = workdir / "config.json"
  if not saved.exists():
    raise errors.MissingInputError(f"{saved} not found: {workdir} is not an msnet workdir, or nothing has run in "
                                   "it yet (msnet run / msnet train writes it)")
  if jax.process_count() > 1:
    raise errors.UserError("msnet.load runs in one process: start it without launch/*.sh (it uses every local "
                           "device)")
  config = config_lib.from_json(saved.read_text())
  predictor = Predictor(workdir, config, class_names_of(workdir, config),
                        int(max_batch or config.evaluate.global_batch))
  for rule in rules or ():
    predictor.params(rule)
  return predictor
