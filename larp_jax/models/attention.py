"""Multi-head attention: ``attention`` dispatches to one of its kernels.

  'xla'                    the reference: einsum scores, float32 softmax, einsum output
                           (``_softmax_attention``, below);
  'dot_product_attention'  ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU);
  'chunked'                pure-JAX flash attention with a custom VJP (``attention_chunked``);
  'cpu_flash'              the C++ kernel for XLA:CPU (``larp_jax.native.flash_attention``);
  'auto'                   chosen per backend and inputs (``resolve_attention_impl``,
                           ``select_attention_impl``).

The softmax always runs in float32. Attention dropout uses the counter-based mask of
``attention_masks.attention_keep`` in every kernel that has dropout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from larp_jax import errors
from larp_jax.models.attention_chunked import chunked_attention
from larp_jax.models.attention_masks import attention_keep, causal_keep
from larp_jax.models.dropout import drop, dropout_seeds, keep_rule
from larp_jax.models.layers import check_choice
from larp_jax.native import flash_attention as native

ATTENTION_CHOICES = ('xla', 'dot_product_attention', 'chunked', 'cpu_flash', 'auto')


def _softmax_attention(q, k, v, *, causal: bool, seeds, dropout_rate: float = 0.0):
  """Reference attention on [B, L, H, Dh]: einsum scores, float32 softmax, einsum output, and
  the counter-based attention-dropout mask of ``attention_keep`` when ``dropout_rate > 0``."""
  b, lq, h, _ = q.shape
  lk = k.shape[1]
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * jnp.asarray(scale, q.dtype), k)
  logits = logits.astype(jnp.float32)
  if causal:
    logits = jnp.where(
      causal_keep(jnp.arange(lq), jnp.arange(lk)), logits, jnp.finfo(jnp.float32).min
    )
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0:
    threshold, keep_scale = keep_rule(dropout_rate)
    keep = attention_keep(
      seeds, threshold, jnp.arange(b * h), jnp.arange(lq), jnp.arange(lk), lq, lk
    ).reshape(b, h, lq, lk)
    probs = drop(probs, keep, keep_scale)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


def resolve_attention_impl(impl: str, *, dropout: bool = False) -> str:
  """The kernel ``attention(impl=impl)`` runs on the default backend: 'auto' is 'cpu_flash' on
  a single CPU device when the C++ kernel builds here (``larp_jax.native.flash_attention``),
  else 'chunked', and 'xla' elsewhere; 'dot_product_attention' has no dropout, so with dropout
  on it is 'xla'. ``select_attention_impl`` refines this for given inputs.

  With several CPU devices 'auto' stays on 'chunked': XLA cannot partition the C++ custom call,
  so under a sharded jit it would all-gather q, k, v and compute the whole attention on every
  device (an explicit 'cpu_flash' still does that, correctly)."""
  check_choice('attention impl', impl, ATTENTION_CHOICES)
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'xla'
    if jax.device_count() > 1:
      return 'chunked'
    return 'cpu_flash' if native.available() else 'chunked'
  if impl == 'dot_product_attention' and dropout:
    return 'xla'
  return impl


def select_attention_impl(impl: str, q, k, v=None, *, dropout: bool = False) -> str:
  """The kernel ``attention`` runs for these q, k: ``resolve_attention_impl``, except that an
  'auto' resolved to 'cpu_flash' becomes 'chunked' for inputs the C++ kernel does not take,
  and an explicit 'cpu_flash' that cannot run raises ValueError saying why."""
  requested, impl = impl, resolve_attention_impl(impl, dropout=dropout)
  if impl == 'cpu_flash':
    why = native.cannot_run(q, k, v)
    if why and requested == 'auto':
      return 'chunked'
    if why:
      raise errors.ConfigError(
        f"attention impl 'cpu_flash' cannot run here: {why}. Use "
        "attention_impl='auto' or 'chunked'."
      )
  return impl


def attention(
  q, k, v, *, causal: bool, dropout_rng=None, dropout_rate: float = 0.0, impl: str = 'xla'
):
  """Multi-head scaled dot-product attention.

  Args:
    q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh] (Lq may be shorter than Lk: queries for a subset
      of the tokens, e.g. the outputs a model keeps from its last block).
    causal: apply a lower-triangular mask (needs Lq == Lk).
    dropout_rng / dropout_rate: dropout on the attention probabilities (rate 0 disables). The
      mask is counter-based (``attention_keep``): 'xla' and 'chunked' drop the same elements.
    impl: 'xla' (explicit einsum + float32 softmax), 'dot_product_attention'
      (``jax.nn.dot_product_attention``: cuDNN flash attention on GPU), 'chunked' (pure JAX, a few
      heads and a query chunk at a time, recomputed in the backward pass: memory linear in
      L), 'cpu_flash' (the C++ flash kernel of ``larp_jax.native``, an XLA FFI call: the
      fastest on CPU, float32, head dim a multiple of 16; differentiable once, not twice) or
      'auto' ('cpu_flash' on a single CPU device where it builds and takes the inputs, else
      'chunked'; 'xla' elsewhere).
      'dot_product_attention' has no dropout and falls back to 'xla' when dropout is active.
  Returns:
    [B, Lq, H, Dh] in q's dtype.
  """
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(
      f'causal attention needs as many queries as keys, got {q.shape[1]} queries '
      f'and {k.shape[1]} keys'
    )
  dropout_on = dropout_rng is not None and dropout_rate > 0
  impl = select_attention_impl(impl, q, k, v, dropout=dropout_on)
  if dropout_on and dropout_rate >= 1.0:
    return jnp.zeros_like(q)
  # Every kernel takes a dropout key; without dropout it is unused.
  seeds = dropout_seeds(dropout_rng) if dropout_on else jnp.zeros((2,), jnp.uint32)
  rate = float(dropout_rate) if dropout_on else 0.0
  if impl == 'dot_product_attention':
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal).astype(q.dtype)
  if impl == 'chunked':
    return chunked_attention(q, k, v, causal=causal, seeds=seeds, dropout_rate=rate)
  if impl == 'cpu_flash':
    return native.flash_attention(q, k, v, seeds, causal, rate)
  return _softmax_attention(q, k, v, causal=causal, seeds=seeds, dropout_rate=rate)
