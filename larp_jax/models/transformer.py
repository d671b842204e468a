"""Transformer building blocks shared by the tokenizer, the discriminator and the prior.

Two block flavours, matching the official networks (LARP_SPEC sections 2 and 5):
  * ``ViTBlock``: timm's ViT block -- pre-LN, one fused qkv Dense without bias, bidirectional
    attention, exact (erf) GELU MLP. Used by the encoder, decoder and discriminator.
  * ``GPTBlock``: the prior's block -- pre-LN, separate q/k/v Dense with bias, causal attention,
    dropout on the embeddings, attention probabilities and residual paths.

Every parameter carries logical axis names; sharding rules live in the config
(``larp_jax.sharding``). Computation runs in ``dtype``, parameters are stored in ``param_dtype``
and the attention softmax always runs in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Official init: every nn.Linear gets xavier-uniform weights and zero bias (LARP_SPEC section 6).
xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def dense(features, axes, *, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
          kernel_init=xavier, name=None):
  """nn.Dense whose kernel/bias carry logical axis names ``axes = (in_axis, out_axis)``."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(zeros, (axes[1],)), name=name)


def layer_norm(eps, *, dtype=jnp.float32, param_dtype=jnp.float32, name=None):
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
      bias_init=nn.with_logical_partitioning(zeros, ('norm',)), name=name)


def constrain(x, axes=('batch', 'length', 'embed')):
  """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, axes)


def _softmax_attention(q, k, v, *, causal: bool, dropout_rng=None, dropout_rate: float = 0.0):
  """Reference attention on [B, L, H, Dh]: einsum scores, float32 softmax, einsum output."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * jnp.asarray(scale, q.dtype), k)
  logits = logits.astype(jnp.float32)
  if causal:
    length = q.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rng is not None and dropout_rate > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


def _query_chunk(length: int, budget: int = 1 << 18) -> int:
  """Largest divisor of ``length`` whose [chunk, length] float32 scores fit in ~1 MiB."""
  target = max(1, budget // max(length, 1))
  best = max((c for c in range(1, min(target, length) + 1) if length % c == 0), default=length)
  return best if best >= 16 else length


def _chunked_attention(q, k, v, *, causal: bool):
  """Attention computed one (example, head, query chunk) block at a time.

  Each block's [chunk, L] scores (at most ~1 MiB) and its head's K and V stay in cache, and the
  block is recomputed in the backward pass (``jax.checkpoint``) instead of storing every score
  matrix. On CPU, where attention is bound by memory traffic over the [B, H, L, L] scores, this
  is about 1.4x faster forward+backward than 'xla' (see BENCHMARKS.md). The loops are
  sequential (``lax.map``): accelerators should use 'xla' or 'dot_product_attention'.
  """
  b, l, h, d = q.shape
  qc = _query_chunk(l)
  nq = l // qc
  scale = jnp.asarray(d ** -0.5, q.dtype)
  per_head = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, l, d)
  qh, kh, vh = per_head(q * scale), per_head(k), per_head(v)

  @jax.checkpoint
  def block(qb, kb, vb, start):                                      # qb [qc, Dh]
    logits = (qb @ kb.T).astype(jnp.float32)                         # [qc, L]
    if causal:
      rows = start + jnp.arange(qb.shape[0])[:, None]
      logits = jnp.where(jnp.arange(kb.shape[0])[None, :] <= rows, logits,
                         jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1).astype(vb.dtype) @ vb     # [qc, Dh]

  def one_head(args):
    qi, ki, vi = args                                                # [L, Dh]
    out = jax.lax.map(lambda c: block(c[0], ki, vi, c[1]),
                      (qi.reshape(nq, qc, d), jnp.arange(nq, dtype=jnp.int32) * qc))
    return out.reshape(l, d)

  out = jax.lax.map(one_head, (qh, kh, vh))                          # [B*H, L, Dh]
  return jnp.transpose(out.reshape(b, h, l, d), (0, 2, 1, 3))


def attention(q, k, v, *, causal: bool, dropout_rng=None, dropout_rate: float = 0.0,
              impl: str = 'xla'):
  """Multi-head scaled dot-product attention.

  Args:
    q, k, v: [B, L, H, Dh].
    causal: apply a lower-triangular mask.
    dropout_rng / dropout_rate: dropout on the attention probabilities (rate 0 disables).
    impl: 'xla' (explicit einsum + float32 softmax), 'dot_product_attention'
      (``jax.nn.dot_product_attention``: cuDNN flash attention on GPU), 'chunked' (one head and
      query chunk at a time, recomputed in the backward pass: fastest on CPU) or 'auto'
      ('chunked' on CPU, 'xla' elsewhere). Only 'xla' applies attention dropout; the others
      fall back to it when dropout is active.
  Returns:
    [B, L, H, Dh] in q's dtype.
  """
  if impl not in ATTENTION_CHOICES:
    raise ValueError(f'unknown attention impl {impl!r}; use one of {ATTENTION_CHOICES}')
  if impl == 'auto':
    impl = 'chunked' if jax.default_backend() == 'cpu' else 'xla'
  dropout_on = dropout_rng is not None and dropout_rate > 0
  if impl == 'dot_product_attention' and not dropout_on:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal).astype(q.dtype)
  if impl == 'chunked' and not dropout_on:
    return _chunked_attention(q, k, v, causal=causal)
  return _softmax_attention(q, k, v, causal=causal, dropout_rng=dropout_rng,
                            dropout_rate=dropout_rate)


