"""Fast kernels agree with their references: attention (values, gradients), sampling, top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larp_jax.models import attention, dropout, layers, vit
from tests.conftest import assert_vjp_close
from larp_jax.models.quantizer import sample_categorical


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('length', [24, 1024 + 8, 1536])  # one chunk, odd length, 3 chunks
@pytest.mark.parametrize('rate', [0.0, 0.3])
def test_chunked_attention_matches_reference(causal, length, rate):
  """Values and gradients of the flash kernel against the einsum reference, with the causal
  mask (blocks above the diagonal skipped) and with attention dropout (the same counter-based
  mask in both)."""
  ks = jax.random.split(jax.random.key(length), 4)
  q, k, v, dout = (jax.random.normal(kk, (2, length, 2, 8)) for kk in ks)

  def run(impl):
    out, pullback = jax.vjp(
      lambda q, k, v: attention.attention(
        q, k, v, causal=causal, impl=impl, dropout_rng=jax.random.key(3), dropout_rate=rate
      ),
      q,
      k,
      v,
    )
    return out, pullback(dout)

  got = run('chunked')
  o = got[0]
  assert_vjp_close(got, run('xla'), atol_out=2e-6, atol_grad=2e-5)
  if rate:
    no_drop = attention.attention(q, k, v, causal=causal, impl='chunked')
    assert not np.allclose(o, no_drop, atol=1e-3)  # the mask did act


def test_attention_dropout_mask_rate_and_causal_rows():
  """Dropped probabilities are zero at the rate; a row's kept weights are rescaled by
  1 / (1 - rate), and masked (future) keys never leak in."""
  rate, length = 0.25, 64
  v = jnp.eye(length)[None, :, None, :]  # value j = one-hot j: output = P row
  q = jnp.zeros((1, length, 1, length))  # equal scores: P = 1 / (row + 1)
  for impl in ('xla', 'chunked'):
    p = np.asarray(
      attention.attention(
        q, q, v, causal=True, impl=impl, dropout_rate=rate, dropout_rng=jax.random.key(0)
      )
    )[0, :, 0]
    assert np.all(np.triu(p, 1) == 0)
    lower = p[np.tril_indices(length)]
    assert abs(np.mean(lower == 0) - rate) < 0.04
    expected = (1 / (1 - rate)) / (np.arange(length) + 1)
    np.testing.assert_allclose(
      np.where(p > 0, p, np.nan),
      np.broadcast_to(expected[:, None], p.shape) * np.where(p > 0, 1, np.nan),
      rtol=1e-5,
    )


def test_auto_attention_matches_xla():
  q = jax.random.normal(jax.random.key(0), (1, 16, 2, 16))  # head dim 16: 'cpu_flash' on CPU
  np.testing.assert_allclose(
    attention.attention(q, q, q, causal=False, impl='auto'),
    attention.attention(q, q, q, causal=False, impl='xla'),
    atol=1e-6,
  )
  np.testing.assert_array_equal(
    attention.attention(
      q, q, q, causal=True, impl='chunked', dropout_rng=jax.random.key(1), dropout_rate=1.0
    ),
    0,
  )
  with pytest.raises(ValueError, match='attention impl'):
    attention.attention(q, q, q, causal=False, impl='flash')


def test_sample_categorical_follows_softmax_and_skips_zero_probability():
  probs = np.array([0.1, 0.0, 0.6, 0.3])
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (100_000, 4))
  draws = np.asarray(sample_categorical(jax.random.key(0), logits))
  freq = np.bincount(draws, minlength=4) / draws.size
  np.testing.assert_allclose(freq, probs, atol=0.006)  # ~4 standard errors
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
  assert 0 < float(jnp.mean(rank < 5)) < 1  # both outcomes occur


@pytest.mark.parametrize('impl', ['xla', 'chunked'])
@pytest.mark.parametrize('out_slice', [(0, 1), (16, 40), (-24, None)])
def test_vit_stack_out_slice_equals_slicing_the_full_output(impl, out_slice):
  """The last block computing only the kept rows gives the rows (and gradients) of the full
  computation; the encoder keeps its query outputs, the decoder its patch queries and the
  discriminator its CLS token this way."""
  stack = vit.ViTStack(depth=2, num_heads=2, attention_impl=impl)
  x = jax.random.normal(jax.random.key(0), (2, 40, 16))
  params = stack.init(jax.random.key(1), x)
  a, b = out_slice
  full = lambda p, x: stack.apply(p, x)[:, a:b]
  part = lambda p, x: stack.apply(p, x, out_slice=out_slice)
  np.testing.assert_allclose(part(params, x), full(params, x), atol=1e-5)
  gf, gp = (
    jax.grad(lambda p, x, f=f: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1))(params, x)
    for f in (full, part)
  )
  for u, w in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gp)):
    np.testing.assert_allclose(u, w, atol=1e-5)


def test_gelu_matches_jax_exact_gelu_values_and_gradients():
  x = jnp.concatenate([jnp.linspace(-9.0, 9.0, 1001), jax.random.normal(jax.random.key(0), (999,))])
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
  grad = lambda f: jax.grad(lambda x: jnp.sum(jnp.cos(x) * f(x)))(x)
  np.testing.assert_allclose(
    grad(layers.gelu), grad(lambda x: jax.nn.gelu(x, approximate=False)), atol=1e-6
  )


def test_dropout_drops_at_the_rate_and_keeps_the_mean():
  x = jnp.ones((400, 1000))
  y = np.asarray(dropout.dropout(x, 0.1, jax.random.key(0)))
  keep = y != 0
  assert abs(np.mean(~keep) - 0.1) < 0.0015  # ~3 standard errors of 4e5 draws
  assert abs(y.mean() - 1.0) < 0.005 and np.allclose(y[keep], 1 / 0.9)
  # Neighbouring counters give independent draws: P(both kept) = 0.9^2 along rows and columns.
  assert abs(np.mean(keep[:, 1:] & keep[:, :-1]) - 0.81) < 0.003
  assert abs(np.mean(keep[1:] & keep[:-1]) - 0.81) < 0.003
  np.testing.assert_array_equal(y, dropout.dropout(x, 0.1, jax.random.key(0)))
  other = np.asarray(dropout.dropout(x, 0.1, jax.random.key(1))) != 0
  assert abs(np.mean(keep & other) - 0.81) < 0.003  # another key: an independent mask
  np.testing.assert_array_equal(dropout.dropout(x, 0.0, jax.random.key(0)), x)
  np.testing.assert_array_equal(dropout.dropout(x, 1.0, jax.random.key(0)), 0)


def test_prior_attention_impls_agree_in_training_mode():
  """The prior's GPT blocks with dropout on: 'chunked' and 'xla' give the same predictions and
  gradients for the same 'dropout' key."""
  from larp_jax.models.prior import PriorGPT

  x = jax.random.normal(jax.random.key(0), (2, 40, 4))
  make = lambda impl: PriorGPT(
    depth=2, num_heads=2, width=16, max_len=40, input_dim=4, dropout=0.2, attention_impl=impl
  )
  params = make('xla').init(jax.random.key(1), x, deterministic=True)

  def loss(p, impl):
    out = make(impl).apply(p, x, deterministic=False, rngs={'dropout': jax.random.key(2)})
    return jnp.sum(jnp.sin(out))

  (lx, gx), (lc, gc) = (jax.value_and_grad(loss)(params, impl) for impl in ('xla', 'chunked'))
  np.testing.assert_allclose(lc, lx, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(gc), jax.tree_util.tree_leaves(gx)):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, np.max(np.abs(b))))  # sum order


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax_values_and_gradients(dtype):
  """The custom-VJP LayerNorm against flax's nn.LayerNorm: same parameters (names, init), same
  outputs and gradients for the input, scale and bias."""
  import flax.linen as nn

  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (3, 40, 32))
  w = jax.random.normal(jax.random.key(1), x.shape)
  ours, ref = (layers.LayerNorm(epsilon=1e-6, dtype=dtype), nn.LayerNorm(epsilon=1e-6, dtype=dtype))
  params = ref.init(jax.random.key(2), x)
  assert jax.tree_util.tree_structure(
    nn.unbox(ours.init(jax.random.key(2), x))
  ) == jax.tree_util.tree_structure(params)
  params = jax.tree_util.tree_map(  # non-trivial scale and bias
    lambda p: p + jax.random.normal(jax.random.key(3), p.shape), params
  )
  for m in (ours, ref):
    assert m.apply(params, x).dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(
    np.asarray(ours.apply(params, x), np.float32),
    np.asarray(ref.apply(params, x), np.float32),
    atol=tol,
    rtol=tol,
  )
  loss = lambda m: lambda p, x: jnp.sum(m.apply(p, x).astype(jnp.float32) * w)
  for a, b in zip(
    jax.tree_util.tree_leaves(jax.grad(loss(ours), argnums=(0, 1))(params, x)),
    jax.tree_util.tree_leaves(jax.grad(loss(ref), argnums=(0, 1))(params, x)),
  ):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(
      np.asarray(a, np.float32),
      np.asarray(b, np.float32),
      atol=tol * max(1.0, float(np.max(np.abs(np.asarray(b, np.float32))))),
    )
