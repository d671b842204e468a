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
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps, dtype):
  return _layer_norm_fwd(x, scale, bias, eps, dtype)[0]


def _layer_norm_fwd(x, scale, bias, eps, dtype):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
  y = (x32 - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(dtype), (x, scale, bias, mean, rstd)


def _layer_norm_bwd(eps, dtype, residuals, g):
  """dx = rstd * (g' - mean(g') - x_hat * mean(g' * x_hat)) with g' = g * scale: one fused
  pass over the rows, where XLA's own derivative of the mean/variance graph took several."""
  x, scale, bias, mean, rstd = residuals
  g = g.astype(jnp.float32)
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  gs = g * scale.astype(jnp.float32)
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - x_hat * jnp.mean(gs * x_hat, axis=-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return (dx.astype(x.dtype), jnp.sum(g * x_hat, axis=rows).astype(scale.dtype),
          jnp.sum(g, axis=rows).astype(bias.dtype))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with parameters 'scale' and 'bias' (as ``nn.LayerNorm``,
  torch's weight and bias), statistics in float32 (two-pass variance) and output in ``dtype``.

  Its custom VJP computes the input gradient in one pass over each row: forward + backward at
  [1, 2048, 768] took 4.8 ms against nn.LayerNorm's 15.4 ms on a 2-core CPU (BENCHMARKS.md)."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (d,), self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(zeros, ('norm',)), (d,),
                      self.param_dtype)
    return _layer_norm(x, scale, bias, float(self.epsilon), jnp.dtype(self.dtype))


def layer_norm(eps, *, dtype=jnp.float32, param_dtype=jnp.float32, name=None):
  return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def constrain(x, axes=('batch', 'length', 'embed')):
  """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, axes)


def _mix32(x):
  """A 32-bit integer finaliser (xor-shift-multiply, the 'lowbias32' constants): a bijection of
  uint32 whose output bits each depend on every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def counter_bits(seeds, counters):
  """Pseudo-random uint32 bits for uint32 ``counters`` under a key ``seeds`` ([2] uint32).

  A keyed hash of the counter, as GPU flash attention uses a counter-based Philox: the bits of
  any element can be recomputed from its index alone, so a blocked kernel regenerates its
  dropout mask block by block in the backward pass instead of storing it. It costs a few
  integer operations per element, ~80x less than ``jax.random.bits`` (threefry) on CPU, where
  the prior's [B, H, L, L] attention-dropout masks made threefry a visible part of a step. It is
  meant for dropout masks, not for anything that needs cryptographic randomness."""
  return _mix32(_mix32(counters ^ seeds[0]) + seeds[1])


def dropout_seeds(rng):
  """The [2] uint32 key of ``counter_bits``, drawn from a JAX PRNG key."""
  return jax.random.bits(rng, (2,), jnp.uint32)


def _keep_rule(rate: float):
  """(threshold, scale): an element is kept when its 32 random bits are >= threshold, i.e. with
  probability 1 - rate to within 2^-33, and kept elements are scaled by the exact inverse of that
  probability."""
  threshold = min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1)
  return threshold, 2.0 ** 32 / (2 ** 32 - threshold)


def _drop(x, keep, scale):
  """Kept elements scaled by ``scale``, dropped ones zero."""
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x))


def dropout(x, rate: float, rng):
  """Inverted dropout with a counter-based mask (``counter_bits`` of each element's flat index):
  the same mask for the same key on any device layout, and cheap to draw."""
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  threshold, scale = _keep_rule(rate)
  index = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
  keep = counter_bits(dropout_seeds(rng), index) >= jnp.uint32(threshold)
  return _drop(x, keep, scale)


class Dropout(nn.Module):
  """``nn.Dropout`` with the cheaper mask of ``dropout`` (same 'dropout' RNG stream)."""
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate <= 0.0:
      return x
    return dropout(x, self.rate, self.make_rng('dropout'))


