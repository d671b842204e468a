"""Synthetic source, stream contract (determinism, hosts, resume, eval padding) and config checks."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from larp_jax import data
from larp_jax.data import synthetic

SHAPE = (4, 16, 24)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
  cfg = data.default_config()
  cfg.synthetic_num_train = 40
  cfg.synthetic_num_eval = 13
  cfg.synthetic_num_frames = 12
  cfg.num_parallel_calls = 2
  cfg.update(kw)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batch_shapes_dtypes_ranges():
  it = data.get_dataset(_cfg(), 'train', SHAPE, batch_size=5, seed=0)
  for b in _take(it, 3):
    assert set(b) == {'video', 'label', 'clip_id'}
    assert b['video'].shape == (5,) + SHAPE + (3,) and b['video'].dtype == np.float32
    assert b['label'].shape == (5,) and b['label'].dtype == np.int32
    assert b['clip_id'].dtype == np.int32
    assert 0.0 <= b['video'].min() and b['video'].max() <= 1.0
    assert b['video'].std() > 0.05  # not blank
    np.testing.assert_array_equal(b['label'], b['clip_id'] % 10)


def test_render_is_deterministic_and_moves():
  a, la = synthetic.render(0, 'train', 7, 10, 3, (8, 32, 32))
  b, lb = synthetic.render(0, 'train', 7, 10, 3, (8, 32, 32))
  np.testing.assert_array_equal(a, b)
  assert la == lb == 7
  c, _ = synthetic.render(0, 'eval', 7, 10, 3, (8, 32, 32))
  assert not np.array_equal(a, c)  # train and eval are different videos
  # Motion: consecutive frames differ, and a clip starting later is the same video shifted.
  assert np.abs(a[1:] - a[:-1]).mean() > 1e-3
  d, _ = synthetic.render(0, 'train', 7, 10, 4, (8, 32, 32))
  np.testing.assert_allclose(d[:-1], a[1:], atol=1e-5)


def test_simple_style_is_smoother_and_keeps_label_and_motion():
  tex, label = synthetic.render(0, 'train', 7, 10, 3, (8, 32, 32))
  simple, label_s = synthetic.render(0, 'train', 7, 10, 3, (8, 32, 32), style='simple')
  assert label == label_s and simple.shape == tex.shape
  assert 0.0 <= simple.min() and simple.max() <= 1.0
  assert np.abs(simple[1:] - simple[:-1]).mean() > 1e-3  # still moves
  # Less high-frequency detail: mean absolute horizontal pixel difference, over 32 videos.
  grad = lambda style: np.mean(
    [
      np.abs(
        np.diff(synthetic.render(0, 'train', i, 10, 0, (4, 32, 32), style=style)[0], axis=2)
      ).mean()
      for i in range(32)
    ]
  )
  assert grad('simple') < 0.5 * grad('textured')
  with pytest.raises(ValueError, match='style'):
    synthetic.render(0, 'train', 7, 10, 3, (8, 32, 32), style='fancy')


def test_fifty_classes_and_class_names():
  labels = {synthetic.render(0, 'train', i, 50, 0, (2, 16, 16))[1] for i in range(50)}
  assert labels == set(range(50))
  assert synthetic.class_name(12, 50) == 'square_bounce_diag'
  assert synthetic.class_name(3, 10) == 'orbit'


def test_determinism_by_seed():
  get = lambda seed: _take(data.get_dataset(_cfg(), 'train', SHAPE, 4, seed=seed), 3)
  a, b, c = get(0), get(0), get(1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['video'], y['video'])
    np.testing.assert_array_equal(x['clip_id'], y['clip_id'])
  assert any(not np.array_equal(x['clip_id'], z['clip_id']) for x, z in zip(a, c))


def test_epochs_visit_every_video_once():
  it = data.get_dataset(_cfg(), 'train', SHAPE, 8, seed=3)
  ids = np.concatenate([b['clip_id'] for b in _take(it, 10)])  # 80 = 2 epochs of 40
  assert sorted(ids[:40]) == list(range(40)) and sorted(ids[40:]) == list(range(40))
  assert not np.array_equal(ids[:40], ids[40:])  # reshuffled per epoch


@pytest.mark.parametrize('start_step', [1, 6, 11])
def test_start_step_is_exact_continuation(start_step):
  full = _take(data.get_dataset(_cfg(), 'train', SHAPE, 7, seed=5), start_step + 2)
  resumed = _take(data.get_dataset(_cfg(), 'train', SHAPE, 7, seed=5, start_step=start_step), 2)
  for x, y in zip(full[start_step:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_pass_is_one_ordered_epoch_padded_and_resumable():
  """`train_pass=e`: every train video once, in order, with epoch e's clips and flips (what
  `python -m larp_jax.tokenize` encodes), padded like eval; `start_step` skips batches."""
  cfg = _cfg(synthetic_num_train=11)
  one = list(data.get_dataset(cfg, 'train', SHAPE, 4, seed=5, train_pass=1))
  assert len(one) == 3 and [int(b['mask'].sum()) for b in one] == [4, 4, 3]
  ids = np.concatenate([b['clip_id'][b['mask']] for b in one])
  np.testing.assert_array_equal(ids, np.arange(11))
  # Epoch 1 of the training stream (elements 11..21) holds the same clips, shuffled.
  epoch1 = next(data.get_dataset(cfg, 'train', SHAPE, 11, seed=5, start_step=1))
  video = np.concatenate([b['video'][b['mask']] for b in one])
  np.testing.assert_array_equal(video[epoch1['clip_id']], epoch1['video'])
  epoch0 = next(data.get_dataset(cfg, 'train', SHAPE, 11, seed=5))
  assert not np.array_equal(video[epoch0['clip_id']], epoch0['video'])  # other starts/flips
  rest = data.get_dataset(cfg, 'train', SHAPE, 4, seed=5, train_pass=1, start_step=2)
  assert rest.num_batches == 1
  np.testing.assert_array_equal(next(rest)['video'], one[2]['video'])
  hosts = [
    data.get_dataset(cfg, 'train', SHAPE, 4, seed=5, train_pass=1, process_index=h, process_count=2)
    for h in (0, 1)
  ]
  assert [it.num_batches for it in hosts] == [2, 2]  # ceil(max(6, 5) / 4) on both hosts
  got = [set(np.concatenate([b['clip_id'][b['mask']] for b in it]).tolist()) for it in hosts]
  assert not got[0] & got[1] and got[0] | got[1] == set(range(11))


def test_two_hosts_disjoint_and_cover():
  seen = []
  for host in (0, 1):
    it = data.get_dataset(_cfg(), 'eval', SHAPE, 4, process_index=host, process_count=2)
    ids = np.concatenate([b['clip_id'][b['mask']] for b in it])
    assert it.num_batches == 2  # ceil(max(7, 6) / 4) on both hosts
    seen.append(set(ids.tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(13))
  tr = [
    set(
      np.concatenate(
        [
          b['clip_id']
          for b in _take(
            data.get_dataset(_cfg(), 'train', SHAPE, 4, process_index=h, process_count=2), 5
          )
        ]
      ).tolist()
    )
    for h in (0, 1)
  ]
  assert not tr[0] & tr[1] and tr[0] | tr[1] == set(range(40))


def test_eval_padding_mask_and_chunks():
  batches = list(data.get_dataset(_cfg(), 'eval', SHAPE, 5))
  assert len(batches) == 3
  assert [b['mask'].sum() for b in batches] == [5, 5, 3]
  last = batches[-1]
  assert last['video'].shape == (5,) + SHAPE + (3,)
  np.testing.assert_array_equal(last['clip_id'][3:], -1)
  np.testing.assert_array_equal(last['video'][3:], 0)
  # 'all': 12-frame videos hold 3 chunks of 4; chunk k starts at frame 4k.
  it = data.get_dataset(_cfg(eval_chunks='all'), 'eval', SHAPE, 8)
  allb = list(it)
  vids = np.concatenate([b['video'][b['mask']] for b in allb])
  assert len(vids) == 39
  ref, _ = synthetic.render(0, 'eval', 0, 10, 4, SHAPE)
  np.testing.assert_array_equal(vids[1], ref)


def test_eval_is_unaugmented_and_matches_render():
  b = next(data.get_dataset(_cfg(), 'eval', SHAPE, 4))
  for i in range(4):
    ref, label = synthetic.render(0, 'eval', int(b['clip_id'][i]), 10, 0, SHAPE)
    np.testing.assert_array_equal(b['video'][i], ref)
    assert b['label'][i] == label


@pytest.mark.parametrize(
  'field,value',
  [
    ('source', 'nope'),
    ('train_crop', 'left'),
    ('eval_chunks', 'some'),
    ('frame_stride', 0),
    ('synthetic_style', 'fancy'),
  ],
)
def test_config_errors_are_one_line(field, value):
  cfg = _cfg()
  cfg[field] = value
  with pytest.raises(ValueError, match='^data config: [^\n]*$'):
    data.get_dataset(cfg, 'train', SHAPE, 2)


def test_missing_path_errors():
  with pytest.raises(ValueError, match='needs config.data.path'):
    data.get_dataset(_cfg(source='folder'), 'train', SHAPE, 2)
  with pytest.raises(ValueError, match='does not exist'):
    data.get_dataset(_cfg(source='records', path='/nonexistent/x'), 'train', SHAPE, 2)
  with pytest.raises(ValueError, match='split'):
    data.get_dataset(_cfg(), 'validation', SHAPE, 2)


def test_make_global_batch():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  b = next(data.get_dataset(_cfg(), 'eval', SHAPE, 2 * jax.device_count()))
  g = data.make_global_batch(b, mesh)
  assert set(g) == set(b)
  for k in b:
    assert isinstance(g[k], jax.Array) and g[k].shape == b[k].shape
    np.testing.assert_array_equal(np.asarray(g[k]), b[k])
  g2 = data.make_global_batch(b, mesh, jax.sharding.PartitionSpec('data'))
  assert g2['video'].sharding.spec == jax.sharding.PartitionSpec('data')


def test_loading_a_config_does_not_import_tensorflow():
  code = (
    'import sys; from larp_jax import config_lib; import larp_jax.data; '
    "c = config_lib.load_config('configs/ucf101.py'); larp_jax.data.default_config(); "
    "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')[:3])"
  )
  r = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert r.stdout.strip() == '[]', r.stdout
  # The lazy names are the real ones.
  from larp_jax.data import pipeline

  assert data.get_dataset is pipeline.get_dataset and data.DataIterator is pipeline.DataIterator
  assert {'default_config', 'get_dataset', 'num_skipped'} <= set(dir(data))
  with pytest.raises(AttributeError, match='no attribute'):
    data.nope  # pylint: disable=pointless-statement
