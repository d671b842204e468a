r"""Command-line entry point.

  python -m larp_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m larp_jax.main --config=configs/ucf101.py:size=L --workdir=runs/l --config.batch_size=64
  python -m larp_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval
  python -m larp_jax.main --config=configs/demo_ar.py --workdir=runs/demo_ar --mode=sample
  python -m larp_jax.main --config=configs/ucf101.py --workdir=runs/l --mode=plan

Training resumes automatically from the latest good checkpoint in --workdir. A config, data or
run-directory mistake fails before anything is compiled or written, with one line on stderr
(``error: ...``) and exit code 2: a flag or config file that cannot be parsed, or any
``errors.UserError`` (or ``OSError``) raised by the run. Any other exception is a bug and shows its
traceback (exit 1). SIGTERM or Ctrl-C saves a checkpoint and exits 0; a second Ctrl-C exits at once.

Multi-host: start the same command on every host with ``--multihost`` (TPU pods, SLURM: jax
detects the rest), or, where nothing can be detected (e.g. two processes on one machine), with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on process I. A signal to
any one process stops the whole job at the same step, with a checkpoint.
"""

from __future__ import annotations

import os
import sys

from larp_jax import cli_env
from larp_jax import errors

cli_env.quiet_tensorflow()  # before TensorFlow loads: our error line is the only one on stderr

import logging as py_logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file (path[:args]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs, samples).')
_MODE = flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'eval', 'sample', 'plan'],
  'train: train (resuming if possible); eval: evaluate the latest checkpoint in --workdir; '
  'sample: write samples of a generator (videos, per-class grids, a JSON record); '
  'plan: mesh, shardings and memory per device, nothing run (<workdir>/plan.json).',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0 for multi-host runs '
  '(jax.distributed); on TPU pods and SLURM leave unset.',
)
_MULTIHOST = flags.DEFINE_bool(
  'multihost',
  False,
  'Join a multi-host job (jax.distributed.initialize()); on TPU pods and SLURM jax finds '
  'the coordinator, the process count and this process id itself.',
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', None, 'Processes in the job, where jax cannot detect it (with --process_id).'
)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id', None, 'This process in [0, --num_processes) (0 runs the coordinator).'
)


class _QuietOrbax(py_logging.Filter):
  """Orbax logs every save at INFO level through absl; keep its warnings only."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  del argv  # parse_flags has refused positional arguments
  logging.get_absl_handler().addFilter(_QuietOrbax())
  config = _CONFIG.value
  try:
    cli_env.init_distributed(  # before anything touches a device
      multihost=_MULTIHOST.value,
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
    from larp_jax import tasks
    from larp_jax.train import loop

    task_cls = tasks.get(tasks.name_of(config))
    if _MODE.value == 'train':
      loop.run(task_cls, config, _WORKDIR.value)
    elif _MODE.value == 'plan':
      from larp_jax.train import plan

      print(plan.run(task_cls, config, _WORKDIR.value)['summary'])
    elif _MODE.value == 'eval':
      print(loop.evaluate_run(task_cls, config, _WORKDIR.value)['summary'])
    else:
      print(loop.sample_run(task_cls, config, _WORKDIR.value)['summary'])
  except BaseException as e:  # pylint: disable=broad-except
    line = cli_env.error_line(e)  # a UserError or OSError (a full disk, a permission): one line
    if line is None:  # anything else is a bug
      import traceback

      traceback.print_exc()
      _exit(1)
    _exit(2, line)
  _exit(0)


def _exit(code: int, message: str | None = None):
  """Ends the process once everything is saved and flushed. ``loop.run`` has closed the input
  iterators, checkpoints and writers by now; ``os._exit`` skips the interpreter teardown of
  whatever native threads the libraries still hold (TensorFlow's, XLA's), which adds nothing
  and can take many seconds. A multi-host process that succeeded leaves the job first (a
  barrier: the coordinator, process 0, stays up until every process is done with it); after a
  failure it does not wait for the others."""
  if message:
    print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  if code == 0 and 'jax' in sys.modules:
    import jax

    jax.distributed.shutdown()  # nothing when this process never joined a job
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
  """Raises ConfigError (one line) for a missing config file, a bad ``:arg`` or a ``--config.X``
  override that names no field, before absl parses the flags (its own messages for these are
  multi-line reprs). Loads the config file once: a bug in it shows its traceback here."""
  from larp_jax import config_lib

  specs = _flag_values(argv, 'config')
  if not specs:
    return
  path = specs[-1].split(':', 1)[0]
  if not os.path.isfile(path):
    raise errors.ConfigError(
      f'config file {path!r} not found (working directory {os.getcwd()}); '
      f'e.g. --config=configs/demo.py'
    )
  config = config_lib.load_config(specs[-1])
  for arg in argv:
    if arg.startswith('--config.'):
      field = arg[len('--config.') :].split('=', 1)[0]
      config_lib.check_field(config, field)


def parse_flags(argv):
  """``app.run``'s flag parser: absl's, with what absl and ml_collections refuse (an unknown
  flag, a bad value for a ``--config.X`` field, a missing --workdir) and stray arguments
  exiting 2 with one ``error:`` line instead of absl's usage text."""
  try:
    rest = flags.FLAGS(argv)
    if len(rest) > 1:
      raise errors.UserError(
        f'unexpected arguments {rest[1:]}: this command takes flags only (see --help)'
      )
  except (flags.Error, errors.UserError) as e:
    _fail(cli_env.flag_error(e, flags.FLAGS))
  return rest


def _fail(e):
  print(cli_env.error_line(e), file=sys.stderr)
  sys.exit(2)


def _run():
  from larp_jax import host_malloc

  host_malloc.reexec_if_needed()  # CPU: keep XLA's step buffers mapped (host_malloc.py)
  if any(a in cli_env.HELP_FLAGS for a in sys.argv[1:]):
    flags.FLAGS(sys.argv[:1], known_only=True)
    print(__doc__.strip() + '\n')
    print(flags.FLAGS.module_help(sys.modules[__name__]))
    sys.exit(0)
  flags.mark_flags_as_required(['config', 'workdir'])
  try:
    check_command_line(sys.argv[1:])
  except (errors.UserError, OSError) as e:  # only these: a bug in the config file: traceback
    _fail(e)
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  _run()
