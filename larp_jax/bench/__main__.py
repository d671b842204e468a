"""``python -m larp_jax.bench``: the benchmark's command line (``runners.main``)."""

import os
import sys

from larp_jax import cli_env, host_malloc
from larp_jax.bench.runners import main


def _run():
  host_malloc.reexec_if_needed()  # CPU: keep XLA's step buffers mapped (host_malloc.py)
  # A user's mistake is one line (exit 2); a bug shows its traceback (exit 1).
  code = cli_env.run_command(lambda args: main(['larp_jax.bench', *args]))
  # No interpreter teardown (tf.data iterators can deadlock on exit; see larp_jax/main.py).
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == '__main__':
  _run()
