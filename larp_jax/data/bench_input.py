"""Input throughput (clips/s) of each source on this machine. Not a test.

  python -m larp_jax.data.bench_input [--steps=20] [--batch=16]

Synthetic at 16x64x64 and 16x128x128; folder and records on small generated videos
(24 videos of 48 frames at 240x320, mpeg4), clips 16x128x128 at short side 128. The work is done
by `measure()`; `clips_per_s()` is the rate of one config (`python -m larp_jax.bench` uses it).
"""

import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import av
import numpy as np

from larp_jax import cli_env
from larp_jax import data
from larp_jax.data import prepare
from larp_jax.errors import UserError


def _write(path, n, h, w, seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  with av.open(path, mode='w') as c:
    s = c.add_stream('mpeg4', rate=25)
    s.width, s.height, s.pix_fmt = w, h, 'yuv420p'
    for t in range(n):
      img = (rng.integers(0, 255, 3) // 4 + xx[..., None] + 3 * t + yy[..., None]) % 256
      for p in s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format='rgb24')):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def clips_per_s(cfg, shape, batch, steps):
  it = data.get_dataset(cfg, 'train', shape, batch, seed=0)
  next(it)  # warm-up: graph building, first prefetch
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t)


def measure(steps: int = 20, batch: int = 16) -> dict:
  """{'rows': [(source, clip shape, clips/s)], 'prepare_s': seconds to prepare the records}."""
  if steps < 1 or batch < 1:
    raise UserError(f'--steps and --batch must be >= 1, got {steps} and {batch}')
  rows = []
  cfg = data.default_config()
  for shape in [(16, 64, 64), (16, 128, 128)]:
    rows.append(('synthetic', shape, clips_per_s(cfg, shape, batch, steps)))
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, 'videos')
    for i in range(24):
      os.makedirs(os.path.join(src, f'class{i % 4}'), exist_ok=True)
      _write(os.path.join(src, f'class{i % 4}', f'v{i}.mp4'), 48, 240, 320, i)
    t = time.perf_counter()
    prepare.prepare(src, os.path.join(tmp, 'rec'), short_side=128, shards=4)
    prep_s = time.perf_counter() - t
    for source, path in [('folder', src), ('records', os.path.join(tmp, 'rec'))]:
      cfg = data.default_config()
      cfg.source, cfg.path, cfg.short_side, cfg.shuffle_buffer = source, path, 128, 24
      rows.append((source, (16, 128, 128), clips_per_s(cfg, (16, 128, 128), batch, steps)))
  return {'rows': rows, 'prepare_s': prep_s}


def format_table(result: dict) -> str:
  lines = [f'{"source":10s} {"clip":>12s} {"clips/s":>8s}   ({os.cpu_count()} CPU cores)']
  for name, shape, r in result['rows']:
    lines.append(f'{name:10s} {"x".join(map(str, shape)):>12s} {r:8.1f}')
  lines.append(f'prepare: 24 videos of 48 frames 240x320 in {result["prepare_s"]:.1f} s')
  return '\n'.join(lines)


def _command(args: list) -> None:
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_integer(
    'steps', 20, 'Timed batches per source (after one warm-up batch).', flag_values=fv
  )
  flags.DEFINE_integer('batch', 16, 'Clips per batch.', flag_values=fv)
  cli_env.parse_flags(fv, args, __doc__)
  print(format_table(measure(fv.steps, fv.batch)))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command on ``argv`` (the arguments after the program name; default
  ``sys.argv[1:]``); returns the exit code (2 after one ``error:`` line on stderr)."""
  return cli_env.run_command(_command, argv)


if __name__ == '__main__':
  sys.exit(main())
