"""LARP's stage-2 generator: a Llama-style autoregressive transformer over the tokenizer's codes
(the official `models/larp_ar.py`, derived from LlamaGen), class-conditional or frame
prediction (FP).

Layout (pre-norm, no biases, no RoPE, learned absolute positions):

  class-conditional  input  [cls_emb(label) ; tok_emb(z_0 .. z_{L-2})]             L positions
                     logits at every position predict z_0 .. z_{L-1}
  frame prediction   input  [tok_emb(c_0 .. c_{L-1}, SEP) ; tok_emb(z_0 .. z_{L-2})]  2L positions
                     (SEP is the id ``vocab_size``, the token table's extra row); the logits from
                     position L onward predict z_0 .. z_{L-1}

with L = ``seq_len`` (the tokens generated, 1024 for LARP-L-Long). Each block is
x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), attention through ``models.attention`` (layout
[B, L, H, Dh]), then a final RMSNorm and a zero-initialised, untied output head.

Numerics follow the official bf16-autocast run: with ``dtype=bfloat16`` the matmuls run in
bf16 while the residual stream, RMSNorm, softmaxes and logits stay float32 (under torch autocast
the residual adds promote to float32 as well); parameters are stored in ``param_dtype``.

Besides the training call, ``prefill`` and ``decode_step`` are the generation entry points with
an explicit KV cache (``init_cache``: per layer k and v [B, H, max_len, Dh], the order of the
official cache); ``larp_jax.generation.sampling`` drives them.

Parameter names follow the official state dict (``tok_embeddings``, ``cls_embedding/
embedding_table``, ``abs_pe``, ``layers_{i}/attention/{wqkv,wo}``, ``layers_{i}/feed_forward/
{w1,w2,w3}``, ``layers_{i}/{attention_norm,ffn_norm}``, ``norm``, ``output``); Dense kernels are
[in, out] (the torch weight transposed), Embed tables are the torch weight, RMSNorm weights are
'scale'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from larp_jax import errors
from larp_jax.models import attention as attention_lib
from larp_jax.models.dropout import Dropout
from larp_jax.models.layers import Dtype, check_choice, constrain, dense

# Official sizes (the `LLAMA_ABS_*` constructors): (dim, depth, num_heads). LARP-L-Long's
# released generators are 'LP' (631.98M parameters class-conditional with 8192 codes and 101
# classes); 'L' is 326.26M (the paper's "343M" is LlamaGen's nominal size).
PRESETS = {
  'S': (384, 12, 6),
  'B': (768, 12, 12),
  'L': (1024, 24, 16),
  'LP': (1280, 30, 20),
  'XL': (1280, 36, 20),
  'XXL': (1536, 48, 24),
}

REMAT_CHOICES = ('none', 'full', 'dots')

# Logical axes of one layer's KV cache [B, H, max_len, Dh] (``init_cache``). Heads before
# positions (the official cache's order as well): the decode einsums then contract contiguous
# rows, where [B, max_len, H, Dh] made XLA:CPU transpose the whole cache every step (a decode
# step's attention 4.1 -> 0.9 ms per layer at B=16, 256 positions, 4 x 64 heads, one core).
CACHE_AXES = ('batch', 'heads', 'length', 'head_dim')

_normal = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def preset_kwargs(name: str, **overrides) -> dict:
  """``LARPAR`` kwargs of a preset (``PRESETS``) with ``overrides`` on top, e.g.
  ``LARPAR(**preset_kwargs('LP', frame_prediction=True))``."""
  if name not in PRESETS:
    raise errors.ConfigError(f'unknown LARPAR preset {name!r}; choices: {sorted(PRESETS)}')
  dim, depth, num_heads = PRESETS[name]
  return dict(dict(dim=dim, depth=depth, num_heads=num_heads), **overrides)


def ffn_hidden(dim: int, multiple: int = 256) -> int:
  """SwiGLU width: int(2 * 4 * dim / 3) rounded up to a multiple of ``multiple`` (1280 -> 3584)."""
  hidden = int(2 * 4 * dim / 3)
  return -(-hidden // multiple) * multiple


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * scale, computed in float32, output in ``dtype``."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
      'scale',
      nn.with_logical_partitioning(_ones, ('norm',)),
      (x.shape[-1],),
      self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
  """Causal MHA: fused bias-free ``wqkv`` laid out [q | k | v], bias-free ``wo``, residual
  dropout. ``__call__`` runs a whole sequence; ``decode`` one new position against a KV cache."""

  dim: int
  num_heads: int
  resid_dropout: float = 0.0
  attention_impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(use_bias=False, kernel_init=_normal, dtype=self.dtype, param_dtype=self.param_dtype)
    self.wqkv = _dense(('embed', 'qkv'), features=3 * self.dim, **kw)
    self.wo = _dense(('qkv', 'embed'), features=self.dim, **kw)
    self.dropout = Dropout(self.resid_dropout)

  def _qkv(self, x):
    b, l, d = x.shape
    qkv = self.wqkv(x).reshape(b, l, 3 * self.num_heads, d // self.num_heads)
    return jnp.split(qkv, 3, axis=2)

  def _out(self, a, deterministic):
    b, l = a.shape[:2]
    return self.dropout(self.wo(a.reshape(b, l, -1)), deterministic=deterministic)

  def __call__(self, x, *, deterministic: bool):
    """x [B, L, D] -> [B, L, D]; also the new keys and values [B, L, H, Dh] (for a prefill)."""
    q, k, v = self._qkv(x)
    a = attention_lib.attention(q, k, v, causal=True, impl=self.attention_impl)
    return self._out(a, deterministic), (k, v)

  def decode(self, x, cache, position):
    """One new position: x [B, 1, D] at ``position`` (a scalar) attends to the cached keys at
    positions <= ``position`` (einsum, float32 softmax); returns ([B, 1, D], the cache
    {'k', 'v'} [B, H, max_len, Dh] with this position written)."""
    q, k, v = (t.transpose(0, 2, 1, 3) for t in self._qkv(x))  # [B, H, 1, Dh]
    ck = write_cache(cache['k'], k, position)
    cv = write_cache(cache['v'], v, position)
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum('bhqd,bhkd->bhqk', q * jnp.asarray(scale, q.dtype), ck.astype(q.dtype))
    scores = scores.astype(jnp.float32)
    visible = jnp.arange(ck.shape[2]) <= position
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    a = jnp.einsum('bhqk,bhkd->bqhd', probs.astype(q.dtype), cv.astype(q.dtype))
    return self._out(a, True), {'k': ck, 'v': cv}


class FeedForward(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x), no biases, then dropout."""

  hidden: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    kw = dict(use_bias=False, kernel_init=_normal, dtype=self.dtype, param_dtype=self.param_dtype)
    h1 = _dense(('embed', 'mlp'), features=self.hidden, name='w1', **kw)(x)
    h3 = _dense(('embed', 'mlp'), features=self.hidden, name='w3', **kw)(x)
    h = constrain(nn.silu(h1) * h3, ('batch', 'length', 'mlp'))
    out = _dense(('mlp', 'embed'), features=x.shape[-1], name='w2', **kw)(h)
    return Dropout(self.dropout_rate)(out, deterministic=deterministic)


