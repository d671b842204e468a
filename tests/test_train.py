"""Training: schedules, losses, the train step, checkpoint/resume, preemption, NaN, configs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import larp_jax
from larp_jax import checkpoint, config_lib
from larp_jax.configs import demo
from larp_jax.losses import gan
from larp_jax.tasks.tokenizer import TokenizerTask
from larp_jax.train import loop, optim
from tests.conftest import run_result_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**run):
  """All losses on (LPIPS-AlexNet, GAN with LeCam, VQ, prior with scheduled sampling)."""
  c = demo.get_config('tiny')
  c.data.synthetic_num_train = 64
  c.data.synthetic_num_frames = 8
  c.update(run)
  return c


# ---------------------------------------------------------------- schedules and losses


def test_lr_multiplier_matches_the_official_formula():
  kw = dict(total_steps=100, warmup_steps=10, start_mult=0.01, min_mult=0.01)
  m = lambda s: float(optim.lr_multiplier(s, **kw))
  assert m(1) == pytest.approx(0.01 + 0.99 * 0.1)
  assert m(5) == pytest.approx(0.01 + 0.99 * 0.5)
  assert m(10) == pytest.approx(1.0)
  assert m(55) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * 0.5)))
  assert m(100) == pytest.approx(0.01)


def test_prior_lr_multiplier_scales_only_the_prior():
  params = {'prior': {'w': jnp.ones(3)}, 'encoder': {'w': jnp.ones(3)}}
  tx = optim.scale_subtree('prior', 50.0)
  updates, _ = tx.update(params, tx.init(params))
  np.testing.assert_allclose(updates['prior']['w'], 50.0)
  np.testing.assert_allclose(updates['encoder']['w'], 1.0)


def test_noisy_labels_stay_in_their_ranges():
  real, fake = gan.noisy_targets(jax.random.key(0), (10000,), 0.15, 0.3)
  assert float(real.min()) >= 0.7 - 1e-6 and float(real.max()) <= 1.0
  assert float(fake.min()) >= 0.0 and float(fake.max()) <= 0.3 + 1e-6
  assert float(real.mean()) == pytest.approx(1 - 0.15 * np.sqrt(2 / np.pi), abs=0.01)


def test_lecam_and_generator_loss_by_hand():
  real, fake = jnp.array([1.0, 3.0]), jnp.array([-1.0, 0.0])
  # relu(2 - 0.5)^2 + relu(0.2 - (-0.5))^2
  assert float(gan.lecam_regularizer(real, fake, 0.2, 0.5)) == pytest.approx(1.5**2 + 0.7**2)
  assert float(gan.generator_loss(jnp.zeros(4))) == pytest.approx(np.log(2.0))


def test_the_mse_term_adds_weight_times_the_squared_error():
  import ml_collections
  from larp_jax.train import steps

  recon = jnp.array([[0.5, 0.0], [1.0, 0.25]])
  video = jnp.array([[0.0, 0.0], [0.5, 0.5]])
  # |e| = 0.5, 0, 0.5, 0.25: L1 1.25 / 4; e^2 = 0.25, 0, 0.25, 0.0625: MSE 0.5625 / 4
  cfg = dict(l1_weight=1.0, lpips_weight=0.0, gan_weight=0.0)
  for w, extra in ((0.0, 0.0), (4.0, 0.5625)):
    loss_cfg = ml_collections.ConfigDict(dict(cfg, l2_weight=w))
    total, terms = steps.reconstruction_losses(
      recon, video, None, None, loss_cfg=loss_cfg, gan_on=1.0
    )
    assert float(total) == pytest.approx(1.25 / 4 + extra)
    assert ('l2_loss' in terms) == (w > 0)
  assert float(terms['l2_loss']) == pytest.approx(0.5625 / 4)


# ---------------------------------------------------------------- the loop


def _params(workdir):
  return larp_jax.load_tokenizer(workdir).params


def test_train_resume_and_load(tmp_path):
  """3 steps, then a restart to 4, equals 4 uninterrupted steps; outputs are written."""
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  loop.run(TokenizerTask, tiny_config(), full)
  loop.run(TokenizerTask, tiny_config(), part, stop_at=3)  # stops with a checkpoint at step 3
  loop.run(TokenizerTask, tiny_config(), part)
  lines = [json.loads(l) for l in open(os.path.join(full, 'metrics.jsonl'))]
  assert [l['step'] for l in lines] == [1, 2, 3, 4]
  for key in (
    'loss',
    'l1_loss',
    'lpips_loss',
    'gan_loss',
    'vq_loss',
    'prior_loss',
    'disc_loss',
    'codebook_usage',
    'lr',
    'grad_norm',
  ):
    assert all(np.isfinite(l[key]) for l in lines), key
  resumed = [json.loads(l) for l in open(os.path.join(part, 'metrics.jsonl'))]
  assert resumed[-1]['step'] == 4
  np.testing.assert_allclose(resumed[-1]['loss'], lines[-1]['loss'], rtol=1e-5)
  chex_close = jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), _params(full), _params(part)
  )
  del chex_close
  tok = larp_jax.load_tokenizer(full)
  assert tok.step == 4 and tok.video_shape == (4, 32, 32)
  video = jax.random.uniform(jax.random.key(0), (2, 4, 32, 32, 3))
  tokens = tok.encode(video)
  assert tokens.shape == (2, 8) and tokens.dtype == jnp.int32
  assert tok.decode(tokens).shape == (2, 4, 32, 32, 3)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'nan')
  c = tiny_config(total_steps=6, checkpoint_every=1)
  c.loss.lpips_weight = 0.0
  c.optim.lr = 1e38  # Adam steps of 1e38 overflow the weights within a step or two
  c.optim.warmup_steps = 1
  with pytest.raises(loop.NonFiniteLossError, match='last good checkpoint'):
    loop.run(TokenizerTask, c, workdir)
  mngr = checkpoint.manager(workdir)
  last = mngr.latest_step()
  mngr.close()
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert last is not None and last == lines[-1]['step'] < 6
  assert all(np.isfinite(l['loss']) for l in lines)


def test_bad_configs_fail_with_one_line():
  c = tiny_config(batch_size=6)
  with pytest.raises(ValueError, match='not divisible by the data-parallel size'):
    config_lib.validate(c, num_devices=4)
  with pytest.raises(ValueError, match="unknown tokenizer size preset 'XL'"):
    config_lib.load_config(os.path.join(ROOT, 'configs/ucf101.py:size=XL'))
  with pytest.raises(ValueError, match='unknown config argument'):
    config_lib.load_config(os.path.join(ROOT, 'configs/ucf101.py:sise=L'))


def test_a_signal_after_the_checkpoint_decision_stops_at_the_next_step_with_a_checkpoint(tmp_path):
  """A SIGTERM handled late in a step (here during its evaluation hook, after the loop decided
  not to checkpoint that step) must not end the run without a checkpoint: it stops after the
  next step, which saves. (Once the loop broke out of step 2 with nothing saved.)"""
  c = tiny_config(total_steps=8, checkpoint_every=4, eval_every=1)
  c.loss.lpips_weight = 0.0

  def signal_at_step_2(exp, state, workdir, step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler only sets a flag
    return {}

  loop.run(TokenizerTask, c, str(tmp_path), evaluate_fn=signal_at_step_2)
  mngr = checkpoint.manager(str(tmp_path))
  assert mngr.all_steps() == [3]
  mngr.close()


_TRAIN_SCRIPT = r"""
import sys, jax
sys.path.insert(0, {root!r})
from tests.test_train import tiny_config
from larp_jax.tasks import tokenizer as tokenizer_task
from larp_jax.tasks.tokenizer import TokenizerTask
from larp_jax.train import loop
c = tiny_config(total_steps={steps}, checkpoint_every={every})
c.loss.lpips_weight = 0.0
init_or_restore = loop.init_or_restore
def start_step(task, mngr):  # prints where the run starts (a restart: its checkpoint's step)
  out = init_or_restore(task, mngr)
  print('START_STEP', out[0], flush=True)
  return out
