"""The `tfds` source: any TFDS video dataset by name (default 'ucf101'), standard splits.

Each host reads its `tfds.even_splits` part in file order (`shuffle_files=False`, so positions are
stable); clip_id = the example's position in the whole split. Frames are read still encoded
(`SkipDecoding`) and only the T frames of a clip are decoded, which is also what makes the
frame-count pass of `eval_chunks='all'` and the resume skip cheap.
"""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from larp_jax.data import clips
from larp_jax.data import source_api
from larp_jax.data import video_io
from larp_jax.errors import DataError


def _missing(cfg, err) -> DataError:
  where = cfg.tfds_data_dir or '~/tensorflow_datasets'
  return DataError(
    f'data: TFDS dataset {cfg.tfds_name!r} is not available in {where} '
    f'({type(err).__name__}); build it with `tfds build {cfg.tfds_name} '
    f'--data_dir={where}` and set config.data.tfds_data_dir'
  )


def _read(builder, cfg, split):
  key = cfg.tfds_video_key
  return builder.as_dataset(
    split=split, shuffle_files=False, decoders={key: tfds.decode.SkipDecoding()}
  )


def _count(builder, cfg, split) -> int:
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, TypeError):  # not generated metadata (e.g. under mock_data)
    return int(_read(builder, cfg, split).reduce(np.int64(0), lambda n, _: n + 1))


def _frames(video, idx, num_frames: int):
  """Encoded frames [N] (or uint8 [N, h, w, 3]) -> uint8 [T, h, w, 3] of frames `idx`."""
  picked = tf.gather(video, idx)
  if video.dtype == tf.string:
    return tf.stack(
      [
        tf.io.decode_image(picked[i], channels=3, expand_animations=False)
        for i in range(num_frames)
      ]
    )
  return tf.cast(picked, tf.uint8)


def build(cfg, split, video_shape, seed, skip, pi, pc, train_pass=None) -> source_api.Built:
  t = video_shape[0]
  stride = int(cfg.frame_stride)
  name = cfg.train_split if split == 'train' else cfg.eval_split
  try:
    builder = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir)
    parts = tfds.even_splits(name, n=pc)
    base = _read(builder, cfg, parts[pi])
  except Exception as e:  # pylint: disable=broad-except
    raise _missing(cfg, e) from None
  offset = sum(_count(builder, cfg, parts[j]) for j in range(pi))
  n_local = _count(builder, cfg, parts[pi])
  if n_local == 0:
    raise DataError(f'data: TFDS {cfg.tfds_name}/{name} has no examples for host {pi} of {pc}')
  vkey, lkey = cfg.tfds_video_key, cfg.tfds_label_key
  # (clip_id, encoded video, label); positions are stable because file order is fixed.
  base = base.enumerate(start=offset).map(
    lambda i, ex: (tf.cast(i, tf.int32), ex[vkey], tf.cast(ex[lkey], tf.int32))
  )
  npc = source_api.parallel_calls(cfg)
  short = cfg.short_side

  if split == 'train':
    buf = int(cfg.shuffle_buffer)

    def epoch(e):
      return base.shuffle(buf, seed=seed * 1_000_003 + e).map(lambda *x: x + (e,))

    if train_pass is None:
      ds = source_api.resumed_epochs(epoch, n_local, skip)
    else:  # file order, unshuffled; skipped examples stay encoded
      ds = source_api.one_pass(base, train_pass, skip)

    def train_elem(cid, video, label, e):
      u = clips.clip_uniforms(clips.element_key(seed, e, cid))
      idx = clips.tf_frame_indices(tf.shape(video)[0], u[0], t, stride)
      out = clips.process(
        _frames(video, idx, t),
        u,
        video_shape,
        short_side=short,
        random_crop=cfg.train_crop == 'random',
        flip=bool(cfg.flip),
      )
      return {'video': out, 'label': label, 'clip_id': cid}

    n_pass = None if train_pass is None else n_local
    return source_api.Built(ds.map(train_elem, num_parallel_calls=npc), n_pass, video_io.SkipLog())

  all_mode = cfg.eval_chunks == 'all'

  def chunks(video):
    n = tf.cast(tf.shape(video)[0], tf.int64)
    return tf.maximum(n // (t * stride), 1) if all_mode else tf.constant(1, tf.int64)

  if all_mode:  # chunk counts need frame counts: one pass over the (still encoded) examples
    counts = np.array(list(base.map(lambda c, v, l: chunks(v)).as_numpy_iterator()), np.int64)
    num_eval = int(counts.sum())
    first_chunk = tf.constant(np.cumsum(counts) - counts)
  else:
    num_eval = n_local

  def expand(cid, video, label):
    return tf.data.Dataset.range(chunks(video)).map(lambda j: (cid, video, label, j))

  def eval_elem(cid, video, label, j):
    idx = clips.tf_frame_indices(tf.shape(video)[0], 0.0, t, stride, start=j * t * stride)
    out = clips.process(_frames(video, idx, t), tf.zeros([4]), video_shape, short_side=short)
    if all_mode:  # local chunk number k -> k * P + p: unique over hosts without their counts
      k = tf.gather(first_chunk, tf.cast(cid, tf.int64) - offset) + j
      cid = tf.cast(k * pc + pi, tf.int32)
    return {'video': out, 'label': label, 'clip_id': cid}

  ds = base.flat_map(expand).map(eval_elem, num_parallel_calls=npc)
  return source_api.Built(ds, num_eval, video_io.SkipLog())
