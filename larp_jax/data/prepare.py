"""Decode a video folder or CSV list once into sharded TFRecords for the `records` source.

  python -m larp_jax.data.prepare SRC OUT [--short_side=128] [--shards=N] [--workers=K]

SRC is a folder (class = parent folder name, ids in sorted() order) or a CSV (`path,label` or
`id,path,action,label`). Every video is decoded with PyAV and resized by swscale (antialiased
bilinear) so its short side is `short_side`; frames are stored losslessly as PNG, so the records
hold exactly the uint8 frames that `video_io.decode(path, short_side=...)` returns. Undecodable
files are skipped with a warning and listed in the manifest. Videos resized up by more than
`video_io.UPSCALE_WARN_FACTOR` on a side get one warning each and are counted (`num_upscaled`).
Videos are written in a fixed shuffled order (round-robin over shards) so that every shard mixes
the classes.
"""
import argparse
import concurrent.futures
import io
import json
import logging
import os
import sys

from larp_jax import cli_env

cli_env.quiet_tensorflow()  # before TensorFlow loads

# pylint: disable=wrong-import-position
import numpy as np
from PIL import Image
import tensorflow as tf

from larp_jax.data import records
from larp_jax.data import video_io

_log = logging.getLogger(__name__)


def _png(frame: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def _example(frames, label, index, path):
  feat = lambda **kw: tf.train.Feature(**kw)
  ints = lambda v: feat(int64_list=tf.train.Int64List(value=[int(v)]))
  return tf.train.Example(features=tf.train.Features(feature={
      'frames': feat(bytes_list=tf.train.BytesList(value=[_png(f) for f in frames])),
      'num_frames': ints(len(frames)), 'height': ints(frames.shape[1]),
      'width': ints(frames.shape[2]), 'label': ints(label), 'index': ints(index),
      'path': feat(bytes_list=tf.train.BytesList(value=[os.fsencode(path)])),
  })).SerializeToString()


def prepare(src: str, out: str, short_side: int = 128, shards: int = 8, workers: int | None = None,
            csv_root: str | None = None, seed: int = 0) -> dict:
  """Writes OUT/shard-*.tfrecord and OUT/manifest.json; returns the manifest."""
  if not os.path.exists(src):
    raise ValueError(f'source does not exist: {src!r}')
  vl = video_io.list_videos(src, csv_root=csv_root)
  if not vl.paths:
    raise ValueError(f'no video files found in {src!r}')
  os.makedirs(out, exist_ok=True)
  shards = max(1, min(int(shards), len(vl.paths)))
  names = [f'shard-{s:05d}-of-{shards:05d}.tfrecord' for s in range(shards)]
  writers = [tf.io.TFRecordWriter(os.path.join(out, n)) for n in names]
  info = [{'file': n, 'num_clips': 0, 'indices': [], 'num_frames': []} for n in names]
  order = np.random.default_rng(seed).permutation(len(vl.paths))
  log = video_io.SkipLog()
  upscaled = video_io.UpscaleLog()

  def load(i):
    try:
      return i, video_io.decode(vl.paths[i], short_side=short_side, upscale_log=upscaled)
    except Exception as e:  # pylint: disable=broad-except
      log.add(vl.paths[i], f'{type(e).__name__}: {e}')
      return i, None

  written = 0
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
    for i, frames in pool.map(load, order):
      if frames is None:
        continue
      s = written % shards
      writers[s].write(_example(frames, vl.labels[i], i, vl.paths[i]))
      info[s]['num_clips'] += 1
      info[s]['indices'].append(int(i))
      info[s]['num_frames'].append(int(len(frames)))
      written += 1
  for w in writers:
    w.close()
  if written == 0:
    raise ValueError(f'no decodable video in {src!r} ({len(vl.paths)} files tried)')
  for s in info:
    s['sha256'] = records.sha256(os.path.join(out, s['file']))
  manifest = {'version': 1, 'source': os.path.abspath(src), 'num_clips': written,
              'classes': list(vl.classes), 'short_side': int(short_side),
              'num_skipped': len(log), 'skipped': sorted(log.paths),
              'num_upscaled': len(upscaled), 'shards': info}
  with open(os.path.join(out, records.MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('src', help='video folder or CSV list')
  p.add_argument('out', help='output directory')
  p.add_argument('--short_side', type=int, default=128)
  p.add_argument('--shards', type=int, default=8)
  p.add_argument('--workers', type=int, default=None)
  p.add_argument('--csv_root', default=None, help='base of relative CSV paths (default: CSV dir)')
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  try:
    m = prepare(a.src, a.out, a.short_side, a.shards, a.workers, a.csv_root)
  except ValueError as e:
    sys.exit(f'prepare: {e}')
  print(f'wrote {m["num_clips"]} clips in {len(m["shards"])} shards to {a.out} '
        f'({m["num_skipped"]} skipped)')


if __name__ == '__main__':
  main()
