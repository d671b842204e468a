"""`get_dataset`: per-host tf.data pipelines for every source, and the global-batch helper.

Stream contract (all sources):
* Host `p` of `P` reads a disjoint part of the split; the parts of all hosts cover it.
* Training is an infinite stream of epochs. Epoch `e` visits each of the host's videos once in an
  order fixed by (seed, e), and each clip's start/crop/flip comes from (seed, e, clip_id). Batches
  are `batch_size` consecutive elements (drop_remainder). So the stream is a pure function of the
  seed, and `start_step=s` skips exactly `s * batch_size` elements: batch `s` of the uninterrupted
  stream is the first batch of the resumed one. The skip costs no decoding (index sources skip
  indices; records/tfds skip serialized examples of the partial epoch only).
* A video that fails to decode during training is replaced by the next video of the host's list
  (and the file is counted and named in a warning), so the element count, and with it the
  resume guarantee, do not depend on bad files.
* Evaluation is one ordered pass; the last batch is padded (mask False) and every host yields the
  same number of batches (a max over hosts), so multi-host eval loops stay in step.
* `train_pass=e` (what `python -m larp_jax.tokenize` reads) makes the train split one pass of the
  same kind: each of the host's videos once, in stored order, with the clip start/crop/flip of
  training epoch `e`; padded and masked like eval (a bad file is a masked row, not replaced), and
  `start_step=s` starts it `s` batches in without decoding the skipped videos.
* `DataIterator.close()` (or leaving `with get_dataset(...) as it:`) stops the pipeline at once:
  the Python work of the synthetic and folder sources sees the pipeline's cancel event and returns
  placeholders instead of decoding, and the tf.data iterator is destroyed then and there.
"""

import gc
import logging
import os
import threading
import weakref

import jax
import numpy as np
import tensorflow as tf

from larp_jax.data import clips
from larp_jax.data import config as config_lib
from larp_jax.data import synthetic
from larp_jax.data import video_io
from larp_jax.data.source_api import (
  Built,
  one_pass,
  parallel_calls,
  resumed_epochs,
  split_location,
)
from larp_jax.errors import DataError

_log = logging.getLogger(__name__)


