"""Things a person can look at: side-by-side videos (mp4 via PyAV) and image grids (PNG), with an
optional text header (PIL's built-in font, nothing downloaded)."""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

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
    canvas[:, y : y + h, :w] = a[i]
    canvas[:, y : y + h, w + gap :] = b[i]
  return canvas


def frame_grid(video: np.ndarray, max_frames: int = 8, gap: int = 0) -> np.ndarray:
  """[T, H, W, 3] uint8 -> [H, k*W + (k-1)*gap, 3]: up to ``max_frames`` evenly spaced frames in a
  row, ``gap`` white columns between them."""
  t, h = video.shape[:2]
  idx = np.linspace(0, t - 1, min(t, max_frames)).round().astype(int)
  white = np.full((h, gap, 3), 255, np.uint8)
  parts = [p for i in idx for p in (white, video[i])][1:] if gap > 0 else [video[i] for i in idx]
  return np.concatenate(parts, axis=1)


HEADER_MIN_WIDTH = 720  # px: a narrow image is padded (white, right) so the header stays readable


def _font(size: int):
  from PIL import ImageFont

  try:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
  except (TypeError, ImportError, OSError):
    return ImageFont.load_default()  # the fixed bitmap font


def _wrap(draw, text: str, font, width: int) -> list:
  """Greedy word wrap of one line of ``text`` to ``width`` pixels."""
  lines, cur = [], ''
  for word in text.split(' '):
    cand = f'{cur} {word}' if cur else word
    if cur and draw.textlength(cand, font=font) > width:
      lines.append(cur)
      cur = word
    else:
      cur = cand
  return lines + [cur]


def add_header(
  image: np.ndarray, lines: Union[str, Sequence[str]], min_width: int = HEADER_MIN_WIDTH
) -> np.ndarray:
  """[H, W, 3] uint8 -> [h + H, max(W, min_width), 3]: black text lines on white above the image.

  Lines are wrapped to the width; the font size follows the width (14 to 28 px).
  """
  from PIL import Image, ImageDraw

  lines = [lines] if isinstance(lines, str) else list(lines)
  h, w, _ = image.shape
  width = max(w, int(min_width))
  size = int(np.clip(width // 80, 14, 28))
  font = _font(size)
  probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  pad = size // 2
  wrapped = [part for line in lines for part in _wrap(probe, line, font, width - 2 * pad)]
  line_h = int(size * 1.35)
  top = 2 * pad + line_h * len(wrapped)
  canvas = Image.new('RGB', (width, top + h), (255, 255, 255))
  canvas.paste(Image.fromarray(image), (0, top))
  draw = ImageDraw.Draw(canvas)
  for i, line in enumerate(wrapped):
    draw.text((pad, pad + i * line_h), line, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def write_png(
  path: str, image: np.ndarray, upscale: int = 1, header: Optional[Union[str, Sequence[str]]] = None
) -> None:
  """Writes ``image`` [H, W, 3] uint8, pixels repeated ``upscale`` times, with ``add_header``'s
  text above it if ``header`` is given (drawn after the upscale, so the text stays sharp)."""
  from PIL import Image

  if upscale > 1:
    image = image.repeat(upscale, 0).repeat(upscale, 1)
  if header:
    image = add_header(image, header)
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


def write_reconstructions(
  out_dir: str,
  name: str,
  originals,
  reconstructions,
  header: Optional[Union[str, Sequence[str]]] = None,
) -> dict:
  """Writes ``name.mp4`` (side by side, moving) and ``name.png`` (frames in rows) in out_dir.

  ``header``: text line(s) drawn above the PNG (e.g. the tokenizer's and the baselines' PSNR, see
  ``evaluation.evaluator.recon_header``); the mp4 has no header.
  """
  gap = 2
  video = side_by_side(originals, reconstructions, gap=gap)
  h = video.shape[1]
  upscale = max(1, 256 // max(1, h // max(1, len(originals))))
  upscale = min(upscale, 4)
  paths = {'mp4': os.path.join(out_dir, f'{name}.mp4'), 'png': os.path.join(out_dir, f'{name}.png')}
  write_mp4(paths['mp4'], video, upscale=upscale)
  write_png(paths['png'], frame_grid(video, gap=4 * gap), upscale=upscale, header=header)
  return paths