def _softmax_attention(q, k, v, *, causal: bool, seeds, dropout_rate: float = 0.0):
  """Reference attention on [B, L, H, Dh]: einsum scores, float32 softmax, einsum output, and
  the counter-based attention-dropout mask of ``_attention_keep`` when ``dropout_rate > 0``."""
  b, lq, h, _ = q.shape
  lk = k.shape[1]
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * jnp.asarray(scale, q.dtype), k)
  logits = logits.astype(jnp.float32)
  if causal:
    logits = jnp.where(_causal_keep(jnp.arange(lq), jnp.arange(lk)), logits,
                       jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0:
    threshold, keep_scale = _keep_rule(dropout_rate)
    keep = _attention_keep(seeds, threshold, jnp.arange(b * h), jnp.arange(lq), jnp.arange(lk),
                           lq, lk).reshape(b, h, lq, lk)
    probs = _drop(probs, keep, keep_scale)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


def _query_chunk(q_len: int, k_len: int, budget: int = 1 << 18) -> int:
  """Largest divisor of ``q_len`` whose [chunk, k_len] float32 scores fit in ~1 MiB."""
  target = max(1, budget // max(k_len, 1))
  best = max((c for c in range(1, min(target, q_len) + 1) if q_len % c == 0), default=q_len)
  return best if best >= 16 else q_len


def _causal_keep(rows, cols):
  """[len(rows), len(cols)] bool: key ``col`` is visible from query ``row``."""
  return cols[None, :] <= rows[:, None]


def _head_group(heads: int, chunk: int, k_len: int, budget: int = 1 << 19) -> int:
  """Heads processed together (largest divisor of ``heads`` whose [group, chunk, k_len] float32
  scores fit in ~2 MiB): batched matmuls over a few heads amortise the per-iteration cost of the
  loop (on a 2-core CPU ~5% faster at the tiny bench shapes, neutral at LARP-L)."""
  per_head = max(chunk * k_len, 1)
  return max(g for g in range(1, heads + 1) if heads % g == 0 and g * per_head <= max(budget, per_head))


def _key_extents(causal, lk, qc, nq):
  """Keys each query chunk needs: all ``lk`` (None: one ``lax.map`` over the chunks), or with a
  causal mask the static prefix up to the chunk's last row, so the masked upper triangle of
  blocks is never computed (the chunks are then unrolled)."""
  if not causal or nq == 1:
    return None
  return [min(lk, (c + 1) * qc) for c in range(nq)]


def _attention_keep(seeds, threshold, heads, rows, cols, q_len, k_len):
  """Attention-dropout keep mask [len(heads), len(rows), len(cols)] of the flat
  (batch * num_heads + head) indices ``heads``: the bits of element (head, row, col) are
  ``counter_bits`` of (head * q_len + row) * k_len + col, so the 'xla' and 'chunked' kernels
  draw the same mask."""
  u = lambda x: jnp.asarray(x).astype(jnp.uint32)
  index = ((u(heads)[:, None, None] * jnp.uint32(q_len) + u(rows)[None, :, None])
           * jnp.uint32(k_len) + u(cols)[None, None, :])
  return counter_bits(seeds, index) >= jnp.uint32(threshold)


class _Plan(NamedTuple):
  """The blocking of one flash-attention call, shared by its forward and backward passes."""
  lq: int                       # queries
  lk: int                       # keys
  qc: int                       # query chunk
  nq: int                       # query chunks
  g: int                        # heads per loop iteration
  extents: Optional[list]       # keys per chunk (causal, unrolled) or None (lax.map / scan)
  threshold: int                # dropout: keep bits >= threshold ...
  keep_scale: float             # ... and scale kept probabilities by this


def _plan(q, k, causal: bool, rate: float) -> _Plan:
  """Blocking of per-head [BH, L, Dh] queries and keys."""
  lq, lk = q.shape[1], k.shape[1]
  qc = _query_chunk(lq, lk)
  nq = lq // qc
  threshold, keep_scale = _keep_rule(rate) if rate > 0 else (0, 1.0)
  return _Plan(lq, lk, qc, nq, _head_group(q.shape[0], qc, lk), _key_extents(causal, lk, qc, nq),
               threshold, keep_scale)


def _grouped(x, g):
  """[BH, ...] -> [BH / g, g, ...]."""
  return x.reshape(x.shape[0] // g, g, *x.shape[1:])


def _flash_forward(q, k, v, seeds, causal, rate):
  """Softmax attention on [BH, L, Dh] (q already scaled), a few heads and one query chunk at a
  time: returns the output and the row log-sum-exp of the scores, [BH, Lq] float32. With
  ``rate > 0`` the probabilities (normalised by the undropped row sum) are dropped with
  ``_attention_keep``."""
  bh, _, d = q.shape
  plan = _plan(q, k, causal, rate)
  lq, lk, qc, nq, g, extents = plan[:6]
  neg = jnp.finfo(jnp.float32).min

  def block(qb, kb, vb, start, heads):                                 # [g, qc | n, Dh]
    rows, cols = start + jnp.arange(qc), jnp.arange(kb.shape[1])
    s = jnp.einsum('gqd,gkd->gqk', qb, kb).astype(jnp.float32)         # [g, qc, n]
    if causal:
      s = jnp.where(_causal_keep(rows, cols), s, neg)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    if rate > 0:
      keep = _attention_keep(seeds, plan.threshold, heads, rows, cols, lq, lk)
      p = _drop(p, keep, plan.keep_scale)
    o = jnp.einsum('gqk,gkd->gqd', p.astype(vb.dtype), vb) / total.astype(vb.dtype)
    return o, (m + jnp.log(total))[..., 0]

  def one_group(args):
    qi, ki, vi, heads = args                                           # [g, Lq | Lk, Dh]
    if extents is None:
      chunks = (jnp.swapaxes(qi.reshape(g, nq, qc, d), 0, 1), jnp.arange(nq, dtype=jnp.int32) * qc)
      o, lse = jax.lax.map(lambda c: block(c[0], ki, vi, c[1], heads), chunks)
      return (jnp.swapaxes(o, 0, 1).reshape(g, lq, d), jnp.swapaxes(lse, 0, 1).reshape(g, lq))
    outs = [block(qi[:, c * qc:(c + 1) * qc], ki[:, :n], vi[:, :n], c * qc, heads)
            for c, n in enumerate(extents)]
    return (jnp.concatenate([o for o, _ in outs], 1), jnp.concatenate([s for _, s in outs], 1))

  heads = _grouped(jnp.arange(bh, dtype=jnp.int32), g)
  o, lse = jax.lax.map(one_group, (_grouped(q, g), _grouped(k, g), _grouped(v, g), heads))
  return o.reshape(bh, lq, d), lse.reshape(bh, lq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, seeds, causal, rate):
  return _flash_forward(q, k, v, seeds, causal, rate)[0]


def _flash_fwd(q, k, v, seeds, causal, rate):
  o, lse = _flash_forward(q, k, v, seeds, causal, rate)
  return o, (q, k, v, seeds, o, lse)


def _flash_bwd(causal, rate, residuals, do):
  """Flash-attention backward per (head group, query chunk) from the saved log-sum-exp, in the
  transposed layout: with [Lk, qc] score blocks, dV += P^T dO and dK += dS^T Q are plain
  matmuls (no transposed copies on XLA:CPU) and only dQ = dS K contracts over rows. Dropout
  masks are regenerated from their counters; with the dropped output O, the softmax term
  rowsum(P * dP) is still rowsum(O * dO)."""
  q, k, v, seeds, o, lse = residuals
  bh, _, d = q.shape
  plan = _plan(q, k, causal, rate)
  lq, lk, qc, nq, g, extents = plan[:6]

  def block(qb, dob, lse_b, delta_b, kb, vb, start, heads):            # [g, qc | n, Dh]
    rows, cols = start + jnp.arange(qc), jnp.arange(kb.shape[1])
    s_t = jnp.einsum('gkd,gqd->gkq', kb, qb).astype(jnp.float32)       # [g, n, qc]
    p_t = jnp.exp(s_t - lse_b[:, None, :])
    if causal:
      p_t = jnp.where(_causal_keep(rows, cols).T, p_t, 0.0)
    dp_t = jnp.einsum('gkd,gqd->gkq', vb, dob).astype(jnp.float32)
    if rate > 0:
      keep_t = jnp.swapaxes(_attention_keep(seeds, plan.threshold, heads, rows, cols, lq, lk), 1, 2)
      pd_t = _drop(p_t, keep_t, plan.keep_scale)
      dp_t = _drop(dp_t, keep_t, plan.keep_scale)
    else:
      pd_t = p_t
    dv = jnp.einsum('gkq,gqd->gkd', pd_t.astype(dob.dtype), dob)
    ds_t = (p_t * (dp_t - delta_b[:, None, :])).astype(qb.dtype)
    dk = jnp.einsum('gkq,gqd->gkd', ds_t, qb)
    dq = jnp.einsum('gkq,gkd->gqd', ds_t, kb)
    return dq, dk.astype(jnp.float32), dv.astype(jnp.float32)

  def one_group(args):
    qi, ki, vi, oi, lsei, doi, heads = args                            # [g, L, Dh], [g, L]
    delta = jnp.sum(oi.astype(jnp.float32) * doi.astype(jnp.float32), axis=-1)    # [g, Lq]
    zeros = jnp.zeros((g, lk, d), jnp.float32)
    if extents is None:
      def step(carry, c):
        qb, dob, lse_b, delta_b, start = c
        dq_b, dk_b, dv_b = block(qb, dob, lse_b, delta_b, ki, vi, start, heads)
        return (carry[0] + dk_b, carry[1] + dv_b), dq_b
      split = lambda x: jnp.swapaxes(x.reshape(g, nq, qc, *x.shape[2:]), 0, 1)
      chunks = (split(qi), split(doi), split(lsei), split(delta),
                jnp.arange(nq, dtype=jnp.int32) * qc)
      (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), chunks)
      dq = jnp.swapaxes(dq, 0, 1).reshape(g, lq, d)
    else:
      dk, dv, dqs = zeros, zeros, []
      for c, n in enumerate(extents):
        r = slice(c * qc, (c + 1) * qc)
        dq_b, dk_b, dv_b = block(qi[:, r], doi[:, r], lsei[:, r], delta[:, r], ki[:, :n],
                                 vi[:, :n], c * qc, heads)
        dk, dv = dk.at[:, :n].add(dk_b), dv.at[:, :n].add(dv_b)
        dqs.append(dq_b)
      dq = jnp.concatenate(dqs, 1)
    return dq, dk.astype(ki.dtype), dv.astype(vi.dtype)

  heads = _grouped(jnp.arange(bh, dtype=jnp.int32), g)
  dq, dk, dv = jax.lax.map(one_group, tuple(_grouped(x, g) for x in (q, k, v, o, lse, do))
                           + (heads,))
  return (dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape),
          np.zeros(seeds.shape, jax.dtypes.float0))


_flash.defvjp(_flash_fwd, _flash_bwd)


def _chunked_attention(q, k, v, *, causal: bool, seeds, dropout_rate: float = 0.0):
  """Flash-style attention computed one (example, head, query chunk) block at a time.

  Each block's [chunk, Lk] scores (at most ~1 MiB) stay in cache; the forward pass keeps only
  the output and the row log-sum-exp, and the backward pass recomputes the probabilities of
  one block at a time from them (``_flash_bwd``) instead of storing every score matrix. With a
  causal mask the blocks above the diagonal are skipped, and attention dropout is drawn inside
  the blocks from counters (the same mask as 'xla'). On a 2-core CPU with the malloc tunables of
  ``larp_jax.host_malloc``, at [1, 2048, 12, 64] it takes 15-28% less time than 'xla' forward
  and from 2% less to 17% more forward + backward in isolation (it recomputes the
  probabilities); the tiny generator step was no faster with 'xla'; with the prior's causal
  dropout it is 1.65x faster forward and 1.35x forward + backward. Its memory does not grow
  with L^2, where 'xla' stores every [B, H, L, L] probability matrix for the backward pass (the
  LARP-L generator step needs 6.9 GB with 'chunked', 19.6 GB with 'xla'). See BENCHMARKS.md and
  ``python -m larp_jax.bench_attention``. The loops are sequential (``lax.map``): accelerators
  should use 'xla' or 'dot_product_attention'.
  """
  b, lq, h, d = q.shape
  scale = jnp.asarray(d ** -0.5, q.dtype)
  per_head = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, x.shape[1], d)
  out = _flash(per_head(q * scale), per_head(k), per_head(v), seeds, causal,
               float(dropout_rate))                                    # [B*H, Lq, Dh]
  return jnp.transpose(out.reshape(b, h, lq, d), (0, 2, 1, 3))


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
    from larp_jax.native import flash_attention as native
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
    from larp_jax.native import flash_attention as native
    why = native.cannot_run(q, k, v)
    if why and requested == 'auto':
      return 'chunked'
    if why:
      raise ValueError(f"attention impl 'cpu_flash' cannot run here: {why}. Use "
                       "attention_impl='auto' or 'chunked'.")
  return impl


