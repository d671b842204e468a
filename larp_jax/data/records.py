"""The `records` source: sharded TFRecords written by `python -m larp_jax.data.prepare`.

Layout of a prepared directory:
  manifest.json                  {'version', 'num_clips', 'classes', 'short_side', 'num_skipped',
                                  'shards': [{'file', 'num_clips', 'sha256', 'indices', 'num_frames'}]}
  shard-00000-of-00004.tfrecord  tf.train.Example per video:
      'frames'     bytes list, one lossless PNG per frame (uint8 RGB at the prepared short side)
      'num_frames' int64, 'height' int64, 'width' int64, 'label' int64,
      'index'      int64 (stable clip id: position in the sorted source list), 'path' bytes
Only the T frames of a clip are PNG-decoded, so reading is cheap whatever the video length.
"""

import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from larp_jax.data import clips
from larp_jax.data import source_api
from larp_jax.data import video_io
from larp_jax.errors import DataError

MANIFEST = 'manifest.json'
FEATURES = {
  'frames': tf.io.VarLenFeature(tf.string),
  'num_frames': tf.io.FixedLenFeature([], tf.int64),
  'height': tf.io.FixedLenFeature([], tf.int64),
  'width': tf.io.FixedLenFeature([], tf.int64),
  'label': tf.io.FixedLenFeature([], tf.int64),
  'index': tf.io.FixedLenFeature([], tf.int64),
}


def read_manifest(root: str) -> dict:
  path = os.path.join(root, MANIFEST)
  if not os.path.exists(path):
    raise DataError(
      f'data: {root!r} has no {MANIFEST}; create it with '
      f'`python -m larp_jax.data.prepare SRC {root}`'
    )
  with open(path) as f:
    return json.load(f)


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def verify(root: str) -> list:
  """Names of the shards whose sha256 differs from the manifest (empty when all are intact)."""
  m = read_manifest(root)
  return [s['file'] for s in m['shards'] if sha256(os.path.join(root, s['file'])) != s['sha256']]


def parse(serialized):
  ex = tf.io.parse_single_example(serialized, FEATURES)
  ex['frames'] = tf.sparse.to_dense(ex['frames'], default_value=b'')
  return ex


def decode_frames(encoded, idx, num_frames: int):
  """PNG strings [N], indices [T] -> uint8 [T, h, w, 3] (only T PNGs decoded)."""
  picked = tf.gather(encoded, idx)
  return tf.stack([tf.io.decode_png(picked[i], channels=3) for i in range(num_frames)])


