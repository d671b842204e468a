"""GAN losses of the LARP tokenizer (the official `models/loss.py`): non-saturating generator loss,
the noisy-label ('ns_smooth') discriminator loss and the LeCam regulariser. All float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def generator_loss(fake_logits):
  """Non-saturating: mean(-log sigmoid(D(x_hat)))."""
  return jnp.mean(-jax.nn.log_sigmoid(fake_logits.astype(jnp.float32)))


def noisy_targets(rng, shape, noise: float = 0.15, clip: float = 0.3):
  """Targets (real, fake): real = max(1 - noise|n|, 1 - clip), fake = min(noise|n|, clip)."""
  r_rng, f_rng = jax.random.split(rng)
  real = jnp.maximum(1.0 - noise * jnp.abs(jax.random.normal(r_rng, shape)), 1.0 - clip)
  fake = jnp.minimum(noise * jnp.abs(jax.random.normal(f_rng, shape)), clip)
  return real, fake


def discriminator_loss(real_logits, fake_logits, rng, noise: float = 0.15, clip: float = 0.3):
  """BCE-with-logits against noisy targets, summed over the real and fake halves."""
  real_t, fake_t = noisy_targets(rng, real_logits.shape, noise, clip)
  return (
    optax.sigmoid_binary_cross_entropy(real_logits, real_t).mean()
    + optax.sigmoid_binary_cross_entropy(fake_logits, fake_t).mean()
  )


def lecam_regularizer(real_logits, fake_logits, ema_real, ema_fake):
  """relu(mean D(real) - ema_fake)^2 + relu(ema_real - mean D(fake))^2 (unweighted)."""
  return jnp.square(jax.nn.relu(jnp.mean(real_logits) - ema_fake)) + jnp.square(
    jax.nn.relu(ema_real - jnp.mean(fake_logits))
  )


def update_ema(ema, value, decay: float):
  return decay * ema + (1.0 - decay) * value