class Mlp(nn.Module):
  """Linear(D -> hidden, bias) -> exact GELU -> Linear(hidden -> D, bias)."""
  hidden: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.hidden, ('embed', 'mlp'), name='fc1', **kw)(x)
    h = nn.gelu(h, approximate=False)
    h = constrain(h, ('batch', 'length', 'mlp'))
    out = dense(x.shape[-1], ('mlp', 'embed'), name='fc2', **kw)(h)
    return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class ViTAttention(nn.Module):
  """Bidirectional MHA with a fused bias-free qkv projection laid out [q | k | v]."""
  num_heads: int
  impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, l, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = dense(3 * d, ('embed', 'qkv'), use_bias=False, name='qkv', **kw)(x)
    q, k, v = jnp.split(qkv.reshape(b, l, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
    out = attention(q, k, v, causal=False, impl=self.impl).reshape(b, l, d)
    return dense(d, ('qkv', 'embed'), name='proj', **kw)(out)


class ViTBlock(nn.Module):
  """timm ViT block: x += Attn(LN1(x)); x += MLP(LN2(x)). No LayerScale, drop-path or dropout."""
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5
  attention_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, _=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    x = constrain(x)
    x = x + ViTAttention(self.num_heads, self.attention_impl, name='attn', **kw)(
        layer_norm(self.norm_eps, name='norm1', **kw)(x))
    x = x + Mlp(int(d * self.mlp_ratio), name='mlp', **kw)(
        layer_norm(self.norm_eps, name='norm2', **kw)(x))
    return constrain(x), None


class GPTBlock(nn.Module):
  """The prior's block: LN -> causal MHA (separate q/k/v with bias) -> LN -> MLP, with dropout."""
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5
  dropout: float = 0.0
  attn_dropout_in_eval: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    b, l, d = x.shape
    h_dim = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = constrain(x)
    h = layer_norm(self.norm_eps, name='ln_1', **kw)(x)
    q, k, v = (dense(d, ('embed', 'qkv'), name=n, **kw)(h).reshape(b, l, self.num_heads, h_dim)
               for n in ('q', 'k', 'v'))
    # The official prior passes its attention dropout straight to SDPA, so it stays active in
    # eval mode as well; ``attn_dropout_in_eval`` reproduces that (LARP_SPEC section 5).
    attn_on = (not deterministic) or self.attn_dropout_in_eval
    rng = self.make_rng('dropout') if (attn_on and self.dropout > 0) else None
    a = attention(q, k, v, causal=True, dropout_rng=rng, dropout_rate=self.dropout)
    a = dense(d, ('qkv', 'embed'), name='proj', **kw)(a.reshape(b, l, d))
    x = x + nn.Dropout(self.dropout)(a, deterministic=deterministic)
    h = layer_norm(self.norm_eps, name='ln_2', **kw)(x)
    x = x + Mlp(int(d * self.mlp_ratio), dropout=self.dropout, name='mlp', **kw)(
        h, deterministic=deterministic)
    return constrain(x), None


class ViTStack(nn.Module):
  """``depth`` ViT blocks, optionally rematerialised and/or scanned over layers.

  With ``scan=True`` the block parameters are stacked along a leading 'layers' axis
  (faster compiles for deep stacks); otherwise blocks are named ``blocks_0..blocks_{depth-1}``
  like the official ``blocks.i`` state-dict entries.
  """
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5
  attention_impl: str = 'xla'
  remat: str = 'none'            # 'none' | 'full' | 'dots' (save matmul outputs)
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    block = ViTBlock
    if self.remat != 'none':
      policy = {'full': None,
                'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}[self.remat]
      block = nn.remat(block, policy=policy, prevent_cse=not self.scan)
    kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, norm_eps=self.norm_eps,
              attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan:
      scanned = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                        length=self.depth, metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scanned(name='blocks', **kw)(x, None)
      return x
    for i in range(self.depth):
      x, _ = block(name=f'blocks_{i}', **kw)(x, None)
    return x


REMAT_CHOICES = ('none', 'full', 'dots')
ATTENTION_CHOICES = ('xla', 'dot_product_attention', 'chunked', 'auto')


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f'{name}={value!r} is not one of {choices}')

