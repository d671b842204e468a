"""A user's mistake or a bug: the exception types (errors.py), how the commands tell them apart
(cli_env.error_line: one line and exit 2, or a traceback and exit 1) and the small commands'
absl flags (--help exits 0; a bad flag or argument is one `error:` line, exit 2)."""

import errno
import os
import subprocess
import sys

from absl import flags
import pytest

from larp_jax import cli_env, config_lib, errors
from larp_jax import workdir as workdir_lib
from larp_jax.data import config as data_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_errors_are_value_errors():
  from larp_jax.train import loop

  for t in (
    errors.ConfigError,
    errors.DataError,
    workdir_lib.WorkdirError,
    loop.NonFiniteLossError,
  ):
    assert issubclass(t, errors.UserError) and issubclass(t, ValueError), t


@pytest.mark.parametrize(
  'e,line',
  [
    (errors.ConfigError('config.x must be\n  positive'), 'error: config.x must be positive'),
    (workdir_lib.WorkdirError('runs/a is in use'), 'error: runs/a is in use'),
    (
      OSError(errno.ENOSPC, 'No space left on device', '/runs/a'),
      'error: No space left on device (/runs/a)',
    ),
    (FileNotFoundError('no checkpoint in runs/a'), 'error: no checkpoint in runs/a'),
  ],
)
def test_a_user_mistake_is_one_line(e, line):
  assert cli_env.error_line(e) == line


@pytest.mark.parametrize(
  'e',
  [
    ValueError('x'),
    TypeError('x'),
    KeyError('x'),
    AttributeError('x'),
    RuntimeError('x'),
    KeyboardInterrupt(),
  ],
)
def test_any_other_exception_is_a_bug(e):
  assert cli_env.error_line(e) is None


def test_run_command_returns_2_for_a_mistake_and_raises_a_bug(capsys):
  def mistake(args):
    raise errors.DataError(f'data: no video files found in {args[0]!r}')

  assert cli_env.run_command(mistake, ['videos/']) == 2
  captured = capsys.readouterr()
  assert captured.err == "error: data: no video files found in 'videos/'\n" and not captured.out

  def bug(args):
    raise ValueError('a bug')

  with pytest.raises(ValueError, match='a bug'):
    cli_env.run_command(bug, [])
  assert cli_env.run_command(lambda args: None, []) == 0


def test_the_library_raises_user_errors_for_config_and_data_mistakes(tmp_path):
  with pytest.raises(errors.ConfigError, match="unknown config argument 'sise'"):
    config_lib.parse_arg('sise=L', size='L')
  with pytest.raises(errors.ConfigError, match='does not exist'):
    config_lib.load_config(str(tmp_path / 'nope.py'))
  config = config_lib.load_config(os.path.join(ROOT, 'configs', 'demo.py'))
  with pytest.raises(errors.ConfigError, match=r"'model.widht'; did you mean model.width\?"):
    config_lib.check_field(config, 'model.widht')
  from larp_jax import sharding

  with pytest.raises(errors.ConfigError, match='does not divide the 4 devices'):
    sharding.mesh_shape({'data': -1, 'fsdp': 3}, 4)
  with pytest.raises(errors.DataError, match='path does not exist'):
    data_config.validate(_folder_cfg(tmp_path / 'missing'), 'train', (8, 32, 32))
  # The networks' own consistency checks are config mistakes too, found when the task is built.
  from larp_jax import tasks
  from larp_jax.train import loop

  bad_model = config.copy_and_resolve_references()
  bad_model.model.num_heads = 3
  with pytest.raises(errors.ConfigError, match='config.model: width=.* num_heads=3'):
    loop.make_task(tasks.get('tokenizer'), bad_model)
  bad_disc = config.copy_and_resolve_references()
  bad_disc.disc.num_heads = 3
  with pytest.raises(errors.ConfigError, match='config.disc: discriminator width'):
    loop.make_task(tasks.get('tokenizer'), bad_disc)


def _folder_cfg(path):
  cfg = data_config.default_config()
  cfg.source, cfg.path = 'folder', str(path)
  return cfg


# ------------------------------------------------------------------------ flag parsing


def _flags():
  fv = flags.FlagValues()
  flags.DEFINE_integer('batch', 8, 'Mini-batch size.', flag_values=fv)
  return fv


