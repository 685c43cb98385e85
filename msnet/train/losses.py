"""Training losses: cross-entropy, and stability training (Zheng et al. 2016) as the paper compares it.

stability = CE(clean) + alpha * KL(p(clean) || p(perturbed)), where the perturbed copy is the clean
uint8 image plus Gaussian noise of sigma (0-255 scale), rounded and clipped back to uint8 so that the
model sees the same kind of input as for any pre-degraded record.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of logits [B, C] (computed in float32) with integer labels [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def kl_divergence(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
  """Mean over the batch of KL(softmax(p) || softmax(q)), from logits [B, C]."""
  logp = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1))


def perturb(images: jax.Array, rng: jax.Array, sigma: float) -> jax.Array:
  """uint8 images + N(0, sigma^2) per pixel and channel, rounded and clipped to uint8."""
  noise = sigma * jax.random.normal(rng, images.shape, jnp.float32)
  return jnp.clip(jnp.round(images.astype(jnp.float32) + noise), 0, 255).astype(jnp.uint8)


def stability_loss(logits_clean: jax.Array, logits_perturbed: jax.Array, labels: jax.Array,
                   alpha: float) -> jax.Array:
  """CE on the clean copy plus alpha * KL(p_clean || p_perturbed); gradients flow through both copies."""
  return cross_entropy(logits_clean, labels) + alpha * kl_divergence(logits_clean, logits_perturbed)
