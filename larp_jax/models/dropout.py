"""Dropout with a counter-based mask: ``counter_bits`` (a keyed hash of element indices), the
keep rule shared by every kernel (``keep_rule``: threshold and scale, also the attributes of the
C++ kernel of ``larp_jax.native``), ``dropout`` and the ``Dropout`` module."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def keep_rule(rate: float):
  """(threshold, scale): an element is kept when its 32 random bits are >= threshold, i.e. with
  probability 1 - rate to within 2^-33, and kept elements are scaled by the exact inverse of that
  probability."""
  threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
  return threshold, 2.0**32 / (2**32 - threshold)


def drop(x, keep, scale):
  """Kept elements scaled by ``scale``, dropped ones zero."""
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros_like(x))


def dropout(x, rate: float, rng):
  """Inverted dropout with a counter-based mask (``counter_bits`` of each element's flat index):
  the same mask for the same key on any device layout, and cheap to draw."""
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  threshold, scale = keep_rule(rate)
  index = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
  keep = counter_bits(dropout_seeds(rng), index) >= jnp.uint32(threshold)
  return drop(x, keep, scale)


class Dropout(nn.Module):
  """``nn.Dropout`` with the cheaper mask of ``dropout`` (same 'dropout' RNG stream)."""

  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate <= 0.0:
      return x
    return dropout(x, self.rate, self.make_rng('dropout'))
