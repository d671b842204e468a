"""Fast kernels agree with their references: attention (values, gradients), sampling, top-k."""

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


def test_label_rank_gives_the_top_k_accuracies_of_lax_top_k():
  from larp_jax.models.prior import label_rank
  logits = jax.random.normal(jax.random.key(0), (3, 50, 64))
  labels = jax.random.randint(jax.random.key(1), (3, 50), 0, 64)
  rank = label_rank(logits, labels)
  top5 = jax.lax.top_k(logits, 5)[1]
  np.testing.assert_array_equal(rank < 1, top5[..., 0] == labels)
  np.testing.assert_array_equal(rank < 5, jnp.any(top5 == labels[..., None], -1))
  assert 0 < float(jnp.mean(rank < 5)) < 1             # both outcomes occur


@pytest.mark.parametrize('impl', ['xla', 'chunked'])
@pytest.mark.parametrize('out_slice', [(0, 1), (16, 40), (-24, None)])
def test_vit_stack_out_slice_equals_slicing_the_full_output(impl, out_slice):
  """The last block computing only the kept rows gives the rows (and gradients) of the full
  computation; the encoder keeps its query outputs, the decoder its patch queries and the
  discriminator its CLS token this way."""
  stack = transformer.ViTStack(depth=2, num_heads=2, attention_impl=impl)
  x = jax.random.normal(jax.random.key(0), (2, 40, 16))
  params = stack.init(jax.random.key(1), x)
  a, b = out_slice
  full = lambda p, x: stack.apply(p, x)[:, a:b]
  part = lambda p, x: stack.apply(p, x, out_slice=out_slice)
  np.testing.assert_allclose(part(params, x), full(params, x), atol=1e-5)
  gf, gp = (jax.grad(lambda p, x, f=f: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1))(params, x)
            for f in (full, part))
  for u, w in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gp)):
    np.testing.assert_allclose(u, w, atol=1e-5)


def test_gelu_matches_jax_exact_gelu_values_and_gradients():
  x = jnp.concatenate([jnp.linspace(-9.0, 9.0, 1001), jax.random.normal(jax.random.key(0), (999,))])
  np.testing.assert_allclose(transformer.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
  grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.cos(x) * f(x)))(x)
  np.testing.assert_allclose(grad(transformer.gelu),
                             grad(lambda x: jax.nn.gelu(x, approximate=False)), atol=1e-6)


def test_dropout_drops_at_the_rate_and_keeps_the_mean():
  x = jnp.ones((400, 1000))
  y = np.asarray(transformer.dropout(x, 0.1, jax.random.key(0)))
  dropped = np.mean(y == 0)
  assert abs(dropped - 0.1) < 0.0015                       # ~3 standard errors of 4e5 draws
  assert abs(y.mean() - 1.0) < 0.005 and np.allclose(y[y != 0], 1 / (1 - 6554 / 65536))
  np.testing.assert_array_equal(y, transformer.dropout(x, 0.1, jax.random.key(0)))
  assert not np.array_equal(y, transformer.dropout(x, 0.1, jax.random.key(1)))
  np.testing.assert_array_equal(transformer.dropout(x, 0.0, jax.random.key(0)), x)
