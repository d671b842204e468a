"""restore_latest on damaged checkpoints: falls back to an older step, moves the damaged one aside."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from larp_jax import checkpoint

# Orbax leaves the other reads of a failed restore as never-awaited coroutines; their errors are
# reported whenever they are collected, often during a later test.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _state(k):
  """A tiny state whose values tell the step: random (incompressible) weights and nested dicts."""
  rng = np.random.default_rng(k)
  return {
    'w': jnp.asarray(rng.standard_normal((64, 64)), jnp.float32),
    'b': jnp.full((3,), k, jnp.float32),
    'nested': {'x': jnp.arange(4, dtype=jnp.int32) * k, 'y': jnp.full((2, 2), k, jnp.bfloat16)},
  }


def _abstract(**shapes):
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
  for name, shape in shapes.items():
    abstract['nested'][name] = jax.ShapeDtypeStruct(shape, abstract['nested'][name].dtype)
  return abstract


def _sharding():
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'tensor'))
  return NamedSharding(mesh, PartitionSpec())


def _save(workdir, *steps):
  mngr = checkpoint.manager(str(workdir), keep=5, async_save=False)
  for step in steps:
    checkpoint.save(mngr, step, jax.device_put(_state(step), _sharding()))
  mngr.close()


@pytest.fixture
def workdir(tmp_path):
  _save(tmp_path, 1, 2, 3)
  return tmp_path


def _restore(mngr, abstract=None, **kwargs):
  abstract = _abstract() if abstract is None else abstract
  shardings = jax.tree_util.tree_map(lambda _: _sharding(), abstract)
  return checkpoint.restore_latest(mngr, abstract, shardings, **kwargs)


def _restore_new(workdir, **kwargs):
  mngr = checkpoint.manager(str(workdir), keep=5, async_save=False)
  try:
    return _restore(mngr, **kwargs)
  finally:
    mngr.close()


def _assert_state(state, k):
  for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(_state(k))):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _warnings(caplog):
  ours = os.path.join('larp_jax', 'checkpoint.py')
  return [
    r.getMessage()
    for r in caplog.records
    if r.levelno == logging.WARNING and r.pathname.endswith(ours)
  ]


def _damaged(workdir):
  root = workdir / 'damaged_checkpoints'
  return sorted(os.listdir(root)) if root.exists() else []


def _truncate_array_file(step_dir):
  files = [
    os.path.join(d, f)
    for d, _, names in os.walk(step_dir)
    for f in names
    if os.path.basename(d) == 'd'
  ]
  largest = max(files, key=os.path.getsize)
  size = os.path.getsize(largest)
  assert size > 8000, (largest, size)  # holds the 64x64 weights, not just b-tree nodes
  with open(largest, 'r+b') as f:
    f.truncate(size // 3)


def _remove_metadata(step_dir):
  os.remove(step_dir / 'default' / '_METADATA')


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


def test_intact_restores_latest(workdir, caplog):
  step, state = _restore_new(workdir)
  assert step == 3
  _assert_state(state, 3)
  assert not _warnings(caplog) and not _damaged(workdir)


def test_no_checkpoint(tmp_path):
  assert _restore_new(tmp_path) == (None, None)


def test_truncated_array_file_falls_back_and_moves_aside(workdir, caplog):
  step3 = workdir / 'checkpoints' / '3'
  _truncate_array_file(step3)
  mngr = checkpoint.manager(str(workdir), keep=5, async_save=False)
  step, state = _restore(mngr)
  assert step == 2
  _assert_state(state, 2)
  (warning,) = _warnings(caplog)
  assert 'step 3' in warning and str(step3) in warning and 'damaged_checkpoints' in warning
  assert 'ValueError: ' in warning and 'tensorstore_spec' not in warning and '\n' not in warning
  assert not step3.exists()
  (moved,) = _damaged(workdir)
  assert moved.startswith('3-') and moved.endswith('Z')
  assert os.path.isdir(workdir / 'damaged_checkpoints' / moved / 'default')
  assert mngr.latest_step() == 2 and list(mngr.all_steps()) == [1, 2]
  checkpoint.save(mngr, 3, jax.device_put(_state(33), _sharding()))
  mngr.close()
  step, state = _restore_new(workdir)
  assert step == 3
  _assert_state(state, 33)


@pytest.mark.parametrize('damage', [_remove_metadata, _empty])
def test_missing_metadata_or_empty_dir_falls_back(workdir, caplog, damage):
  damage(workdir / 'checkpoints' / '3')
  step, state = _restore_new(workdir)
  assert step == 2
  _assert_state(state, 2)
  (warning,) = _warnings(caplog)
  assert 'step 3' in warning and 'FileNotFoundError: ' in warning
  assert [d.split('-')[0] for d in _damaged(workdir)] == ['3']


def test_all_damaged_raises(workdir):
  ckpts = workdir / 'checkpoints'
  _empty(ckpts / '3')
  _remove_metadata(ckpts / '2')
  _truncate_array_file(ckpts / '1')
  with pytest.raises(
    ValueError, match=r'every checkpoint .* damaged \(step 3 .*; step 2 .*; step 1 '
  ) as e:
    _restore_new(workdir)
  assert '\n' not in str(e.value) and 'nothing was moved' in str(e.value)
  assert not _damaged(workdir)  # an error common to every step moves nothing
  assert sorted(os.listdir(ckpts)) == ['1', '2', '3']


def test_shape_mismatch_raises_and_moves_nothing(workdir, caplog):
  with pytest.raises(
    ValueError,
    match=r"'nested\.x' is stored with shape \(4,\) but requested "
    r'with shape \(5,\)',
  ):
    _restore_new(workdir, abstract=_abstract(x=(5,)))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2', '3']
  assert not _damaged(workdir) and not _warnings(caplog)


def test_no_quarantine_leaves_damaged_in_place(workdir, caplog):
  step3 = workdir / 'checkpoints' / '3'
  _truncate_array_file(step3)
  step, state = _restore_new(workdir, quarantine=False)
  assert step == 2
  _assert_state(state, 2)
  (warning,) = _warnings(caplog)
  assert 'step 3' in warning and 'left it in place' in warning
  assert os.path.isdir(step3 / 'default') and not _damaged(workdir)


@pytest.mark.parametrize(
  'error',
  [
    jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: out of memory'),
    ValueError('UNAVAILABLE: connection reset'),
  ],
)
def test_device_or_network_error_is_not_damage(workdir, monkeypatch, error):
  mngr = checkpoint.manager(str(workdir), keep=5, async_save=False)

  def fail(*args, **kwargs):
    raise error

  monkeypatch.setattr(mngr, 'restore', fail)
  with pytest.raises(type(error), match=str(error)):
    _restore(mngr)
  mngr.close()
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2', '3'] and not _damaged(workdir)