class DataIterator:
  """Iterator of numpy batch dicts. `num_skipped` counts the undecodable files it met so far.

  Attributes: `dataset` (the batched tf.data.Dataset; None once closed), `num_batches` (eval:
  batches this pass yields, equal on every host; train: None), `train`, `batch_size`.

  Close it when done (`it.close()`, or `with get_dataset(...) as it:`): that cancels the queued
  and running Python work of the pipeline and destroys the tf.data iterator now, in order, instead
  of at garbage collection, where tf.data waits for every running decode to finish.
  """

  def __init__(
    self, ds, *, train, batch_size, num_batches, skip_log, cancel=None, upscale_log=None
  ):
    self.dataset = ds
    self.train = train
    self.batch_size = batch_size
    self.num_batches = num_batches
    self._skip_log = skip_log
    self._upscale_log = upscale_log
    self._cancel = cancel if cancel is not None else threading.Event()
    self._it = ds.as_numpy_iterator()
    self._emitted = 0
    # Zero-length arrays of each field: the template of all-padding batches.
    self._spec = {
      k: np.zeros((0,) + tuple(s.shape[1:]), s.dtype.as_numpy_dtype)
      for k, s in ds.element_spec.items()
    }

  @property
  def num_skipped(self) -> int:
    return len(self._skip_log)

  @property
  def skipped_paths(self) -> list:
    return sorted(self._skip_log.paths)

  @property
  def num_upscaled(self) -> int | None:
    """Files resized up by more than `video_io.UPSCALE_WARN_FACTOR` on a side so far (each warned
    about once); None for records/tfds, which resize in the TF graph and do not track it."""
    return None if self._upscale_log is None else len(self._upscale_log)

  @property
  def upscaled_paths(self) -> list | None:
    return None if self._upscale_log is None else sorted(self._upscale_log.paths)

  @property
  def closed(self) -> bool:
    return self._it is None

  def close(self) -> None:
    """Stops the pipeline now; idempotent. Later `next()` calls raise RuntimeError.

    Sets the pipeline's cancel event (queued and running decodes return placeholders at once; a
    running PyAV decode stops within one frame), then destroys the tf.data iterator, which waits
    only for that. `dataset` is dropped too: its Python functions stay cancelled.
    """
    if self._it is None:
      return
    self._cancel.set()
    it, self._it = self._it, None
    alive = weakref.ref(it)
    del it
    if alive() is not None:  # held by a reference cycle (e.g. a kept traceback): collect it now
      gc.collect()
    if alive() is not None:
      _log.warning(
        'DataIterator.close(): the tf.data iterator is still referenced elsewhere; '
        'it is destroyed when that reference goes'
      )
    self.dataset = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      raise RuntimeError('data: this DataIterator is closed')
    if self.train:
      return self._checked(next(self._it))
    if self._emitted >= self.num_batches:
      raise StopIteration
    b = self.batch_size
    batch = self._checked(next(self._it, None))
    if batch is None:  # past the local data: an all-padding batch keeps hosts in step
      batch = self._spec
    n = len(batch['label'])
    pad = lambda x, fill: np.concatenate([x, np.full((b - n,) + x.shape[1:], fill, x.dtype)])
    mask = np.arange(b) < n
    if 'ok' in batch:  # a `train_pass` of the folder source: bad files are masked rows
      mask[:n] &= np.asarray(batch['ok'], bool)
    out = {
      'video': pad(batch['video'], 0),
      'label': pad(batch['label'], 0),
      'clip_id': pad(batch['clip_id'], -1),
      'mask': mask,
    }
    self._emitted += 1
    return out

  def _checked(self, batch):
    """`batch`, unless close() ran meanwhile (another thread): it may hold placeholders then."""
    if self._cancel.is_set():
      raise RuntimeError('data: this DataIterator was closed during next()')
    return batch


def _host(process_index, process_count):
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f'data: process_index {pi} is not in [0, {pc})')
  return pi, pc


def _global_max(n: int, process_count: int) -> int:
  """Max of `n` over the real JAX processes (simulated hosts in one process cannot agree)."""
  if process_count > 1 and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return int(np.max(multihost_utils.process_allgather(np.int64(n))))
  return n


def index_train_stream(n: int, seed: int, skip: int) -> tf.data.Dataset:
  """(position, epoch) pairs: epoch e is a permutation of range(n) keyed by (seed, e).

  Starts `skip` elements in, without touching the skipped ones.
  """

  def epoch(e):
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(e, tf.int64)])

    def pos(i):
      return tf.random.experimental.index_shuffle(i, seed=key, max_index=n - 1), tf.cast(
        e, tf.int64
      )

    return tf.data.Dataset.range(n).map(pos)

  return resumed_epochs(epoch, n, skip)


# ----------------------------------------------------------------------------- synthetic