loop.init_or_restore = start_step
loop.run(TokenizerTask, c, {workdir!r})
import os; os._exit(0)
"""


def _train_proc(workdir, steps, every):
  code = _TRAIN_SCRIPT.format(root=ROOT, steps=steps, every=every, workdir=workdir)
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  return subprocess.Popen(
    [sys.executable, '-c', code],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _wait_for_step(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, 'metrics.jsonl')
  t0 = time.time()
  while time.time() - t0 < timeout:
    exited = proc.poll() is not None  # before reading, so an exit never hides the step
    if os.path.exists(path) and any(json.loads(l)['step'] >= step for l in open(path)):
      return
    if exited:
      raise AssertionError(proc.stdout.read()[-3000:])
    time.sleep(0.2)
  raise AssertionError('training subprocess too slow')


def test_sigkill_restarts_from_the_last_checkpoint_to_the_same_parameters(tmp_path):
  """A SIGKILLed run restarts from its last checkpoint and ends with an uninterrupted run's
  parameters. (SIGTERM's checkpoint-and-exit is test_cli_exits'; a signal to one of two
  processes and the restart are test_multihost's.)"""
  steps = 20  # room after the kill, however fast the steps are
  ref, run = str(tmp_path / 'ref'), str(tmp_path / 'run')
  c = tiny_config(total_steps=steps, checkpoint_every=4)
  c.loss.lpips_weight = 0.0
  loop.run(TokenizerTask, c, ref)

  p = _train_proc(run, steps, every=4)
  _wait_for_step(run, 5, p)
  # the step-4 checkpoint is written asynchronously: kill once Orbax has committed it (renamed
  # its temporary directory to the step's)
  ckpt, t0 = os.path.join(run, 'checkpoints', '4'), time.time()
  while not os.path.isdir(ckpt) and p.poll() is None and time.time() - t0 < 240:
    time.sleep(0.1)
  p.kill()
  p.wait()
  mngr = checkpoint.manager(run)
  killed_after = mngr.latest_step()
  mngr.close()
  assert killed_after is not None and killed_after < steps, killed_after
  p = _train_proc(run, steps, every=4)
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 0, out[-3000:]
  assert f'START_STEP {killed_after}\n' in out, out[-3000:]
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), _params(ref), _params(run)
  )


