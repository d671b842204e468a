"""Decode a video folder or CSV list once into sharded TFRecords for the `records` source.

  python -m larp_jax.data.prepare SRC OUT [--short_side=128] [--shards=N] [--workers=K]
                                           [--csv_root=DIR]

SRC is a folder (class = parent folder name, ids in sorted() order) or a CSV (`path,label` or
`id,path,action,label`). Every video is decoded with PyAV and resized by swscale (antialiased
bilinear) so its short side is `short_side`; frames are stored losslessly as PNG, so the records
hold exactly the uint8 frames that `video_io.decode(path, short_side=...)` returns. Undecodable
files are skipped with a warning and listed in the manifest. Videos resized up by more than
`video_io.UPSCALE_WARN_FACTOR` on a side get one warning each and are counted (`num_upscaled`).
Videos are written in a fixed shuffled order (round-robin over shards) so that every shard mixes
the classes. A missing source or no decodable video exits with code 2 and one `error:` line.
The work is done by `prepare()`.
"""

import concurrent.futures
import io
import json
import logging
import os
import sys
from typing import Optional, Sequence

from larp_jax import cli_env

cli_env.quiet_tensorflow()  # before TensorFlow loads

# pylint: disable=wrong-import-position
from absl import flags
import numpy as np
from PIL import Image
import tensorflow as tf

from larp_jax.data import records
from larp_jax.data import video_io
from larp_jax.errors import DataError

_log = logging.getLogger(__name__)


def _png(frame: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def _example(frames, label, index, path):
  feat = lambda **kw: tf.train.Feature(**kw)
  ints = lambda v: feat(int64_list=tf.train.Int64List(value=[int(v)]))
  return tf.train.Example(
    features=tf.train.Features(
      feature={
        'frames': feat(bytes_list=tf.train.BytesList(value=[_png(f) for f in frames])),
        'num_frames': ints(len(frames)),
        'height': ints(frames.shape[1]),
        'width': ints(frames.shape[2]),
        'label': ints(label),
        'index': ints(index),
        'path': feat(bytes_list=tf.train.BytesList(value=[os.fsencode(path)])),
      }
    )
  ).SerializeToString()


def prepare(
  src: str,
  out: str,
  short_side: int = 128,
  shards: int = 8,
  workers: int | None = None,
  csv_root: str | None = None,
  seed: int = 0,
) -> dict:
  """Writes OUT/shard-*.tfrecord and OUT/manifest.json; returns the manifest. Raises DataError
  (one line) for a missing source or one without a decodable video."""
  if not os.path.exists(src):
    raise DataError(f'prepare: source does not exist: {src!r}')
  vl = video_io.list_videos(src, csv_root=csv_root)
  if not vl.paths:
    raise DataError(f'prepare: no video files found in {src!r}')
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
    raise DataError(f'prepare: no decodable video in {src!r} ({len(vl.paths)} files tried)')
  for s in info:
    s['sha256'] = records.sha256(os.path.join(out, s['file']))
  manifest = {
    'version': 1,
    'source': os.path.abspath(src),
    'num_clips': written,
    'classes': list(vl.classes),
    'short_side': int(short_side),
    'num_skipped': len(log),
    'skipped': sorted(log.paths),
    'num_upscaled': len(upscaled),
    'shards': info,
  }
  with open(os.path.join(out, records.MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest


def _command(args: list) -> None:
  fv = flags.FlagValues()
  flags.DEFINE_integer(
    'short_side', 128, 'Resize every video so that its short side is this.', flag_values=fv
  )
  flags.DEFINE_integer(
    'shards', 8, 'Number of TFRecord files (at most one per video).', flag_values=fv
  )
  flags.DEFINE_integer(
    'workers', None, 'Decoding threads (default: the CPU count).', flag_values=fv
  )
  flags.DEFINE_string(
    'csv_root', None, 'Base of relative paths in a CSV (default: its directory).', flag_values=fv
  )
  src, out = cli_env.parse_flags(fv, args, __doc__, positional=('SRC', 'OUT'))
  logging.basicConfig(level=logging.INFO)
  m = prepare(src, out, fv.short_side, fv.shards, fv.workers, fv.csv_root)
  print(
    f'wrote {m["num_clips"]} clips in {len(m["shards"])} shards to {out} '
    f'({m["num_skipped"]} skipped)'
  )


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command on ``argv`` (the arguments after the program name; default
  ``sys.argv[1:]``); returns the exit code (2 after one ``error:`` line on stderr)."""
  return cli_env.run_command(_command, argv)


if __name__ == '__main__':
  sys.exit(main())
