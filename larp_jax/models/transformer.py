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

import functools
from typing import Any, Optional, Tuple

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


def dropout(x, rate: float, rng):
  """Inverted dropout drawing 16 random bits per element instead of jax.random.bernoulli's 32
  (a float uniform), which halves the threefry work (the prior's [B, H, L, L] attention dropout
  dominates its cost on CPU). An element is dropped when its bits fall below
  round(rate * 2^16), i.e. with probability rate to within 2^-17, and kept elements are scaled
  by the exact inverse of the keep probability."""
  if rate <= 0.0:
    return x
  threshold = int(round(rate * 65536))
  if threshold >= 65536:
    return jnp.zeros_like(x)
  keep = jax.random.bits(rng, x.shape, jnp.uint16) >= jnp.uint16(threshold)
  return jnp.where(keep, x * jnp.asarray(65536.0 / (65536 - threshold), x.dtype),
                   jnp.zeros_like(x))


class Dropout(nn.Module):
  """``nn.Dropout`` with the cheaper mask of ``dropout`` (same 'dropout' RNG stream)."""
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate <= 0.0:
      return x
    return dropout(x, self.rate, self.make_rng('dropout'))


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
    probs = dropout(probs, dropout_rate, dropout_rng)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


def _query_chunk(q_len: int, k_len: int, budget: int = 1 << 18) -> int:
  """Largest divisor of ``q_len`` whose [chunk, k_len] float32 scores fit in ~1 MiB."""
  target = max(1, budget // max(k_len, 1))
  best = max((c for c in range(1, min(target, q_len) + 1) if q_len % c == 0), default=q_len)
  return best if best >= 16 else q_len


def _chunks(q, k):
  """(Lq, Lk, query chunk, number of chunks) of per-head [BH, L, Dh] queries and keys."""
  lq, lk = q.shape[1], k.shape[1]
  qc = _query_chunk(lq, lk)
  return lq, lk, qc, lq // qc


def _causal_keep(rows, cols):
  """[len(rows), len(cols)] bool: key ``col`` is visible from query ``row``."""
  return cols[None, :] <= rows[:, None]


def _flash_forward(q, k, v, causal):
  """Per (head, query chunk) softmax attention on [BH, L, Dh] (q already scaled): returns the
  output and the row log-sum-exp of the scores, [BH, Lq] float32."""
  d = q.shape[-1]
  lq, lk, qc, nq = _chunks(q, k)
  neg = jnp.finfo(jnp.float32).min

  def one_head(args):
    qi, ki, vi = args                                                  # [Lq | Lk, Dh]

    def block(c):
      qb, start = c                                                    # [qc, Dh]
      s = (qb @ ki.T).astype(jnp.float32)                              # [qc, Lk]
      if causal:
        s = jnp.where(_causal_keep(start + jnp.arange(qc), jnp.arange(lk)), s, neg)
      m = jnp.max(s, axis=-1, keepdims=True)
      p = jnp.exp(s - m)
      total = jnp.sum(p, axis=-1, keepdims=True)
      o = (p.astype(vi.dtype) @ vi) / total.astype(vi.dtype)           # normalise [qc, Dh]
      return o, (m + jnp.log(total))[:, 0]

    o, lse = jax.lax.map(block, (qi.reshape(nq, qc, d), jnp.arange(nq, dtype=jnp.int32) * qc))
    return o.reshape(lq, d), lse.reshape(lq)

  return jax.lax.map(one_head, (q, k, v))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, causal):
  return _flash_forward(q, k, v, causal)[0]


def _flash_fwd(q, k, v, causal):
  o, lse = _flash_forward(q, k, v, causal)
  return o, (q, k, v, o, lse)


