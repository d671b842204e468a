"""What sampling leaves for a person to look at: one mp4 of every sample tiled, and a PNG per
class (each row one sample, its frames left to right), under one prefix."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from larp_jax import visualize


def tile(videos: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
  """[N, T, H, W, 3] uint8 -> one [T, rows*H + gaps, columns*W + gaps, 3] video (white gaps)."""
  n, t, h, w, _ = videos.shape
  columns = max(1, min(int(columns), n))
  rows = -(-n // columns)
  canvas = np.full((t, rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3), 255)
  canvas = canvas.astype(np.uint8)
  for i in range(n):
    r, c = divmod(i, columns)
    y, x = r * (h + gap), c * (w + gap)
    canvas[:, y : y + h, x : x + w] = videos[i]
  return canvas


def _upscale(h: int) -> int:
  return int(min(4, max(1, 128 // max(1, h))))


def class_name(label: int, names: Optional[Sequence[str]]) -> str:
  if names is not None and 0 <= int(label) < len(names):
    return f'{int(label)} {names[int(label)]}'
  return f'class {int(label)}'


def write_samples(
  out_dir: str,
  prefix: str,
  videos,
  labels,
  *,
  class_names: Optional[Sequence[str]] = None,
  max_per_class: int = 8,
  header: Optional[str] = None,
) -> dict:
  """Writes ``<prefix>.mp4`` (all samples tiled, sorted by class) and
  ``<prefix>_class<k>.png`` (up to ``max_per_class`` samples of class k, frames in a row).

  Returns {'mp4': path, 'png': {label: path}}.
  """
  videos = visualize.to_uint8(videos)
  labels = np.asarray(labels).astype(int)
  order = np.argsort(labels, kind='stable')
  videos, labels = videos[order], labels[order]
  h = videos.shape[2]
  up = _upscale(h)
  os.makedirs(out_dir, exist_ok=True)
  paths = {'mp4': os.path.join(out_dir, f'{prefix}.mp4'), 'png': {}}
  columns = int(np.ceil(np.sqrt(len(videos))))
  visualize.write_mp4(paths['mp4'], tile(videos, columns), upscale=up)
  for k in np.unique(labels):
    rows = videos[labels == k][:max_per_class]
    strips = [visualize.frame_grid(v, gap=4) for v in rows]
    white = np.full((4,) + strips[0].shape[1:], 255, np.uint8)
    grid = np.concatenate([p for strip in strips for p in (white, strip)][1:], axis=0)
    text = [f'{class_name(k, class_names)}: {len(rows)} samples'] + ([header] if header else [])
    path = os.path.join(out_dir, f'{prefix}_class{int(k)}.png')
    visualize.write_png(path, grid, upscale=up, header=text)
    paths['png'][int(k)] = path
  return paths
