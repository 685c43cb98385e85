"""The train state pytree and its creation straight into its shardings (no copy on device 0 first).

Besides the params and the optimizer state it carries the model's non-trainable state, `model_state`: the
variable collections other than "params" ({"batch_stats": ...} of a BatchNorm ResNet: every norm's running
mean and variance, each branch its own), which the train step updates and checkpoints save and restore. It is
{} for GroupNorm and norm-free networks, so their state, steps and checkpoints are those of before.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from msnet import parallel
from msnet.train import optim


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data iterator."""
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any = dataclasses.field(default_factory=dict)  # e.g. {"batch_stats": ...}; {} without BatchNorm


def split_variables(variables: Any) -> tuple[Any, Any]:
  """(params, model_state) of model variables {"params": ..., other collections...}."""
  return variables["params"], {c: v for c, v in variables.items() if c != "params"}


def _create(tx: optax.GradientTransformation, params: Any, model_state: Any) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), model_state=model_state)


def state_shardings(abstract: TrainState, mesh: Mesh, rules: Any) -> TrainState:
  """Params by the config's sharding rules; each optimizer-state copy of a param like that param.

  An optimizer-state leaf belongs to the param whose path is a suffix of its own path and that has the
  same shape (e.g. '.../trace/branches/fc6/kernel'); counts and other scalars are replicated, and so is the
  model state (vectors of per-channel statistics).
  """
  p_sh = parallel.param_shardings(abstract.params, mesh, rules)
  by_path = {optim.path_name(path): (leaf.shape, sh) for (path, leaf), sh in
             zip(jax.tree_util.tree_leaves_with_path(abstract.params), jax.tree.leaves(p_sh))}
  repl = parallel.replicated(mesh)

  def opt_one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
    name = optim.path_name(path)
    parts = name.split("/")
    for i in range(len(parts)):
      hit = by_path.get("/".join(parts[i:]))
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return repl

  opt_sh = jax.tree_util.tree_map_with_path(opt_one, abstract.opt_state)
  return TrainState(step=repl, params=p_sh, opt_state=opt_sh,
                    model_state=jax.tree.map(lambda _: repl, abstract.model_state))


def abstract_state(abstract_params: Any, tx: optax.GradientTransformation, abstract_model_state: Any = None
                   ) -> TrainState:
  """The state's shapes and dtypes, computed without allocating anything."""
  return jax.eval_shape(functools.partial(_create, tx), abstract_params, abstract_model_state or {})


def init_state(init_variables: Callable[[], Any], tx: optax.GradientTransformation, shardings: TrainState
               ) -> TrainState:
  """A fresh state from the variables `init_variables()` (e.g. model.init under a fixed key), built inside one
  jit whose out_shardings place every array where the train step wants it.

  Compiled without XLA's backend optimisations: the program runs once, and its many truncated-normal
  initialisers otherwise take XLA:CPU ~20 s to compile for VGG-16 (2-3 s this way).
  """
  return jax.jit(lambda: _create(tx, *split_variables(init_variables())), out_shardings=shardings,
                 compiler_options={"xla_backend_optimization_level": 0})()


def state_from_params(params: Any, tx: optax.GradientTransformation, shardings: TrainState,
                      model_state: Any = None) -> TrainState:
  """A fresh state from host params and model state (another stage's result, pretrained weights).

  Each process builds the global arrays from its own copy (every process holds the same values), so
  this works with several processes as well.
  """
  def place(tree: Any, sh: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]),
                        tree, sh)
  model_state = model_state or {}
  return jax.jit(functools.partial(_create, tx), in_shardings=(shardings.params, shardings.model_state),
                 out_shardings=shardings)(place(params, shardings.params), place(model_state, shardings.model_state))


def abstract_like(shardings: TrainState, abstract: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the shardings: the restore target for orbax."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