def attention(q, k, v, *, causal: bool, dropout_rng=None, dropout_rate: float = 0.0,
              impl: str = 'xla'):
  """Multi-head scaled dot-product attention.

  Args:
    q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh] (Lq may be shorter than Lk: queries for a subset
      of the tokens, e.g. the outputs a model keeps from its last block).
    causal: apply a lower-triangular mask (needs Lq == Lk).
    dropout_rng / dropout_rate: dropout on the attention probabilities (rate 0 disables). The
      mask is counter-based (``_attention_keep``): 'xla' and 'chunked' drop the same elements.
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
    raise ValueError(f'causal attention needs as many queries as keys, got {q.shape[1]} queries '
                     f'and {k.shape[1]} keys')
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
    return _chunked_attention(q, k, v, causal=causal, seeds=seeds, dropout_rate=rate)
  if impl == 'cpu_flash':
    from larp_jax.native import flash_attention as native
    return native.flash_attention(q, k, v, seeds, causal, rate)
  return _softmax_attention(q, k, v, causal=causal, seeds=seeds, dropout_rate=rate)


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
  attention_impl: str = 'xla'
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
    a = attention(q, k, v, causal=True, dropout_rng=rng, dropout_rate=self.dropout,
                  impl=self.attention_impl)
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
ATTENTION_CHOICES = ('xla', 'dot_product_attention', 'chunked', 'cpu_flash', 'auto')


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f'{name}={value!r} is not one of {choices}')

