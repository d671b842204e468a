"""Keep XLA:CPU's per-step buffers in the process instead of returning them to the kernel.

On CPU, XLA allocates every temporary buffer of a compiled step with ``posix_memalign`` when
the step starts and frees it when it ends (0.45 GB for the tiny bench generator step, 6.9 GB
for LARP-L at batch 1). glibc serves such large blocks with ``mmap`` (from a thread's own
arena it always does) and hands them back with ``munmap``, so every step page-faults all of
its temporaries in again: ~120k minor faults and ~0.3 s of kernel time per tiny step on the
2-core bench machine, 12% of the step (BENCHMARKS.md).

Three glibc tunables stop that: one malloc arena (so large blocks come from the main heap),
no ``mmap`` for large blocks, and no trimming of the heap's free top. They only take effect
when set before the process starts, so the command-line entry points (``larp_jax.main``,
``larp_jax.bench``, ``larp_jax.bench_attention``) re-execute themselves once with them set when
they run on a CPU backend. Library users get the same effect by exporting the variable
themselves::

  export GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

The single arena has a cost: a forward program that runs after a training step in the same
process is slower with it (a LARP-L encode + decode after a generator step: 7.6-8.0 s against
6.7-7.2 s on the bench machine; 9.3-10.2 s inside ``larp_jax.bench``, which compiles more in
between). Alone in a fresh process the difference is within noise (7.14-7.32 against
6.95-7.22 s), and the LARP-L generator step is 2-7% faster with it (27.96 against 29.96 s in
one bench run), so the default keeps it.

``LARP_JAX_MALLOC_TUNING=0`` turns the re-execution off. Accelerator hosts are left alone: there
the step's buffers live on the device, and a single arena could slow a many-threaded input
pipeline.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Mapping, Optional

TUNABLES = (
  'glibc.malloc.arena_max=1',
  'glibc.malloc.mmap_max=0',
  'glibc.malloc.trim_threshold=68719476736',
)
OPT_OUT = 'LARP_JAX_MALLOC_TUNING'
# Installed plugins that mean JAX will run on an accelerator unless JAX_PLATFORMS says cpu.
_ACCELERATOR_PLUGINS = (
  'jax_cuda12_plugin',
  'jax_cuda13_plugin',
  'jax_rocm60_plugin',
  'jax_rocm7_plugin',
  'libtpu',
  'jax_plugins.xla_cuda12',
)


def _has_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def runs_on_cpu(environ: Mapping[str, str]) -> bool:
  """Best guess, before JAX is imported, that the default backend will be the CPU."""
  platforms = environ.get('JAX_PLATFORMS', environ.get('JAX_PLATFORM_NAME', '')).strip().lower()
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return not any(_has_module(m) for m in _ACCELERATOR_PLUGINS)


def tuned_environment(
  environ: Mapping[str, str], *, libc: Optional[str] = None, on_cpu: Optional[bool] = None
) -> Optional[dict]:
  """The environment to re-execute with, or None when nothing should change: not glibc, opted
  out, not on CPU, or the tunables already set (so a re-executed process never loops)."""
  if environ.get(OPT_OUT, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return None
  libc = platform.libc_ver()[0] if libc is None else libc
  if sys.platform != 'linux' or libc != 'glibc':
    return None
  if not (runs_on_cpu(environ) if on_cpu is None else on_cpu):
    return None
  current = [t for t in environ.get('GLIBC_TUNABLES', '').split(':') if t]
  names = {t.split('=')[0] for t in current}
  missing = [t for t in TUNABLES if t.split('=')[0] not in names]
  if not missing:
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = ':'.join(current + missing)
  env[OPT_OUT] = '0'  # belt and braces: the child never re-executes again
  return env


def reexec_if_needed() -> None:
  """Re-executes the running command (``sys.orig_argv``) with ``tuned_environment`` if it
  returns one; otherwise returns. Call it first thing in a ``__main__`` entry point."""
  env = tuned_environment(os.environ)
  if env is None or not getattr(sys, 'orig_argv', None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
