"""FVD between two sets of videos on disk: the work of ``python -m larp_jax.fvd``.

``fvd_between(real, fake, ...)`` takes, for each side, a folder of video files (searched
recursively, decoded with PyAV; undecodable or too short files are skipped with a warning), a
``.npy`` / ``.npz`` array of clips [N,T,H,W,3] (uint8 0..255 or float in [0, 1]), or a ``.npz`` of
``FeatureStats``; see ``larp_jax/fvd.py`` for the rules. Problems with the inputs raise
``InputError`` (a ``DataError``) with one line; warnings and progress go to stderr.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator, Optional

import numpy as np

from larp_jax import errors

VIDEO_EXTS = ('.mp4', '.avi', '.mkv', '.webm', '.mov', '.m4v', '.gif', '.mpg', '.mpeg')
MIN_CLIPS = 2  # a covariance needs two samples
STANDARD_CLIPS = 2048  # clips per side in the standard FVD protocol


class InputError(errors.DataError):
  """A problem with the inputs that the user can fix (the CLI: one line, exit code 2)."""


def _warn(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def resize_center_crop(clip: np.ndarray, size: int) -> np.ndarray:
  """[T,H,W,3] -> [T,size,size,3]: short side to `size` (bilinear, antialiased, PIL),
  long side int(size * long / short) as torchvision, then a center crop.

  uint8 in, uint8 out (rounded); float in [0, 1] in, float32 in [0, 1] out (not rounded).
  """
  from PIL import Image

  is_uint8 = clip.dtype == np.uint8
  t, h, w, _ = clip.shape
  if h <= w:
    nh, nw = size, max(size, int(size * w / h))
  else:
    nh, nw = max(size, int(size * h / w)), size
  out = np.empty((t, size, size, 3), np.uint8 if is_uint8 else np.float32)
  top = int(round((nh - size) / 2.0))
  left = int(round((nw - size) / 2.0))
  for i in range(t):
    if (nh, nw) != (h, w):
      chans = [
        np.asarray(
          Image.fromarray(clip[i, :, :, c].astype(np.float32), mode='F').resize(
            (nw, nh), Image.BILINEAR
          )
        )
        for c in range(3)
      ]
      frame = np.stack(chans, -1)
      frame = np.clip(np.rint(frame), 0, 255).astype(np.uint8) if is_uint8 else np.clip(frame, 0, 1)
    else:
      frame = clip[i]
    out[i] = frame[top : top + size, left : left + size]
  return out


def _decode_first_frames(path: str, num_frames: int) -> Optional[np.ndarray]:
  import av

  frames = []
  with av.open(path) as container:
    if not container.streams.video:
      return None
    stream = container.streams.video[0]
    for frame in container.decode(stream):
      frames.append(frame.to_ndarray(format='rgb24'))
      if len(frames) == num_frames:
        break
  if len(frames) < num_frames:
    return None
  return np.stack(frames)


def _list_videos(folder: str) -> list:
  files = []
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for n in sorted(names):
      if n.lower().endswith(VIDEO_EXTS):
        files.append(os.path.join(root, n))
  return files


def _load_array(path: str):
  """Returns ('array', arr) or ('stats', FeatureStats)."""
  from larp_jax.evaluation.fvd import FeatureStats

  try:
    if path.endswith('.npy'):
      return 'array', np.load(path, mmap_mode='r', allow_pickle=False)
    with np.load(path, allow_pickle=False) as z:
      keys = list(z.keys())
      if {'n', 'sum', 'sum_outer'} <= set(keys):
        return 'stats', FeatureStats.load(path)
      if not keys:
        raise InputError(f'{path}: the .npz file holds no arrays')
      key = 'videos' if 'videos' in keys else keys[0]
      return 'array', z[key]
  except InputError:
    raise
  except Exception as e:  # unreadable / corrupt file
    raise InputError(f'{path}: cannot read array ({type(e).__name__}: {e})') from None


def _check_array(path: str, a: np.ndarray, num_frames: int, max_clips: Optional[int]) -> None:
  """Raises InputError unless `a` is uint8 or [0, 1] float clips [N,T,H,W,3] with T >= num_frames."""
  is_float = np.issubdtype(a.dtype, np.floating)
  if not (a.dtype == np.uint8 or is_float) or a.ndim != 5 or a.shape[-1] != 3:
    raise InputError(
      f'{path}: expected an array [N,T,H,W,3] of uint8 (0..255) or float in [0, 1], '
      f'got {a.dtype} {tuple(a.shape)}'
    )
  if a.shape[0] == 0:
    raise InputError(f'{path}: the array holds no clips')
  if a.shape[1] < num_frames:
    raise InputError(
      f'{path}: clips have {a.shape[1]} frames, fewer than --num_frames={num_frames}'
    )
  if is_float:
    used = a[: max_clips or a.shape[0], :num_frames]
    lo, hi = float(np.min(used)), float(np.max(used))
    if not (lo >= 0.0 and hi <= 1.0):  # also rejects NaN
      raise InputError(
        f'{path}: float values span [{lo:g}, {hi:g}]; accepted are uint8 0..255 or float in '
        f'[0, 1]: convert with np.clip(x, 0, 1) if it is round-off, x / 255 if it is 0..255 data'
      )


class ClipSource:
  """One side of the comparison: streams clips [T,H,W,3] (uint8, or float32 in [0, 1]) or holds
  precomputed stats."""

  def __init__(
    self, path: str, num_frames: int, max_clips: Optional[int], resolution: Optional[int]
  ):
    self.path, self.num_frames, self.max_clips, self.resolution = (
      path,
      num_frames,
      max_clips,
      resolution,
    )
    self.stats = None
    self.array = None
    self.files = None
    if not os.path.exists(path):
      raise InputError(f'{path}: no such file or directory')
    if os.path.isdir(path):
      self.kind = 'folder'
      self.files = _list_videos(path)
      if not self.files:
        raise InputError(f'{path}: no video files ({", ".join(VIDEO_EXTS)}) in this folder')
    elif path.endswith(('.npy', '.npz')):
      kind, obj = _load_array(path)
      if kind == 'stats':
        self.kind, self.stats = 'stats', obj
        return
      self.kind, self.array = 'array', obj
      _check_array(path, obj, num_frames, max_clips)
    else:
      raise InputError(f'{path}: expected a folder of videos or a .npy/.npz file')

  def max_count(self) -> int:
    """Clips this side can give at most (exact for arrays and stats; files may fail to decode)."""
    if self.kind == 'stats':
      return self.stats.n
    n = self.array.shape[0] if self.kind == 'array' else len(self.files)
    return min(n, self.max_clips) if self.max_clips else n

  def count_text(self) -> str:
    n = self.max_count()
    return f'{n} video file{"" if n == 1 else "s"}' if self.kind == 'folder' else _clips(n)

  def clips(self) -> Iterator[np.ndarray]:
    count = 0
    limit = self.max_clips if self.max_clips else None
    if self.kind == 'array':
      n = self.array.shape[0] if limit is None else min(limit, self.array.shape[0])
      for i in range(n):
        clip = np.asarray(self.array[i, : self.num_frames])
        clip = clip if clip.dtype == np.uint8 else clip.astype(np.float32)
        yield resize_center_crop(clip, self.resolution) if self.resolution else clip
      return
    for f in self.files:
      if limit is not None and count >= limit:
        return
      try:
        clip = _decode_first_frames(f, self.num_frames)
      except Exception as e:  # PyAV raises many error types for broken files
        _warn(f'warning: skipping {f}: cannot decode ({type(e).__name__}: {e})')
        continue
      if clip is None:
        _warn(f'warning: skipping {f}: fewer than {self.num_frames} decodable frames')
        continue
      count += 1
      yield resize_center_crop(clip, self.resolution) if self.resolution else clip


def _batches(clips: Iterator[np.ndarray], batch: int) -> Iterator[np.ndarray]:
  """Groups consecutive clips of the same shape into arrays of at most `batch` clips."""
  buf = []
  for c in clips:
    if buf and (c.shape != buf[0].shape or len(buf) == batch):
      yield np.stack(buf)
      buf = []
    buf.append(c)
  if buf:
    yield np.stack(buf)


def _clips(n: int) -> str:
  return f'{n} clip' if n == 1 else f'{n} clips'


def _too_few_clips(real: str, fake: str) -> InputError:
  return InputError(
    f'FVD needs a covariance of the features, i.e. at least {MIN_CLIPS} clips per side (got real: '
    f'{real}, fake: {fake}); for a meaningful value use hundreds to thousands (the standard '
    f'protocol uses {STANDARD_CLIPS})'
  )


def _check_clip_counts(real, fake) -> None:
  """Raises InputError for fewer than MIN_CLIPS clips on a side; warns below the feature dim."""
  if min(real.n, fake.n) < MIN_CLIPS:
    raise _too_few_clips(_clips(real.n), _clips(fake.n))
  if min(real.n, fake.n) < real.dim:
    _warn(
      f'warning: fewer clips than the {real.dim} feature dimensions (real: {real.n}, fake: '
      f'{fake.n}): the covariance is rank-deficient, so this FVD is biased upward and not '
      f'comparable to published FVDs (the standard protocol uses {STANDARD_CLIPS} clips per side)'
    )


def _stats_for(src: ClipSource, extractor, label: str, batch: int):
  from larp_jax.evaluation.fvd import FeatureStats

  if src.kind == 'stats':
    return src.stats, None
  stats = FeatureStats()
  shapes = set()
  for b in _batches(src.clips(), batch):
    shapes.add(tuple(b.shape[2:4]))
    stats.update(extractor(b))
    _warn(f'[{label}] {stats.n} clips')
  if stats.n == 0:
    raise InputError(f'{src.path}: no decodable videos with at least {src.num_frames} frames')
  return stats, sorted(shapes)


def fvd_between(
  real: str,
  fake: str,
  *,
  batch: int = 8,
  max_clips: Optional[int] = None,
  num_frames: int = 16,
  resolution: Optional[int] = None,
  save_stats: Optional[str] = None,
) -> dict:
  """{"fvd", "n_real", "n_fake", "protocol"} between the clips at paths ``real`` and ``fake``.

  ``max_clips``: at most this many clips per side; ``resolution``: resize the short side and
  center-crop to RxR before I3D (None: clips go in at their own size); ``save_stats``: write
  ``<prefix>_real.npz`` / ``<prefix>_fake.npz``. Raises InputError for unusable inputs, before
  I3D runs where it can (also for fewer than ``MIN_CLIPS`` clips on a side).
  """
  from larp_jax.evaluation.fvd import MIN_FRAMES

  if batch < 1:
    raise InputError('--batch must be >= 1')
  if max_clips is not None and max_clips < 1:
    raise InputError('--max_clips must be >= 1')
  if num_frames < MIN_FRAMES:
    raise InputError(f"--num_frames must be >= {MIN_FRAMES} (I3D's temporal receptive field)")
  if resolution is not None and resolution < 1:
    raise InputError('--resolution must be >= 1')
  real_src = ClipSource(real, num_frames, max_clips, resolution)
  fake_src = ClipSource(fake, num_frames, max_clips, resolution)
  if min(real_src.max_count(), fake_src.max_count()) < MIN_CLIPS:  # fail before running I3D
    raise _too_few_clips(real_src.count_text(), fake_src.count_text())

  from larp_jax.evaluation import fvd as F

  extractor = None
  if not (real_src.kind == 'stats' and fake_src.kind == 'stats'):
    extractor = F.I3DFeatureExtractor(batch_size=batch)
  real_stats, real_shapes = _stats_for(real_src, extractor, 'real', batch)
  fake_stats, fake_shapes = _stats_for(fake_src, extractor, 'fake', batch)
  _check_clip_counts(real_stats, fake_stats)
  if save_stats:
    real_stats.save(save_stats + '_real.npz')
    fake_stats.save(save_stats + '_fake.npz')
  score = F.fvd_from_stats(real_stats, fake_stats)
  protocol = F.make_protocol(
    dataset='',
    split='',
    n_clips={'real': real_stats.n, 'fake': fake_stats.n},
    num_frames=num_frames,
    resolution=resolution if resolution else {'real': real_shapes, 'fake': fake_shapes},
    seed=None,
    real=os.path.abspath(real),
    fake=os.path.abspath(fake),
    clip_selection='first num_frames frames of each file / array entry',
    crop=('short side resize (bilinear, antialias) + center crop' if resolution else 'none'),
    max_clips=max_clips,
  )
  return {'fvd': score, 'n_real': real_stats.n, 'n_fake': fake_stats.n, 'protocol': protocol}
