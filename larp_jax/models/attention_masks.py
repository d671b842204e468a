"""The masks every attention kernel shares: causal visibility and the counter-based
attention-dropout keep mask ('xla', 'chunked' and the C++ 'cpu_flash' drop the same elements)."""

from __future__ import annotations

import jax.numpy as jnp

from larp_jax.models.dropout import counter_bits


def causal_keep(rows, cols):
  """[len(rows), len(cols)] bool: key ``col`` is visible from query ``row``."""
  return cols[None, :] <= rows[:, None]


def attention_keep(seeds, threshold, heads, rows, cols, q_len, k_len):
  """Attention-dropout keep mask [len(heads), len(rows), len(cols)] of the flat
  (batch * num_heads + head) indices ``heads``: the bits of element (head, row, col) are
  ``counter_bits`` of (head * q_len + row) * k_len + col, so the 'xla' and 'chunked' kernels
  draw the same mask."""
  u = lambda x: jnp.asarray(x).astype(jnp.uint32)
  index = (u(heads)[:, None, None] * jnp.uint32(q_len) + u(rows)[None, :, None]) * jnp.uint32(
    k_len
  ) + u(cols)[None, None, :]
  return counter_bits(seeds, index) >= jnp.uint32(threshold)
