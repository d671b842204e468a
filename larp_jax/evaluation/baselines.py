"""Trivial-code baselines for the reconstruction metrics: the PSNR / MSE a tokenizer must beat.

Each baseline reconstructs the evaluated clips from a trivial code, and is scored with the
tokenizer's protocol (``larp_jax/evaluation/recon_metrics.py``): per video
``-10 log10(max(MSE, MSE_FLOOR))`` with data range 1 and the reconstruction clamped to [0, 1],
then the mean over the clips; the MSE is averaged over the clips too. ``MSE_FLOOR`` = 1e-10, so an
exact reconstruction is 100 dB (JSON has no inf), as for the tokenizer.

* ``dataset_mean``: the mean over the evaluated clips of every pixel of every frame, the same
  video for every clip. An oracle (fitted on the clips it is scored on), 0 numbers per clip.
* ``clip_mean``: each clip's mean RGB colour, 3 numbers per clip.
* ``patch_mean``: each 3D patch's mean RGB colour, with the model's ``patch_size`` (kt, kh, kw)
  (``larp_jax/models/patches.py``), 3 numbers per patch.
* ``pca<k>``: continuous PCA of the patches flattened to kt*kh*kw*3 vectors in the order of
  ``patches.patchify``, mean-centred, fitted on the patches of the evaluated clips themselves; the
  reconstruction keeps the top-k components, k numbers per patch. An oracle ceiling: a quantized
  code of the same size is not expected to pass it (at k=16 certainly not). k is capped at
  kt*kh*kw*3 (the reported 'components').

Two passes over the clips: ``sufficient_stats`` (float64 sums of the clips, of the patch vectors
and of their outer products; a plain sum merges shards of the clips, e.g. over processes), then
``fit`` (mean video, patch mean, PCA bases from ``eigh`` of the covariance), then ``error_sums``
(per-clip MSE and PSNR of every baseline, summed). ``baseline_metrics`` runs all three with an
optional ``all_sum`` between them, which makes a multi-host evaluation exact: every process fits
the same model from the summed statistics and scores its own clips. All arithmetic is numpy
float64, chunked to about ``CHUNK_VALUES`` values, so the clips can stay uint8 in memory.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np

from larp_jax.evaluation import recon_metrics
from larp_jax.models import patches

MSE_FLOOR = recon_metrics.MSE_FLOOR  # an exact reconstruction is 100 dB, as for the tokenizer
PCA_COMPONENTS = (1, 4, 16)
CHUNK_VALUES = 1 << 22  # float64 values per chunk of clips (32 MB)
_SHIFT = 0.5  # sums are of x - 0.5: a fixed shift, so shards still add up

Clips = Union[np.ndarray, Sequence[np.ndarray]]


def names(pca_components: Iterable[int] = PCA_COMPONENTS) -> tuple:
  """The baselines' names, in reporting order: trivial codes first, then the PCA oracles."""
  return ('dataset_mean', 'clip_mean', 'patch_mean') + tuple(f'pca{int(k)}' for k in pca_components)


def label(name: str) -> str:
  """A short human name, e.g. 'patch-mean colour' or 'PCA-16'."""
  fixed = {
    'dataset_mean': 'dataset-mean video',
    'clip_mean': 'clip-mean colour',
    'patch_mean': 'patch-mean colour',
  }
  return fixed.get(name) or f'PCA-{name[3:]}'


def to_unit(x) -> np.ndarray:
  """uint8 (or any integer) -> float64 / 255; floats -> float64 as they are."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.integer):
    return x.astype(np.float64) / 255.0
  return x.astype(np.float64)


def _chunks(clips: Clips, max_values: int = CHUNK_VALUES):
  """float64 [c, T, H, W, 3] pieces of ``clips`` (an array, or a list of arrays of clips)."""
  parts = [clips] if isinstance(clips, np.ndarray) else list(clips)
  for part in parts:
    part = np.asarray(part)
    if len(part) == 0:
      continue
    step = max(1, max_values // int(np.prod(part.shape[1:])))
    for i in range(0, len(part), step):
      yield to_unit(part[i : i + step])


def _blocks(video: np.ndarray, patch_size) -> np.ndarray:
  """[B, T, H, W, C] -> [B, gt, kt, gh, kh, gw, kw, C] (a view, no copy)."""
  b, t, h, w, c = video.shape
  kt, kh, kw = (int(k) for k in patch_size)
  if t % kt or h % kh or w % kw:
    raise ValueError(f'patch_size {tuple(patch_size)} does not divide the clips {video.shape[1:4]}')
  return video.reshape(b, t // kt, kt, h // kh, kh, w // kw, kw, c)


def patchify(video: np.ndarray, patch_size) -> np.ndarray:
  """``models.patches.patchify`` (the model's patch order) with a clear error when
  ``patch_size`` does not divide the clips: [B, T, H, W, C] -> [B, P, kt*kh*kw*C]."""
  _blocks(video, patch_size)  # checks divisibility
  return patches.patchify(video, tuple(int(k) for k in patch_size))


def clip_mean_recon(video: np.ndarray) -> np.ndarray:
  """Every pixel of a clip set to the clip's mean colour: [B, T, H, W, 3] -> same shape."""
  return np.broadcast_to(video.mean(axis=(1, 2, 3), keepdims=True), video.shape)


def patch_mean_recon(video: np.ndarray, patch_size) -> np.ndarray:
  """Every pixel set to the mean colour of its (kt, kh, kw) patch: [B, T, H, W, 3] -> same."""
  x = _blocks(video, patch_size)
  return np.broadcast_to(x.mean(axis=(2, 4, 6), keepdims=True), x.shape).reshape(video.shape)


def sufficient_stats(clips: Clips, patch_size, video_shape=None) -> dict:
  """First pass: float64 sums that ``fit`` needs; shards of the clips merge by adding the leaves.

  Args:
    clips: [N, T, H, W, 3] uint8 or float in [0, 1], or a list of such arrays (N may be 0).
    patch_size: (kt, kh, kw).
    video_shape: (T, H, W); needed only when there are no clips.
  Returns:
    {'n': clips, 'video_sum': [T, H, W, 3] sum of x - 0.5, 'patch_n': patches,
     'patch_sum': [D] and 'patch_outer': [D, D] sums of the shifted patch vectors}, all float64.
  """
  if video_shape is None:
    first = np.asarray(clips if isinstance(clips, np.ndarray) else clips[0])
    video_shape = first.shape[1:4]
  t, h, w = (int(s) for s in video_shape)
  d = int(np.prod(patch_size)) * 3
  stats = {
    'n': np.zeros((), np.float64),
    'video_sum': np.zeros((t, h, w, 3), np.float64),
    'patch_n': np.zeros((), np.float64),
    'patch_sum': np.zeros((d,), np.float64),
    'patch_outer': np.zeros((d, d), np.float64),
  }
  for x in _chunks(clips):
    x = x - _SHIFT
    p = patchify(x, patch_size).reshape(-1, d)
    stats['n'] += len(x)
    stats['video_sum'] += x.sum(axis=0)
    stats['patch_n'] += len(p)
    stats['patch_sum'] += p.sum(axis=0)
    stats['patch_outer'] += p.T @ p
  return stats


def fit(stats: dict, pca_components: Iterable[int] = PCA_COMPONENTS) -> dict:
  """The fitted baselines from (summed) ``sufficient_stats``.

  Returns {'mean_video': [T, H, W, 3], 'patch_mean': [D], 'bases': {k: [D, min(k, D)]} (the top
  eigenvectors of the biased patch covariance, largest first), 'eigenvalues': [D] descending}.
  """
  n, pn = float(stats['n']), float(stats['patch_n'])
  if n <= 0 or pn <= 0:
    raise ValueError('baselines: no clips to fit')
  m = stats['patch_sum'] / pn
  cov = stats['patch_outer'] / pn - np.outer(m, m)
  evals, evecs = np.linalg.eigh((cov + cov.T) / 2)
  evals, evecs = evals[::-1], evecs[:, ::-1]
  bases = {int(k): evecs[:, : min(int(k), len(m))] for k in pca_components}
  return {
    'mean_video': stats['video_sum'] / n + _SHIFT,
    'patch_mean': m + _SHIFT,
    'bases': bases,
    'eigenvalues': evals,
  }


def _mse(recon: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Per-clip MSE of the clamped reconstruction, over every axis but the first."""
  err = np.clip(recon, 0.0, 1.0, out=np.empty(recon.shape, np.float64))  # C order
  err -= target
  err = err.reshape(len(err), -1)
  return np.einsum('bi,bi->b', err, err) / max(1, err.shape[1])


def per_clip_mse(video: np.ndarray, fitted: dict, patch_size) -> dict:
  """{name: [B] float64}: each baseline's MSE per clip, reconstruction clamped to [0, 1].

  The PCA errors are taken in patch space (a permutation of the pixels, so the same MSE), and
  the projection on the largest basis is shared: ``fit``'s bases are prefixes of one another.
  """
  video = to_unit(video)
  out = {
    'dataset_mean': _mse(np.broadcast_to(fitted['mean_video'], video.shape), video),
    'clip_mean': _mse(clip_mean_recon(video), video),
    'patch_mean': _mse(patch_mean_recon(video, patch_size), video),
  }
  if fitted['bases']:
    p = patchify(video, patch_size)
    widest = max(fitted['bases'].values(), key=lambda b: b.shape[1])
    coeff = (p - fitted['patch_mean']) @ widest
    for k, basis in fitted['bases'].items():
      j = basis.shape[1]
      out[f'pca{k}'] = _mse(coeff[..., :j] @ widest[:, :j].T + fitted['patch_mean'], p)
  return out


def psnr_from_mse(mse) -> np.ndarray:
  """-10 log10(max(MSE, MSE_FLOOR)), float64: exact reconstructions give 100 dB."""
  return -10.0 * np.log10(np.maximum(np.asarray(mse, np.float64), MSE_FLOOR))


def error_sums(clips: Clips, fitted: dict, patch_size) -> dict:
  """Second pass: {name: float64 [2] = (sum of per-clip MSE, sum of per-clip PSNR)}."""
  sums = {name: np.zeros((2,), np.float64) for name in ('dataset_mean', 'clip_mean', 'patch_mean')}
  sums.update({f'pca{k}': np.zeros((2,), np.float64) for k in fitted['bases']})
  for x in _chunks(clips):
    for name, mse in per_clip_mse(x, fitted, patch_size).items():
      sums[name] += (mse.sum(), psnr_from_mse(mse).sum())
  return sums


def baseline_metrics(
  clips: Clips,
  patch_size,
  *,
  video_shape=None,
  pca_components: Iterable[int] = PCA_COMPONENTS,
  all_sum: Optional[Callable] = None,
) -> Optional[dict]:
  """Every baseline's mean PSNR and MSE over ``clips``.

  Args:
    clips: [N, T, H, W, 3] uint8 or float in [0, 1], or a list of such arrays.
    patch_size: the model's (kt, kh, kw).
    video_shape: (T, H, W); needed only when this process has no clips.
    pca_components: the k of the PCA baselines.
    all_sum: sums a tree of numpy arrays over processes (``evaluation.multihost.all_sum``); every process
      must call this function then. None: the clips are all there is.
  Returns:
    None if there are no clips anywhere, else {'clips': N (all processes), 'baselines': {name:
    {'psnr', 'mse', 'values_per_clip'} (+ 'components' for PCA)}} in ``names`` order.
  """
  all_sum = all_sum or (lambda tree: tree)
  pca_components = tuple(int(k) for k in pca_components)
  stats = all_sum(sufficient_stats(clips, patch_size, video_shape))
  n = int(round(float(stats['n'])))
  if n == 0:
    return None
  fitted = fit(stats, pca_components)
  sums = all_sum(error_sums(clips, fitted, patch_size))
  patches_per_clip = int(round(float(stats['patch_n']))) // n
  values = {'dataset_mean': 0, 'clip_mean': 3, 'patch_mean': 3 * patches_per_clip}
  out = {}
  for name in names(pca_components):
    mse_sum, psnr_sum = (float(v) for v in sums[name])
    out[name] = {'psnr': psnr_sum / n, 'mse': mse_sum / n}
    if name.startswith('pca'):
      k = fitted['bases'][int(name[3:])].shape[1]
      out[name].update(components=k, values_per_clip=k * patches_per_clip)
    else:
      out[name]['values_per_clip'] = values[name]
  return {'clips': n, 'baselines': out}