def _synthetic(cfg, split, video_shape, seed, skip, pi, pc, train_pass=None) -> Built:
  t, h, w = video_shape
  stride = int(cfg.frame_stride)
  n_total = int(cfg.synthetic_num_train if split == 'train' else cfg.synthetic_num_eval)
  ids = np.arange(pi, n_total, pc, dtype=np.int64)
  if len(ids) == 0:
    raise DataError(f'data: synthetic {split} split has {n_total} videos, fewer than {pc} hosts')
  length = int(cfg.synthetic_num_frames)
  room = max(length - clips.span(t, stride), 0)
  render_args = (int(cfg.synthetic_seed), split, int(cfg.synthetic_num_classes))
  style = str(cfg.synthetic_style)
  cancel = threading.Event()

  def render(index, t0):
    if cancel.is_set():  # closing: a placeholder, nobody reads it
      return np.zeros((t, h, w, 3), np.float32), np.int32(0)
    clip, label = synthetic.render(
      *render_args[:2], int(index), render_args[2], int(t0), video_shape, stride, style
    )
    return clip, np.int32(label)

  def make(index, t0):
    video, label = tf.numpy_function(render, [index, t0], (tf.float32, tf.int32), stateful=False)
    return tf.ensure_shape(video, (t, h, w, 3)), tf.ensure_shape(label, ())

  ids_t = tf.constant(ids)
  if split == 'train':
    flip = bool(cfg.flip)

    def train_elem(pos, epoch):
      index = tf.gather(ids_t, pos)
      u = clips.clip_uniforms(clips.element_key(seed, epoch, index))
      t0 = tf.minimum(tf.cast(tf.floor(u[0] * (room + 1)), tf.int64), room)
      video, label = make(index, t0)
      if flip:
        video = tf.cond(u[3] < 0.5, lambda: video[:, :, ::-1, :], lambda: video)
      return {'video': video, 'label': label, 'clip_id': tf.cast(index, tf.int32)}

    if train_pass is None:
      stream, n_pass = index_train_stream(len(ids), seed, skip), None
    else:
      stream, n_pass = one_pass(tf.data.Dataset.range(len(ids)), train_pass, skip), len(ids)
    ds = stream.map(train_elem, num_parallel_calls=parallel_calls(cfg, python_decode=True))
    return Built(ds, n_pass, video_io.SkipLog(), cancel, video_io.UpscaleLog())

  chunks = int(clips.num_chunks(length, t, stride)) if cfg.eval_chunks == 'all' else 1

  def eval_elem(j):
    index, k = tf.gather(ids_t, j // chunks), j % chunks
    video, label = make(index, k * t * stride)
    return {'video': video, 'label': label, 'clip_id': tf.cast(index * chunks + k, tf.int32)}

  n = len(ids) * chunks
  ds = tf.data.Dataset.range(n).map(
    eval_elem, num_parallel_calls=parallel_calls(cfg, python_decode=True)
  )
  return Built(ds, n, video_io.SkipLog(), cancel, video_io.UpscaleLog())


# ----------------------------------------------------------------------------- folder


def folder_classes(cfg) -> list | None:
  """Class names shared by both splits of a folder source (None for CSV lists)."""
  roots = {
    split_location(cfg, s)
    for s in config_lib.SPLITS
    if (cfg.eval_path if s == 'eval' else cfg.path)
  }
  roots = [r for r in roots if os.path.isdir(r)]
  return sorted(set().union(*(video_io.folder_classes(r) for r in roots))) if roots else None


def _folder(cfg, split, video_shape, seed, skip, pi, pc, train_pass=None) -> Built:
  t, h, w = video_shape
  stride = int(cfg.frame_stride)
  loc = split_location(cfg, split)
  vl = video_io.list_videos(loc, classes=folder_classes(cfg), csv_root=cfg.csv_root)
  if not vl.paths:
    raise DataError(f'data: no video files found in {loc!r}')
  ids = np.arange(pi, len(vl.paths), pc)
  paths = [vl.paths[i] for i in ids]
  labels = vl.labels[ids]
  log = video_io.SkipLog()
  upscaled = video_io.UpscaleLog()
  cancel = threading.Event()
  short = cfg.short_side
  # Placeholder of a dropped element (eval: a bad file; both: the pipeline is closing).
  empty = (np.zeros((t, h, w, 3), np.uint8), np.int32(0), np.int32(-1), False)

  def load(pos, u, start):
    """Clip of local video `pos`; -> frames, label, clip_id, ok; `empty` once cancelled; None
    for a bad file."""
    path = paths[pos]
    try:
      frames = video_io.decode(
        path,
        short_side=short,
        out_hw=(h, w),
        start_u=u,
        num_frames=t,
        stride=stride,
        start=start,
        cancel=cancel,
        upscale_log=upscaled,
      )
      return frames, labels[pos], np.int32(ids[pos]), True
    except video_io.Cancelled:
      return empty  # closing, not a bad file: not counted or logged
    except Exception as e:  # pylint: disable=broad-except
      log.add(path, f'{type(e).__name__}: {e}')
      return None

  # Fail early, with one line, when this host has nothing decodable at all.
  for p in range(len(paths)):
    try:
      video_io.probe_num_frames(paths[p])
      break
    except Exception as e:  # pylint: disable=broad-except
      log.add(paths[p], f'{type(e).__name__}: {e}')
  else:
    raise DataError(f'data: no decodable video in {loc!r} ({len(paths)} files tried)')

  def py_train(pos, u):
    n = len(paths)
    for k in range(n):  # a bad file is replaced by the next good one: element count is kept
      if cancel.is_set():
        return empty
      out = load((int(pos) + k) % n, float(u), None)
      if out is not None:
        return out
    raise RuntimeError(f'no decodable video left in {loc!r}')

  def py_pass(pos, u):
    """One pass (`train_pass`): a bad file is kept as a masked placeholder, not replaced, so the
    pass holds each video at most once and its element count does not depend on bad files."""
    if cancel.is_set():
      return empty
    return load(int(pos), float(u), None) or empty

  def py_eval(pos, start):
    if cancel.is_set():
      return empty
    return load(int(pos), 0.0, int(start)) or empty

  def decoded(fn, args, u, train):
    frames, label, cid, ok = tf.numpy_function(
      fn, args, (tf.uint8, tf.int32, tf.int32, tf.bool), stateful=False
    )
    frames.set_shape((t, None, None, 3))
    video = clips.process(
      frames,
      u,
      video_shape,
      short_side=short,
      random_crop=train and cfg.train_crop == 'random',
      flip=train and cfg.flip,
    )
    return {
      'video': video,
      'label': tf.ensure_shape(label, ()),
      'clip_id': tf.ensure_shape(cid, ()),
      'ok': tf.ensure_shape(ok, ()),
    }

  if split == 'train':
    ids_t = tf.constant(ids, tf.int64)

    def train_elem(pos, epoch):
      u = clips.clip_uniforms(clips.element_key(seed, epoch, tf.gather(ids_t, pos)))
      return decoded(py_train, [pos, u[0]], u, True)

    if train_pass is not None:

      def pass_elem(pos, epoch):
        u = clips.clip_uniforms(clips.element_key(seed, epoch, tf.gather(ids_t, pos)))
        return decoded(py_pass, [pos, u[0]], u, True)

      ds = one_pass(tf.data.Dataset.range(len(paths)), train_pass, skip).map(
        pass_elem, num_parallel_calls=parallel_calls(cfg, python_decode=True)
      )
      return Built(ds, len(paths), log, cancel, upscaled)  # 'ok' kept: the mask of the pass
    ds = index_train_stream(len(paths), seed, skip).map(
      train_elem, num_parallel_calls=parallel_calls(cfg, python_decode=True)
    )
    return Built(ds.map(_drop_ok), None, log, cancel, upscaled)

  if cfg.eval_chunks == 'all':
    lens = []
    for p in paths:
      try:
        lens.append(video_io.probe_num_frames(p))
      except Exception as e:  # pylint: disable=broad-except
        log.add(p, f'{type(e).__name__}: {e}')
        lens.append(0)
    lens = np.array(lens)
    chunks = np.where(lens > 0, clips.num_chunks(lens, t, stride), 0)
    pos = np.repeat(np.arange(len(paths)), chunks)
    first = np.repeat(np.cumsum(chunks) - chunks, chunks)
    starts = (np.arange(len(pos)) - first) * t * stride
  else:
    pos, starts = np.arange(len(paths)), np.zeros(len(paths), np.int64)
  zero_u = tf.zeros([4])
  ds = tf.data.Dataset.from_tensor_slices((pos, starts)).map(
    lambda p, s: decoded(py_eval, [p, s], zero_u, False),
    num_parallel_calls=parallel_calls(cfg, python_decode=True),
  )
  ds = ds.filter(lambda e: e['ok']).map(_drop_ok)
  return Built(ds, len(pos), log, cancel, upscaled)


def _drop_ok(e):
  return {k: v for k, v in e.items() if k != 'ok'}


# ----------------------------------------------------------------------------- entry points


def get_dataset(
  cfg,
  split: str,
  video_shape,
  batch_size: int,
  seed: int = 0,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  train_pass: int | None = None,
) -> DataIterator:
  """This host's batches: {'video': f32 [b, T, H, W, 3] in [0, 1], 'label': i32 [b], 'clip_id': i32 [b]}.

  split 'train': infinite, shuffled, drop_remainder; `start_step` skips exactly that many batches.
  split 'eval': one ordered pass, last batch padded, plus 'mask': bool [b] marking real clips.
  split 'train' with `train_pass=e`: one ordered pass over the train videos with the augmentation
  of training epoch e, padded and masked like eval; `start_step` skips that many of its batches.
  Close the iterator when done: `it.close()` or `with get_dataset(...) as it:` (see DataIterator).
  """
  config_lib.validate(cfg, split, video_shape)
  if int(batch_size) < 1 or int(start_step) < 0:
    raise ValueError(
      f'data: batch_size must be >= 1 and start_step >= 0, got {batch_size}, {start_step}'
    )
  pi, pc = _host(process_index, process_count)
  video_shape = tuple(int(d) for d in video_shape)
  one = split == 'train' and train_pass is not None
  if one and int(train_pass) < 0:
    raise ValueError(f'data: train_pass must be >= 0, got {train_pass}')
  skip = int(start_step) * int(batch_size) if split == 'train' else 0
  if cfg.source == 'records':
    from larp_jax.data import records  # pylint: disable=g-import-not-at-top

    build = records.build
  elif cfg.source == 'tfds':
    from larp_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

    build = tfds_source.build
  else:
    build = {'synthetic': _synthetic, 'folder': _folder}[cfg.source]
  args = (cfg, split, video_shape, int(seed), skip, pi, pc)
  built = build(*args, train_pass=int(train_pass)) if one else build(*args)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 0
  ds = built.ds.with_options(options)
  if split == 'train' and not one:
    ds = ds.batch(batch_size, drop_remainder=True)
    num_batches = None
  else:
    ds = ds.batch(batch_size)
    num_batches = _global_max(-(-built.num_eval // batch_size), pc)
    if one:  # the batches left after the skipped ones (a short host pads the rest)
      num_batches = max(num_batches - int(start_step), 0)
  ds = ds.prefetch(int(cfg.prefetch) if int(cfg.prefetch) > 0 else 0)
  return DataIterator(
    ds,
    train=split == 'train' and not one,
    batch_size=int(batch_size),
    num_batches=num_batches,
    skip_log=built.skip_log,
    cancel=built.cancel,
    upscale_log=built.upscale_log,
  )


def num_skipped(iterator: DataIterator | None = None) -> int:
  """Undecodable files skipped by `iterator`, or by every pipeline of this process if None."""
  return iterator.num_skipped if iterator is not None else video_io.num_skipped_total()


def make_global_batch(batch: dict, mesh: jax.sharding.Mesh, sharding=None) -> dict:
  """Each host's numpy batch -> dict of global `jax.Array`s, batch axis split over the devices.

  `sharding`: a `jax.sharding.Sharding`, a `PartitionSpec` (used with `mesh`), or None for the
  batch axis over every mesh axis. Array ranks differ (video vs label), so a spec names only the
  batch axis and is applied to each array's leading dimension.
  """
  if sharding is None:
    sharding = jax.sharding.PartitionSpec(mesh.axis_names)
  if isinstance(sharding, jax.sharding.PartitionSpec):
    sharding = jax.sharding.NamedSharding(mesh, sharding)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }
