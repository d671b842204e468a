"""The tokenizer's training state: one pytree, checkpointed and sharded as a whole."""

from __future__ import annotations

from typing import Any

import flax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TokenizerTrainState:
  """Everything that changes during tokenizer training.

  step: number of completed generator steps (int32 scalar).
  params: tokenizer parameters, prior included.
  opt_state: generator Adam state.
  disc_params / disc_opt_state: the discriminator and its Adam state.
  lecam_ema: {'real', 'fake'} EMAs of the mean discriminator logits (LeCam).
  disc_stats: the last discriminator step's scalars, reported on every log step.
  ema_params: EMA of ``params`` (``None`` when ``optim.ema_decay`` is 0).
  batch_stats: the model's 'batch_stats' collection (running statistics of a batch-norm
    bottleneck, ``model.bottleneck_norm`` 'bn_bn' / 'bn_b'); ``None`` without one.
  """

  step: Any
  params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any
  lecam_ema: Any
  disc_stats: Any
  ema_params: Any = None
  batch_stats: Any = None


DISC_STATS = ('disc_loss', 'disc_bce', 'lecam_loss', 'disc_real_logit', 'disc_fake_logit')


def create(
  params,
  disc_params,
  gen_tx: optax.GradientTransformation,
  disc_tx: optax.GradientTransformation,
  use_ema: bool,
  batch_stats=None,
) -> TokenizerTrainState:
  return TokenizerTrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=gen_tx.init(params),
    disc_params=disc_params,
    disc_opt_state=disc_tx.init(disc_params),
    lecam_ema={'real': jnp.zeros((), jnp.float32), 'fake': jnp.zeros((), jnp.float32)},
    disc_stats={k: jnp.zeros((), jnp.float32) for k in DISC_STATS},
    ema_params=params if use_ema else None,
    batch_stats=batch_stats,
  )
