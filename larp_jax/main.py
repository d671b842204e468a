r"""Command-line entry point.

  python -m larp_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m larp_jax.main --config=configs/ucf101.py:size=L --workdir=runs/l --config.batch_size=64
  python -m larp_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval

Training resumes automatically from the latest good checkpoint in --workdir. A config, data or
run-directory mistake fails before anything is compiled or written, with one line on stderr
(``error: ...``) and exit code 2; any other failure is a bug and shows its traceback (exit 1).
SIGTERM or Ctrl-C saves a checkpoint and exits 0; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import os
import sys

from larp_jax import cli_env

cli_env.quiet_tensorflow()   # before TensorFlow loads: our error line is the only one on stderr

import logging as py_logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:args]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs, samples).')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                          'train: train (resuming if possible); eval: evaluate the latest '
                          'checkpoint in --workdir.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for multi-host runs '
                                   '(jax.distributed); on TPU pods and SLURM leave unset.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize().')

_HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '--helpfull', '-?')


class _QuietOrbax(py_logging.Filter):
  """Orbax logs every save at INFO level through absl; keep its warnings only."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or 'orbax' not in record.pathname


def _user_errors():
  """The exception types that are the user's mistakes (one line), not bugs (traceback)."""
  from larp_jax.train import loop
  return (ValueError, FileNotFoundError, loop.NonFiniteLossError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  import jax
  if _MULTIHOST.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value)
  from larp_jax import tasks
  from larp_jax.train import loop
  config = _CONFIG.value
  try:
    task_cls = tasks.get(tasks.name_of(config))
    if _MODE.value == 'train':
      loop.run(task_cls, config, _WORKDIR.value)
    else:
      print(loop.evaluate_run(task_cls, config, _WORKDIR.value)['summary'])
  except _user_errors() as e:
    _exit(2, f'error: {e}')
  except OSError as e:   # full disk, permissions, a vanished mount: the path says where
    where = f' ({e.filename})' if getattr(e, 'filename', None) else ''
    _exit(2, f'error: {e.strerror or e}{where}')
  except BaseException:
    import traceback
    traceback.print_exc()
    _exit(1)
  _exit(0)


def _exit(code: int, message: str | None = None):
  """Ends the process once everything is saved and flushed. ``loop.run`` has closed the input
  iterators, checkpoints and writers by now; ``os._exit`` skips the interpreter teardown of
  whatever native threads the libraries still hold (TensorFlow's, XLA's), which adds nothing
  and can take many seconds."""
  if message:
    print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  py_logging.shutdown()
  os._exit(code)


def _flag_values(argv, name):
  """Values given as ``--name=v`` or ``--name v``."""
  out = []
  for i, a in enumerate(argv):
    if a.startswith(f'--{name}='):
      out.append(a.split('=', 1)[1])
    elif a == f'--{name}' and i + 1 < len(argv):
      out.append(argv[i + 1])
  return out


def check_command_line(argv) -> None:
  """Raises ValueError (one line) for a missing config file or a ``--config.X`` override that
  names no field, before absl parses the flags (its own messages are multi-line reprs)."""
  from larp_jax import config_lib
  specs = _flag_values(argv, 'config')
  if not specs:
    return
  path = specs[-1].split(':', 1)[0]
  if not os.path.isfile(path):
    raise ValueError(f'config file {path!r} not found (working directory {os.getcwd()}); '
                     f'e.g. --config=configs/demo.py')
  config = config_lib.load_config(specs[-1])
  for arg in argv:
    if arg.startswith('--config.'):
      field = arg[len('--config.'):].split('=', 1)[0]
      config_lib.check_field(config, field)


def _run():
  from larp_jax import host_malloc
  host_malloc.reexec_if_needed()       # CPU: keep XLA's step buffers mapped (host_malloc.py)
  if any(a in _HELP_FLAGS for a in sys.argv[1:]):
    flags.FLAGS(sys.argv[:1], known_only=True)
    print(__doc__.strip() + '\n')
    print(flags.FLAGS.module_help(sys.modules[__name__]))
    sys.exit(0)
  flags.mark_flags_as_required(['config', 'workdir'])
  try:
    check_command_line(sys.argv[1:])
    app.run(main)
  except (ValueError, TypeError, AttributeError, KeyError, OSError) as e:
    # Only flag parsing gets here (main() exits on its own): bad --config / --config.X values.
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    print('error: ' + ' '.join(message.split()), file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  _run()