def _flash_bwd(causal, residuals, do):
  """Flash-attention backward per (head, query chunk) from the saved log-sum-exp, in the
  transposed layout: with [Lk, qc] score blocks, dV += P^T dO and dK += dS^T Q are plain
  matmuls (no transposed copies on XLA:CPU) and only dQ = dS K contracts over rows."""
  q, k, v, o, lse = residuals
  d = q.shape[-1]
  lq, lk, qc, nq = _chunks(q, k)

  def one_head(args):
    qi, ki, vi, oi, lsei, doi = args
    delta = jnp.sum(oi.astype(jnp.float32) * doi.astype(jnp.float32), axis=-1)    # [Lq]

    def block(carry, c):
      dk, dv = carry                                                   # [Lk, Dh] float32
      qb, dob, lse_b, delta_b, start = c
      s_t = (ki @ qb.T).astype(jnp.float32)                            # [Lk, qc]
      p_t = jnp.exp(s_t - lse_b[None, :])
      if causal:
        p_t = jnp.where(_causal_keep(start + jnp.arange(qc), jnp.arange(lk)).T, p_t, 0.0)
      dv = dv + (p_t.astype(dob.dtype) @ dob).astype(jnp.float32)
      dp_t = (vi @ dob.T).astype(jnp.float32)                          # [Lk, qc]
      ds_t = (p_t * (dp_t - delta_b[None, :])).astype(qb.dtype)
      dk = dk + (ds_t @ qb).astype(jnp.float32)
      return (dk, dv), ds_t.T @ ki                                     # dq block [qc, Dh]

    zeros = jnp.zeros((lk, d), jnp.float32)
    chunks = (qi.reshape(nq, qc, d), doi.reshape(nq, qc, d), lsei.reshape(nq, qc),
              delta.reshape(nq, qc), jnp.arange(nq, dtype=jnp.int32) * qc)
    (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), chunks)
    return dq.reshape(lq, d), dk.astype(ki.dtype), dv.astype(vi.dtype)

  return jax.lax.map(one_head, (q, k, v, o, lse, do))


_flash.defvjp(_flash_fwd, _flash_bwd)


def _chunked_attention(q, k, v, *, causal: bool):
  """Flash-style attention computed one (example, head, query chunk) block at a time.

  Each block's [chunk, Lk] scores (at most ~1 MiB) stay in cache; the forward pass keeps only
  the output and the row log-sum-exp, and the backward pass recomputes the probabilities of
  one block at a time from them (``_flash_bwd``) instead of storing every score matrix. On CPU,
  where attention is bound by memory traffic over the [B, H, L, L] scores, this is ~1.3x faster
  forward + backward than 'xla' (see BENCHMARKS.md). The loops are sequential (``lax.map``):
  accelerators should use 'xla' or 'dot_product_attention'.
  """
  b, lq, h, d = q.shape
  scale = jnp.asarray(d ** -0.5, q.dtype)
  per_head = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, x.shape[1], d)
  out = _flash(per_head(q * scale), per_head(k), per_head(v), causal)  # [B*H, Lq, Dh]
  return jnp.transpose(out.reshape(b, h, lq, d), (0, 2, 1, 3))


def attention(q, k, v, *, causal: bool, dropout_rng=None, dropout_rate: float = 0.0,
              impl: str = 'xla'):
  """Multi-head scaled dot-product attention.

  Args:
    q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh] (Lq may be shorter than Lk: queries for a subset
      of the tokens, e.g. the outputs a model keeps from its last block).
    causal: apply a lower-triangular mask (needs Lq == Lk).
    dropout_rng / dropout_rate: dropout on the attention probabilities (rate 0 disables).
    impl: 'xla' (explicit einsum + float32 softmax), 'dot_product_attention'
      (``jax.nn.dot_product_attention``: cuDNN flash attention on GPU), 'chunked' (one head and
      query chunk at a time, recomputed in the backward pass: fastest on CPU) or 'auto'
      ('chunked' on CPU, 'xla' elsewhere). Only 'xla' applies attention dropout; the others
      fall back to it when dropout is active.
  Returns:
    [B, Lq, H, Dh] in q's dtype.
  """
  if impl not in ATTENTION_CHOICES:
    raise ValueError(f'unknown attention impl {impl!r}; use one of {ATTENTION_CHOICES}')
  if impl == 'auto':
    impl = 'chunked' if jax.default_backend() == 'cpu' else 'xla'
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f'causal attention needs as many queries as keys, got {q.shape[1]} queries '
                     f'and {k.shape[1]} keys')
  dropout_on = dropout_rng is not None and dropout_rate > 0
  if impl == 'dot_product_attention' and not dropout_on:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal).astype(q.dtype)
  if impl == 'chunked' and not dropout_on:
    return _chunked_attention(q, k, v, causal=causal)
  return _softmax_attention(q, k, v, causal=causal, dropout_rng=dropout_rng,
                            dropout_rate=dropout_rate)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_cdf(x):
  return 0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype))


