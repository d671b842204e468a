"""The 'chunked' attention kernel: pure-JAX flash attention with a custom VJP.

A few heads and one query chunk at a time, so each block's scores stay in cache and memory is
linear in L: the forward pass keeps the output and the row log-sum-exp, the backward pass
recomputes one block's probabilities at a time in the transposed layout. With a causal mask the
blocks above the diagonal are skipped; attention dropout is drawn inside the blocks from
counters (``attention_masks.attention_keep``: the mask of the 'xla' kernel).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from larp_jax.models.attention_masks import attention_keep, causal_keep
from larp_jax.models.dropout import drop, keep_rule


def _query_chunk(q_len: int, k_len: int, budget: int = 1 << 18) -> int:
  """Largest divisor of ``q_len`` whose [chunk, k_len] float32 scores fit in ~1 MiB."""
  target = max(1, budget // max(k_len, 1))
  best = max((c for c in range(1, min(target, q_len) + 1) if q_len % c == 0), default=q_len)
  return best if best >= 16 else q_len


def _head_group(heads: int, chunk: int, k_len: int, budget: int = 1 << 19) -> int:
  """Heads processed together (largest divisor of ``heads`` whose [group, chunk, k_len] float32
  scores fit in ~2 MiB): batched matmuls over a few heads amortise the per-iteration cost of the
  loop (on a 2-core CPU ~5% faster at the tiny bench shapes, neutral at LARP-L)."""
  per_head = max(chunk * k_len, 1)
  return max(
    g for g in range(1, heads + 1) if heads % g == 0 and g * per_head <= max(budget, per_head)
  )


def _key_extents(causal, lk, qc, nq):
  """Keys each query chunk needs: all ``lk`` (None: one ``lax.map`` over the chunks), or with a
  causal mask the static prefix up to the chunk's last row, so the masked upper triangle of
  blocks is never computed (the chunks are then unrolled)."""
  if not causal or nq == 1:
    return None
  return [min(lk, (c + 1) * qc) for c in range(nq)]


class _Plan(NamedTuple):
  """The blocking of one flash-attention call, shared by its forward and backward passes."""

  lq: int  # queries
  lk: int  # keys
  qc: int  # query chunk
  nq: int  # query chunks
  g: int  # heads per loop iteration
  extents: Optional[list]  # keys per chunk (causal, unrolled) or None (lax.map / scan)
  threshold: int  # dropout: keep bits >= threshold ...
  keep_scale: float  # ... and scale kept probabilities by this


def _plan(q, k, causal: bool, rate: float) -> _Plan:
  """Blocking of per-head [BH, L, Dh] queries and keys."""
  lq, lk = q.shape[1], k.shape[1]
  qc = _query_chunk(lq, lk)
  nq = lq // qc
  threshold, keep_scale = keep_rule(rate) if rate > 0 else (0, 1.0)
  return _Plan(
    lq,
    lk,
    qc,
    nq,
    _head_group(q.shape[0], qc, lk),
    _key_extents(causal, lk, qc, nq),
    threshold,
    keep_scale,
  )


def _grouped(x, g):
  """[BH, ...] -> [BH / g, g, ...]."""
  return x.reshape(x.shape[0] // g, g, *x.shape[1:])


def _flash_forward(q, k, v, seeds, causal, rate):
  """Softmax attention on [BH, L, Dh] (q already scaled), a few heads and one query chunk at a
  time: returns the output and the row log-sum-exp of the scores, [BH, Lq] float32. With
  ``rate > 0`` the probabilities (normalised by the undropped row sum) are dropped with
  ``attention_keep``."""
  bh, _, d = q.shape
  plan = _plan(q, k, causal, rate)
  lq, lk, qc, nq, g, extents = plan[:6]
  neg = jnp.finfo(jnp.float32).min

  def block(qb, kb, vb, start, heads):  # [g, qc | n, Dh]
    rows, cols = start + jnp.arange(qc), jnp.arange(kb.shape[1])
    s = jnp.einsum('gqd,gkd->gqk', qb, kb).astype(jnp.float32)  # [g, qc, n]
    if causal:
      s = jnp.where(causal_keep(rows, cols), s, neg)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    if rate > 0:
      keep = attention_keep(seeds, plan.threshold, heads, rows, cols, lq, lk)
      p = drop(p, keep, plan.keep_scale)
    o = jnp.einsum('gqk,gkd->gqd', p.astype(vb.dtype), vb) / total.astype(vb.dtype)
    return o, (m + jnp.log(total))[..., 0]

  def one_group(args):
    qi, ki, vi, heads = args  # [g, Lq | Lk, Dh]
    if extents is None:
      chunks = (jnp.swapaxes(qi.reshape(g, nq, qc, d), 0, 1), jnp.arange(nq, dtype=jnp.int32) * qc)
      o, lse = jax.lax.map(lambda c: block(c[0], ki, vi, c[1], heads), chunks)
      return (jnp.swapaxes(o, 0, 1).reshape(g, lq, d), jnp.swapaxes(lse, 0, 1).reshape(g, lq))
    outs = [
      block(qi[:, c * qc : (c + 1) * qc], ki[:, :n], vi[:, :n], c * qc, heads)
      for c, n in enumerate(extents)
    ]
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

  def block(qb, dob, lse_b, delta_b, kb, vb, start, heads):  # [g, qc | n, Dh]
    rows, cols = start + jnp.arange(qc), jnp.arange(kb.shape[1])
    s_t = jnp.einsum('gkd,gqd->gkq', kb, qb).astype(jnp.float32)  # [g, n, qc]
    p_t = jnp.exp(s_t - lse_b[:, None, :])
    if causal:
      p_t = jnp.where(causal_keep(rows, cols).T, p_t, 0.0)
    dp_t = jnp.einsum('gkd,gqd->gkq', vb, dob).astype(jnp.float32)
    if rate > 0:
      keep_t = jnp.swapaxes(attention_keep(seeds, plan.threshold, heads, rows, cols, lq, lk), 1, 2)
      pd_t = drop(p_t, keep_t, plan.keep_scale)
      dp_t = drop(dp_t, keep_t, plan.keep_scale)
    else:
      pd_t = p_t
    dv = jnp.einsum('gkq,gqd->gkd', pd_t.astype(dob.dtype), dob)
    ds_t = (p_t * (dp_t - delta_b[:, None, :])).astype(qb.dtype)
    dk = jnp.einsum('gkq,gqd->gkd', ds_t, qb)
    dq = jnp.einsum('gkq,gkd->gqd', ds_t, kb)
    return dq, dk.astype(jnp.float32), dv.astype(jnp.float32)

  def one_group(args):
    qi, ki, vi, oi, lsei, doi, heads = args  # [g, L, Dh], [g, L]
    delta = jnp.sum(oi.astype(jnp.float32) * doi.astype(jnp.float32), axis=-1)  # [g, Lq]
    zeros = jnp.zeros((g, lk, d), jnp.float32)
    if extents is None:

      def step(carry, c):
        qb, dob, lse_b, delta_b, start = c
        dq_b, dk_b, dv_b = block(qb, dob, lse_b, delta_b, ki, vi, start, heads)
        return (carry[0] + dk_b, carry[1] + dv_b), dq_b

      split = lambda x: jnp.swapaxes(x.reshape(g, nq, qc, *x.shape[2:]), 0, 1)
      chunks = (
        split(qi),
        split(doi),
        split(lsei),
        split(delta),
        jnp.arange(nq, dtype=jnp.int32) * qc,
      )
      (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), chunks)
      dq = jnp.swapaxes(dq, 0, 1).reshape(g, lq, d)
    else:
      dk, dv, dqs = zeros, zeros, []
      for c, n in enumerate(extents):
        r = slice(c * qc, (c + 1) * qc)
        dq_b, dk_b, dv_b = block(
          qi[:, r], doi[:, r], lsei[:, r], delta[:, r], ki[:, :n], vi[:, :n], c * qc, heads
        )
        dk, dv = dk.at[:, :n].add(dk_b), dv.at[:, :n].add(dv_b)
        dqs.append(dq_b)
      dq = jnp.concatenate(dqs, 1)
    return dq, dk.astype(ki.dtype), dv.astype(vi.dtype)

  heads = _grouped(jnp.arange(bh, dtype=jnp.int32), g)
  dq, dk, dv = jax.lax.map(
    one_group, tuple(_grouped(x, g) for x in (q, k, v, o, lse, do)) + (heads,)
  )
  return (
    dq.reshape(q.shape),
    dk.reshape(k.shape),
    dv.reshape(v.shape),
    np.zeros(seeds.shape, jax.dtypes.float0),
  )


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(q, k, v, *, causal: bool, seeds, dropout_rate: float = 0.0):
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
  scale = jnp.asarray(d**-0.5, q.dtype)
  per_head = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, x.shape[1], d)
  out = _flash(
    per_head(q * scale), per_head(k), per_head(v), seeds, causal, float(dropout_rate)
  )  # [B*H, Lq, Dh]
  return jnp.transpose(out.reshape(b, h, lq, d), (0, 2, 1, 3))
