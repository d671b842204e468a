"""Folder, CSV and records sources; `prepare` round trip; bad files skipped and counted."""

import os
import subprocess
import sys

import av
import numpy as np
import pytest

from larp_jax import data
from larp_jax.data import prepare
from larp_jax.data import records
from larp_jax.data import video_io

SHAPE = (4, 24, 24)


def write_video(path, num_frames, h=32, w=48, seed=0, codec='mpeg4', fps=25):
  """A small video whose frames differ (moving gradient + per-video colour)."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 255, size=3)
  yy, xx = np.mgrid[:h, :w]
  with av.open(str(path), mode='w') as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height = w, h
    s.pix_fmt = 'rgb8' if codec == 'gif' else 'yuv420p'
    for t in range(num_frames):
      img = (base + 4 * xx[..., None] + 6 * t + 2 * yy[..., None]) % 256
      for p in s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format='rgb24')):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def make_folder(root, with_bad=False):
  """2 classes x 3 videos (8-20 frames); optionally 3 bad files. Returns the good paths."""
  good = []
  for ci, cls in enumerate(['walk', 'jump']):  # sorted(): jump=0, walk=1
    d = root / cls
    d.mkdir(parents=True)
    for k in range(3):
      ext = ['mp4', 'avi', 'mkv'][k]
      p = d / f'v{k}.{ext}'
      write_video(p, 8 + 6 * k, seed=10 * ci + k)
      good.append(str(p))
  if with_bad:
    (root / 'walk' / 'garbage.mp4').write_bytes(os.urandom(3000))
    (root / 'jump' / 'empty.avi').write_bytes(b'')
    whole = open(good[0], 'rb').read()
    (root / 'jump' / 'truncated.mp4').write_bytes(whole[: len(whole) // 3])
  return good


def _cfg(source, path, **kw):
  cfg = data.default_config()
  cfg.source, cfg.path = source, str(path)
  cfg.num_parallel_calls = 2
  cfg.shuffle_buffer = 8
  cfg.update(kw)
  return cfg


def test_folder_listing_labels_sorted(tmp_path):
  make_folder(tmp_path)
  vl = video_io.list_videos(str(tmp_path))
  assert vl.classes == ('jump', 'walk')
  assert [os.path.basename(os.path.dirname(p)) for p in vl.paths] == ['jump'] * 3 + ['walk'] * 3
  np.testing.assert_array_equal(vl.labels, [0, 0, 0, 1, 1, 1])


def test_folder_train_and_eval_batches(tmp_path):
  make_folder(tmp_path)
  vl = video_io.list_videos(str(tmp_path))
  it = data.get_dataset(_cfg('folder', tmp_path), 'train', SHAPE, 4, seed=0)
  for _ in range(3):
    b = next(it)
    assert b['video'].shape == (4,) + SHAPE + (3,) and b['video'].dtype == np.float32
    assert 0 <= b['video'].min() and b['video'].max() <= 1
    np.testing.assert_array_equal(b['label'], vl.labels[b['clip_id']])
  ev = list(data.get_dataset(_cfg('folder', tmp_path), 'eval', SHAPE, 4))
  assert [b['mask'].sum() for b in ev] == [4, 2]
  # Eval clip 0 = frames 0..3 of video 0, short side 24 (36x24), center crop 24x24, /255.
  frames = video_io.decode(vl.paths[0], short_side=None, out_hw=(24, 24))
  assert frames.shape[1:] == (24, 36, 3)
  np.testing.assert_allclose(ev[0]['video'][0], frames[:4, :, 6:30] / 255.0, atol=1e-6)


def test_csv_list_official_header_and_short_videos(tmp_path):
  good = make_folder(tmp_path / 'vids')
  with open(tmp_path / 'list.csv', 'w') as f:
    f.write('id,path,action,label\n')
    for i, p in enumerate(good):
      rel = os.path.relpath(p, tmp_path)
      f.write(f'{i},{rel},{"Jump" if "jump" in p else "Walk"},{7 if "jump" in p else 3}\n')
  vl = video_io.list_videos(str(tmp_path / 'list.csv'))
  assert set(vl.labels.tolist()) == {3, 7} and vl.classes[7] == 'Jump'
  cfg = _cfg('folder', tmp_path / 'list.csv')
  b = next(data.get_dataset(cfg, 'eval', (16, 24, 24), 6))  # T=16 > 8 frames: padded
  assert b['mask'].all()
  i = int(np.flatnonzero(b['clip_id'] == 0)[0])
  assert vl.paths[0].endswith(os.path.join('jump', 'v0.mp4'))  # the 8-frame video
  np.testing.assert_array_equal(b['video'][i, 8:], np.repeat(b['video'][i, 7:8], 8, 0))
  assert not np.array_equal(b['video'][i, 6], b['video'][i, 7])


def test_bad_files_are_skipped_counted_and_named(tmp_path, caplog):
  make_folder(tmp_path, with_bad=True)
  before = data.num_skipped()
  it = data.get_dataset(_cfg('folder', tmp_path), 'train', SHAPE, 3, seed=1)
  for _ in range(6):  # 18 elements = 2 epochs of 9 files: every file is tried
    b = next(it)
    assert b['video'].shape == (3,) + SHAPE + (3,)
    assert b['video'].std() > 0
  assert it.num_skipped == 3
  assert data.num_skipped(it) == 3 and data.num_skipped() >= before + 3
  assert {os.path.basename(p) for p in it.skipped_paths} == {
    'garbage.mp4',
    'empty.avi',
    'truncated.mp4',
  }
  assert 'garbage.mp4' in caplog.text
  ev = data.get_dataset(_cfg('folder', tmp_path), 'eval', SHAPE, 4)
  got = np.concatenate([b['clip_id'][b['mask']] for b in ev])
  assert len(got) == 6 and ev.num_skipped == 3


def test_folder_train_pass_masks_bad_files_instead_of_replacing_them(tmp_path):
  make_folder(tmp_path, with_bad=True)
  vl = video_io.list_videos(str(tmp_path))
  it = data.get_dataset(_cfg('folder', tmp_path), 'train', SHAPE, 4, seed=1, train_pass=0)
  batches = list(it)
  assert len(batches) == 3 and it.num_skipped == 3  # 9 files, 3 of them bad
  ids = np.concatenate([b['clip_id'][b['mask']] for b in batches])
  good = [i for i, p in enumerate(vl.paths) if os.path.basename(p).startswith('v')]
  np.testing.assert_array_equal(ids, good)  # each good video once, in list order
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, vl.labels[ids])


def test_no_decodable_video_is_one_line_error(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'a' / 'x.mp4').write_bytes(b'not a video')
  (tmp_path / 'a' / 'y.webm').write_bytes(b'')
  with pytest.raises(ValueError, match='^data: no decodable video in [^\n]*$'):
    data.get_dataset(_cfg('folder', tmp_path), 'train', SHAPE, 2)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no video files'):
    data.get_dataset(_cfg('folder', tmp_path / 'empty'), 'train', SHAPE, 2)


def test_paths_are_only_paths(tmp_path):
  weird = tmp_path / 'c'
  weird.mkdir()
  p = weird / 'concat:x|y.mp4'  # an FFmpeg protocol if read as a URL
  write_video(p, 8)
  assert video_io.decode(str(p)).shape == (8, 32, 48, 3)
  with pytest.raises(FileNotFoundError):
    video_io.decode('pipe:0')


def test_folder_two_hosts_disjoint_cover(tmp_path):
  make_folder(tmp_path)
  seen = []
  for h in (0, 1):
    ev = data.get_dataset(
      _cfg('folder', tmp_path), 'eval', SHAPE, 2, process_index=h, process_count=2
    )
    seen.append({int(i) for b in ev for i in b['clip_id'][b['mask']]})
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(6))


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('src')
  make_folder(root, with_bad=True)
  out = tmp_path_factory.mktemp('rec')
  m = prepare.prepare(str(root), str(out), short_side=24, shards=3, workers=2)
  return root, out, m


def test_prepare_manifest_and_exact_round_trip(prepared):
  root, out, m = prepared
  assert m['num_clips'] == 6 and m['num_skipped'] == 3 and m['classes'] == ['jump', 'walk']
  assert len(m['shards']) == 3 and sum(s['num_clips'] for s in m['shards']) == 6
  assert records.verify(str(out)) == []
  vl = video_io.list_videos(str(root))
  import tensorflow as tf

  for s in m['shards']:
    for raw, idx in zip(tf.data.TFRecordDataset(os.path.join(out, s['file'])), s['indices']):
      ex = records.parse(raw)
      frames = np.stack([tf.io.decode_png(x).numpy() for x in ex['frames']])
      ref = video_io.decode(vl.paths[idx], short_side=24)  # PyAV at that size
      assert ref.shape[1:] == (24, 36, 3) and int(ex['index']) == idx
      np.testing.assert_array_equal(frames, ref)
      assert int(ex['label']) == vl.labels[idx]


def test_records_source_batches_hosts_and_resume(prepared):
  _, out, m = prepared
  cfg = _cfg('records', out)
  b = next(data.get_dataset(cfg, 'train', SHAPE, 4, seed=0))
  assert b['video'].shape == (4,) + SHAPE + (3,) and b['label'].dtype == np.int32
  idx = [i for s in m['shards'] for i in s['indices']]
  assert set(b['clip_id'].tolist()) <= set(idx)
  full = [next(it) for it in [data.get_dataset(cfg, 'train', SHAPE, 4, seed=2)] for _ in range(6)]
  res = data.get_dataset(cfg, 'train', SHAPE, 4, seed=2, start_step=2)  # 8 = 1 epoch of 6 + 2
  for want in full[2:]:
    got = next(res)
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  one = list(data.get_dataset(cfg, 'train', SHAPE, 4, seed=2, train_pass=0))
  assert sorted(i for b in one for i in b['clip_id'][b['mask']]) == sorted(idx)
  for pc in (2, 3):  # 3 shards: record-level split for 2 hosts, file-level for 3
    seen = [
      {
        int(i)
        for b in data.get_dataset(cfg, 'eval', SHAPE, 2, process_index=h, process_count=pc)
        for i in b['clip_id'][b['mask']]
      }
      for h in range(pc)
    ]
    assert sum(len(s) for s in seen) == 6 and set().union(*seen) == set(idx)


def test_records_eval_matches_folder_eval(prepared):
  root, out, _ = prepared
  a = list(data.get_dataset(_cfg('records', out, short_side=24), 'eval', SHAPE, 8))
  f = list(data.get_dataset(_cfg('folder', root, short_side=24), 'eval', SHAPE, 8))
  ra = {int(c): v for b in a for c, v in zip(b['clip_id'][b['mask']], b['video'][b['mask']])}
  rf = {int(c): v for b in f for c, v in zip(b['clip_id'][b['mask']], b['video'][b['mask']])}
  assert ra.keys() == rf.keys()
  for k in ra:
    np.testing.assert_array_equal(ra[k], rf[k])
  chunks = list(data.get_dataset(_cfg('records', out, eval_chunks='all'), 'eval', SHAPE, 8))
  ids = np.concatenate([b['clip_id'][b['mask']] for b in chunks])
  # 8, 14, 20 frames per class -> 2 + 3 + 5 chunks of 4, twice.
  assert sorted(ids.tolist()) == list(range(20))


def test_prepare_cli_errors_in_one_line(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'a' / 'x.mp4').write_bytes(b'junk')
  r = subprocess.run(
    [sys.executable, '-m', 'larp_jax.data.prepare', str(tmp_path), str(tmp_path / 'o')],
    capture_output=True,
    text=True,
    check=False,
  )
  assert r.returncode != 0 and 'prepare: no decodable video in' in r.stderr
  assert 'Traceback' not in r.stderr
  # No TensorFlow start-up lines around it (they appear on x86 CPUs unless the CLI quiets them).
  assert [l for l in r.stderr.splitlines() if 'oneDNN' in l or 'absl::InitializeLog' in l] == []
  with pytest.raises(ValueError, match='has no manifest.json'):
    data.get_dataset(_cfg('records', tmp_path), 'train', SHAPE, 2)


def test_upscaling_more_than_2x_is_warned_once_per_file_and_counted(tmp_path, caplog):
  d = tmp_path / 'a'
  d.mkdir()
  write_video(d / 'tiny.mp4', 8, h=8, w=8)  # 8x8 -> 32x32: 4x, warned
  write_video(d / 'half.mp4', 8, h=16, w=16)  # 16x16 -> 32x32: exactly 2x, not warned
  write_video(d / 'big.mp4', 8)  # 32x48 -> 32x48: not resized
  tiny = str(d / 'tiny.mp4')
  it = data.get_dataset(_cfg('folder', tmp_path), 'train', (4, 32, 32), 3, seed=0)
  for _ in range(4):  # 4 epochs: every file decoded 4 times
    assert next(it)['video'].shape == (3, 4, 32, 32, 3)
  it.close()
  assert it.num_upscaled == 1 and it.upscaled_paths == [tiny]
  warned = [r.getMessage() for r in caplog.records if 'upscaling' in r.getMessage()]
  assert len(warned) == 1 and repr(tiny) in warned[0]
  assert '8x8 to 32x32 (4.0x)' in warned[0]
  ev = data.get_dataset(_cfg('folder', tmp_path), 'eval', (4, 16, 16), 3)
  list(ev)
  assert ev.num_upscaled == 0  # 8x8 -> 16x16 is 2x
  out = tmp_path / 'rec'
  assert prepare.prepare(str(tmp_path), str(out), short_side=24, shards=1)['num_upscaled'] == 1
