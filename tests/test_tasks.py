"""The shared loop trains any task: a trivial second task (linear regression) goes through
``loop.run`` with the same checkpoints, resume, metrics, evaluation and params export."""

import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from larp_jax import errors, params_io, tasks
from larp_jax.tasks import base
from larp_jax.train import loop

DIM = 4
TRUE_W = np.arange(1.0, DIM + 1, dtype=np.float32)


@flax.struct.dataclass
class LinState:
  step: jnp.ndarray
  params: dict
  opt_state: optax.OptState


class _Batches:
  """Deterministic batches of (x, y = x @ TRUE_W), resumable at any step."""

  def __init__(self, batch_size, start_step):
    self.batch_size, self.step = batch_size, start_step

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def __next__(self):
    rng = np.random.default_rng(self.step)
    self.step += 1
    x = rng.standard_normal((self.batch_size, DIM)).astype(np.float32)
    return {'x': x, 'y': x @ TRUE_W}


class LinearTask(base.Task):
  name = 'linear'
  batch_keys = ('x', 'y')
  evaluations = []

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.tx = optax.sgd(float(config.lr))

  def boxed_init(self, seed):
    w = nn.LogicallyPartitioned(jnp.zeros((DIM,)), names=('embed',))
    return LinState(
      step=jnp.zeros((), jnp.int32),
      params={'w': w},
      opt_state=self.tx.init({'w': jnp.zeros((DIM,))}),
    )

  def train_step(self):
    tx = self.tx

    def step(state, batch, key, extras):
      del key, extras
      loss_fn = lambda p: jnp.mean((batch['x'] @ p['w'] - batch['y']) ** 2)
      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {'loss': loss}

    return step

  def train_data(self, *, batch_size, start_step):
    return _Batches(batch_size, start_step)

  def evaluate(self, state, workdir, step):
    err = float(jnp.abs(state.params['w'] - TRUE_W).max())
    LinearTask.evaluations.append((step, err))
    return {'max_error': err}

  def export(self, state):
    return {'params': state.params}


def _config(**kw):
  c = ml_collections.ConfigDict(
    dict(
      task='linear',
      seed=0,
      batch_size=8,
      total_steps=40,
      lr=0.1,
      log_every=10,
      checkpoint_every=20,
      keep_checkpoints=2,
      eval_every=20,
      mesh=dict(data=-1, fsdp=1, tensor=1),
      sharding_rules=(('batch', ('data', 'fsdp')), ('embed', 'fsdp')),
      model=dict(dim=DIM),
    )
  )
  c.update(kw)
  return c


def test_a_second_task_trains_resumes_evaluates_and_exports(tmp_path):
  LinearTask.evaluations = []
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  last = loop.run(LinearTask, _config(), full)
  assert last['loss'] < 1e-3
  assert [s for s, _ in LinearTask.evaluations] == [20, 40]
  assert LinearTask.evaluations[-1][1] < 0.05
  lines = [json.loads(l) for l in open(os.path.join(full, 'metrics.jsonl'))]
  assert [l['step'] for l in lines] == [1, 10, 20, 30, 40]

  loop.run(LinearTask, _config(), part, stop_at=13)  # a preemption at step 13, then resume
  loop.run(LinearTask, _config(), part)
  resumed = [json.loads(l) for l in open(os.path.join(part, 'metrics.jsonl'))]
  assert [l['step'] for l in resumed] == [1, 10, 13, 14, 20, 30, 40]
  assert resumed[-1]['loss'] == pytest.approx(lines[-1]['loss'], rel=1e-6)

  # The params export at the end, loadable alone, on any placement.
  exported = os.path.join(full, loop.PARAMS_SUBDIR)
  assert params_io.is_params_dir(exported)
  info = params_io.read_info(exported)
  assert info['task'] == 'linear' and info['step'] == 40 and info['num_parameters'] == DIM
  abstract = {'params': {'w': jax.ShapeDtypeStruct((DIM,), jnp.float32)}}
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = {'params': {'w': one}}
  a, step_a, kind_a = params_io.load_variables(exported, abstract, shardings)
  b, step_b, kind_b = params_io.load_variables(part, abstract, shardings)  # from the run dir
  assert (kind_a, step_a, kind_b, step_b) == ('params', 40, 'run', 40)
  np.testing.assert_allclose(a['params']['w'], b['params']['w'], rtol=1e-6)
  np.testing.assert_allclose(a['params']['w'], TRUE_W, atol=0.05)


def test_task_registry_names_the_choices():
  assert tasks.name_of(ml_collections.ConfigDict()) == 'tokenizer'
  assert tasks.get('tokenizer').name == 'tokenizer'
  with pytest.raises(
    errors.ConfigError,
    match=r"config.task='nope' is not a task; choose one "
    r"of \('generator', 'tokenizer'\)",
  ):
    tasks.get('nope')


def test_params_dir_refuses_another_model(tmp_path):
  d = str(tmp_path / 'p')
  params_io.save(d, {'params': {'w': jnp.ones((3,))}}, config=_config(), step=1, task='linear')
  with pytest.raises(errors.UserError, match='already holds parameters'):
    params_io.save(d, {'params': {'w': jnp.ones((3,))}}, config=_config(), step=1, task='linear')
  abstract = {'params': {'w': jax.ShapeDtypeStruct((4,), jnp.float32)}}
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(errors.UserError, match=r"'params.w' is stored with shape \(3,\)"):
    params_io.load(d, abstract, {'params': {'w': one}})
  with pytest.raises(errors.UserError, match='neither a params directory'):
    params_io.load_variables(str(tmp_path / 'nothing'), abstract, {'params': {'w': one}})