class Block(nn.Module):
  """Pre-norm Llama block: h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h))."""

  dim: int
  num_heads: int
  ffn_hidden: int
  norm_eps: float = 1e-5
  resid_dropout: float = 0.0
  ffn_dropout: float = 0.0
  attention_impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.attention = Attention(
      self.dim, self.num_heads, self.resid_dropout, self.attention_impl, **kw
    )
    self.feed_forward = FeedForward(self.ffn_hidden, self.ffn_dropout, **kw)
    self.attention_norm = RMSNorm(self.norm_eps, **kw)
    self.ffn_norm = RMSNorm(self.norm_eps, **kw)

  def _ffn(self, h, deterministic):
    return constrain(h + self.feed_forward(self.ffn_norm(h), deterministic=deterministic))

  def __call__(self, x, deterministic: bool):
    """x [B, L, D] (float32 residual stream) -> ([B, L, D], (keys, values) [B, L, H, Dh])."""
    x = constrain(x)
    a, kv = self.attention(self.attention_norm(x), deterministic=deterministic)
    return self._ffn(x + a, deterministic), kv

  def decode(self, x, cache, position):
    a, cache = self.attention.decode(self.attention_norm(x), cache, position)
    return self._ffn(constrain(x) + a, True), cache


class LabelEmbedder(nn.Module):
  """Class table with ``num_classes + 1`` rows; the last is the classifier-free-guidance null
  class. Negative labels map to it, and in training each label does with prob ``drop_rate``.
  (The official table has no null row when its dropout is 0; ``larp_jax.convert`` refuses
  such checkpoints.)"""

  num_classes: int
  dim: int
  drop_rate: float = 0.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels, *, train: bool):
    null = self.num_classes
    labels = jnp.where(labels < 0, null, labels)
    if train and self.drop_rate > 0:
      drop = jax.random.uniform(self.make_rng('dropout'), labels.shape) < self.drop_rate
      labels = jnp.where(drop, null, labels)
    table = nn.Embed(
      self.num_classes + 1,
      self.dim,
      embedding_init=nn.with_logical_partitioning(_normal, ('classes', 'embed')),
      dtype=jnp.float32,
      param_dtype=self.param_dtype,
      name='embedding_table',
    )
    return table(labels)


