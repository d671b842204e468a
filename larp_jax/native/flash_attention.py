"""The C++ flash-attention kernel for XLA:CPU (``flash_attention.cc``): build, load, call.

The kernel is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``;
``-O3 -march=native``, a few seconds) against the XLA FFI headers that ship with jaxlib, and
cached as a shared library under ``$LARP_JAX_NATIVE_CACHE`` (default
``~/.cache/larp_jax/native``), keyed by the source, the compiler, jaxlib's version and the CPU's
instruction-set flags, so a home directory shared by different machines keeps one build per
kind of CPU. ``available()`` says whether it could be built; with no compiler, or with
``LARP_JAX_NATIVE=0``, it is False with a reason, and ``attention_impl='auto'`` uses the
pure-JAX 'chunked' kernel instead.

``flash_attention(q, k, v, seeds, causal, rate)`` takes the model's own [B, L, H, Dh] float32
layout (no transposes around the call), scales the scores by Dh^-1/2, and has a custom VJP
whose backward pass is the second FFI handler. Its dropout mask is ``attention_keep`` of
``larp_jax.models.attention_masks``: the same elements as the 'xla' and 'chunked' kernels drop.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from larp_jax.models import dropout

SOURCE = Path(__file__).with_name('flash_attention.cc')
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')
TARGETS = {
  'larp_cpu_flash_forward': 'LarpFlashForward',
  'larp_cpu_flash_backward': 'LarpFlashBackward',
}

_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
  """The instruction-set flags of this CPU (part of the cache key: the build is -march=native)."""
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith(('flags', 'Features')):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _compiler() -> Tuple[list, str]:
  """($CXX, else c++) split like a shell would (e.g. 'ccache g++'), and its version line."""
  cxx = shlex.split(os.environ.get('CXX', 'c++'))
  out = subprocess.run([*cxx, '--version'], capture_output=True, text=True, timeout=60)
  if out.returncode != 0:
    raise OSError(f'{" ".join(cxx)} --version failed: {out.stderr.strip()[-300:]}')
  return cxx, out.stdout.strip().splitlines()[0]


def cache_dir() -> Path:
  default = Path.home() / '.cache' / 'larp_jax' / 'native'
  return Path(os.environ.get('LARP_JAX_NATIVE_CACHE', default))


def build() -> Path:
  """Compiles the kernel if this source/compiler/jaxlib/CPU has no cached build; returns the
  library's path. Raises OSError (no compiler) or RuntimeError (compiler errors, with them)."""
  import jaxlib

  cxx, version = _compiler()
  source = SOURCE.read_bytes()
  key = hashlib.sha256(
    b'\0'.join(
      [
        source,
        version.encode(),
        ' '.join(FLAGS).encode(),
        jaxlib.__version__.encode(),
        _cpu_flags().encode(),
        platform.machine().encode(),
      ]
    )
  ).hexdigest()[:16]
  lib = cache_dir() / f'flash_attention_{key}.so'
  if lib.exists():
    return lib
  lib.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=lib.parent)
  os.close(fd)
  try:
    cmd = [*cxx, *FLAGS, '-I', jax.ffi.include_dir(), str(SOURCE), '-o', tmp]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
      raise RuntimeError(
        f'compiling {SOURCE.name} failed ({" ".join(cmd)}):\n{out.stderr.strip()[-2000:]}'
      )
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o755 & ~umask)  # mkstemp's 0600 would hide a shared cache from other users
    os.replace(tmp, lib)  # atomic: concurrent processes see a whole library or none
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return lib


def _load() -> Optional[str]:
  """Builds, loads and registers the FFI targets once per process; None, or why not."""
  if os.environ.get('LARP_JAX_NATIVE', '1') == '0':
    return 'disabled by LARP_JAX_NATIVE=0'
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
    return f'{type(e).__name__}: {e}'
  return None


def unavailable_reason() -> Optional[str]:
  """None if the kernel is built and registered (building it on the first call), else why not."""
  with _lock:
    if 'reason' not in _state:
      _state['reason'] = _load()
      if _state['reason'] is not None:
        print(
          f'larp_jax: the C++ CPU attention kernel is unavailable ({_state["reason"]}); '
          "using the pure-JAX 'chunked' kernel",
          file=sys.stderr,
        )
    return _state['reason']


def available() -> bool:
  return unavailable_reason() is None


def supports(q, k, v=None) -> Optional[str]:
  """None if the kernel takes these [B, L, H, Dh] arrays (v defaults to k's shape and dtype),
  else why not."""
  v = k if v is None else v
  if any(x.dtype != jnp.float32 for x in (q, k, v)):
    return f'it computes in float32 only (got {q.dtype}, {k.dtype}, {v.dtype})'
  same = lambda x: (x.shape[0], x.shape[2], x.shape[3])
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or same(q) != same(k):
    return (
      f'it needs q [B, Lq, H, Dh] and k, v [B, Lk, H, Dh] (got {q.shape}, {k.shape}, {v.shape})'
    )
  if q.shape[-1] % 16 or q.shape[-1] == 0:
    return f'the head dim must be a positive multiple of 16 (got {q.shape[-1]})'
  if k.shape[1] == 0:
    return 'there are no keys'
  return None


def cannot_run(q, k, v=None) -> Optional[str]:
  """None if the kernel runs here on these arrays (CPU backend, built, ``supports``), else why
  not. Building happens on the first call."""
  if jax.default_backend() != 'cpu':
    return f'it runs on the CPU backend only (the default backend is {jax.default_backend()})'
  return unavailable_reason() or supports(q, k, v)


def _require():
  why = unavailable_reason()
  if why is not None:
    raise RuntimeError(f'the C++ CPU attention kernel is unavailable: {why}')


def _attrs(causal: bool, rate: float) -> dict:
  threshold, scale = dropout.keep_rule(rate) if rate > 0 else (0, 1.0)
  return dict(causal=np.int64(causal), threshold=np.int64(threshold), keep_scale=np.float32(scale))


def _forward(q, k, v, seeds, causal, rate):
  _require()
  b, lq, h, _ = q.shape
  call = jax.ffi.ffi_call(
    'larp_cpu_flash_forward',
    (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)),
    vmap_method='sequential',
  )
  return call(q, k, v, seeds, **_attrs(causal, rate))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def flash_attention(q, k, v, seeds, causal: bool, rate: float):
  """softmax(q k^T / sqrt(Dh), causal mask, dropout ``rate`` from ``seeds``) v, [B, Lq, H, Dh].

  Differentiable once: its backward pass is the second FFI handler, which JAX cannot
  differentiate again (for gradients of gradients use attention_impl='chunked')."""
  return _forward(q, k, v, seeds, causal, rate)[0]


def _fwd(q, k, v, seeds, causal, rate):
  out, lse = _forward(q, k, v, seeds, causal, rate)
  return out, (q, k, v, seeds, out, lse)


def _bwd(causal, rate, residuals, dout):
  q, k, v, seeds, out, lse = residuals
  call = jax.ffi.ffi_call(
    'larp_cpu_flash_backward',
    tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
    vmap_method='sequential',
  )
  dq, dk, dv = call(q, k, v, seeds, out, lse, dout.astype(jnp.float32), **_attrs(causal, rate))
  return dq, dk, dv, np.zeros(seeds.shape, jax.dtypes.float0)


flash_attention.defvjp(_fwd, _bwd)
