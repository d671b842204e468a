"""Helpers for Jupyter and Colab (the notebooks in ``notebooks/`` use them): run a command with its
output in the cell, show videos and images inline with nothing fetched from the internet, draw
token ids as an image, count codebook use.

IPython is imported only by the ``show_*`` functions, so the rest works anywhere.
"""

from __future__ import annotations

import base64
import collections
import io
import math
import os
import shlex
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np

from larp_jax import visualize

# Log lines that say nothing a person running a notebook needs (clu's per-step metric writer and
# work-unit notes; the loop's own progress lines carry the same numbers).
NOISE = ('logging_writer.py', 'local.py:')


def run(argv: Sequence[str], *, skip: Sequence[str] = NOISE, tail: int = 40, env=None) -> None:
  """Runs ``argv`` (e.g. ``[sys.executable, '-m', 'larp_jax.main', ...]``), printing its output
  as it comes (lines containing any of ``skip`` left out) after the command itself.

  Raises:
    RuntimeError: the command failed; the message ends with its last ``tail`` lines, skipped
      ones included.
  """
  argv = [str(a) for a in argv]
  shown = ['python' if i == 0 and a == sys.executable else a for i, a in enumerate(argv)]
  print('$', shlex.join(shown), flush=True)
  env = dict(os.environ if env is None else env, PYTHONUNBUFFERED='1')
  last = collections.deque(maxlen=tail)
  with subprocess.Popen(
    argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
  ) as proc:
    for line in proc.stdout:
      last.append(line.rstrip('\n'))
      if not any(s in line for s in skip):
        print(line, end='', flush=True)
  if proc.returncode != 0:
    raise RuntimeError(
      f'{shlex.join(shown)} exited with code {proc.returncode}; its last lines:\n' + '\n'.join(last)
    )


def mp4_bytes(video, fps: int = 8, upscale: int = 1) -> bytes:
  """[T, H, W, 3] (float in [0, 1] or uint8) -> the bytes of an H.264 mp4
  (``visualize.write_mp4``)."""
  video = np.asarray(video)
  if video.dtype != np.uint8:
    video = visualize.to_uint8(video)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'video.mp4')
    visualize.write_mp4(path, video, fps=fps, upscale=upscale)
    with open(path, 'rb') as f:
      return f.read()


def video_html(video, fps: int = 8, upscale: int = 1, caption: Optional[str] = None) -> str:
  """An HTML5 ``<video>`` (looping, muted, with controls) holding the mp4 of ``video`` as a
  data URI: it plays offline and stays in a saved notebook."""
  data = base64.b64encode(mp4_bytes(video, fps=fps, upscale=upscale)).decode('ascii')
  tag = (
    f'<video autoplay loop muted playsinline controls src="data:video/mp4;base64,{data}"></video>'
  )
  if caption:
    tag = f'<figure style="display:inline-block;margin:4px">{tag}<figcaption>{caption}</figcaption></figure>'
  return tag


def png_bytes(image, upscale: int = 1) -> bytes:
  """[H, W, 3] (float in [0, 1] or uint8) -> PNG bytes, each pixel repeated ``upscale`` times."""
  from PIL import Image

  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = visualize.to_uint8(image)
  if upscale > 1:
    image = image.repeat(upscale, 0).repeat(upscale, 1)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


def show_video(video, fps: int = 8, upscale: int = 1, caption: Optional[str] = None) -> None:
  """Displays ``video`` [T, H, W, 3] in the notebook (``video_html``)."""
  from IPython.display import HTML, display

  display(HTML(video_html(video, fps=fps, upscale=upscale, caption=caption)))


def show_image(image, upscale: int = 1) -> None:
  """Displays ``image`` [H, W, 3] in the notebook as a PNG."""
  from IPython.display import Image, display

  display(Image(data=png_bytes(image, upscale=upscale), format='png'))


def grid_shape(n: int) -> tuple[int, int]:
  """(rows, columns) for ``n`` tokens: columns the power of two at or above sqrt(n), e.g. 64 -> (8, 8),
  8 -> (2, 4), 1024 -> (32, 32)."""
  cols = 2 ** math.ceil(math.log2(math.sqrt(max(int(n), 1))))
  return -(-int(n) // cols), cols


def code_colours(ids) -> np.ndarray:
  """uint8 RGB [..., 3] for code ids: hues spread by the golden ratio, so neighbouring ids look
  different and one id always has one colour."""
  ids = np.asarray(ids, np.int64)
  hue = (ids * 0.6180339887) % 1.0
  sat = 0.55 + 0.35 * ((ids * 7) % 3) / 2.0
  k = (hue[..., None] * 6.0 + np.array([5.0, 3.0, 1.0])) % 6.0
  rgb = 0.95 * (1.0 - sat[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
  return (rgb * 255.0 + 0.5).astype(np.uint8)


def token_image(tokens, cell: int = 8, gap: int = 2) -> np.ndarray:
  """[B, N] code ids -> one uint8 image: each clip's N tokens as a ``grid_shape(N)`` grid of
  ``cell``-pixel squares (one colour per id, ``code_colours``; token i at row i // columns),
  the clips side by side with white gaps. Unused cells of the last row are white."""
  tokens = np.asarray(tokens)
  b, n = tokens.shape
  rows, cols = grid_shape(n)
  grid = np.full((b, rows * cols, 3), 255, np.uint8)
  grid[:, :n] = code_colours(tokens)
  grid = grid.reshape(b, rows, cols, 3).repeat(cell, 1).repeat(cell, 2)
  h, w = rows * cell, cols * cell
  out = np.full((h, b * w + (b - 1) * gap, 3), 255, np.uint8)
  for i in range(b):
    out[:, i * (w + gap) : i * (w + gap) + w] = grid[i]
  return out


def codebook_counts(tokens, codebook_size: int) -> dict:
  """How ``tokens`` use the codebook: 'counts' [codebook_size] (times each code occurs), 'used'
  (codes that occur), 'usage' (used / codebook_size) and 'perplexity' (exp of the entropy of the
  code frequencies: the number of equally used codes that would give the same entropy)."""
  counts = np.bincount(np.asarray(tokens, np.int64).ravel(), minlength=int(codebook_size))
  p = counts[counts > 0] / max(int(counts.sum()), 1)
  used = int((counts > 0).sum())
  return dict(
    counts=counts,
    used=used,
    usage=used / int(codebook_size),
    perplexity=float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0,
  )
