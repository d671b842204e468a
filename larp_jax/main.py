r"""Command-line entry point.

  python -m larp_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m larp_jax.main --config=configs/ucf101.py:size=L --workdir=runs/l --config.batch_size=64
  python -m larp_jax.main --config=configs/demo.py --workdir=runs/demo --mode=eval

Training resumes automatically from the latest checkpoint in --workdir. A config that cannot
work fails before anything is compiled, with one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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


class _QuietOrbax(py_logging.Filter):
  """Orbax logs every save at INFO level through absl; keep its warnings only."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  import jax
  if _MULTIHOST.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value)
  from larp_jax.train import loop
  config = _CONFIG.value
  try:
    if _MODE.value == 'train':
      from larp_jax.evaluation import evaluator
      loop.run(config, _WORKDIR.value, evaluate_fn=evaluator.evaluate_during_training)
    else:
      from larp_jax.evaluation import evaluator
      result = evaluator.evaluate_workdir(config, _WORKDIR.value)
      print(result['summary'])
  except (ValueError, FileNotFoundError, loop.NonFiniteLossError) as e:
    print(f'error: {e}', file=sys.stderr)
    _exit(2)
  _exit(0)


def _exit(code: int):
  """Exits without interpreter teardown. Everything is saved and flushed by now; tearing down a
  tf.data iterator whose prefetch thread is inside a numpy_function (synthetic and folder
  sources) can deadlock on the GIL, so the process would never end."""
  sys.stdout.flush()
  sys.stderr.flush()
  py_logging.shutdown()
  os._exit(code)


def _run():
  from larp_jax import host_malloc
  host_malloc.reexec_if_needed()       # CPU: keep XLA's step buffers mapped (host_malloc.py)
  flags.mark_flags_as_required(['config', 'workdir'])
  try:
    app.run(main)
  except (ValueError, TypeError) as e:   # bad --config / --config.X values, while parsing flags
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:   # --config.X where the config has no field X
    print(f'error: the config has no field {e}; see the config file for the valid names',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  _run()