_MESH_SCRIPT = r"""
import os, sys, json
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import jax, numpy as np, flax.linen as nn
sys.path.insert(0, {root!r})
from tests.test_train import tiny_config
from larp_jax import data as data_lib, sharding
from larp_jax.tasks import tokenizer as tokenizer_task
from larp_jax.tasks.tokenizer import TokenizerTask
from larp_jax.train import loop
out = {{}}
for name, mesh, n in (('one', dict(data=1, fsdp=1, tensor=1), 1),
                      ('dp8', dict(data=8, fsdp=1, tensor=1), 8),
                      ('dp2_fsdp4', dict(data=2, fsdp=4, tensor=1), 8)):
  c = tiny_config(batch_size=8)
  c.loss.lpips_weight = 0.0
  c.mesh.update(mesh)
  exp = tokenizer_task.build(c, devices=jax.devices()[:n])
  abstract, shardings = exp.abstract_state()
  with sharding.logical_context(exp.mesh, exp.rules):
    state = jax.jit(lambda: nn.unbox(exp.boxed_init(0)), out_shardings=shardings)()
    if name == 'dp2_fsdp4':
      big = [x for x in jax.tree_util.tree_leaves(state.params) if x.size >= 2048]
      out['sharded_big_params'] = sum(len(x.sharding.device_set) > 1 and
          x.sharding.shard_shape(x.shape) != x.shape for x in big) / len(big)
    step = loop.make_train_step(exp, shardings)
    it = data_lib.get_dataset(c.data, 'train', exp.model.video_shape, c.batch_size, seed=0)
    losses = []
    for _ in range(3):
      batch = data_lib.make_global_batch({{'video': next(it)['video']}}, exp.mesh,
                                         sharding.batch_sharding(exp.mesh))
      state, m = step(state, batch, jax.random.key(0), {{}})
      losses.append({{k: float(v) for k, v in m.items()}})
    if name == 'dp2_fsdp4':   # the activations' logical constraints reach the program
      text = step.lower(state, batch, jax.random.key(0), {{}}).as_text()
      out['constraints'] = text.count('sharding_constraint') + text.count('@Sharding')
  out[name] = losses
  out[name + '_params'] = float(sum(np.abs(np.asarray(x)).sum()
                                    for x in jax.tree_util.tree_leaves(state.params)))
print('RESULT' + json.dumps(out), flush=True)
os._exit(0)
"""


