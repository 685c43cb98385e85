"""The train state pytree and its creation straight into its shardings (no copy on device 0 first)."""

from __future__ import annotations

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
  """Everything a checkpoint holds besides the data iterator. Norms are GroupNorm: no batch stats."""
  step: jax.Array
  params: Any
  opt_state: Any


def _create(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(abstract: TrainState, mesh: Mesh, rules: Any) -> TrainState:
  """Params by the config's sharding rules; each optimizer-state copy of a param like that param.

  An optimizer-state leaf belongs to the param whose path is a suffix of its own path and that has the
  same shape (e.g. '.../trace/branches/fc6/kernel'); counts and other scalars are replicated.
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
  return TrainState(step=repl, params=p_sh, opt_state=opt_sh)


def abstract_state(abstract_params: Any, tx: optax.GradientTransformation) -> TrainState:
  """The state's shapes and dtypes, computed without allocating anything."""
  return jax.eval_shape(lambda p: _create(p, tx), abstract_params)


def init_state(init_params: Callable[[], Any], tx: optax.GradientTransformation, shardings: TrainState
               ) -> TrainState:
  """A fresh state from `init_params()` (e.g. model.init under a fixed key), built inside one jit whose
  out_shardings place every array where the train step wants it.

  Compiled without XLA's backend optimisations: the program runs once, and its many truncated-normal
  initialisers otherwise take XLA:CPU ~20 s to compile for VGG-16 (2-3 s this way).
  """
  return jax.jit(lambda: _create(init_params(), tx), out_shardings=shardings,
                 compiler_options={"xla_backend_optimization_level": 0})()


def state_from_params(params: Any, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """A fresh state from host params (another stage's result, pretrained weights).

  Each process builds the global arrays from its own copy (every process holds the same values), so
  this works with several processes as well.
  """
  placed = jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]),
                        params, shardings.params)
  return jax.jit(lambda p: _create(p, tx), in_shardings=(shardings.params,), out_shardings=shardings)(placed)


def abstract_like(shardings: TrainState, abstract: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the shardings: the restore target for orbax."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