def build(cfg, split, video_shape, seed, skip, pi, pc, train_pass=None) -> source_api.Built:
  t, _, _ = video_shape
  stride = int(cfg.frame_stride)
  root = source_api.split_location(cfg, split)
  m = read_manifest(root)
  shards = m['shards']
  # Whole shard files per host when they divide evenly (no host reads another's bytes);
  # otherwise every host reads every shard and keeps the clips with index % P == p.
  by_file = len(shards) % pc == 0
  if by_file:
    mine = shards[pi::pc]
    lens = np.concatenate([np.asarray(s['num_frames'], np.int64) for s in mine] or [np.zeros(0)])
    ids = np.concatenate([np.asarray(s['indices'], np.int64) for s in mine] or [np.zeros(0)])
  else:
    mine = shards
    ids = np.concatenate([np.asarray(s['indices'], np.int64) for s in shards])
    lens = np.concatenate([np.asarray(s['num_frames'], np.int64) for s in shards])
    keep = ids % pc == pi
    ids, lens = ids[keep], lens[keep]
  n_local = len(ids)
  if n_local == 0:
    raise DataError(f'data: records in {root!r} hold no clip for host {pi} of {pc}')
  files = [os.path.join(root, s['file']) for s in mine]
  log = video_io.SkipLog()

  def host_filter(ds):
    if by_file:
      return ds
    pick = lambda s: tf.equal(
      tf.io.parse_single_example(s, {'index': FEATURES['index']})['index'] % pc, pi
    )
    return ds.filter(pick)

  npc = source_api.parallel_calls(cfg)
  short = cfg.short_side

  if split == 'train':
    buf = int(cfg.shuffle_buffer)

    files_t = tf.constant(files)

    def epoch(e):
      """One epoch: files in an order keyed by (seed, e), interleaved, then a seeded shuffle."""
      key = tf.stack([tf.constant(seed, tf.int64), e])
      order = tf.random.experimental.index_shuffle(
        tf.range(len(files), dtype=tf.int64), seed=key, max_index=len(files) - 1
      )
      ds = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, order))
      ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(4, len(files)),
        block_length=1,
        num_parallel_calls=npc,
        deterministic=True,
      )
      ds = host_filter(ds).shuffle(buf, seed=seed * 1_000_003 + e)
      return ds.map(lambda x: (x, e))

    if train_pass is None:
      ds = source_api.resumed_epochs(epoch, n_local, skip)
    else:  # the files in order, unshuffled; skipped records are read but never decoded
      ds = source_api.one_pass(host_filter(tf.data.TFRecordDataset(files)), train_pass, skip)

    def train_elem(serialized, e):
      ex = parse(serialized)
      u = clips.clip_uniforms(clips.element_key(seed, e, ex['index']))
      idx = clips.tf_frame_indices(ex['num_frames'], u[0], t, stride)
      frames = decode_frames(ex['frames'], idx, t)
      video = clips.process(
        frames,
        u,
        video_shape,
        short_side=short,
        random_crop=cfg.train_crop == 'random',
        flip=bool(cfg.flip),
      )
      return {
        'video': video,
        'label': tf.cast(ex['label'], tf.int32),
        'clip_id': tf.cast(ex['index'], tf.int32),
      }

    n_pass = None if train_pass is None else n_local
    return source_api.Built(ds.map(train_elem, num_parallel_calls=npc), n_pass, log)

  # Eval: files in order; 'all' expands each video into its chunks (counts from the manifest).
  ds = host_filter(tf.data.TFRecordDataset(files))
  per_video = clips.num_chunks(lens, t, stride) if cfg.eval_chunks == 'all' else np.ones_like(lens)
  num_eval = int(per_video.sum())
  # clip ids of chunks: chunk offset of the video in the global (all-host) chunk order + k.
  all_ids = np.concatenate([np.asarray(s['indices'], np.int64) for s in shards])
  all_lens = np.concatenate([np.asarray(s['num_frames'], np.int64) for s in shards])
  order = np.argsort(all_ids)
  all_chunks = (
    clips.num_chunks(all_lens[order], t, stride)
    if cfg.eval_chunks == 'all'
    else np.ones(len(order), np.int64)
  )
  offsets = np.zeros(int(all_ids.max()) + 1, np.int64)
  offsets[all_ids[order]] = np.cumsum(all_chunks) - all_chunks
  offsets_t = tf.constant(offsets)
  all_mode = cfg.eval_chunks == 'all'

  def expand(serialized):
    ex = parse(serialized)
    k = tf.maximum(ex['num_frames'] // (t * stride), 1) if all_mode else tf.constant(1, tf.int64)
    return tf.data.Dataset.range(k).map(lambda j: (ex, j))

  def eval_elem(ex, j):
    idx = clips.tf_frame_indices(ex['num_frames'], 0.0, t, stride, start=j * t * stride)
    frames = decode_frames(ex['frames'], idx, t)
    video = clips.process(frames, tf.zeros([4]), video_shape, short_side=short)
    cid = tf.gather(offsets_t, ex['index']) + j if all_mode else ex['index']
    return {
      'video': video,
      'label': tf.cast(ex['label'], tf.int32),
      'clip_id': tf.cast(cid, tf.int32),
    }

  ds = ds.flat_map(expand).map(eval_elem, num_parallel_calls=npc)
  return source_api.Built(ds, num_eval, log)
