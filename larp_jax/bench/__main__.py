"""``python -m larp_jax.bench``: the benchmark's command line (``runners.main``)."""

import os
import sys

from larp_jax import host_malloc
from larp_jax.bench.runners import main


def _run():
  host_malloc.reexec_if_needed()       # CPU: keep XLA's step buffers mapped (host_malloc.py)
  try:
    main()
    code = 0
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    code = 2
  # No interpreter teardown (tf.data iterators can deadlock on exit; see larp_jax/main.py).
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == '__main__':
  _run()
