"""The one jitted train step of every stage, and the masked-sum evaluation step.

Stages differ only in what they pass in: the model's apply function, the optimizer (which params
train), the loss ("ce" or "stability"). The step is jitted with explicit in/out shardings over the mesh
and donates the old state; its RNG is the stage key folded with the step count, so a resumed run draws
the same dropout and stability noise as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from msnet import parallel
from msnet.models import compiler_options
from msnet.train import losses
from msnet.train.state import TrainState

# apply(params, images uint8 [B,H,W,3], train, rng) -> logits [B, C]
ApplyFn = Callable[[Any, jax.Array, bool, jax.Array], jax.Array]


def slave_apply(model: Any) -> ApplyFn:
  """The single-branch (K=1) slave as a [B, C] classifier; stages train one branch at a time."""
  def apply(params: Any, images: jax.Array, train: bool, rng: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, images, train=train, rngs={"dropout": rng} if train else None)
    return logits[0]
  return apply


def master_apply(model: Any) -> ApplyFn:
  """The master as a [B, num_bins] classifier of quality bins."""
  def apply(params: Any, images: jax.Array, train: bool, rng: jax.Array) -> jax.Array:
    del train, rng  # the master has no dropout
    return model.apply({"params": params}, images)
  return apply


def gate_apply(gate: Any, slave: Any) -> ApplyFn:
  """The gated mixture of the K frozen branches as a [B, C] classifier: log sum_k g_k(x) p_k(y|x).

  params = {"gate": the gate network's (a master: [B, K] logits), "slave": the K-branch slave's}. Returned
  as log-probabilities, which are logits whose softmax is the mixture itself: the stage's cross-entropy is
  the mixture's NLL, and its argmax the mixture's top-1.
  """
  def apply(params: Any, images: jax.Array, train: bool, rng: jax.Array) -> jax.Array:
    del train, rng  # the branches are frozen (no dropout); the gate has none
    log_gate = jax.nn.log_softmax(gate.apply({"params": params["gate"]}, images).astype(jnp.float32), axis=-1)
    branch = slave.apply({"params": params["slave"]}, images, train=False).astype(jnp.float32)  # [K, B, C]
    return jax.nn.logsumexp(log_gate.T[:, :, None] + jax.nn.log_softmax(branch, axis=-1), axis=0)
  return apply


def make_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    trainable: Any, mesh: Mesh, shardings: TrainState, rng: jax.Array, *,
                    loss: str = "ce", alpha: float = 0.0, noise_sigma: float = 0.0
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """step(state, batch) -> (state, metrics: loss, accuracy, lr, grad_norm), jitted once.

  `trainable` is the bool pytree of optim.trainable_mask: frozen params enter the loss behind
  stop_gradient, so their gradients (and, for a frozen trunk, the whole backward pass through it) are
  never computed. `rng` is a key baked into the program, folded with state.step inside.
  """
  if loss not in ("ce", "stability"):
    raise ValueError(f"loss {loss!r}: must be 'ce' or 'stability'")

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    step_rng = jax.random.fold_in(rng, state.step)
    dropout_rng, noise_rng = jax.random.split(step_rng)
    images, labels = batch["image"], batch["label"]

    def loss_fn(params: Any) -> tuple[jax.Array, jax.Array]:
      params = jax.tree.map(lambda m, p: p if m else jax.lax.stop_gradient(p), trainable, params)
      logits = apply_fn(params, images, True, dropout_rng)
      if loss == "stability":
        perturbed = losses.perturb(images, noise_rng, noise_sigma)
        logits_p = apply_fn(params, perturbed, True, jax.random.fold_in(dropout_rng, 1))
        return losses.stability_loss(logits, logits_p, labels, alpha), logits
      return losses.cross_entropy(logits, labels), logits

    (value, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value, "accuracy": losses.accuracy(logits, labels),
               "lr": jnp.asarray(schedule(state.step), jnp.float32), "grad_norm": optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  repl = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(shardings, parallel.data_sharding(mesh)),
                 out_shardings=(shardings, repl), donate_argnums=0, compiler_options=compiler_options())


def make_eval_step(apply_fn: ApplyFn, mesh: Mesh, param_shardings: Any, label_key: str = "label"
                   ) -> Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
  """eval(params, batch) -> (correct, count) summed over the global batch, padding masked out."""
  def evaluate(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    logits = apply_fn(params, batch["image"], False, jax.random.key(0))
    mask = batch["mask"].astype(jnp.int32)
    correct = (jnp.argmax(logits, axis=-1) == batch[label_key]).astype(jnp.int32)
    return jnp.sum(correct * mask), jnp.sum(mask)

  repl = parallel.replicated(mesh)
  return jax.jit(evaluate, in_shardings=(param_shardings, parallel.data_sharding(mesh)), out_shardings=(repl, repl),
                 compiler_options=compiler_options())
