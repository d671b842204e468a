"""PSNR / MSE / SSIM against hand-computed values and a direct numpy SSIM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larp_jax.evaluation import recon_metrics as rm


def test_psnr_constant_offset():
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 3, 16, 16, 3)) * 0.8
  y = x.at[0].add(0.1).at[1].add(0.05)
  np.testing.assert_allclose(rm.mse(x, y), [0.01, 0.0025], rtol=1e-4)
  np.testing.assert_allclose(rm.psnr(x, y), [20.0, -10 * np.log10(0.0025)], rtol=1e-4)


def test_psnr_identical_is_finite_floor():
  x = jnp.full((1, 2, 8, 8, 3), 0.3)
  p = rm.psnr(x, x)
  assert np.isfinite(float(p[0])) and abs(float(p[0]) - 100.0) < 1e-3


def test_psnr_uint8_and_jit():
  x = np.zeros((1, 2, 8, 8, 3), np.uint8)
  y = np.full((1, 2, 8, 8, 3), 255, np.uint8)
  assert abs(float(jax.jit(rm.psnr)(x, y)[0])) < 1e-5  # MSE 1 -> 0 dB


def test_ssim_identical_is_one():
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 2, 24, 24, 3))
  np.testing.assert_allclose(rm.ssim(x, x), [1.0, 1.0], atol=1e-5)


def test_ssim_constant_images_closed_form():
  # Constant frames a, b: variances and covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
  a, b = 0.2, 0.7
  c1 = 0.01**2
  x = jnp.full((1, 2, 16, 16, 3), a)
  y = jnp.full((1, 2, 16, 16, 3), b)
  expect = (2 * a * b + c1) / (a * a + b * b + c1)
  np.testing.assert_allclose(rm.ssim(x, y), [expect], rtol=1e-4)


def _ssim_numpy(x, y):
  """Direct (non-separable, loop) numpy SSIM for one HWC image, 'valid' Gaussian window."""
  g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
  w = np.outer(g, g)
  w /= w.sum()
  c1, c2 = 0.01**2, 0.03**2
  h, wd, ch = x.shape
  vals = []
  for c in range(ch):
    for i in range(h - 10):
      for j in range(wd - 10):
        px = x[i : i + 11, j : j + 11, c].astype(np.float64)
        py = y[i : i + 11, j : j + 11, c].astype(np.float64)
        mx, my = (w * px).sum(), (w * py).sum()
        vx = (w * px * px).sum() - mx**2
        vy = (w * py * py).sum() - my**2
        cxy = (w * px * py).sum() - mx * my
        vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
  return float(np.mean(vals))


def test_ssim_matches_direct_numpy():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(1, 2, 16, 18, 3)).astype(np.float32)
  y = np.clip(x + 0.2 * rng.normal(size=x.shape), 0, 1).astype(np.float32)
  y[0, 1] = np.clip(x[0, 1] * 0.5 + 0.3, 0, 1)
  expect = np.mean([_ssim_numpy(x[0, t], y[0, t]) for t in range(2)])
  got = float(jax.jit(rm.ssim)(x, y)[0])
  assert abs(got - expect) < 1e-5, (got, expect)
  assert got < 0.9


def test_ssim_too_small_raises():
  with pytest.raises(ValueError):
    rm.ssim(jnp.zeros((1, 1, 8, 8, 3)), jnp.zeros((1, 1, 8, 8, 3)))


def test_shape_mismatch_raises():
  with pytest.raises(ValueError):
    rm.psnr(jnp.zeros((1, 2, 8, 8, 3)), jnp.zeros((1, 3, 8, 8, 3)))
