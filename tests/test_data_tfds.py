"""TFDS source through `tfds.testing.mock_data`, and the missing-data error."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from larp_jax import data

SHAPE = (4, 16, 16)


def _cfg(**kw):
  cfg = data.default_config()
  cfg.source = 'tfds'
  cfg.tfds_data_dir = '/nonexistent/tfds'
  cfg.num_parallel_calls = 2
  cfg.shuffle_buffer = 4
  cfg.update(kw)
  return cfg


@pytest.fixture
def mock_ucf():
  with tfds.testing.mock_data(num_examples=6):
    yield


def test_missing_dataset_is_one_clear_line():
  with pytest.raises(
    ValueError,
    match=r'^data: TFDS dataset .ucf101. is not available[^\n]*'
    r'tfds build ucf101 --data_dir=/nonexistent/tfds',
  ) as e:
    data.get_dataset(_cfg(), 'train', SHAPE, 2)
  assert e.value.__cause__ is None and e.value.__suppress_context__


def test_tfds_train_batches(mock_ucf):
  it = data.get_dataset(_cfg(), 'train', SHAPE, 4, seed=0)
  ids = []
  for _ in range(3):  # 12 elements = 2 epochs of 6
    b = next(it)
    assert b['video'].shape == (4,) + SHAPE + (3,) and b['video'].dtype == np.float32
    assert 0 <= b['video'].min() and b['video'].max() <= 1 and b['video'].std() > 0
    assert b['label'].dtype == np.int32 and ((0 <= b['label']) & (b['label'] < 101)).all()
    ids.extend(b['clip_id'].tolist())
  assert sorted(ids[:6]) == list(range(6)) and sorted(ids[6:]) == list(range(6))
  one = list(data.get_dataset(_cfg(), 'train', SHAPE, 4, seed=0, train_pass=0))  # in file order
  assert [b['clip_id'][b['mask']].tolist() for b in one] == [[0, 1, 2, 3], [4, 5]]


def test_tfds_resume_and_determinism(mock_ucf):
  full = [
    next(it) for it in [data.get_dataset(_cfg(), 'train', SHAPE, 4, seed=3)] for _ in range(5)
  ]
  again = data.get_dataset(_cfg(), 'train', SHAPE, 4, seed=3)
  np.testing.assert_array_equal(next(again)['video'], full[0]['video'])
  res = data.get_dataset(_cfg(), 'train', SHAPE, 4, seed=3, start_step=2)  # 8 = 6 + 2
  for want in full[2:]:
    got = next(res)
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_tfds_eval_hosts_and_chunks(mock_ucf):
  # mock_data serves every (sub)split with the same 6 examples, so this checks the host plumbing
  # (each host reads its own even split; ids continue after the previous hosts' examples), while
  # the disjoint cover itself is `tfds.even_splits`'s contract.
  seen = []
  for h in (0, 1):
    ev = data.get_dataset(_cfg(), 'eval', SHAPE, 4, process_index=h, process_count=2)
    batches = list(ev)
    assert len(batches) == ev.num_batches == 2
    assert [b['mask'].sum() for b in batches] == [4, 2]
    seen.append({int(i) for b in batches for i in b['clip_id'][b['mask']]})
  assert seen == [set(range(6)), set(range(6, 12))]
  ev = list(data.get_dataset(_cfg(eval_chunks='all'), 'eval', SHAPE, 4))
  ids = np.concatenate([b['clip_id'][b['mask']] for b in ev])
  assert len(ids) > 6 and sorted(ids.tolist()) == list(range(len(ids)))
