"""Training losses: cross-entropy, stability training (Zheng et al. 2016) as the paper compares it, and
AugMix's Jensen-Shannon consistency loss (Hendrycks et al. 2020).

stability = CE(clean) + alpha * KL(p(clean) || p(perturbed)), where the perturbed copy is the clean
uint8 image plus Gaussian noise of sigma (0-255 scale), rounded and clipped back to uint8 so that the
model sees the same kind of input as for any pre-degraded record.

augmix = CE(clean) + lam * JS(p(clean), p(aug1), p(aug2)), the two copies from msnet/train/augmix.py.
"""

from __future__ import annotations

import math

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


def js_divergence(*logits: jax.Array) -> jax.Array:
  """Mean over the batch of the Jensen-Shannon divergence of softmax(logits_i) [B, C]: the mean over i of
  KL(p_i || M), M the mean of the p_i, with log M from the log-probabilities (no clamp needed)."""
  logp = jnp.stack([jax.nn.log_softmax(z.astype(jnp.float32), axis=-1) for z in logits])
  log_m = jax.nn.logsumexp(logp, axis=0) - math.log(len(logits))
  return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - log_m), axis=-1))


def augmix_loss(logits_clean: jax.Array, logits_aug1: jax.Array, logits_aug2: jax.Array, labels: jax.Array,
                lam: float) -> jax.Array:
  """CE on the clean copy plus lam * JS(p_clean, p_aug1, p_aug2); gradients flow through all three copies."""
  return cross_entropy(logits_clean, labels) + lam * js_divergence(logits_clean, logits_aug1, logits_aug2)
