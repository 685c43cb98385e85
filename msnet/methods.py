"""Every method and decision rule msnet knows, in one table read by validation, evaluation, predict and export.

A method is a K=1 network (`NETWORK`: the baseline and the comparison methods), the slave's branches each
alone (`BRANCHES`, reported as `branch_<bin>`), or a decision rule over the slave's K branches (`RULE`). Its
entry says which training stages it needs (`SLAVE` standing for the baseline and every `branch_<bin>`), which
param parts the predictor loads for it, where the bin of each image comes from when it routes by one given
from outside (the true bin, or the bin read from the image's bitstream), and, for a rule, the function that
computes its probabilities and routing. Evaluation's jitted step and the predictor both call that function, so
a rule computes the same thing on both paths and a new rule is one entry here.

Importing this module imports no JAX (config validation, `msnet predict`'s file reading and the report read
the table); a rule's function imports it when it is traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Callable

NETWORK, BRANCHES, RULE = "network", "branches", "rule"
SLAVE = "slave"  # in `stages`: baseline and every branch_<bin> stage; in `parts`: the assembled slave's params
BIN_FIELDS = {"true": "bin", "bitstream": "bitstream_bin"}  # `Method.bins` -> the evaluation record's field


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a rule reads, computed by its caller: evaluation's shared-trunk step or the predictor's function."""
  slave: Any                # [K, B, C] the branches' logits
  master: Any = None        # [B, K] float32 master logits (rules needing the master stage)
  gate: Any = None          # [B, K] the learned gate's logits (the gate rule)
  temperatures: Any = None  # the calibrate stage's {"branch": [K], "own_bin": [K], "master": []}
  bins: Any = None          # [B] int: the bin each image is routed by (rules whose `bins` is set)


Output = dict[str, Any]  # {"probs": [B, C], "branch": [B] int32 (the branch each image used), "bin_probs": [B, K] | None}


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table."""
  name: str
  kind: str                      # NETWORK, BRANCHES or RULE
  stages: tuple[str, ...]        # the training stages it needs (SLAVE: baseline and every branch_<bin>)
  parts: tuple[str, ...]         # the param parts the predictor loads, in load order
  bins: str | None = None        # "true" / "bitstream": routes by each image's bin given from outside
  fn: Callable[[Inputs], Output] | None = None  # RULE: probabilities and routing from its Inputs
  # The calibrate stage's temperatures it divides by: the branches' first ("branch": fitted on every bin,
  # "own_bin": each branch on its own bin), then "master" (export records them beside the artifact).
  temperatures: tuple[str, ...] = ()


def _jax() -> tuple[Any, Any, Any]:
  """(msnet.decision, jax, jax.numpy), imported on first trace so that reading the table needs no JAX."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from msnet import decision  # noqa: PLC0415
  return decision, jax, jnp


def _routed_by(probs: Any, bin_logits: Any) -> Output:
  """A rule weighted or routed by a bin network: each image's branch is that network's most probable bin."""
  _, jax, jnp = _jax()
  return {"probs": probs, "branch": jnp.argmax(bin_logits, axis=-1).astype(jnp.int32),
          "bin_probs": jax.nn.softmax(bin_logits.astype(jnp.float32), axis=-1)}


def _ms(x: Inputs) -> Output:
  decision, _, _ = _jax()
  return _routed_by(decision.ms(x.slave, x.master), x.master)


def _map(x: Inputs) -> Output:
  decision, _, _ = _jax()
  return _routed_by(decision.map_rule(x.slave, x.master), x.master)


def _map_cal(x: Inputs) -> Output:
  """MAP of the branches at their own-bin temperatures and the master at its own."""
  decision, _, _ = _jax()
  master = x.master / x.temperatures["master"]
  return _routed_by(decision.map_rule(decision.temper(x.slave, x.temperatures["own_bin"]), master), master)


def _gate(x: Inputs) -> Output:
  decision, _, _ = _jax()
  return _routed_by(decision.map_rule(x.slave, x.gate), x.gate)


