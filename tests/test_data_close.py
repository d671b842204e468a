"""`DataIterator.close()`: prompt cancellation of in-flight decodes, idempotence, every source.

Decodes are made slow by wrapping PyAV's frame iterator (`video_io._open`) with a sleep per frame,
so that an uncancelled clip decode takes at least `_MIN_DECODE_S` (>= 10 s) by construction.
"""

import threading
import time

import numpy as np
import pytest

from larp_jax import data
from larp_jax.data import prepare
from larp_jax.data import video_io
from test_data_files import make_folder
from test_data_files import write_video

SHAPE = (4, 16, 16)
_FRAME_S = 0.05  # sleep per decoded frame of a slow decode
_STRIDE = 70  # a clip spans (4 - 1) * 70 + 1 = 211 frames: decoded up to frame >= 210
_MIN_DECODE_S = _FRAME_S * ((SHAPE[0] - 1) * _STRIDE + 1)  # 10.55 s for one uncancelled decode


class _SlowContainer:
  """A PyAV container whose frames arrive `_FRAME_S` apart."""

  def __init__(self, container, state):
    self._c, self._state = container, state

  def __getattr__(self, name):
    return getattr(self._c, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return self._c.__exit__(*exc)

  def decode(self, *args, **kwargs):
    for frame in self._c.decode(*args, **kwargs):
      self._state.started.set()
      time.sleep(_FRAME_S)
      yield frame


class _State:
  def __init__(self, fast_opens):
    self.fast_left = fast_opens
    self.started = threading.Event()
    self.cancelled = 0
    self.closing = False
    self.finished_slow = 0  # slow decodes that ran to the end while close() was running
    self.lock = threading.Lock()


def _instrument(monkeypatch, fast_opens):
  """Slow decodes after the first `fast_opens` files; counts cancelled decodes, and slow ones that
  finished during close()."""
  state = _State(fast_opens)
  real_open, real_decode = video_io._open, video_io.decode
  this = threading.local()  # whether this thread's current decode is a slow one

  def slow_open(path):
    f, container = real_open(path)
    with state.lock:
      state.fast_left -= 1
      this.slow = state.fast_left < 0
    return f, (_SlowContainer(container, state) if this.slow else container)

  def spy_decode(*args, **kwargs):
    try:
      out = real_decode(*args, **kwargs)
    except video_io.Cancelled:
      with state.lock:
        state.cancelled += 1
      raise
    if getattr(this, 'slow', False) and state.closing:
      with state.lock:
        state.finished_slow += 1
    return out

  monkeypatch.setattr(video_io, '_open', slow_open)
  monkeypatch.setattr(video_io, 'decode', spy_decode)
  return state


def _long_folder(root, n=4, frames=240):
  for i in range(n):
    d = root / f'c{i % 2}'
    d.mkdir(parents=True, exist_ok=True)
    write_video(d / f'v{i}.mp4', frames, seed=i)


def _folder_cfg(root):
  cfg = data.default_config()
  cfg.source, cfg.path = 'folder', str(root)
  cfg.num_parallel_calls, cfg.prefetch, cfg.frame_stride, cfg.flip = 2, 1, _STRIDE, False
  return cfg


def test_close_cancels_in_flight_decodes(tmp_path, monkeypatch, caplog):
  _long_folder(tmp_path)
  skipped_before = data.num_skipped()
  it = data.get_dataset(_folder_cfg(tmp_path), 'train', SHAPE, 2, seed=0)
  # The first 2 batches are fast (even if their decodes start out of order), later ones slow.
  state = _instrument(monkeypatch, fast_opens=4)
  b = next(it)
  assert b['video'].shape == (2,) + SHAPE + (3,) and b['video'].std() > 0
  assert state.started.wait(60), 'no slow decode started after the first batch'
  state.closing = True
  t = time.perf_counter()
  it.close()
  elapsed = time.perf_counter() - t
  # Behaviour, not speed: the running decodes were cancelled instead of awaited. Each needs
  # >= _MIN_DECODE_S uncancelled; close() returns within a small fraction of one.
  assert state.cancelled >= 1 and state.finished_slow == 0
  assert elapsed / _MIN_DECODE_S < 0.25, (elapsed, _MIN_DECODE_S)
  # Cancelled decodes are not bad files.
  assert it.num_skipped == 0 and data.num_skipped() == skipped_before
  assert 'skipping' not in caplog.text


def test_close_during_next_in_another_thread_raises_there(tmp_path, monkeypatch):
  _long_folder(tmp_path)
  state = _instrument(monkeypatch, fast_opens=0)  # before the pipeline's threads start
  it = data.get_dataset(_folder_cfg(tmp_path), 'train', SHAPE, 2, seed=1)
  got = []

  def consume():
    try:
      got.append(next(it))
    except RuntimeError as e:
      got.append(e)

  th = threading.Thread(target=consume)
  th.start()
  assert state.started.wait(60)
  state.closing = True
  it.close()
  th.join(_MIN_DECODE_S / 2)
  assert not th.is_alive()
  # The batch of placeholders that the cancelled decodes made is never handed out.
  assert len(got) == 1 and isinstance(got[0], RuntimeError) and 'closed' in str(got[0])
  assert state.cancelled >= 1 and state.finished_slow == 0


def test_cancelled_decode_raises_private_error_and_is_not_skipped(tmp_path):
  p = tmp_path / 'v.mp4'
  write_video(p, 8)
  cancel = threading.Event()
  assert video_io.decode(str(p), cancel=cancel).shape == (8, 32, 48, 3)  # unset: decodes
  cancel.set()
  with pytest.raises(video_io.Cancelled):
    video_io.decode(str(p), cancel=cancel)


def test_close_is_idempotent_and_next_raises():
  cfg = data.default_config()
  cfg.synthetic_num_train, cfg.synthetic_num_frames, cfg.num_parallel_calls = 20, 8, 2
  it = data.get_dataset(cfg, 'train', SHAPE, 3, seed=0)
  next(it)
  assert not it.closed
  it.close()
  it.close()
  assert it.closed and it.dataset is None
  with pytest.raises(RuntimeError, match='closed'):
    next(it)
  with data.get_dataset(cfg, 'eval', SHAPE, 4) as ev:
    assert next(ev)['mask'].all()
  assert ev.closed
  with pytest.raises(RuntimeError, match='closed'):
    next(ev)


def test_closing_one_pipeline_leaves_another_intact():
  cfg = data.default_config()
  cfg.synthetic_num_train, cfg.synthetic_num_frames, cfg.num_parallel_calls = 20, 8, 2
  ref = [next(it) for it in [data.get_dataset(cfg, 'train', SHAPE, 4, seed=3)] for _ in range(4)]
  live = data.get_dataset(cfg, 'train', SHAPE, 4, seed=3)
  got = [next(live)]
  with data.get_dataset(cfg, 'train', SHAPE, 4, seed=3) as other:
    next(other)
  got += [next(live) for _ in range(3)]
  for want, have in zip(ref, got):
    for k in want:
      np.testing.assert_array_equal(want[k], have[k])
  assert got[-1]['video'].std() > 0.05  # real frames, not placeholders
  live.close()


def test_records_source_closes(tmp_path):
  make_folder(tmp_path / 'src')
  prepare.prepare(str(tmp_path / 'src'), str(tmp_path / 'rec'), short_side=24, shards=2, workers=2)
  cfg = data.default_config()
  cfg.source, cfg.path, cfg.shuffle_buffer = 'records', str(tmp_path / 'rec'), 4
  it = data.get_dataset(cfg, 'train', SHAPE, 2)
  assert next(it)['video'].shape == (2,) + SHAPE + (3,)
  assert it.num_upscaled is None  # resized in the TF graph: not tracked
  it.close()
  it.close()
  with pytest.raises(RuntimeError, match='closed'):
    next(it)
