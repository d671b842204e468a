"""Video files: listing a folder or CSV, decoding with PyAV, and counting the files skipped.

Paths are only ever paths: files are opened with Python's `open()` and the file object is handed
to PyAV, so a name such as `rtsp://...`, `pipe:0` or `concat:a|b` is never read as an FFmpeg URL
or protocol, and nothing is globbed or expanded.
"""

import csv
import dataclasses
import logging
import os
import threading

import av
import numpy as np

from larp_jax.data import clips

VIDEO_EXTENSIONS = (
  '.mp4',
  '.avi',
  '.webm',
  '.mkv',
  '.gif',
  '.mov',
  '.m4v',
  '.mpg',
  '.mpeg',
  '.flv',
  '.wmv',
  '.ogv',
  '.3gp',
  '.ts',
)

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_all_skipped: set = set()  # every file skipped in this process, for `num_skipped()`

# `decode` warns (once per file, through an `UpscaleLog`) when it resizes a video up by more than
# this factor on either side: the clips are then mostly interpolation.
UPSCALE_WARN_FACTOR = 2.0


class Cancelled(Exception):
  """`decode` stopped because its `cancel` event was set (the pipeline is closing); not a bad
  file."""


class SkipLog:
  """Thread-safe record of the files skipped by one pipeline; warns once per file."""

  def __init__(self):
    self.paths: set = set()

  def add(self, path: str, reason: str) -> None:
    with _lock:
      new = path not in self.paths
      self.paths.add(path)
      _all_skipped.add(path)
    if new:
      _log.warning(
        'skipping undecodable video %r: %s (%d skipped so far)', path, reason, len(self.paths)
      )

  def __len__(self):
    return len(self.paths)


class UpscaleLog:
  """Thread-safe record of the files one pipeline resized up by more than `UPSCALE_WARN_FACTOR`
  on either side; warns once per file."""

  def __init__(self):
    self.paths: set = set()

  def add(self, path: str, src_hw, out_hw) -> None:
    with _lock:
      new = path not in self.paths
      self.paths.add(path)
    if new:
      factor = max(out_hw[0] / src_hw[0], out_hw[1] / src_hw[1])
      _log.warning(
        'upscaling video %r from %dx%d to %dx%d (%.1fx): the source is much smaller '
        'than the clip (%d upscaled so far)',
        path,
        src_hw[0],
        src_hw[1],
        out_hw[0],
        out_hw[1],
        factor,
        len(self.paths),
      )

  def __len__(self):
    return len(self.paths)


def num_skipped_total() -> int:
  with _lock:
    return len(_all_skipped)


@dataclasses.dataclass(frozen=True)
class VideoList:
  paths: tuple  # absolute or as given
  labels: np.ndarray  # int32 [N]
  classes: tuple  # class names, index = label (may be empty for label-only CSVs)


def _is_video(name: str) -> bool:
  return name.lower().endswith(VIDEO_EXTENSIONS)


def folder_classes(root: str) -> list:
  """Class names (parent folder names) of the videos under `root`."""
  names = set()
  for dirpath, _, files in os.walk(root):
    if any(_is_video(f) for f in files):
      names.add(os.path.basename(dirpath))
  return sorted(names)


def list_videos(path: str, classes=None, csv_root=None) -> VideoList:
  """Videos of a folder (class = parent folder name) or a CSV (`path,label` or `id,path,action,label`).

  Folder labels are indices into `classes` (default: sorted class names found under `path`).
  The list is sorted by path, so indices are stable.
  """
  if os.path.isdir(path):
    classes = list(classes) if classes is not None else folder_classes(path)
    ids = {c: i for i, c in enumerate(classes)}
    items = []
    for dirpath, dirs, files in os.walk(path):
      dirs.sort()
      for f in files:
        if _is_video(f) and os.path.basename(dirpath) in ids:
          items.append((os.path.join(dirpath, f), ids[os.path.basename(dirpath)]))
    items.sort()
    return VideoList(
      tuple(p for p, _ in items), np.array([l for _, l in items], np.int32), tuple(classes)
    )
  root = csv_root or os.path.dirname(os.path.abspath(path))
  with open(path, newline='') as f:
    rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
  if not rows:
    return VideoList((), np.zeros([0], np.int32), ())
  head = [c.strip().lower() for c in rows[0]]
  if 'path' in head and 'label' in head:
    pi, li = head.index('path'), head.index('label')
    ai = head.index('action') if 'action' in head else None
    rows = rows[1:]
  else:  # headerless `path,label`
    pi, li, ai = 0, 1, None
  names = {}
  items = []
  for r in rows:
    p = r[pi]
    label = int(r[li])
    if ai is not None:
      names[label] = r[ai]
    items.append((p if os.path.isabs(p) else os.path.join(root, p), label))
  items.sort()
  classes = tuple(names.get(i, str(i)) for i in range(max(names) + 1)) if names else ()
  return VideoList(tuple(p for p, _ in items), np.array([l for _, l in items], np.int32), classes)