def _ams_of(logits: Any) -> Output:
  """AMS; each image's branch is the one whose probability gave the top-1 class."""
  decision, jax, jnp = _jax()
  probs = decision.ams(logits)
  top1 = jnp.argmax(probs, axis=-1)
  per_branch = jnp.take_along_axis(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), top1[None, :, None],
                                   axis=-1)[..., 0]  # [K, B]
  return {"probs": probs, "branch": jnp.argmax(per_branch, axis=0).astype(jnp.int32), "bin_probs": None}


def _ams(x: Inputs) -> Output:
  return _ams_of(x.slave)


def _ams_cal(x: Inputs) -> Output:
  """AMS at the temperatures fitted on every bin (AMS applies every branch to every image)."""
  decision, _, _ = _jax()
  return _ams_of(decision.temper(x.slave, x.temperatures["branch"]))


def _given_bin(x: Inputs) -> Output:
  """The branch of the given bin: the oracle (true bin) and the bitstream rule (the bitstream's bin)."""
  decision, _, jnp = _jax()
  return {"probs": decision.oracle(x.slave, x.bins), "branch": x.bins.astype(jnp.int32), "bin_probs": None}


def _hybrid(x: Inputs) -> Output:
  """The bitstream's branch where it names a degradation bin, else the master's."""
  decision, _, jnp = _jax()
  out = _routed_by(decision.hybrid(x.slave, x.master, x.bins), x.master)
  return dict(out, branch=jnp.where(x.bins != 0, x.bins.astype(jnp.int32), out["branch"]))


def _network(name: str, stages: tuple[str, ...] | None = None, parts: tuple[str, ...] | None = None) -> Method:
  return Method(name, NETWORK, stages or (name,), parts or (name,))


def _rule(name: str, fn: Callable[[Inputs], Output], needs: tuple[str, ...] = (), bins: str | None = None,
          temperatures: tuple[str, ...] = ()) -> Method:
  """A rule over the slave and the stages in `needs`; each stage's params are a part of the same name, but the
  calibrate stage's part is its temperatures."""
  parts = tuple("temperatures" if s == "calibrate" else s for s in needs)
  return Method(name, RULE, (SLAVE, *needs), (SLAVE, *parts), bins, fn, temperatures)


METHODS: dict[str, Method] = {m.name: m for m in (
    _network("baseline"),
    Method("branches", BRANCHES, (SLAVE,), (SLAVE,)),
    _rule("ms", _ms, ("master",)),
    _rule("ams", _ams),
    _rule("map", _map, ("master",)),
    _rule("oracle", _given_bin, bins="true"),
    _rule("bitstream", _given_bin, bins="bitstream"),
    _rule("hybrid", _hybrid, ("master",), bins="bitstream"),
    _rule("ams_cal", _ams_cal, ("calibrate",), temperatures=("branch",)),
    _rule("map_cal", _map_cal, ("master", "calibrate"), temperatures=("own_bin", "master")),
    _rule("gate", _gate, ("gate",)),
    _network("da_fc8"), _network("da_fc67"), _network("da_fc678"), _network("stability"),
    _network("deepcloak", ("baseline", "deepcloak"), ("baseline", "feature_mask")),  # the baseline, features masked
    _network("alexnet_baseline"),
    _network("augmix"),
)}


def unknown(name: str, known: Iterable[str]) -> str:
  """The one wording of a refused method or rule name, with the names that would have been accepted."""
  return f"{name!r} is not one of {list(known)}"


def get(name: str) -> Method:
  """The table's entry; ValueError naming every method for a name it does not hold."""
  if name not in METHODS:
    raise ValueError(f"method {unknown(name, METHODS)}")
  return METHODS[name]


def names(*kinds: str, bins: str | None = None) -> tuple[str, ...]:
  """The table's names of these kinds (all kinds when none is given), in table order; `bins`: only the rules
  routed by that bin ("true" or "bitstream")."""
  return tuple(m.name for m in METHODS.values()
               if (not kinds or m.kind in kinds) and (bins is None or m.bins == bins))


def stages_of(method: Method, bin_names: Iterable[str]) -> list[str]:
  """The training stages `method` needs, SLAVE spelt out as the baseline and every degradation bin's branch."""
  branch_stages = ["baseline", *(f"branch_{b}" for b in list(bin_names)[1:])]
  return [s for stage in method.stages for s in (branch_stages if stage == SLAVE else [stage])]
