"""Reconstruction metrics for videos: MSE, PSNR and SSIM (pure jnp, jittable, float32).

Videos are [B,T,H,W,C] in [0,1] (integer inputs are divided by 255). Every function returns one
value per video, shape [B]; average over the batch (or over the dataset) yourself.

* `mse(x, y)`  : mean squared error over T,H,W,C.
* `psnr(x, y)` : -10 log10(mse) per video (the LARP rFVD-script definition, data range 1). The MSE is
  clipped from below at `MSE_FLOOR` = 1e-10 so identical videos give a finite 100 dB instead of inf.
* `ssim(x, y)` : Wang et al. SSIM per frame, Gaussian window 11x11 with sigma 1.5, K1=0.01,
  K2=0.03, data range 1, 'valid' filtering (no padding; as pytorch_msssim and skimage with
  gaussian_weights=True, use_sample_covariance=False), computed per channel, averaged over the
  SSIM map and the channels, then averaged over the frames of each video. Frames must be at least
  11x11. (The LARP evaluation script does not report SSIM; see the official `eval/eval_larp_tokenizer.py`.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from larp_jax import errors

MSE_FLOOR = 1e-10
SSIM_WIN = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _to_unit(x) -> jnp.ndarray:
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.integer):
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


def _check_pair(x, y, ndim=5):
  if x.shape != y.shape or x.ndim != ndim:
    raise ValueError(f'expected two [B,T,H,W,C] arrays of equal shape, got {x.shape} and {y.shape}')


def mse(x, y) -> jnp.ndarray:
  """Per-video MSE over T,H,W,C: [B,T,H,W,C] x2 -> float32 [B]."""
  x, y = _to_unit(x), _to_unit(y)
  _check_pair(x, y)
  return jnp.mean((x - y) ** 2, axis=(1, 2, 3, 4))


def psnr(x, y, floor: float = MSE_FLOOR) -> jnp.ndarray:
  """Per-video PSNR in dB for data range 1: -10 log10(max(MSE, floor)) -> float32 [B]."""
  return -10.0 * jnp.log10(jnp.maximum(mse(x, y), floor))


def gaussian_window_1d(size: int = SSIM_WIN, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """Normalised 1D Gaussian (the 2D window is its outer product)."""
  c = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-(c**2) / (2.0 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _filter_valid(img: jnp.ndarray, g: np.ndarray) -> jnp.ndarray:
  """Separable Gaussian, 'valid': img [N,H,W,C] -> [N,H-w+1,W-w+1,C] (depthwise)."""
  c = img.shape[-1]
  k = jnp.asarray(g)
  kh = jnp.tile(k.reshape(-1, 1, 1, 1), (1, 1, 1, c))  # HWIO, feature_group_count=C
  kw = jnp.tile(k.reshape(1, -1, 1, 1), (1, 1, 1, c))
  dn = ('NHWC', 'HWIO', 'NHWC')
  hp = jax.lax.Precision.HIGHEST
  out = jax.lax.conv_general_dilated(
    img, kh, (1, 1), 'VALID', dimension_numbers=dn, feature_group_count=c, precision=hp
  )
  return jax.lax.conv_general_dilated(
    out, kw, (1, 1), 'VALID', dimension_numbers=dn, feature_group_count=c, precision=hp
  )


def ssim_frames(
  x,
  y,
  data_range: float = 1.0,
  win_size: int = SSIM_WIN,
  sigma: float = SSIM_SIGMA,
  k1: float = SSIM_K1,
  k2: float = SSIM_K2,
) -> jnp.ndarray:
  """SSIM per image: [N,H,W,C] x2 -> float32 [N] (mean over the valid SSIM map and channels)."""
  x, y = _to_unit(x), _to_unit(y)
  _check_pair(x, y, ndim=4)
  if min(x.shape[1], x.shape[2]) < win_size:
    raise errors.ConfigError(
      f'SSIM needs frames of at least {win_size}x{win_size}, got {x.shape[1:3]}'
    )
  g = gaussian_window_1d(win_size, sigma)
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  mu_x = _filter_valid(x, g)
  mu_y = _filter_valid(y, g)
  var_x = _filter_valid(x * x, g) - mu_x**2
  var_y = _filter_valid(y * y, g) - mu_y**2
  cov = _filter_valid(x * y, g) - mu_x * mu_y
  lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
  cs = (2 * cov + c2) / (var_x + var_y + c2)
  return jnp.mean(lum * cs, axis=(1, 2, 3))


def ssim(x, y, data_range: float = 1.0) -> jnp.ndarray:
  """Per-video SSIM: per-frame SSIM averaged over frames, [B,T,H,W,C] x2 -> float32 [B]."""
  x, y = _to_unit(x), _to_unit(y)
  _check_pair(x, y)
  b, t = x.shape[:2]
  s = ssim_frames(
    x.reshape((b * t,) + x.shape[2:]), y.reshape((b * t,) + y.shape[2:]), data_range=data_range
  )
  return jnp.mean(s.reshape(b, t), axis=1)


def recon_metrics(x, y) -> dict:
  """All three per-video metrics at once: {'mse': [B], 'psnr': [B], 'ssim': [B]}."""
  return {'mse': mse(x, y), 'psnr': psnr(x, y), 'ssim': ssim(x, y)}