def test_parse_flags_returns_the_positional_arguments():
  fv = _flags()
  assert cli_env.parse_flags(fv, ['a', '--batch=3', 'b'], 'Doc.', ('X', 'Y')) == ['a', 'b']
  assert fv.batch == 3
  fv = _flags()  # a fresh FlagValues per call: nothing carries over
  assert cli_env.parse_flags(fv, ['a', 'b'], 'Doc.', ('X', 'Y')) == ['a', 'b'] and fv.batch == 8


@pytest.mark.parametrize(
  'args,message',
  [
    (['a', 'b', '--bach=3'], r'^unknown flag --bach; did you mean --batch\? \(see --help\)$'),
    (
      ['a', 'b', '--batch=x'],
      r"^flag --batch=x: invalid literal for int\(\) .*'x' \(see --help\)$",
    ),
    (['a', 'b', '--batch'], r'^Missing value for flag --batch'),
    (['a'], r"^expected the arguments X Y besides the flags, got \['a'\]"),
    (['a', 'b', 'c'], r"^expected the arguments X Y besides the flags, got \['a', 'b', 'c'\]"),
  ],
)
def test_parse_flags_mistakes_are_one_line_user_errors(args, message):
  with pytest.raises(errors.UserError, match=message) as e:
    cli_env.parse_flags(_flags(), args, 'Doc.', ('X', 'Y'))
  assert '\n' not in str(e.value)


def test_parse_flags_without_positional_arguments_refuses_them():
  with pytest.raises(errors.UserError, match=r"unexpected arguments \['x'\]"):
    cli_env.parse_flags(_flags(), ['x'], 'Doc.')


def test_help_prints_the_docstring_and_the_flags_and_exits_0(capsys):
  with pytest.raises(SystemExit) as e:
    cli_env.parse_flags(_flags(), ['a', '--help'], 'Doc line.\n\nMore.', ('X', 'Y'))
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith('Doc line.\n\nMore.\n') and '--batch: Mini-batch size.' in out
  assert '--flagfile' not in out and '-c:' not in out


# ----------------------------------------------------------------- the small commands


def _commands():
  from larp_jax import fvd
  from larp_jax.data import bench_input, prepare

  return {'fvd': fvd, 'prepare': prepare, 'bench_input': bench_input}


@pytest.mark.parametrize(
  'name,flag', [('fvd', '--num_frames'), ('prepare', '--short_side'), ('bench_input', '--steps')]
)
def test_each_command_help_exits_0(capsys, name, flag):
  module = _commands()[name]
  with pytest.raises(SystemExit) as e:
    module.main(['--help'])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(module.__doc__.strip().splitlines()[0]) and flag in out


@pytest.mark.parametrize(
  'name,args,needle',
  [
    ('fvd', ['real.npy', 'fake.npy', '--bach=2'], 'unknown flag --bach; did you mean --batch?'),
    ('fvd', ['real.npy'], 'expected the arguments REAL FAKE besides the flags'),
    ('fvd', ['real.npy', 'fake.npy', '--num_frames=many'], 'flag --num_frames=many: invalid'),
    ('prepare', ['videos/', 'records/', '--shards=many'], 'flag --shards=many: invalid'),
    ('prepare', ['videos/'], 'expected the arguments SRC OUT besides the flags'),
    ('bench_input', ['--steps=0'], '--steps and --batch must be >= 1'),
    ('bench_input', ['extra'], "unexpected arguments ['extra']"),
  ],
)
def test_each_command_bad_argument_is_one_line_exit_2(capsys, name, args, needle):
  assert _commands()[name].main(args) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], captured.err


def test_bench_input_entry_point_help_and_bad_flag():
  """Through `python -m` too: --help exits 0 on stdout, a bad flag is one line with exit 2."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  run = lambda *a: subprocess.run(
    [sys.executable, '-m', 'larp_jax.data.bench_input', *a],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=300,
  )
  r = run('--help')
  assert r.returncode == 0 and '--batch' in r.stdout and 'Traceback' not in r.stderr, r.stderr
  r = run('--batch=x')
  assert r.returncode == 2 and r.stdout == '', r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith('error: flag --batch=x'), r.stderr
