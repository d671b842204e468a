"""Params-only checkpoints: a tokenizer trained with FSDP on 8 (simulated) devices loads on one
device from its run directory (model fields only) and from its params directory, identically."""

import os

import jax
import numpy as np
import pytest

import larp_jax
from larp_jax import errors, params_io
from larp_jax.train import loop
from tests.conftest import ROOT, run_result_script

_FSDP_RUN = r"""
import json, os, sys
import jax, numpy as np
assert jax.device_count() == 8
sys.path.insert(0, {root!r})
from tests.test_train import tiny_config
from larp_jax import checkpoint, workdir as workdir_lib
from larp_jax.tasks.tokenizer import TokenizerTask
from larp_jax.train import loop
c = tiny_config(total_steps=2, batch_size=8)
c.loss.lpips_weight = 0.0
c.mesh.update(data=2, fsdp=4, tensor=1)
# What a training run leaves (no train step needed: the layout is the point): the sharded
# state checkpointed at step 2, config.json, and the params export.
task = loop.make_task(TokenizerTask, c)
mngr = checkpoint.manager({workdir!r}, async_save=False)
_, state, _ = loop.init_or_restore(task, mngr)
checkpoint.save(mngr, 2, state, force=True)
mngr.close()
workdir_lib.write_config({workdir!r}, c, start_step=0, diff={{}})
loop.export_params(task, state, os.path.join({workdir!r}, loop.PARAMS_SUBDIR), step=2)
leaves = jax.tree_util.tree_leaves(state.params)
sharded = sum(x.sharding.shard_shape(x.shape) != x.shape for x in leaves)
total = float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))
print('RESULT' + json.dumps({{'sharded': int(sharded), 'abs_sum': total}}), flush=True)
os._exit(0)
"""


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_fsdp_run_loads_on_one_device_from_run_and_params_dirs(tmp_path):
  wd = str(tmp_path / 'run')
  out = run_result_script(
    _FSDP_RUN.format(root=ROOT, workdir=wd),
    timeout=600,
    XLA_FLAGS='--xla_force_host_platform_device_count=8',
    JAX_DISABLE_MOST_OPTIMIZATIONS='1',
  )
  assert out['sharded'] > 0  # FSDP really split some parameters over the 8 devices
  params_dir = os.path.join(wd, loop.PARAMS_SUBDIR)
  assert params_io.is_params_dir(params_dir)
  assert params_io.read_info(params_dir)['step'] == 2

  assert jax.device_count() == 1
  from_run = larp_jax.load_tokenizer(wd)
  from_params = larp_jax.load_tokenizer(params_dir)
  assert from_run.step == from_params.step == 2
  for a, b in zip(_leaves(from_run.params), _leaves(from_params.params), strict=True):
    np.testing.assert_array_equal(a, b)
  leaf = jax.tree_util.tree_leaves(from_params.params)[0]
  assert len(leaf.sharding.device_set) == 1
  total = sum(np.abs(np.asarray(x, np.float64)).sum() for x in _leaves(from_params.params))
  assert total == pytest.approx(out['abs_sum'], rel=1e-12)

  # Save from the API and load again: the same tokens.
  again = larp_jax.load_tokenizer(from_run.save(str(tmp_path / 'saved')))
  video = np.random.default_rng(0).random((2, *from_run.video_shape, 3), np.float32)
  np.testing.assert_array_equal(np.asarray(from_run.encode(video)), np.asarray(again.encode(video)))
  np.testing.assert_array_equal(
    np.asarray(from_params.decode(from_params.encode(video))),
    np.asarray(again.decode(again.encode(video))),
  )
  with pytest.raises(errors.UserError, match='already holds parameters'):
    from_run.save(str(tmp_path / 'saved'))


def test_load_tokenizer_errors_are_one_line(tmp_path):
  with pytest.raises(errors.UserError, match='not a larp_jax run or params directory'):
    larp_jax.load_tokenizer(str(tmp_path))