def _open(path: str):
  f = open(path, 'rb')  # a path, never a URL or FFmpeg protocol
  try:
    container = av.open(f, mode='r')
  except BaseException:
    f.close()
    raise
  return f, container


def probe_num_frames(path: str) -> int:
  """Frame count from the container (demuxing packets if the header has none). Raises on bad files."""
  f, container = _open(path)
  with f, container:
    if not container.streams.video:
      raise ValueError('no video stream')
    stream = container.streams.video[0]
    n = int(stream.frames or 0)
    if n <= 0:
      n = sum(1 for p in container.demux(stream) if p.size)
    if n <= 0:
      raise ValueError('no frames')
    return n


def _check(cancel) -> None:
  if cancel is not None and cancel.is_set():
    raise Cancelled()


def _output_size(h: int, w: int, out_hw, short_side) -> tuple[int, int]:
  if out_hw is None and not short_side:
    return h, w
  oh, ow = out_hw if out_hw is not None else (1, 1)
  return clips.resized_size(h, w, oh, ow, short_side)


def decode(
  path: str,
  short_side=None,
  out_hw=None,
  start_u=None,
  num_frames=None,
  stride=1,
  start=None,
  interpolation='BILINEAR',
  cancel=None,
  upscale_log=None,
):
  """Decodes frames as uint8 [n, h', w', 3], resized by swscale (antialiased bilinear).

  With `num_frames`, returns the clip of `num_frames` frames starting at `start`, or at a start
  drawn from `start_u` in [0, 1) (see `clips.start_frame`), padded with the last frame; without,
  returns every frame. The size is `clips.resized_size` of the source size for `out_hw` (H, W)
  and `short_side`; (None, None) keeps the source size. Raises on an undecodable file.

  `cancel`: a `threading.Event`, checked before each frame; once set, decoding stops with the
  `Cancelled`, which callers that pass `cancel` catch (it is not a bad file).
  `upscale_log`: an `UpscaleLog` told about a resize up by more than `UPSCALE_WARN_FACTOR`.
  """
  _check(cancel)
  f, container = _open(path)
  with f, container:
    if not container.streams.video:
      raise ValueError('no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    n_meta = int(stream.frames or 0)
    want = None
    if num_frames is not None and n_meta > 0:
      s = (
        start
        if start is not None
        else clips.start_frame(n_meta, start_u or 0.0, num_frames, stride)
      )
      want = clips.frame_indices(n_meta, s, num_frames, stride)
    size = None
    kept = {}
    count = 0
    for frame in container.decode(stream):
      _check(cancel)
      if size is None:
        size = _output_size(frame.height, frame.width, out_hw, short_side)
        if (
          upscale_log is not None
          and max(size[0] / frame.height, size[1] / frame.width) > UPSCALE_WARN_FACTOR
        ):
          upscale_log.add(path, (frame.height, frame.width), size)
      if want is None or count in want:
        kept[count] = frame.to_ndarray(
          width=size[1], height=size[0], format='rgb24', interpolation=interpolation
        )
      count += 1
      if want is not None and count > want[-1]:
        break
    if not kept:
      raise ValueError('no decodable frames')
    if num_frames is None:
      return np.stack([kept[i] for i in range(count)])
    if want is None:  # no frame count in the header: everything was decoded, pick now
      s = (
        start if start is not None else clips.start_frame(count, start_u or 0.0, num_frames, stride)
      )
      want = clips.frame_indices(count, s, num_frames, stride)
    last = max(kept)  # the header may over-count: pad with the last frame actually decoded
    return np.stack([kept[min(int(i), last)] for i in want])
