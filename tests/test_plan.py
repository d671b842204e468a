"""``--mode=plan`` (``larp_jax/train/plan.py``): shardings and memory per device, nothing run.

README's command runs as written (8 simulated CPU devices), shortened by ``--config`` overrides to
the tiny model; LARP-L is planned on 8 simulated devices without compiling; the generator plans
without a tokenizer or a token dataset.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from larp_jax import config_lib, errors, tasks
from larp_jax.train import plan
from tests.conftest import ROOT, run_result_script

README = os.path.join(ROOT, 'README.md')
# The tiny tokenizer and discriminator (configs/common.py) as overrides, a small batch.
TINY = [
  '--config.model.video_shape=(4,32,32)',
  '--config.model.patch_size=(2,8,8)',
  '--config.model.width=32',
  '--config.model.num_heads=2',
  '--config.model.encoder_depth=1',
  '--config.model.decoder_depth=1',
  '--config.model.num_latent_tokens=8',
  '--config.model.codebook_size=64',
  '--config.model.code_dim=8',
  '--config.model.prior_depth=1',
  '--config.model.prior_width=16',
  '--config.model.prior_heads=2',
  '--config.disc.width=16',
  '--config.disc.depth=1',
  '--config.disc.num_heads=2',
  '--config.disc.patch_size=(2,8,8)',
  '--config.batch_size=8',
  '--config.loss.lpips_weight=0',
]


def readme_plan_command():
  """(environment assignments, argv) of README's ``--mode=plan`` command."""
  text = open(README).read().replace('\\\n', ' ')
  for line in text.splitlines():
    words = line.split('  #', 1)[0].split()
    if '--mode=plan' in words and 'larp_jax.main' in words:
      env = {}
      while words and '=' in words[0] and not words[0].startswith('-'):
        k, v = words.pop(0).split('=', 1)
        env[k] = v
      return env, words
  raise AssertionError('README has no --mode=plan command')