def test_data_parallel_and_fsdp_meshes_match_one_device():
  out = run_result_script(
    _MESH_SCRIPT.format(root=ROOT), timeout=600, JAX_DISABLE_MOST_OPTIMIZATIONS='1'
  )
  for name in ('dp8', 'dp2_fsdp4'):
    for step, (a, b) in enumerate(zip(out['one'], out[name])):
      for key in ('loss', 'l1_loss', 'vq_loss', 'prior_loss', 'gan_loss', 'disc_loss'):
        np.testing.assert_allclose(
          b[key], a[key], rtol=2e-4, atol=1e-5, err_msg=f'{name} step {step + 1} {key}'
        )
    np.testing.assert_allclose(out[name + '_params'], out['one_params'], rtol=1e-5)
  assert out['sharded_big_params'] > 0.5  # FSDP really shards the large weights
  assert out['constraints'] > 0  # (under jax 0.10's `with mesh:` flax silently dropped them)


def test_a_batch_norm_bottleneck_trains_evaluates_and_loads_with_its_running_stats(tmp_path):
  """bottleneck_norm='bn_b': the running statistics live in the train state, are updated by the
  step, checkpointed, used by the evaluation and by load_tokenizer."""
  wd = str(tmp_path)
  c = tiny_config(total_steps=2, eval_every=2)
  c.loss.lpips_weight = 0.0
  c.model.bottleneck_norm = 'bn_b'
  c.eval.update(num_clips=2, batch_size=2, fvd=False, lpips=False, num_videos_to_show=0)
  loop.run(TokenizerTask, c, wd)
  tok = larp_jax.load_tokenizer(wd)
  stats = jax.tree_util.tree_leaves(tok.batch_stats)
  assert stats and any(float(np.abs(np.asarray(s)).sum()) > 0 for s in stats)
  # Not the init values (mean 0, var 1): two steps moved them.
  means = [
    np.asarray(s)
    for p, s in jax.tree_util.tree_flatten_with_path(tok.batch_stats)[0]
    if 'mean' in jax.tree_util.keystr(p)
  ]
  assert means and all(np.abs(m).max() > 0 for m in means)
  assert json.load(open(os.path.join(wd, 'eval', '2.json')))['psnr'] is not None
  video = jax.random.uniform(jax.random.key(0), (2, 4, 32, 32, 3))
  assert tok.decode(tok.encode(video)).shape == (2, 4, 32, 32, 3)


def test_the_discriminator_waits_for_disc_start():
  """Before ``loss.disc_start`` the discriminator is not updated (the official disc_factor is 0
  there: its loss and the generator's GAN term both vanish); from it on, every disc_every steps."""
  from flax import linen as nn

  from larp_jax.tasks import tokenizer as tok_task

  c = tiny_config()
  c.loss.lpips_weight = 0.0
  c.loss.update(disc_start=2, disc_every=1)
  task = tok_task.build(c, jax.devices()[:1])
  state = nn.unbox(task.boxed_init(0))
  step = jax.jit(task.train_step())
  video = jax.random.uniform(jax.random.key(1), (2, *task.model.video_shape, 3))
  changed = []
  for _ in range(3):
    new, metrics = step(state, {'video': video}, jax.random.key(2), {})
    moved = jax.tree_util.tree_map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.disc_params, new.disc_params
    )
    changed.append(any(jax.tree_util.tree_leaves(moved)))
    assert np.isfinite(float(metrics['loss']))
    state = new
  assert changed == [False, False, True]
