"""Sampling token sequences from ``LARPAR`` (the official `ar/generate.py`, in one jitted program).

``sample`` prefills the prefix (the class token, or the FP conditioning tokens + separator) into
a KV cache and decodes the remaining tokens one position at a time inside one ``lax.scan``.
``sample_by_recompute`` draws the same way without a cache (a full forward per token): the
reference the cached path is tested against, and the baseline of its speed.

Per token: classifier-free guidance (the batch doubled as [cond ; null], logits
u + s * (c - u), the drawn token fed to both halves; ``cfg_interval``), then the temperature
(floored at 1e-5), top-k, top-p, a float32 softmax and a categorical draw with the key
``fold_in(key, t)`` for token t, so the same key gives the same sequence on any batch layout
of the program. Each step also returns the log-probability of the drawn token under the
distribution it was drawn from (after guidance, temperature and filtering).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from larp_jax import errors
from larp_jax.models import larp_ar

_MIN_TEMPERATURE = 1e-5


def top_k_filter(logits, k: int):
  """Logits with everything below the k-th largest of each row set to -inf (ties kept)."""
  k = min(int(k), logits.shape[-1])
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p):
  """Nucleus filtering: keeps the smallest set of most likely tokens whose probability sums to
  at least ``p`` (always the most likely one; ties at the boundary kept), the rest -inf."""
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  count = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_logits, count - 1, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def filter_logits(logits, *, temperature=1.0, top_k: int = 0, top_p=1.0, use_top_p=None):
  """float32 logits / max(temperature, 1e-5), then top-k (k > 0) and top-p (p < 1) filtering.
  ``use_top_p`` (static) overrides the ``top_p < 1`` test when ``top_p`` is traced."""
  logits = logits.astype(jnp.float32) / jnp.maximum(temperature, _MIN_TEMPERATURE)
  if top_k > 0:
    logits = top_k_filter(logits, top_k)
  if (top_p < 1.0) if use_top_p is None else use_top_p:
    logits = top_p_filter(logits, top_p)
  return logits


def _log_prob(logits, tokens):
  """log softmax(logits)[tokens] as (x - max) - log(sum(exp(x - max))): at the large scales of a
  tiny temperature this stays <= 0 (x - max is exact near the max), where x - logsumexp(x)
  rounds by the ulp of the logits."""
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
  return jnp.take_along_axis(shifted, tokens[:, None], axis=-1)[:, 0] - lse


def sample(
  model: larp_ar.LARPAR,
  variables,
  labels=None,
  key=None,
  *,
  cfg_scale: float = 1.0,
  cfg_interval: int = -1,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  prefix=None,
  greedy: bool = False,
):
  """Draws ``model.seq_len`` tokens per row with a KV cache.

  Args:
    model: a ``LARPAR``; variables: its variables ({'params': ...}).
    labels: [B] int class ids in [0, num_classes) (class-conditional models).
    key: a PRNG key (optional with ``greedy``).
    cfg_scale: guidance scale s; s != 1 doubles the batch as [cond ; null] and uses
      u + s * (c - u) (s = 0: the unconditional model). Needs a model trained with class
      dropout; FP models take 1 only. (The official code guides only for s > 1.)
    cfg_interval: -1 guides every token; n >= 0 guides tokens 0 .. n + 1 only (the official
      loop's count: the prefill token and the first n + 1 decoded ones).
    temperature: divides the logits (floored at 1e-5); top_k: keep the k most likely (0: all);
      top_p: nucleus filtering (1: off).
    prefix: [B, seq_len] int conditioning tokens (FP models; the separator is added).
    greedy: argmax instead of a draw.
  Returns:
    {'tokens': [B, seq_len] int32, 'logprobs': [B, seq_len] float32} (log-probability of each
    token under the distribution it was drawn from).
  """
  cond, key, flags, scalars = _prepare(
    model, labels, prefix, key, cfg_scale, cfg_interval, temperature, top_k, top_p, greedy
  )
  return _program(model, True, *flags)(variables, cond, key, *scalars)


def sample_by_recompute(
  model: larp_ar.LARPAR,
  variables,
  labels=None,
  key=None,
  *,
  cfg_scale: float = 1.0,
  cfg_interval: int = -1,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  prefix=None,
  greedy: bool = False,
):
  """``sample`` without a cache: the full training forward (deterministic) over the token
  buffer for every new token, O(seq_len^2) work. Same arguments, keys and results (to float
  rounding); the reference for tests and the speed comparison."""
  cond, key, flags, scalars = _prepare(
    model, labels, prefix, key, cfg_scale, cfg_interval, temperature, top_k, top_p, greedy
  )
  return _program(model, False, *flags)(variables, cond, key, *scalars)


def _prepare(
  model, labels, prefix, key, cfg_scale, cfg_interval, temperature, top_k, top_p, greedy
):
  """Checks everything a user can get wrong before anything compiles; returns (conditioning
  array, key, static flags, traced scalars)."""
  try:  # Python numbers from here on (a jnp scalar would not hash into the program cache).
    cfg_scale, temperature, top_p = float(cfg_scale), float(temperature), float(top_p)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f'cfg_scale, temperature and top_p must be numbers: {e}') from None
  if model.frame_prediction:
    if labels is not None:
      raise errors.DataError('a frame-prediction model takes prefix=..., not class labels')
    if prefix is None:
      raise errors.DataError(f'a frame-prediction model needs prefix [batch, {model.seq_len}]')
    cond = _ids('prefix token', prefix, model.vocab_size)
    if cond.ndim != 2 or cond.shape[1] != model.seq_len:
      raise errors.DataError(
        f'prefix must be [batch, seq_len={model.seq_len}], got shape {tuple(cond.shape)}'
      )
    if cfg_scale != 1.0:
      raise errors.ConfigError(
        f'cfg_scale={cfg_scale}: a frame-prediction model has no null class (use 1.0)'
      )
  else:
    if prefix is not None:
      raise errors.DataError('a class-conditional model takes labels, not prefix=...')
    if labels is None:
      raise errors.DataError('a class-conditional model needs labels [batch]')
    cond = _ids('class', labels, model.num_classes)
    if cond.ndim != 1:
      raise errors.DataError(f'labels must be [batch], got shape {tuple(cond.shape)}')
    if cfg_scale != 1.0 and model.class_dropout <= 0.0:
      raise errors.ConfigError(
        f'cfg_scale={cfg_scale} needs a model trained with class dropout (class_dropout=0: '
        'its null class was never trained); use cfg_scale=1.0'
      )
  if cond.shape[0] < 1:
    raise errors.DataError('cannot sample an empty batch')
  if int(cfg_interval) != cfg_interval or cfg_interval < -1:
    raise errors.ConfigError(f'cfg_interval={cfg_interval} must be -1 (always) or an int >= 0')
  if not temperature >= 0.0:
    raise errors.ConfigError(f'temperature={temperature} must be >= 0')
  if int(top_k) != top_k or top_k < 0:
    raise errors.ConfigError(f'top_k={top_k} must be an int >= 0 (0: no top-k filtering)')
  if not 0.0 < top_p <= 1.0:
    raise errors.ConfigError(f'top_p={top_p} must be in (0, 1] (1: no nucleus filtering)')
  if key is None:
    if not greedy:
      raise errors.ConfigError('sampling needs a PRNG key (or greedy=True)')
    key = jax.random.key(0)
  flags = (cfg_scale != 1.0, min(int(top_k), model.vocab_size), top_p < 1.0, bool(greedy))
  scalars = (
    jnp.float32(cfg_scale),
    jnp.int32(cfg_interval),
    jnp.float32(temperature),
    jnp.float32(top_p),
  )
  return cond, key, flags, scalars


def _ids(what, ids, size):
  """``ids`` as an int32 array after checking they are integers in [0, size). A ``jax.Array``
  stays where it is (a batch-sharded global array, also one spanning hosts, goes into the
  program as it lies; only its min and max come to the host); anything else goes through
  numpy."""
  on_device = isinstance(ids, jax.Array)
  ids = ids if on_device else np.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise errors.DataError(f'{what} ids must be integers, got {ids.dtype}')
  if ids.size and not isinstance(ids, jax.core.Tracer):  # values unknown inside a caller's jit
    lo, hi = (int(x) for x in jax.device_get((ids.min(), ids.max())))
    if lo < 0 or hi >= size:
      raise errors.DataError(f'{what} id {lo if lo < 0 else hi} is out of range [0, {size - 1}]')
  return ids.astype(jnp.int32) if on_device else jnp.asarray(ids, jnp.int32)


@functools.lru_cache(maxsize=32)
def _program(model, cached: bool, use_cfg: bool, top_k: int, use_top_p: bool, greedy: bool):
  """The jitted sampler for one model and one set of static choices (cached, so a second
  call with other scales, temperatures, top-p values or keys does not recompile)."""
  return jax.jit(
    functools.partial(
      _generate,
      model=model,
      cached=cached,
      use_cfg=use_cfg,
      top_k=top_k,
      use_top_p=use_top_p,
      greedy=greedy,
    )
  )


def _generate(
  variables,
  cond,
  key,
  cfg_scale,
  cfg_interval,
  temperature,
  top_p,
  *,
  model,
  cached,
  use_cfg,
  top_k,
  use_top_p,
  greedy,
):
  batch, length = cond.shape[0], model.seq_len
  if use_cfg:  # [cond ; null]: the null class is the class table's last row
    cond = jnp.concatenate([cond, jnp.full_like(cond, model.num_classes)])
  cond_kw = {'prefix': cond} if model.frame_prediction else {'labels': cond}

  def pick(logits, t):
    """logits [B or 2B, V] for token t -> (tokens [B] int32, log-probs [B] float32)."""
    if use_cfg:
      c, u = logits[:batch], logits[batch:]
      guided = (cfg_interval < 0) | (t <= cfg_interval + 1)
      logits = jnp.where(guided, u + cfg_scale * (c - u), c)
    logits = filter_logits(
      logits, temperature=temperature, top_k=top_k, top_p=top_p, use_top_p=use_top_p
    )
    if greedy:
      tok = jnp.argmax(logits, axis=-1)
    else:
      tok = jax.random.categorical(jax.random.fold_in(key, t), logits, axis=-1)
    tok = tok.astype(jnp.int32)
    return tok, _log_prob(logits, tok)

  def both(tok):
    return jnp.concatenate([tok, tok]) if use_cfg else tok

  if not cached:

    def body(t, carry):
      tokens, logprobs = carry
      logits = model.apply(variables, both(tokens), **cond_kw)
      tok, lp = pick(jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False), t)
      return tokens.at[:, t].set(tok), logprobs.at[:, t].set(lp)

    init = (jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), jnp.float32))
    tokens, logprobs = jax.lax.fori_loop(0, length, body, init)
    return {'tokens': tokens, 'logprobs': logprobs}

  cache = larp_ar.init_cache(model, cond.shape[0])
  logits, cache = model.apply(variables, cache, **cond_kw, method=model.prefill)
  tok0, lp0 = pick(logits, 0)

  def step(carry, t):
    tok, cache = carry
    # Token t-1 sits at sequence position prefix_len + t - 1; its output predicts token t.
    logits, cache = model.apply(
      variables, cache, both(tok), model.prefix_len + t - 1, method=model.decode_step
    )
    tok, lp = pick(logits, t)
    return (tok, cache), (tok, lp)

  _, (toks, lps) = jax.lax.scan(step, (tok0, cache), jnp.arange(1, length))
  tokens = jnp.concatenate([tok0[:, None], toks.T], axis=1)
  logprobs = jnp.concatenate([lp0[:, None], lps.T], axis=1)
  return {'tokens': tokens, 'logprobs': logprobs}
