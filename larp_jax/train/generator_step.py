"""The AR generator's training state and pure step (next-token cross-entropy, AdamW).

As the official `trainers/larp_ar_trainer.py` (class-conditional) and
`trainers/larp_ar_fp_trainer.py` (frame prediction): the tokens come from a frozen tokenizer
with deterministic quantization, either precomputed (``python -m larp_jax.tokenize``) or
encoded inside the step from the video batch (the tokenizer's variables are then a replicated
or sharded *argument* of the step, never compiled-in constants).
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class GeneratorTrainState:
  """step (completed steps, int32), params (the generator's), opt_state (AdamW)."""

  step: Any
  params: Any
  opt_state: Any


def create(params, tx: optax.GradientTransformation) -> GeneratorTrainState:
  return GeneratorTrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )


def fp_condition_video(video, num_cond_frames: int):
  """Frame prediction's conditioning clip: the first ``num_cond_frames`` frames, the last of them
  repeated to the clip's length (the official `trainers/larp_ar_fp_trainer.py`)."""
  t = video.shape[1]
  idx = jnp.minimum(jnp.arange(t), num_cond_frames - 1)
  return video[:, idx]


def encode_tokens(tokenizer, tokenizer_variables, video):
  """Deterministic (argmax) tokens of ``video`` from the frozen tokenizer, int32 [B, N]."""
  tokens = tokenizer.apply(tokenizer_variables, video, method=type(tokenizer).encode)
  return jax.lax.stop_gradient(tokens).astype(jnp.int32)


def batch_tokens(batch, extras, *, tokenizer, frame_prediction: bool, num_cond_frames: int):
  """(tokens [B, N], prefix tokens [B, N] or None) of a batch of tokens or of videos."""
  if 'tokens' in batch:
    return batch['tokens'].astype(jnp.int32), batch.get('cond_tokens')
  video = batch['video']
  tokens = encode_tokens(tokenizer, extras['tokenizer'], video)
  prefix = None
  if frame_prediction:
    cond = fp_condition_video(video, num_cond_frames)
    prefix = encode_tokens(tokenizer, extras['tokenizer'], cond)
  return tokens, prefix


def token_losses(logits, tokens):
  """Per-token cross-entropy (float32) and top-1 hits of ``logits`` [B, N, V] at ``tokens``."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
  hits = (jnp.argmax(logits, -1) == tokens).astype(jnp.float32)
  return ce, hits


def generator_train_step(
  state: GeneratorTrainState,
  batch: dict,
  key,
  extras: dict,
  *,
  model,
  tx: optax.GradientTransformation,
  lr_fn,
  tokenizer=None,
  num_cond_frames: int = 5,
  apply_fn=None,
) -> tuple[GeneratorTrainState, dict]:
  """One AdamW step on the mean next-token cross-entropy.

  ``batch``: {'tokens' int32 [B, N] (and 'cond_tokens' for frame prediction), 'label'} or
  {'video', 'label'} (then ``extras['tokenizer']`` holds the frozen tokenizer's variables).
  ``apply_fn(params, tokens, labels, prefix, rngs)`` runs the model in training mode and returns
  logits [B, N, V] predicting ``tokens``. ``key`` is the run's key; the step folds in its count.
  """
  frame_prediction = bool(getattr(model, 'frame_prediction', False))
  tokens, prefix = batch_tokens(
    batch,
    extras,
    tokenizer=tokenizer,
    frame_prediction=frame_prediction,
    num_cond_frames=num_cond_frames,
  )
  labels = batch['label'].astype(jnp.int32)
  step_key = jax.random.fold_in(key, state.step)

  def loss_fn(params):
    logits = apply_fn(params, tokens, labels, prefix, step_key)
    ce, hits = token_losses(logits, tokens)
    return jnp.mean(ce), jnp.mean(hits)

  (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
    'loss': loss,
    'top1': acc,
    'grad_norm': optax.tree.norm(grads),
    'param_norm': optax.tree.norm(params),
    'lr': lr_fn(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def nll_sums(params, batch, *, apply_fn, mask: Optional[jnp.ndarray] = None) -> dict:
  """Summed token NLL and top-1 hits of a held-out batch (deterministic model), for eval."""
  tokens = batch['tokens'].astype(jnp.int32)
  logits = apply_fn(params, tokens, batch['label'].astype(jnp.int32), batch.get('cond_tokens'))
  ce, hits = token_losses(logits, tokens)
  m = jnp.ones(tokens.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
  return {'nll_sum': jnp.sum(ce.mean(-1) * m), 'top1_sum': jnp.sum(hits.mean(-1) * m), 'n': m.sum()}
