"""Things a person can look at: side-by-side videos (mp4 via PyAV) and image grids (PNG)."""

from __future__ import annotations

import os

import numpy as np


def to_uint8(video) -> np.ndarray:
  return (np.clip(np.asarray(video, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def side_by_side(originals, reconstructions, gap: int = 2) -> np.ndarray:
  """[N, T, H, W, 3] x 2 -> one [T, N*H + gaps, 2*W + gap, 3] uint8 video: originals on the
  left, reconstructions on the right, one row per clip."""
  a, b = to_uint8(originals), to_uint8(reconstructions)
  n, t, h, w, _ = a.shape
  canvas = np.full((t, n * h + (n - 1) * gap, 2 * w + gap, 3), 255, np.uint8)
  for i in range(n):
    y = i * (h + gap)
    canvas[:, y:y + h, :w] = a[i]
    canvas[:, y:y + h, w + gap:] = b[i]
  return canvas


def frame_grid(video: np.ndarray, max_frames: int = 8) -> np.ndarray:
  """[T, H, W, 3] uint8 -> [H, k*W, 3]: up to ``max_frames`` evenly spaced frames in a row."""
  t = video.shape[0]
  idx = np.linspace(0, t - 1, min(t, max_frames)).round().astype(int)
  return np.concatenate([video[i] for i in idx], axis=1)


def write_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
  from PIL import Image
  if upscale > 1:
    image = image.repeat(upscale, 0).repeat(upscale, 1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path)


def write_mp4(path: str, video: np.ndarray, fps: int = 8, upscale: int = 1) -> None:
  """[T, H, W, 3] uint8 -> H.264 mp4 (sizes padded to even numbers for yuv420p)."""
  import av
  if upscale > 1:
    video = video.repeat(upscale, 1).repeat(upscale, 2)
  t, h, w, _ = video.shape
  video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=255)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with av.open(path, mode='w') as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.width, stream.height = video.shape[2], video.shape[1]
    stream.pix_fmt = 'yuv420p'
    for frame in video:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_reconstructions(out_dir: str, name: str, originals, reconstructions) -> dict:
  """Writes ``name.mp4`` (side by side, moving) and ``name.png`` (frames in rows) in out_dir."""
  video = side_by_side(originals, reconstructions)
  h = video.shape[1]
  upscale = max(1, 256 // max(1, h // max(1, len(originals))))
  upscale = min(upscale, 4)
  paths = {'mp4': os.path.join(out_dir, f'{name}.mp4'), 'png': os.path.join(out_dir, f'{name}.png')}
  write_mp4(paths['mp4'], video, upscale=upscale)
  write_png(paths['png'], frame_grid(video), upscale=upscale)
  return paths
