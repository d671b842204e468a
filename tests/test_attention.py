"""Attention implementations agree with the reference, values and gradients; fast sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larp_jax.models import transformer
from larp_jax.models.quantizer import sample_categorical


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('length', [24, 1024 + 8, 1536])   # one chunk, odd length, 3 chunks
def test_chunked_attention_matches_reference(causal, length):
  ks = jax.random.split(jax.random.key(length), 4)
  q, k, v, dout = (jax.random.normal(kk, (2, length, 2, 8)) for kk in ks)

  def run(impl):
    out, pullback = jax.vjp(
        lambda q, k, v: transformer.attention(q, k, v, causal=causal, impl=impl), q, k, v)
    return out, pullback(dout)

  (o_ref, g_ref), (o, g) = run('xla'), run('chunked')
  np.testing.assert_allclose(o, o_ref, atol=2e-6)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_auto_attention_is_chunked_on_cpu_and_dropout_falls_back():
  q = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
  np.testing.assert_allclose(transformer.attention(q, q, q, causal=False, impl='auto'),
                             transformer.attention(q, q, q, causal=False, impl='xla'), atol=1e-6)
  with_dropout = transformer.attention(q, q, q, causal=True, impl='chunked',
                                       dropout_rng=jax.random.key(1), dropout_rate=0.5)
  np.testing.assert_allclose(with_dropout, transformer.attention(
      q, q, q, causal=True, impl='xla', dropout_rng=jax.random.key(1), dropout_rate=0.5))
  with pytest.raises(ValueError, match='attention impl'):
    transformer.attention(q, q, q, causal=False, impl='flash')


def test_sample_categorical_follows_softmax_and_skips_zero_probability():
  probs = np.array([0.1, 0.0, 0.6, 0.3])
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (100_000, 4))
  draws = np.asarray(sample_categorical(jax.random.key(0), logits))
  freq = np.bincount(draws, minlength=4) / draws.size
  np.testing.assert_allclose(freq, probs, atol=0.006)   # ~4 standard errors
  assert freq[1] == 0 and draws.dtype == np.int32
  again = np.asarray(sample_categorical(jax.random.key(0), logits))
  np.testing.assert_array_equal(draws, again)