def _env(**extra):
  env = dict(os.environ, PYTHONUNBUFFERED='1', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  env.update(extra)
  return env


@pytest.fixture(scope='module')
def readme_plan(tmp_path_factory):
  """README's plan command with the tiny model and a limit it cannot meet."""
  user = tmp_path_factory.mktemp('plan')
  os.symlink(os.path.join(ROOT, 'configs'), user / 'configs')
  env, argv = readme_plan_command()
  assert argv[:3] == ['python', '-m', 'larp_jax.main'], argv
  r = subprocess.run(
    [sys.executable, *argv[1:], *TINY, '--config.plan_device_memory_gb=0.0001'],
    cwd=user,
    env=_env(**env),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  workdir = [w.split('=', 1)[1] for w in argv if w.startswith('--workdir=')][0]
  return user / workdir, r, env


def test_readme_command_plans_eight_devices_and_writes_only_the_plan(readme_plan):
  workdir, r, env = readme_plan
  assert env.get('XLA_FLAGS') == '--xla_force_host_platform_device_count=8'
  assert 'mesh data=1 x fsdp=8 x tensor=1 (8 x cpu' in r.stdout, r.stdout
  assert sorted(os.listdir(workdir)) == ['plan.json']  # no lock, config, checkpoints
  record = json.load(open(workdir / 'plan.json'))
  assert record['mesh']['axes'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert record['mesh']['device_count'] == 8 and record['mesh']['process_count'] == 1
  groups = {g['group']: g for g in record['groups']}
  enc = groups['params/encoder']
  assert enc['axes']['embed'] == ['fsdp'] and enc['device_bytes'] < enc['bytes']
  assert record['batch_per_device'] == 1
  # One line per group, not per leaf.
  assert sum(1 for line in r.stdout.splitlines() if line.startswith('  params/')) == len(
    [g for g in groups if g.startswith('params/')]
  )


def test_compiled_memory_matches_the_counted_arguments(readme_plan):
  workdir, r, _ = readme_plan
  record = json.load(open(workdir / 'plan.json'))
  c = record['compiled']
  assert c['available'] and c['temp_bytes'] > 0 and c['peak_bytes'] > c['argument_bytes']
  # XLA's argument bytes on one device are the state, batch and extras the plan counted (+ key).
  assert abs(c['argument_bytes'] - record['device_bytes']['total']) <= 64, c
  assert 'compiled train step (XLA memory analysis per device' in r.stdout


def test_warning_names_the_excess_and_the_fixes(readme_plan):
  workdir, r, _ = readme_plan
  line = [l for l in r.stdout.splitlines() if l.startswith('WARNING')]
  assert len(line) == 1, r.stdout
  assert 'does not fit' in line[0] and 'over config.plan_device_memory_gb=0.0001 GiB' in line[0]
  for fix in ('model.remat=full', 'model.dtype=bfloat16'):
    assert fix in line[0], line[0]
  assert json.load(open(workdir / 'plan.json'))['fits'] is False


def test_larp_l_fsdp_over_eight_devices_holds_an_eighth_per_device():
  out = run_result_script(
    """
import json
from larp_jax import tasks
from larp_jax.configs import ucf101
from larp_jax.train import plan
c = ucf101.get_config('size=L')
c.mesh.update(data=1, fsdp=8)
c.plan_compile = False
r = plan.make_plan(tasks.get('tokenizer'), c)
glob = {}
for leaf in r['leaves']:
  glob[leaf['role']] = glob.get(leaf['role'], 0) + leaf['bytes']
print('RESULT' + json.dumps(dict(dev=r['device_bytes'], glob=glob, params=r['parameters'],
                                 compiled=r['compiled'], notes=r['notes'],
                                 text=plan.format_plan(r))))
""",
    timeout=300,
    XLA_FLAGS='--xla_force_host_platform_device_count=8',
  )
  assert out['params'] == 172_179_984 + 21_700_240  # tokenizer + prior
  # One device holds all of ``glob`` (a 1-device plan: see the tiny test below); FSDP over 8
  # splits every weight with an 'embed' axis: about an eighth (norms, codebook replicated).
  for role in ('params', 'optimizer', 'discriminator'):
    ratio = out['dev'][role] / out['glob'][role]
    assert 0.124 < ratio < 0.135, (role, ratio)
  assert out['dev']['batch'] * 8 == out['glob']['batch']
  assert out['compiled'] is None and 'plan_compile=False' in out['notes'][0]
  assert 'compiled train step: skipped' in out['text']


def test_bad_plan_setting_is_one_error_line(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      '-m',
      'larp_jax.main',
      '--config=configs/demo.py',
      f'--workdir={tmp_path / "run"}',
      '--mode=plan',
      '--config.plan_device_memory_gb=-1',
    ],
    cwd=ROOT,
    env=_env(JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith('error: config.plan_device_memory_gb must be positive'), lines
  assert not (tmp_path / 'run').exists()


# ------------------------------------------------------------------- in process, one device


def _tiny(spec):
  c = config_lib.load_config(os.path.join(ROOT, spec))
  return c


def test_one_device_holds_everything_and_unwritable_workdir_prints_only(tmp_path):
  c = _tiny('configs/demo.py:tiny')
  with c.unlocked():
    c.plan_compile = False
    c.plan_device_memory_gb = 100.0
  assert c.loss.lpips_weight > 0  # the LPIPS weights are extras: read as shapes only
  blocker = tmp_path / 'file'
  blocker.write_text('')
  before = {id(a) for a in jax.live_arrays()}
  r = plan.run(tasks.get('tokenizer'), c, str(blocker / 'run'))
  assert not [a for a in jax.live_arrays() if id(a) not in before]  # nothing on a device
  assert r['device_bytes']['extras'] > 0
  assert all(leaf['device_bytes'] == leaf['bytes'] for leaf in r['leaves'])
  assert r['fits'] is True and r['warnings'] == []
  assert 'plan.json not written' in r['summary'] and 'printed only' in r['summary']
  assert 'fits:' in r['summary']


def test_generator_plans_without_tokenizer_or_tokens():
  c = _tiny('configs/ucf101_ar.py:tiny')
  assert not c.tokenizer_path and not c.tokens_dir
  with pytest.raises(errors.ConfigError, match='needs its tokens'):
    tasks.get('generator')(c, None)  # training still refuses
  r = plan.make_plan(tasks.get('generator'), c)
  assert r['task'] == 'generator' and 'planned for token batches' in r['notes'][0]
  assert {leaf['path'] for leaf in r['leaves'] if leaf['role'] == 'batch'} == {
    'batch/tokens',
    'batch/label',
  }
  assert 'extras' not in r['device_bytes']
  assert r['compiled']['available'] and r['compiled']['temp_bytes'] > 0


def test_frame_prediction_plans_the_frozen_tokenizer_as_extras():
  c = _tiny('configs/k600_fp.py:tiny')
  with c.unlocked():
    c.plan_compile = False
  r = plan.make_plan(tasks.get('generator'), c)
  extras = [leaf for leaf in r['leaves'] if leaf['role'] == 'extras']
  assert extras and all(leaf['path'].startswith('extras/tokenizer/') for leaf in extras)
  batch = {leaf['path']: leaf['shape'] for leaf in r['leaves'] if leaf['role'] == 'batch'}
  assert batch['batch/video'][0] == c.batch_size and len(batch['batch/video']) == 5
