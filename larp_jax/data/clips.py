"""Clip sampling and preprocessing shared by every source (official `datasets/video_dataset.py`).

A clip is T frames `start + i * stride` of a video with N frames; indices past the end repeat the
last frame. Training draws the start uniformly from [0, max(N - span, 0)], evaluation starts at
frame 0 ('first') or at every multiple of T * stride ('all'). Frames are resized so the short side
is `short_side` (antialiased bilinear) and the result still covers (H, W), then center- or
randomly cropped, randomly flipped (training) and scaled to float32 in [0, 1].

All randomness of one clip comes from a stateless key (seed, epoch, clip_id): the same clip gets
the same start, crop and flip whatever the order, parallelism or host count.
"""

import math

import numpy as np
import tensorflow as tf


def span(num_frames: int, stride: int) -> int:
  """Frames covered by a clip of `num_frames` frames at `stride`."""
  return (num_frames - 1) * stride + 1


def num_chunks(video_len, num_frames: int, stride: int):
  """Non-overlapping chunks [k * T * stride, ...) of a video; at least one (padded) per video."""
  return np.maximum(1, np.asarray(video_len) // (num_frames * stride))


def start_frame(video_len: int, u: float, num_frames: int, stride: int) -> int:
  """Uniform start in [0, max(N - span, 0)] from u in [0, 1) (numpy twin of `tf_frame_indices`)."""
  room = max(int(video_len) - span(num_frames, stride), 0)
  return min(int(math.floor(u * (room + 1))), room)


def frame_indices(video_len: int, start: int, num_frames: int, stride: int) -> np.ndarray:
  return np.minimum(start + np.arange(num_frames) * stride, max(int(video_len) - 1, 0))


def resized_size(h: int, w: int, out_h: int, out_w: int, short_side=None) -> tuple[int, int]:
  """Size after resizing (h, w): short side -> `short_side`, but never smaller than (out_h, out_w)."""
  s = max(out_h / h, out_w / w)
  if short_side:
    s = max(s, short_side / min(h, w))
  return max(out_h, int(round(h * s))), max(out_w, int(round(w * s)))


def tf_resized_size(h, w, out_h: int, out_w: int, short_side=None):
  """TF twin of `resized_size` (float64, round half to even like Python's round)."""
  h, w = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  s = tf.maximum(out_h / h, out_w / w)
  if short_side:
    s = tf.maximum(s, short_side / tf.minimum(h, w))
  nh = tf.maximum(out_h, tf.cast(tf.round(h * s), tf.int32))
  nw = tf.maximum(out_w, tf.cast(tf.round(w * s), tf.int32))
  return nh, nw


def element_key(seed, epoch, clip_id):
  """Stateless RNG key [2] int64 of one clip in one epoch."""
  mix = tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)
  return tf.stack([mix, tf.cast(clip_id, tf.int64)])


def clip_uniforms(key):
  """Four uniforms in [0, 1): start, crop y, crop x, flip."""
  return tf.random.stateless_uniform([4], seed=key, dtype=tf.float32)


def tf_frame_indices(video_len, u, num_frames: int, stride: int, start=None):
  """[T] int32 frame indices; the start is drawn from u unless given (TF twin of start_frame)."""
  n = tf.cast(video_len, tf.int32)
  if start is None:
    room = tf.maximum(n - span(num_frames, stride), 0)
    start = tf.minimum(tf.cast(tf.floor(u * tf.cast(room + 1, tf.float32)), tf.int32), room)
  idx = tf.cast(start, tf.int32) + tf.range(num_frames, dtype=tf.int32) * stride
  return tf.minimum(idx, tf.maximum(n - 1, 0))


def process(frames, u, video_shape, *, short_side=None, random_crop=False, flip=False):
  """uint8 [T, h, w, 3] -> float32 [T, H, W, 3] in [0, 1]; `u` from `clip_uniforms`."""
  _, out_h, out_w = video_shape
  shape = tf.shape(frames)
  h, w = shape[1], shape[2]
  nh, nw = tf_resized_size(h, w, out_h, out_w, short_side)
  frames = tf.cond(
    tf.logical_and(tf.equal(nh, h), tf.equal(nw, w)),
    lambda: tf.cast(frames, tf.float32),
    lambda: tf.image.resize(frames, tf.stack([nh, nw]), method='bilinear', antialias=True),
  )
  if random_crop:
    top = tf.cast(tf.floor(u[1] * tf.cast(nh - out_h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(u[2] * tf.cast(nw - out_w + 1, tf.float32)), tf.int32)
  else:
    top, left = (nh - out_h) // 2, (nw - out_w) // 2
  frames = frames[:, top : top + out_h, left : left + out_w, :]
  if flip:
    frames = tf.cond(u[3] < 0.5, lambda: frames[:, :, ::-1, :], lambda: frames)
  frames = tf.clip_by_value(frames * (1.0 / 255.0), 0.0, 1.0)
  return tf.ensure_shape(frames, (video_shape[0], out_h, out_w, 3))
