"""The one train step of every stage (jitted alone, or scanned K times in one call), and the masked-sum
evaluation step.

Stages differ only in what they pass in: the model's apply function (which also says which parts of the
network update their BatchNorm statistics), the optimizer (which params train), the loss ("ce", "stability",
or "augmix" with its `augmix.Settings`). The state carries the model state (BatchNorm running statistics; {}
otherwise), which the step returns updated. The step is jitted with explicit in/out shardings over the mesh
and donates the old state; its RNG is the stage key folded with the step count, so a resumed run draws the
same dropout, stability noise and AugMix choices as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msnet import parallel
from msnet.models import compiler_options
from msnet.train import augmix, crop, losses
from msnet.train.state import TrainState

# apply(params, model_state, images uint8 [B,H,W,3], train, rng) -> (logits [B, C], the new model_state)
ApplyFn = Callable[[Any, Any, jax.Array, bool, jax.Array], tuple[jax.Array, Any]]
StepFn = Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]
CallFn = Callable[[TrainState, Any, list[Any]], tuple[TrainState, dict[str, jax.Array]]]
CROP_STREAM = 2  # the crop's key: the step's key folded with this (split gives dropout's and noise's)


def slave_apply(model: Any, norm_train: tuple[str, ...] = ("trunk", "branches")) -> ApplyFn:
  """The single-branch (K=1) slave as a [B, C] classifier; stages train one branch at a time.

  In training, the parts in `norm_train` ("trunk", "branches") run their BatchNorms on the batch's statistics
  and return their updated running ones; the other parts, and everything in inference, use the running ones.
  Without BatchNorm (model_state {}) `norm_train` changes nothing.
  """
  def apply(params: Any, model_state: Any, images: jax.Array, train: bool, rng: jax.Array) -> tuple[jax.Array, Any]:
    variables, rngs = {"params": params, **model_state}, {"dropout": rng} if train else None
    if train and model_state and norm_train:
      logits, model_state = model.apply(variables, images, train=True, norm_train=norm_train, rngs=rngs,
                                        mutable=list(model_state))
      return logits[0], model_state
    return model.apply(variables, images, train=train, rngs=rngs)[0], model_state
  return apply


def master_apply(model: Any) -> ApplyFn:
  """The master as a [B, num_bins] classifier of quality bins."""
  def apply(params: Any, model_state: Any, images: jax.Array, train: bool, rng: jax.Array) -> tuple[jax.Array, Any]:
    del train, rng  # the master has no dropout, nor batch statistics
    return model.apply({"params": params}, images), model_state
  return apply


def gate_apply(gate: Any, slave: Any) -> ApplyFn:
  """The gated mixture of the K frozen branches as a [B, C] classifier: log sum_k g_k(x) p_k(y|x).

  params = {"gate": the gate network's (a master: [B, K] logits), "slave": the K-branch slave's}, model_state
  = {collection: {"slave": ...}} (the slave's running statistics). Returned as log-probabilities, which are
  logits whose softmax is the mixture itself: the stage's cross-entropy is the mixture's NLL, and its argmax
  the mixture's top-1.
  """
  def apply(params: Any, model_state: Any, images: jax.Array, train: bool, rng: jax.Array) -> tuple[jax.Array, Any]:
    del train, rng  # the branches are frozen (no dropout, running statistics); the gate has none
    log_gate = jax.nn.log_softmax(gate.apply({"params": params["gate"]}, images).astype(jnp.float32), axis=-1)
    slave_vars = {"params": params["slave"], **{c: v["slave"] for c, v in model_state.items()}}
    branch = slave.apply(slave_vars, images, train=False).astype(jnp.float32)  # [K, B, C]
    return jax.nn.logsumexp(log_gate.T[:, :, None] + jax.nn.log_softmax(branch, axis=-1), axis=0), model_state
  return apply


def _train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation, schedule: optax.Schedule, trainable: Any,
                rng: jax.Array, loss: str, alpha: float, noise_sigma: float,
                mixing: augmix.Settings | None, crop_pad: int = 0) -> StepFn:
  """The pure step(state, batch) -> (state, metrics) that the single step and the scanned call jit.

  `crop_pad` > 0: each image randomly translated (msnet/train/crop.py) by a key of its own, folded from the
  step's, so the dropout, noise and AugMix draws are those of a run without it."""
  if loss not in ("ce", "stability", "augmix"):
    raise ValueError(f"loss {loss!r}: must be 'ce', 'stability' or 'augmix'")
  if (loss == "augmix") != (mixing is not None):
    raise ValueError(f"loss {loss!r} with mixing={mixing!r}: the augmix loss, and only it, needs augmix.Settings")

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    step_rng = jax.random.fold_in(rng, state.step)
    dropout_rng, noise_rng = jax.random.split(step_rng)
    images, labels = batch["image"], batch["label"]
    if crop_pad:
      images = crop.random_crop(images, jax.random.fold_in(step_rng, CROP_STREAM), crop_pad)
    if mixing is not None:  # the clean batch and two AugMix copies (each row its own draws), as one batch
      images = jnp.concatenate([images, augmix.augmix(jnp.concatenate([images, images]), noise_rng, mixing)])

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
      params = jax.tree.map(lambda m, p: p if m else jax.lax.stop_gradient(p), trainable, params)
      logits, model_state = apply_fn(params, state.model_state, images, True, dropout_rng)
      if mixing is not None:  # one pass over clean + both copies: the statistics of all three
        clean, aug1, aug2 = jnp.split(logits, 3)
        return losses.augmix_loss(clean, aug1, aug2, labels, mixing.js_lambda), (clean, model_state)
      if loss == "stability":  # two passes in training mode update the statistics twice, as torch's would
        perturbed = losses.perturb(images, noise_rng, noise_sigma)
        logits_p, model_state = apply_fn(params, model_state, perturbed, True, jax.random.fold_in(dropout_rng, 1))
        return losses.stability_loss(logits, logits_p, labels, alpha), (logits, model_state)
      return losses.cross_entropy(logits, labels), (logits, model_state)

    (value, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value, "accuracy": losses.accuracy(logits, labels),
               "lr": jnp.asarray(schedule(state.step), jnp.float32), "grad_norm": optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state), metrics

  return step


def make_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    trainable: Any, mesh: Mesh, shardings: TrainState, rng: jax.Array, *,
                    loss: str = "ce", alpha: float = 0.0, noise_sigma: float = 0.0,
                    mixing: augmix.Settings | None = None, crop_pad: int = 0) -> StepFn:
  """step(state, batch) -> (state, metrics: loss, accuracy, lr, grad_norm), jitted once.

  `trainable` is the bool pytree of optim.trainable_mask: frozen params enter the loss behind
  stop_gradient, so their gradients (and, for a frozen trunk, the whole backward pass through it) are
  never computed. `rng` is a key baked into the program, folded with state.step inside.
  """
  step = _train_step(apply_fn, tx, schedule, trainable, rng, loss, alpha, noise_sigma, mixing, crop_pad)
  repl = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(shardings, parallel.data_sharding(mesh)),
                 out_shardings=(shardings, repl), donate_argnums=0, compiler_options=compiler_options())


@dataclasses.dataclass(frozen=True)
class Feed:
  """Where the steps of a call get their batches: `batch(data, item)` builds one step's global batch from
  the arrays every call shares (`data`: e.g. device-resident records, None for host batches) and that
  step's `item` (what the loader's `__next__` returned: a host batch, a stream position)."""
  batch: Callable[[Any, Any], dict[str, jax.Array]]
  data_sharding: Any   # in_sharding of `data` (a pytree prefix)
  item_sharding: Any   # in_sharding of one item, stacked [n, ...] inside the call
  stacked_sharding: Any  # sharding of the stacked items
  data: Any = None       # the `data` argument of every call


def host_feed(mesh: Mesh) -> Feed:
  """Batches read on the host (loader.TrainLoader): each item is already the step's global batch."""
  return Feed(batch=lambda data, item: item, data_sharding=None, item_sharding=parallel.data_sharding(mesh),
              stacked_sharding=NamedSharding(mesh, P(None, "data")))


def make_train_call(apply_fn: ApplyFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    trainable: Any, mesh: Mesh, shardings: TrainState, rng: jax.Array, *, steps: int, feed: Feed,
                    loss: str = "ce", alpha: float = 0.0, noise_sigma: float = 0.0,
                    mixing: augmix.Settings | None = None, crop_pad: int = 0, unroll: bool | None = None) -> CallFn:
  """call(state, data, items) -> (state, metrics [steps]): `steps` train steps in one jitted program.

  `items` is the list of the `steps` loader items of the call, stacked inside and scanned over
  (`lax.scan`), so the host dispatches once per call. Each step is the single step's own function: the
  params after a call are those of `steps` single steps (to float32 rounding: XLA may fuse differently).

  `unroll` None: unrolled on the CPU, a loop elsewhere. XLA's CPU backend runs the body of a loop (a rolled
  scan, even of one trip) about 30x slower than the same step jitted alone (benchmarks/bench_steps_per_call.py
  --rolled: 0.19 against 6.7 steps/s), while the K steps written out run as fast as single steps (compile time
  grows with K). Accelerators keep the loop: one step's program, compiled once.
  """
  if steps < 1:
    raise ValueError(f"steps {steps}: must be >= 1")
  step = _train_step(apply_fn, tx, schedule, trainable, rng, loss, alpha, noise_sigma, mixing, crop_pad)

  def call(state: TrainState, data: Any, items: list[Any]) -> tuple[TrainState, dict[str, jax.Array]]:
    if len(items) != steps:
      raise ValueError(f"a call of {steps} steps got {len(items)} items")
    if unroll:  # the K steps written out one after the other: no loop in the program, not even of one trip
      per_step = []
      for item in items:
        state, metrics = step(state, feed.batch(data, item))
        per_step.append(metrics)
      return state, jax.tree.map(lambda *x: jnp.stack(x), *per_step)
    xs = jax.lax.with_sharding_constraint(jax.tree.map(lambda *x: jnp.stack(x), *items), feed.stacked_sharding)
    return jax.lax.scan(lambda s, item: step(s, feed.batch(data, item)), state, xs)

  if unroll is None:
    unroll = jax.default_backend() == "cpu"

  repl = parallel.replicated(mesh)
  return jax.jit(call, in_shardings=(shardings, feed.data_sharding, feed.item_sharding),
                 out_shardings=(shardings, repl), donate_argnums=0, compiler_options=compiler_options())


def make_eval_step(apply_fn: ApplyFn, mesh: Mesh, shardings: TrainState, label_key: str = "label"
                   ) -> Callable[[Any, Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
  """eval(params, model_state, batch) -> (correct, count) summed over the global batch, padding masked out;
  the network in inference mode (BatchNorm on its running statistics)."""
  def evaluate(params: Any, model_state: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    logits, _ = apply_fn(params, model_state, batch["image"], False, jax.random.key(0))
    mask = batch["mask"].astype(jnp.int32)
    correct = (jnp.argmax(logits, axis=-1) == batch[label_key]).astype(jnp.int32)
    return jnp.sum(correct * mask), jnp.sum(mask)

  repl = parallel.replicated(mesh)
  return jax.jit(evaluate, in_shardings=(shardings.params, shardings.model_state, parallel.data_sharding(mesh)),
                 out_shardings=(repl, repl), compiler_options=compiler_options())
