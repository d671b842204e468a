"""README's commands as a user runs them (the ways out of `python -m larp_jax.main` are in test_cli_exits.py).

Each README command runs as written, in a subprocess, shortened only by `--config.*` overrides.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')

# Shortens the demo to a few steps and a small evaluation (FVD and LPIPS still on).
SHORT = [
  '--config.total_steps=3',
  '--config.log_every=1',
  '--config.eval.num_clips=2',
  '--config.eval.batch_size=2',
  '--config.eval.num_videos_to_show=2',
]
# Shrinks any config's networks (compiles in seconds) for the tests of exits and signals.
TINY = [
  '--config.model.video_shape=(8,32,32)',
  '--config.model.width=32',
  '--config.model.num_heads=2',
  '--config.model.encoder_depth=1',
  '--config.model.decoder_depth=1',
  '--config.model.num_latent_tokens=16',
  '--config.model.codebook_size=64',
  '--config.model.prior_depth=1',
  '--config.model.prior_width=16',
  '--config.model.prior_heads=2',
  '--config.disc.width=16',
  '--config.disc.depth=1',
  '--config.disc.num_heads=2',
]


def readme_command(pattern: str) -> list:
  """The README command (after `&&`) of the bash line that contains ``pattern``, as argv."""
  for line in open(README):
    if pattern in line and line.lstrip().startswith('pip install'):
      return line.split('&&', 1)[1].split()
  raise AssertionError(f'README has no command line with {pattern!r}')


def readme_command_block(*patterns: str, command: str = 'python -m larp_jax.main') -> list:
  """The first ``command`` line of README's code blocks that contains every one of ``patterns``
  (continuation lines joined; a trailing comment dropped), as argv."""
  text = open(README).read().replace('\\\n', ' ')
  for line in text.splitlines():
    line = line.split('  #', 1)[0]
    if all(p in line for p in patterns) and line.strip().startswith(command):
      return line.split()
  raise AssertionError(f'README has no {command} command with {patterns!r}')


def _env():
  # XLA's optimisation passes cost more than they save on these tiny, few-step runs (as in
  # conftest.py); the commands themselves run as written.
  env = dict(
    os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', JAX_DISABLE_MOST_OPTIMIZATIONS='1'
  )
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  env.pop('TF_ENABLE_ONEDNN_OPTS', None)
  return env


def _user_dir(tmp_path):
  """A fresh directory that looks like a checkout to the commands (configs/ beside it)."""
  d = tmp_path / 'user'
  d.mkdir()
  os.symlink(os.path.join(ROOT, 'configs'), d / 'configs')
  return d


def _main(args, cwd=ROOT, **kw):
  return subprocess.run(
    [sys.executable, '-m', 'larp_jax.main', *args],
    cwd=cwd,
    env=_env(),
    capture_output=True,
    text=True,
    **kw,
  )


def _one_error_line(r, *needles):
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2, r.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-3000:]
  for n in needles:
    assert n in lines[0], lines[0]
  return lines[0]


# ------------------------------------------------------------------- README, end to end


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  """README's first command, shortened: (its directory, the completed process)."""
  user = _user_dir(tmp_path_factory.mktemp('demo'))
  argv = readme_command('configs/demo.py')
  assert argv[:3] == ['python', '-m', 'larp_jax.main'], argv
  r = subprocess.run(
    [sys.executable, *argv[1:], *SHORT],
    cwd=user,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  return user, r


def test_readme_first_command_trains_evaluates_and_exits_0(demo_run):
  user, r = demo_run
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  run = user / 'runs' / 'demo'
  record = json.load(open(run / 'eval' / '3.json'))
  for k in ('psnr', 'ssim', 'lpips', 'fvd', 'codebook_usage'):
    assert record[k] is not None and np.isfinite(record[k]), k
  assert record['num_clips'] == 2
  assert (run / 'eval' / '3_recon.png').stat().st_size > 0
  assert (run / 'eval' / '3_recon.mp4').stat().st_size > 0
  steps = [json.loads(l)['step'] for l in open(run / 'metrics.jsonl')]
  assert steps == [1, 2, 3]
  assert not (run / 'lock').read_text().strip()  # released at the end


def test_readme_library_block_runs_as_pasted(demo_run):
  """README's "Library use" code, pasted into python in the directory of the demo run."""
  user, r = demo_run
  assert r.returncode == 0, r.stderr[-3000:]
  text = open(README).read()
  block = re.search(r'## Library use\n.*?```python\n(.*?)```', text, re.S).group(1)
  out = subprocess.run(
    [sys.executable, '-c', block + '\nprint("LIBRARY-OK")'],
    cwd=user,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert 'LIBRARY-OK' in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_readme_folder_command_with_broken_files_trains_and_evaluates(tmp_path):
  """README's "From a folder of videos" command (the LARP-L recipe), shrunk by overrides."""
  from tests.test_data_files import make_folder

  videos = tmp_path / 'UCF-101'
  make_folder(videos, with_bad=True)
  user = _user_dir(tmp_path)
  argv = readme_command_block('source=folder')
  argv = [a.replace('/data/UCF-101', str(videos)) for a in argv]
  r = subprocess.run(
    [
      sys.executable,
      *argv[1:],
      *TINY,
      *SHORT,
      '--config.batch_size=2',
      '--config.loss.lpips_weight=0',
      '--config.eval.fvd=false',
      '--config.optim.warmup_steps=1',
    ],
    cwd=user,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stderr[-4000:]
  assert 'skipping undecodable video' in r.stderr
  assert json.load(open(user / 'runs' / 'larp_l' / 'eval' / '3.json'))['num_clips'] == 2


def test_readme_eval_command(demo_run):
  user, r = demo_run
  assert r.returncode == 0, r.stderr[-3000:]
  argv = readme_command_block('--mode=eval')
  out = subprocess.run(
    [
      sys.executable,
      *argv[1:],
      '--config.eval.num_clips=2',
      '--config.eval.batch_size=2',
      '--config.eval.fvd=false',
    ],
    cwd=user,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'psnr' in out.stdout and 'runs/demo/eval/3.json' in out.stdout


def test_readme_generation_commands(demo_run):
  """README's "Generation" block on the (shortened) demo tokenizer: tokenize, train the demo
  generator (its end evaluation with a 2-sample gFVD through the real I3D), --mode=sample,
  --mode=eval; each command as written plus overrides."""
  user, r = demo_run
  assert r.returncode == 0, r.stderr[-3000:]

  def run(argv, *extra):
    out = subprocess.run(
      [sys.executable, *argv[1:], *extra],
      cwd=user,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out

  small_data = ['--config.data.synthetic_num_train=8', '--config.data.synthetic_num_eval=4']
  run(
    readme_command_block('runs/demo_tokens', command='python -m larp_jax.tokenize'),
    '--batch_size=4',
    *small_data,
  )
  manifest = json.load(open(user / 'runs' / 'demo_tokens' / 'manifest.json'))
  assert manifest['splits']['train']['num_clips'] == 8, manifest['splits']
  sampling = ['--config.sample.batch_size=2']
  evals = [
    '--config.eval.batch_size=2',
    '--config.eval.nll_clips=4',
    '--config.eval.class_accuracy_clips=2',
    '--config.eval.class_probe.steps=2',
    '--config.eval.class_probe.batch_size=2',
  ]
  run(
    readme_command_block('configs/demo_ar.py', '--workdir=runs/demo_ar'),
    '--config.total_steps=3',
    '--config.log_every=1',
    '--config.batch_size=4',
    '--config.eval.fvd_samples=2',
    '--config.eval.num_videos_to_show=2',
    *small_data,
    *sampling,
    *evals,
  )
  run_dir = user / 'runs' / 'demo_ar'
  rec = json.load(open(run_dir / 'eval' / '3.json'))
  assert rec['gfvd_samples'] == 2 and np.isfinite(rec['gfvd']), rec
  assert np.isfinite(rec['token_nll']) and np.isfinite(rec['sample_nll'])
  assert rec['class_accuracy_clips'] == 2 and rec['class_accuracy_chance'] == 0.1, rec
  for name in ('real', 'recon', 'samples'):
    assert 0 <= rec[f'class_accuracy_{name}'] <= 1, rec
  out = run(
    readme_command_block('configs/demo_ar.py', '--mode=sample'),
    '--config.sample.num_samples=2',
    *small_data,
    *sampling,
  )
  assert 'samples written to' in out.stdout
  assert (run_dir / 'samples' / '3.mp4').stat().st_size > 0
  assert json.load(open(run_dir / 'samples' / '3.json'))['num_samples'] == 2
  out = run(
    readme_command_block('configs/demo_ar.py', '--mode=eval'),
    '--config.eval.num_samples=2',
    '--config.eval.num_videos_to_show=0',
    *small_data,
    *sampling,
    *evals,
  )
  assert 'gfvd' in out.stdout and 'runs/demo_ar/eval/3.json' in out.stdout