@jax.custom_vjp
def gelu(x):
  """Exact GELU written as torch's ``nn.GELU()``: x * (1 + erf(x / sqrt 2)) / 2.

  The backward pass is one fused elementwise pass, g * (Phi(x) + x * phi(x)), from the saved
  input: XLA's own derivative of ``jax.nn.gelu`` (erfc-based) takes several passes over the
  [B, L, 4D] hidden activations and made the MLP's forward + backward ~20% slower on CPU."""
  return x * _gelu_cdf(x)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(_INV_SQRT_2PI, x.dtype)
  return (g * (_gelu_cdf(x) + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


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
    h = gelu(h)
    h = constrain(h, ('batch', 'length', 'mlp'))
    out = dense(x.shape[-1], ('mlp', 'embed'), name='fc2', **kw)(h)
    return Dropout(self.dropout)(out, deterministic=deterministic)


class ViTAttention(nn.Module):
  """Bidirectional MHA with a fused bias-free qkv projection laid out [q | k | v].

  With ``out_slice=(start, stop)`` (Python slice bounds: ``(-n, None)`` is the last n tokens)
  only the tokens ``start:stop`` query (all tokens still give keys and values) and the output
  holds just those rows: the same rows as the full output, without computing the others."""
  num_heads: int
  impl: str = 'xla'
  out_slice: Optional[Tuple[int, Optional[int]]] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, l, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = dense(3 * d, ('embed', 'qkv'), use_bias=False, name='qkv', **kw)(x)
    q, k, v = jnp.split(qkv.reshape(b, l, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
    if self.out_slice is not None:
      q = q[:, self.out_slice[0]:self.out_slice[1]]
    out = attention(q, k, v, causal=False, impl=self.impl).reshape(b, q.shape[1], d)
    return dense(d, ('qkv', 'embed'), name='proj', **kw)(out)


class ViTBlock(nn.Module):
  """timm ViT block: x += Attn(LN1(x)); x += MLP(LN2(x)). No LayerScale, drop-path or dropout.

  ``out_slice=(start, stop)``: compute and return only the tokens ``start:stop`` (attending to
  all tokens), for a last block whose other outputs are discarded."""
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5
  attention_impl: str = 'xla'
  out_slice: Optional[Tuple[int, Optional[int]]] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, _=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    x = constrain(x)
    a = ViTAttention(self.num_heads, self.attention_impl, self.out_slice, name='attn', **kw)(
        layer_norm(self.norm_eps, name='norm1', **kw)(x))
    if self.out_slice is not None:
      x = x[:, self.out_slice[0]:self.out_slice[1]]
    x = x + a
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
    x = x + Dropout(self.dropout)(a, deterministic=deterministic)
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
  def __call__(self, x, out_slice: Optional[Tuple[int, Optional[int]]] = None):
    """x [B, L, D] -> [B, L, D], or only the tokens ``out_slice=(start, stop)`` of the last
    block's output. Unscanned, that block computes only those rows (the same values); with
    ``scan=True`` the full output is sliced."""
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
      return x if out_slice is None else x[:, out_slice[0]:out_slice[1]]
    for i in range(self.depth):
      last = out_slice if i == self.depth - 1 else None
      x, _ = block(name=f'blocks_{i}', out_slice=last, **kw)(x, None)
    return x


REMAT_CHOICES = ('none', 'full', 'dots')
ATTENTION_CHOICES = ('xla', 'dot_product_attention', 'chunked', 'auto')


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f'{name}={value!r} is not one of {choices}')

