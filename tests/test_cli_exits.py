"""Every way out of `python -m larp_jax.main`: one-line errors for a user's mistakes, tracebacks
for bugs, SIGTERM, Ctrl-C, an error mid-run, a second trainer on the same directory.

Split from ``test_cli.py`` (README's commands) so the two files run on different test workers.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cli import ROOT, TINY, _env, _main, _one_error_line, _user_dir

# ------------------------------------------------------------------- one-line errors


def test_config_mistakes_are_one_line_and_nothing_else_on_stderr(tmp_path):
  wd = str(tmp_path / 'wd')
  line = _one_error_line(
    _main(['--config=configs/demo.py', f'--workdir={wd}', '--config.model.widht=64']),
    "'model.widht'",
    'model.width',
  )
  assert '\\n' not in line
  _one_error_line(
    _main(['--config=configs/nope.py', f'--workdir={wd}']), "'configs/nope.py' not found"
  )
  _one_error_line(
    _main(['--config=configs/demo.py', f'--workdir={wd}', '--config.eval_every=-1']),
    'config.eval_every must be >= 0',
  )
  _one_error_line(
    _main(['--config=configs/demo.py', f'--workdir={wd}', '--config.nonexistent=1']),
    "'nonexistent'",
  )
  # A data mistake is found before the model is built and before the workdir is made.
  _one_error_line(
    _main(
      [
        '--config=configs/demo.py',
        f'--workdir={wd}',
        '--config.data.source=folder',
        f'--config.data.path={tmp_path}/missing',
      ]
    ),
    'path does not exist',
  )
  assert not os.path.exists(wd)


def test_help_exits_0():
  r = _main(['--help'])
  assert r.returncode == 0, r.stderr[-2000:]
  assert '--workdir' in r.stdout and '--config' in r.stdout


def test_flag_mistakes_are_one_line(tmp_path):
  """What absl or ml_collections cannot parse: one line, exit 2 (not absl's usage text)."""
  wd = str(tmp_path / 'wd')
  _one_error_line(
    _main(['--config=configs/demo.py', f'--workdir={wd}', '--config.batch_size=abc']),
    'flag --config.batch_size=abc',
    'invalid literal for int()',
  )
  _one_error_line(
    _main(['--config=configs/demo.py:bogus=1', f'--workdir={wd}']),
    "unknown config argument 'bogus'",
    "accepted: ['batch', 'long', 'lpips'",
  )
  _one_error_line(
    _main(['--config=configs/demo.py', f'--wrokdir={wd}']),
    'unknown flag --wrokdir; did you mean --workdir?',
  )
  _one_error_line(
    _main(['--config=configs/demo.py', f'--workdir={wd}', 'extra']),
    "unexpected arguments ['extra']",
  )
  _one_error_line(_main(['--config=configs/demo.py']), 'Flag --workdir must have a value')
  assert not os.path.exists(wd)


def test_a_bug_in_the_config_file_shows_its_traceback(tmp_path):
  cfg = tmp_path / 'broken.py'
  cfg.write_text('def get_config(arg=None):\n  return {}["model"]\n')
  r = _main([f'--config={cfg}', f'--workdir={tmp_path}/wd'])
  assert r.returncode == 1, r.stderr[-3000:]
  assert 'Traceback' in r.stderr and "KeyError: 'model'" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize(
  'exception,code',
  [
    ('ValueError("shapes (3,) and (4,) not aligned")', 1),  # a plain ValueError is a bug
    ('errors.ConfigError("config.optim.lr must be positive")', 2),
  ],
)
def test_a_bug_during_the_run_shows_its_traceback_a_mistake_one_line(tmp_path, exception, code):
  """main's real entry point, with loop.run replaced by one that raises at once."""
  script = (
    'import sys\n'
    'from larp_jax import main\n'  # first: it keeps TensorFlow's start-up lines quiet
    'from larp_jax import errors\n'
    'from larp_jax.train import loop\n'
    'def run(*args, **kwargs):\n'
    f'  raise {exception}\n'
    'loop.run = run\n'
    f'sys.argv = ["larp_jax.main", "--config=configs/demo.py", "--workdir={tmp_path}/wd"]\n'
    'main._run()\n'
  )
  r = subprocess.run(
    [sys.executable, '-c', script],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=dict(_env(), LARP_JAX_MALLOC_TUNING='0'),
    timeout=600,
  )
  name, message = exception.split('(', 1)
  message = message.strip('")')
  if code == 1:
    assert r.returncode == 1, r.stderr[-3000:]
    assert 'Traceback' in r.stderr and f'{name.split(".")[-1]}: {message}' in r.stderr
  else:
    _one_error_line(r, message)


def test_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  _one_error_line(
    _main(['--config=configs/demo.py', f'--workdir={blocker}/run']),
    'cannot write to the run directory',
    str(blocker),
  )


# ------------------------------------------------------------------- signals and exits


def _start(args, cwd):
  return subprocess.Popen(
    [sys.executable, '-m', 'larp_jax.main', *args],
    cwd=cwd,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _logged_steps(metrics):
  steps = []
  for line in open(metrics) if metrics.exists() else []:
    try:
      steps.append(json.loads(line)['step'])
    except ValueError:  # a line being written right now
      pass
  return steps


def _wait_for_step(metrics, step, proc, timeout=600):
  t0 = time.time()
  while time.time() - t0 < timeout:
    exited = proc.poll() is not None
    if any(s >= step for s in _logged_steps(metrics)):
      return
    if exited:
      raise AssertionError(proc.stdout.read()[-4000:])
    time.sleep(0.1)
  proc.kill()
  raise AssertionError('training subprocess too slow')


def _latest_checkpoint(run):
  steps = [int(p) for p in os.listdir(run / 'checkpoints') if p.isdigit()]
  return max(steps) if steps else None


@pytest.fixture(scope='module')
def long_videos(tmp_path_factory):
  """A folder of longer videos, so that decodes are in flight when a signal arrives."""
  from tests.test_data_files import write_video

  root = tmp_path_factory.mktemp('long')
  for cls in ('a', 'b'):
    (root / cls).mkdir()
    for k in range(4):
      write_video(root / cls / f'v{k}.mp4', 240, h=120, w=160, seed=k)
  return root


def _folder_train_args(videos, run='runs/sig', steps=400):
  return [
    '--config=configs/demo.py:lpips=false',
    f'--workdir={run}',
    *TINY,
    f'--config.total_steps={steps}',
    '--config.log_every=1',
    '--config.eval_every=0',
    '--config.checkpoint_every=1000',
    '--config.data.source=folder',
    f'--config.data.path={videos}',
    '--config.data.prefetch=4',
  ]


def test_sigterm_saves_logs_and_exits_0_within_seconds(tmp_path, long_videos):
  user = _user_dir(tmp_path)
  run = user / 'runs' / 'sig'
  p = _start(_folder_train_args(long_videos), user)
  _wait_for_step(run / 'metrics.jsonl', 3, p)
  t0 = time.time()
  p.send_signal(signal.SIGTERM)
  out = p.communicate(timeout=120)[0]
  exit_seconds = time.time() - t0
  assert p.returncode == 0, out[-4000:]
  # A bound against a hang, not a speed check: usually 2-5 s; 21.5 s seen once in 4 runs here
  # (2026-12-02, cause not found yet).
  assert exit_seconds < 60, f'{exit_seconds:.1f} s from SIGTERM to exit\n{out[-3000:]}'
  saved = _latest_checkpoint(run)
  steps = _logged_steps(run / 'metrics.jsonl')
  assert saved is not None and steps[-1] == saved, (saved, steps)


def test_ctrl_c_saves_and_exits_0(tmp_path, long_videos):
  user = _user_dir(tmp_path)
  run = user / 'runs' / 'sig'
  p = _start(_folder_train_args(long_videos), user)
  _wait_for_step(run / 'metrics.jsonl', 2, p)
  p.send_signal(signal.SIGINT)
  out = p.communicate(timeout=120)[0]
  assert p.returncode == 0, out[-4000:]
  assert _latest_checkpoint(run) is not None, out[-4000:]


_TWO_SIGNALS = r"""
import os, signal, sys, time
sys.path.insert(0, {root!r})
from larp_jax.train import loop
with loop._Preemption() as p:
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(0.2)
  assert p.requested
  print('first handled', flush=True)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(5)
print('not reached', flush=True)
"""


def test_a_second_ctrl_c_exits_at_once():
  r = subprocess.run(
    [sys.executable, '-c', _TWO_SIGNALS.format(root=ROOT)],
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 128 + signal.SIGINT, r.stdout + r.stderr[-3000:]
  assert 'first handled' in r.stdout and 'not reached' not in r.stdout


def test_an_error_during_training_exits_2_promptly(tmp_path, long_videos):
  """A NaN loss mid-run with decodes in flight: one error line, exit 2, no hang."""
  user = _user_dir(tmp_path)
  r = _main(
    _folder_train_args(long_videos, steps=20)
    + ['--config.optim.lr=1e38', '--config.optim.warmup_steps=1'],
    cwd=user,
    timeout=300,
  )
  assert r.returncode == 2, r.stderr[-4000:]
  assert r.stderr.strip().splitlines()[-1].startswith('error: non-finite'), r.stderr[-2000:]


def test_a_second_trainer_on_the_same_workdir_is_refused(tmp_path):
  user = _user_dir(tmp_path)
  run = user / 'runs' / 'demo'
  args = [
    '--config=configs/demo.py:lpips=false',
    '--workdir=runs/demo',
    *TINY,
    '--config.total_steps=100000',
    '--config.eval_every=0',
  ]
  p = _start(args, user)
  try:
    t0 = time.time()  # the first trainer holds the lock and has written its config
    while not ((run / 'config.json').exists() and f'"pid": {p.pid}' in (run / 'lock').read_text()):
      assert p.poll() is None and time.time() - t0 < 300, p.stdout.read()[-3000:]
      time.sleep(0.1)
    config_json = (run / 'config.json').read_text()
    r = _main(args + ['--config.optim.lr=1e-2'], cwd=user, timeout=300)
    _one_error_line(r, 'in use by another trainer', f'pid {p.pid}')
    assert not (run / 'config.restart-0.json').exists()
    assert (run / 'config.json').read_text() == config_json
  finally:
    p.kill()
    p.wait()
