"""What the command-line entry points share (never applied on library import).

**Errors.** A command reports a user's mistake (``errors.UserError``, or an ``OSError``: a full
disk, a permission, a vanished mount) as one line ``error: ...`` on stderr and exits with code 2
(``error_line``). Any other exception is a bug: its traceback is shown and the exit code is 1.

**Flags.** Every command takes absl flags (``--name=value``; ``python -m larp_jax.main`` adds
ml_collections' ``--config`` / ``--config.X``). The small commands (``larp_jax.fvd``,
``larp_jax.data.prepare``, ``larp_jax.data.bench_input``) define theirs on a private
``FlagValues`` per call (``run_command`` + ``parse_flags``), so that they can be imported
together (``bench`` imports ``bench_input``) and called more than once in a process (tests).
``--help`` prints the module's docstring and its flags and exits 0.

**TensorFlow's start-up lines.** TensorFlow (the input pipeline) prints C++ INFO lines when it
loads: absl's pre-init notice, the CPU-feature note, and on x86 CPUs "oneDNN custom operations
are on" (that one ignores the log level). On stderr they come before a command's own one-line
error. The commands therefore keep TensorFlow's warnings and errors only, and turn oneDNN's
custom kernels off, which also makes TF's float ops (the pipeline's resizes) the same on every
CPU. Call ``quiet_tensorflow()`` before TensorFlow is imported; a value the user set in the
environment wins.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Callable, Optional, Sequence

from larp_jax import errors

HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '--helpfull', '-?')


def quiet_tensorflow() -> None:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


def init_distributed(
  *,
  multihost: bool = False,
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
) -> bool:
  """Joins a multi-host job (``jax.distributed.initialize``) when any argument asks for one;
  returns whether it did. Call it before anything touches a device.

  On TPU VMs, SLURM and Open MPI jobs jax finds every value itself (``--multihost`` alone).
  Elsewhere (several processes started by hand, e.g. on one machine) pass all three of
  ``coordinator_address`` (host:port of process 0), ``num_processes`` and ``process_id``.
  CPU processes exchange their collectives through gloo (jax's default on CPU). UserError for
  an incomplete or inconsistent set.
  """
  if not (multihost or coordinator_address or num_processes is not None or process_id is not None):
    return False
  if (num_processes is None) != (process_id is None):
    raise errors.UserError('--num_processes and --process_id go together: give both or neither')
  if num_processes is not None:
    if not 0 <= process_id < num_processes:
      raise errors.UserError(
        f'--process_id={process_id} is not in [0, --num_processes={num_processes})'
      )
    if not (coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')):
      raise errors.UserError(
        '--num_processes/--process_id need --coordinator_address=HOST:PORT (process 0)'
      )
  import jax

  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return True


def error_line(e: BaseException) -> Optional[str]:
  """``'error: ...'`` (one line) when ``e`` is a user's mistake; None when it is a bug.

  A user's mistake is an ``errors.UserError`` (config, data, run directory, inputs) or an
  ``OSError`` (the path, when known, says where). Anything else, a plain ValueError, TypeError,
  KeyError or AttributeError included, is a bug: the caller shows its traceback.
  """
  if isinstance(e, errors.UserError):
    message = str(e)
  elif isinstance(e, OSError):
    where = f' ({e.filename})' if getattr(e, 'filename', None) else ''
    message = f'{e.strerror or e}{where}'
  else:
    return None
  return 'error: ' + ' '.join(message.split())


def flag_error(e: Exception, flag_values) -> errors.UserError:
  """A one-line UserError for absl's ``flags.Error`` ``e`` (unknown flags get a suggestion)."""
  from absl import flags

  if isinstance(e, errors.UserError):
    return e
  if isinstance(e, flags.UnrecognizedFlagError):
    close = difflib.get_close_matches(e.flagname, list(flag_values), n=1)
    hint = f'; did you mean --{close[0]}?' if close else ''
    return errors.UserError(f'unknown flag --{e.flagname}{hint} (see --help)')
  return errors.UserError(f'{e} (see --help)')


def usage(flag_values, doc: str) -> str:
  """``doc`` and the help of every flag in ``flag_values`` (absl's own flags left out)."""
  text = flag_values.get_help(prefix='', include_special_flags=False)
  lines = [l for l in text.splitlines() if l.startswith(' ')]  # drop the module headers
  return doc.strip() + '\n\nflags:\n' + '\n'.join(lines)


def parse_flags(flag_values, args: Sequence[str], doc: str, positional: Sequence[str] = ()) -> list:
  """Parses ``args`` (the arguments after the program name) into ``flag_values``; returns the
  positional arguments, one per name in ``positional``.

  ``--help`` prints ``usage`` and exits 0. A flag that absl cannot parse (an unknown name, a bad
  or missing value) or a wrong number of positional arguments raises UserError (one line).
  """
  from absl import flags

  args = list(args)
  if any(a in HELP_FLAGS for a in args):
    print(usage(flag_values, doc))
    sys.exit(0)
  try:
    rest = flag_values(['larp_jax', *args])[1:]
  except flags.Error as e:
    raise flag_error(e, flag_values) from None
  if not positional and rest:
    raise errors.UserError(
      f'unexpected arguments {rest}: this command takes flags only (see --help)'
    )
  if len(rest) != len(positional):
    raise errors.UserError(
      f'expected the arguments {" ".join(positional)} besides the flags, got {rest} (see --help)'
    )
  return rest


def run_command(command: Callable[[list], None], argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``command(args)`` on ``argv`` (the arguments after the program name; default
  ``sys.argv[1:]``) and returns the exit code: 0, or 2 after one ``error:`` line on stderr for
  a user's mistake (``error_line``). A bug propagates: Python shows the traceback, exit code 1."""
  args = list(sys.argv[1:] if argv is None else argv)
  try:
    command(args)
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless a user's mistake)
    line = error_line(e)
    if line is None:
      raise
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    return 2
  return 0
