"""Optimisers and learning-rate schedules: the tokenizer's two Adams, the generator's AdamW.

As in the official `trainers/base_trainer.py` and `cfgs/larp_tokenizer.yaml`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_multiplier(
  step, *, total_steps: int, warmup_steps: int, start_mult: float = 0.01, min_mult: float = 0.01
):
  """Official step-wise schedule, ``step`` counted from 1: linear warmup from ``start_mult`` to
  1 over ``warmup_steps``, then a half cosine from 1 down to ``min_mult`` at ``total_steps``."""
  step = jnp.asarray(step, jnp.float32)
  warm = start_mult + (1.0 - start_mult) * step / max(warmup_steps, 1)
  progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
  cos = min_mult + (1.0 - min_mult) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup_steps, warm, cos)


def schedule(base_lr: float, optim_cfg, total_steps: int):
  """optax schedule of the update count (0-based, so the official step is count + 1)."""

  def fn(count):
    return base_lr * lr_multiplier(
      count + 1,
      total_steps=total_steps,
      warmup_steps=optim_cfg.warmup_steps,
      start_mult=optim_cfg.start_lr_mult,
      min_mult=optim_cfg.min_lr_mult,
    )

  return fn


def scale_subtree(name: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of the top-level parameter subtree ``name`` by ``factor``.

  After Adam this is exactly a learning-rate multiplier for that group (how the prior gets its
  x50 in the paper)."""

  def update_fn(updates, state, params=None):
    del params

    def scale(path, u):
      head = path[0]
      key = getattr(head, 'key', getattr(head, 'name', None))
      return u * factor if key == name else u

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def generator_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Adam(b1, b2, eps), no weight decay, cosine schedule; optional clipping and the prior's lr
  multiplier (applied only with ``apply_prior_lr_mult``: the released code overwrites it to 1x)."""
  parts = []
  if optim_cfg.grad_clip_norm and optim_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  parts += [
    optax.scale_by_adam(optim_cfg.b1, optim_cfg.b2, optim_cfg.eps),
    optax.scale_by_learning_rate(schedule(optim_cfg.lr, optim_cfg, total_steps)),
  ]
  if optim_cfg.apply_prior_lr_mult and optim_cfg.prior_lr_mult != 1.0:
    parts.append(scale_subtree('prior', optim_cfg.prior_lr_mult))
  return optax.chain(*parts)


def discriminator_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """Adam(disc_b1, disc_b2) at disc_lr with the same multiplier schedule (of the global step,
  passed in as the schedule count by the train step)."""
  return optax.chain(
    optax.scale_by_adam(optim_cfg.disc_b1, optim_cfg.disc_b2, optim_cfg.eps), optax.scale(-1.0)
  )


# ------------------------------------------------------------------ the AR generator


def decay_mask(params):
  """True for the weight matrices of Dense layers (a ``kernel`` leaf), False for everything
  else: embeddings, the class table, the absolute PE, norms, biases. The official AR trainer
  decays only ``nn.Linear`` weights (`trainers/larp_ar_trainer.py`)."""

  def is_kernel(path, _):
    keys = [getattr(k, 'key', None) for k in path]  # DictKeys; a box's '.value' has none
    names = [k for k in keys if isinstance(k, str)]
    return bool(names) and names[-1] == 'kernel'

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def adamw_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW(b1, b2, eps) with decoupled weight decay on Dense kernels only (``decay_mask``), the
  official warm-up + cosine multiplier (floor ``min_lr_mult``), optional global-norm clipping.
  The decay is scaled by the scheduled learning rate, as torch's AdamW does."""
  parts = []
  if optim_cfg.get('grad_clip_norm', 0.0) and optim_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  parts += [
    optax.scale_by_adam(optim_cfg.b1, optim_cfg.b2, optim_cfg.eps),
    optax.add_decayed_weights(float(optim_cfg.weight_decay), mask=decay_mask),
    optax.scale_by_learning_rate(schedule(optim_cfg.lr, optim_cfg, total_steps)),
  ]
  return optax.chain(*parts)