class LARPAR(nn.Module):
  """The LARP AR generator (see the module docstring for the layouts).

  Calls (``model.apply(variables, ..., method=...)``):
    ``__call__(tokens [B, L] int32, labels [B] int32 | None, prefix [B, seq_len] | None,
    *, train=False)`` -> logits [B, L, vocab_size] float32, L <= seq_len, position i predicting
    token i from the prefix and tokens[:, :i] (tokens[:, L-1] is not read). Class-conditional
    models take ``labels`` (0..num_classes-1; num_classes or a negative value is the null
    class), FP models take ``prefix``: the conditioning tokens (ids < vocab_size), to which the
    separator is appended here. ``train=True`` turns on the dropouts and the class dropout
    (RNG stream 'dropout').
    ``prefill(cache, labels=None, prefix=None)`` -> (logits [B, vocab] of the first token, cache).
    ``decode_step(cache, tokens [B], position)`` -> (logits [B, vocab] of the next token, cache):
    ``tokens`` is the token at sequence position ``position`` (``prefix_len + i`` for token i).

  Ids are checked when concrete (outside jit); shapes always.
  """

  vocab_size: int = 8192
  num_classes: int = 101
  dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  seq_len: int = 1024
  frame_prediction: bool = False
  class_dropout: float = 0.1
  token_dropout: float = 0.1
  resid_dropout: float = 0.1
  ffn_dropout: float = 0.1
  norm_eps: float = 1e-5
  ffn_multiple: int = 256
  attention_impl: str = 'auto'
  remat: str = 'none'  # 'none' | 'full' | 'dots' (save matmul outputs)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    super().__post_init__()
    for name in ('vocab_size', 'dim', 'depth', 'num_heads', 'seq_len', 'ffn_multiple'):
      if int(getattr(self, name)) < 1:
        raise errors.ConfigError(f'LARPAR {name}={getattr(self, name)} must be positive')
    if not self.frame_prediction and self.num_classes < 1:
      raise errors.ConfigError(f'LARPAR num_classes={self.num_classes} must be positive')
    if self.dim % self.num_heads:
      raise errors.ConfigError(
        f'LARPAR dim={self.dim} is not a multiple of num_heads={self.num_heads}'
      )
    for name in ('class_dropout', 'token_dropout', 'resid_dropout', 'ffn_dropout'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise errors.ConfigError(f'LARPAR {name}={getattr(self, name)} is not in [0, 1]')
    check_choice('LARPAR attention_impl', self.attention_impl, attention_lib.ATTENTION_CHOICES)
    check_choice('LARPAR remat', self.remat, REMAT_CHOICES)

  # Sizes that callers (sampler, datasets, tasks) read.
  @property
  def prefix_len(self) -> int:
    """Positions before the first generated token: 1 (class) or seq_len + 1 (FP tokens + SEP)."""
    return self.seq_len + 1 if self.frame_prediction else 1

  @property
  def max_len(self) -> int:
    """Positions the model ever sees (PE rows, KV-cache length): prefix_len + seq_len - 1."""
    return self.prefix_len + self.seq_len - 1

  @property
  def separator_id(self) -> int:
    return self.vocab_size

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rows = self.vocab_size + (1 if self.frame_prediction else 0)
    self.tok_embeddings = nn.Embed(
      rows,
      self.dim,
      embedding_init=nn.with_logical_partitioning(_normal, ('vocab', 'embed')),
      dtype=jnp.float32,
      param_dtype=self.param_dtype,
    )
    if not self.frame_prediction:
      self.cls_embedding = LabelEmbedder(
        self.num_classes, self.dim, self.class_dropout, param_dtype=self.param_dtype
      )
    self.abs_pe = self.param(
      'abs_pe',
      nn.with_logical_partitioning(_normal, (None, 'length', 'embed')),
      (1, self.max_len, self.dim),
      self.param_dtype,
    )
    block = Block
    if self.remat != 'none':
      policy = {'full': None, 'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}
      block = nn.remat(Block, policy=policy[self.remat], static_argnums=(2,))
    self.layers = [
      block(
        self.dim,
        self.num_heads,
        ffn_hidden(self.dim, self.ffn_multiple),
        self.norm_eps,
        self.resid_dropout,
        self.ffn_dropout,
        self.attention_impl,
        **kw,
      )
      for _ in range(self.depth)
    ]
    self.norm = RMSNorm(self.norm_eps, **kw)
    self.output = _dense(
      ('embed', 'vocab'), features=self.vocab_size, use_bias=False, kernel_init=_zeros, **kw
    )
    self.token_drop = Dropout(self.token_dropout)

  # --- inputs ---------------------------------------------------------------------------------

  def check_inputs(self, tokens=None, labels=None, prefix=None):
    """Raises ``errors.DataError`` for wrong shapes or conditioning, and (for concrete arrays)
    ids out of range: tokens [B, L] in [0, vocab_size) with 1 <= L <= seq_len; labels [B] <=
    num_classes (class-conditional); prefix [B, seq_len] in [0, vocab_size) (FP)."""
    batch = None
    if tokens is not None:
      if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.seq_len:
        raise errors.DataError(
          f'tokens must be [batch, L] with 1 <= L <= seq_len={self.seq_len}, got shape '
          f'{tuple(tokens.shape)}'
        )
      batch = tokens.shape[0]
      _check_ids('token', tokens, 0, self.vocab_size - 1)
    if self.frame_prediction:
      if labels is not None:
        raise errors.DataError('a frame-prediction LARPAR takes prefix tokens, not class labels')
      if prefix is None:
        raise errors.DataError(f'a frame-prediction LARPAR needs prefix [batch, {self.seq_len}]')
      if prefix.ndim != 2 or prefix.shape[1] != self.seq_len:
        raise errors.DataError(
          f'prefix must be [batch, seq_len={self.seq_len}], got shape {tuple(prefix.shape)}'
        )
      cond, cond_batch = prefix, prefix.shape[0]
      _check_ids('prefix token', prefix, 0, self.vocab_size - 1)
    else:
      if prefix is not None:
        raise errors.DataError('a class-conditional LARPAR takes labels, not prefix tokens')
      if labels is None:
        raise errors.DataError('a class-conditional LARPAR needs labels [batch]')
      if labels.ndim != 1:
        raise errors.DataError(f'labels must be [batch], got shape {tuple(labels.shape)}')
      cond, cond_batch = labels, labels.shape[0]
      _check_ids('class', labels, None, self.num_classes)
    if not jnp.issubdtype(cond.dtype, jnp.integer):
      raise errors.DataError(f'conditioning ids must be integers, got {cond.dtype}')
    if batch is not None and batch != cond_batch:
      raise errors.DataError(f'tokens have batch {batch} but the conditioning has {cond_batch}')

  def _prefix_embed(self, labels, prefix, train):
    """[B, prefix_len, D] float32: the class embedding, or the FP tokens followed by SEP."""
    if self.frame_prediction:
      sep = jnp.full((prefix.shape[0], 1), self.separator_id, prefix.dtype)
      return self.tok_embeddings(jnp.concatenate([prefix, sep], axis=1))
    return self.cls_embedding(labels, train=train)[:, None]

  def _head(self, h):
    logits = self.output(self.norm(h)).astype(jnp.float32)
    return constrain(logits, ('batch', 'length', 'vocab'))

  # --- calls ----------------------------------------------------------------------------------

  def __call__(self, tokens, labels=None, prefix=None, *, train: bool = False):
    self.check_inputs(tokens, labels, prefix)
    n = tokens.shape[1]
    h = jnp.concatenate(
      [self._prefix_embed(labels, prefix, train), self.tok_embeddings(tokens[:, :-1])], axis=1
    )
    # Token dropout covers the prefix too and comes before the PE (the official order).
    h = self.token_drop(h, deterministic=not train)
    h = h + self.abs_pe[:, : h.shape[1]].astype(jnp.float32)
    for layer in self.layers:
      h, _ = layer(h, not train)
    return self._head(h[:, -n:])

  def prefill(self, cache, labels=None, prefix=None):
    """Runs the prefix, writes its keys and values at positions 0..prefix_len-1 of ``cache``
    (``init_cache``) and returns (logits [B, vocab] float32 for token 0, cache)."""
    self.check_inputs(None, labels, prefix)
    h = self._prefix_embed(labels, prefix, False)
    h = h + self.abs_pe[:, : h.shape[1]].astype(jnp.float32)
    new_cache = {}
    for i, layer in enumerate(self.layers):
      h, (k, v) = layer(h, True)
      c = cache[f'layers_{i}']
      new_cache[f'layers_{i}'] = {
        'k': write_cache(c['k'], k.transpose(0, 2, 1, 3), 0),
        'v': write_cache(c['v'], v.transpose(0, 2, 1, 3), 0),
      }
    return self._head(h[:, -1:])[:, 0], new_cache

  def decode_step(self, cache, tokens, position):
    """tokens [B] int32 at sequence position ``position`` (scalar, traced is fine) -> (logits
    [B, vocab] float32 of the token at position + 1 - prefix_len, cache)."""
    if tokens.ndim != 1:
      raise errors.DataError(f'decode_step takes tokens [batch], got shape {tuple(tokens.shape)}')
    h = self.tok_embeddings(tokens[:, None])
    h = h + jax.lax.dynamic_slice_in_dim(self.abs_pe, position, 1, 1).astype(jnp.float32)
    new_cache = {}
    for i, layer in enumerate(self.layers):
      h, new_cache[f'layers_{i}'] = layer.decode(h, cache[f'layers_{i}'], position)
    return self._head(h)[:, 0], new_cache


def _dense(axes, *, features, **kw):
  """``layers.dense`` with the axes first (the Dense layers of this model have no bias)."""
  return dense(features, axes, **kw)


def _check_ids(what, x, low, high):
  """DataError when a concrete id array has values outside [low, high] (None: unbounded)."""
  try:
    values = np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  if values.size == 0:
    return
  lo, hi = int(values.min()), int(values.max())
  if (low is not None and lo < low) or hi > high:
    bad = lo if (low is not None and lo < low) else hi
    span = f'[{low}, {high}]' if low is not None else f'<= {high}'
    raise errors.DataError(f'{what} id {bad} is out of range {span}')


def write_cache(cache, x, position):
  """``cache`` [B, H, max_len, Dh] with x [B, H, S, Dh] written at positions position..+S-1."""
  out = jax.lax.dynamic_update_slice_in_dim(cache, x.astype(cache.dtype), position, 2)
  return constrain(out, CACHE_AXES)


def init_cache(model: LARPAR, batch_size: int, dtype=None):
  """Zero KV cache for ``model``: {'layers_i': {'k', 'v'}} of [batch_size, H, max_len, Dh] in
  ``dtype`` (default the model's compute dtype). Logical axes ``CACHE_AXES``: ``prefill`` and
  ``decode_step`` constrain every cache they write (``write_cache``), so inside a jitted program
  under a mesh and logical rules the cache is sharded like the activations."""
  shape = (batch_size, model.num_heads, model.max_len, model.dim // model.num_heads)
  dtype = model.dtype if dtype is None else dtype
  return {
    f'layers_{i}': {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
    for i in range(model.depth)
  }


def token_nll(logits, tokens):
  """Per-token negative log-likelihood [B, L] float32 of ``tokens`` under ``logits``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)


def cross_entropy(logits, tokens, valid=None):
  """Mean token cross-entropy (float32), over the samples with ``valid`` [B] true if given."""
  nll = token_nll(logits, tokens)
  if valid is None:
    return jnp.mean(nll)
  w = valid.astype(jnp.float32)[:, None] * jnp.ones_like(nll)
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def log_likelihood(model, variables, tokens, labels=None, prefix=None):
  """Per-token log-probabilities [B, L] float32 of ``tokens`` under the model (deterministic
  forward); their row sum is a sequence's log-likelihood."""
  logits = model.apply(variables, tokens, labels, prefix)
  return -token_nll(logits, tokens)
