"""The C++ CPU flash-attention kernel (attention_impl='cpu_flash'): builds where a C++ compiler
exists, agrees with the einsum reference (values, gradients, causal mask, dropout), and 'auto'
falls back to 'chunked' where it cannot run."""

import os
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larp_jax.models import attention
from larp_jax.native import flash_attention as native
from tests.conftest import assert_vjp_close

HAVE_CXX = shutil.which(shlex.split(os.environ.get('CXX', 'c++'))[0]) is not None


def test_kernel_builds_where_a_compiler_exists():
  if not HAVE_CXX:
    pytest.skip('no C++ compiler on this machine')
  assert native.unavailable_reason() is None
  lib = native.build()
  stamp = lib.stat().st_mtime_ns
  assert native.build() == lib and lib.stat().st_mtime_ns == stamp  # cached, not rebuilt
  assert os.access(lib, os.R_OK | os.X_OK)
  if jax.device_count() == 1:
    assert attention.resolve_attention_impl('auto') == 'cpu_flash'


needs_kernel = pytest.mark.skipif(not HAVE_CXX, reason='no C++ compiler on this machine')


def _run(impl, q, k, v, dout, causal, rate, seed=3):
  def f(q, k, v):
    return attention.attention(
      q, k, v, causal=causal, impl=impl, dropout_rate=rate, dropout_rng=jax.random.key(seed)
    )

  out, pullback = jax.vjp(f, q, k, v)
  return out, pullback(dout)


@needs_kernel
@pytest.mark.parametrize('causal,rate', [(False, 0.0), (True, 0.0), (True, 0.3), (False, 0.1)])
@pytest.mark.parametrize('shape', [(2, 37, 3, 16), (1, 300, 2, 64), (1, 130, 1, 32)])
def test_cpu_flash_matches_reference(shape, causal, rate):
  """Lengths that fill no block evenly, several heads and batch elements, head dims 16-64: the
  output and all three gradients equal the 'xla' reference, dropout mask included."""
  ks = jax.random.split(jax.random.key(sum(shape)), 4)
  q, k, v, dout = (jax.random.normal(kk, shape) for kk in ks)
  got = _run('cpu_flash', q, k, v, dout, causal, rate)
  o = got[0]
  assert_vjp_close(got, _run('xla', q, k, v, dout, causal, rate), atol_out=3e-6, atol_grad=3e-5)
  if rate:
    no_drop = attention.attention(q, k, v, causal=causal, impl='cpu_flash')
    assert not np.allclose(o, no_drop, atol=1e-3)  # the mask did act


@needs_kernel
def test_cpu_flash_fewer_queries_than_keys():
  """The last-block case (out_slice): 40 queries over 200 keys, under jit and vmap."""
  ks = jax.random.split(jax.random.key(7), 4)
  q, dout = (jax.random.normal(kk, (3, 1, 40, 2, 32)) for kk in ks[:2])
  k, v = (jax.random.normal(kk, (3, 1, 200, 2, 32)) for kk in ks[2:])

  def loss(impl):
    f = lambda q, k, v: jnp.sum(attention.attention(q, k, v, causal=False, impl=impl) * dout)
    return jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1, 2))))(q, k, v)

  assert_vjp_close(loss('cpu_flash'), loss('xla'), atol_out=1e-3, atol_grad=3e-5)


@needs_kernel
def test_cpu_flash_dropout_with_fewer_queries_than_keys():
  """The dropout counters use both lengths: (head * Lq + row) * Lk + col."""
  ks = jax.random.split(jax.random.key(9), 4)
  q, dout = (jax.random.normal(kk, (2, 24, 2, 16)) for kk in ks[:2])
  k, v = (jax.random.normal(kk, (2, 70, 2, 16)) for kk in ks[2:])
  assert_vjp_close(
    _run('cpu_flash', q, k, v, dout, False, 0.25),
    _run('xla', q, k, v, dout, False, 0.25),
    atol_out=3e-6,
    atol_grad=3e-5,
  )


@needs_kernel
def test_cpu_flash_is_deterministic_and_follows_the_key():
  q = jax.random.normal(jax.random.key(0), (1, 64, 2, 16))
  run = jax.jit(
    lambda r: attention.attention(
      q, q, q, causal=True, impl='cpu_flash', dropout_rate=0.5, dropout_rng=r
    )
  )
  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_auto_falls_back_to_chunked_for_inputs_the_kernel_does_not_take():
  """bfloat16 and a head dim of 8: 'auto' runs 'chunked' (same values), an explicit
  'cpu_flash' says why it cannot run."""
  q = jax.random.normal(jax.random.key(0), (1, 32, 2, 8))
  np.testing.assert_array_equal(
    attention.attention(q, q, q, causal=True, impl='auto'),
    attention.attention(q, q, q, causal=True, impl='chunked'),
  )
  with pytest.raises(ValueError, match='multiple of 16'):
    attention.attention(q, q, q, causal=True, impl='cpu_flash')
  qb = jnp.ones((1, 32, 2, 16), jnp.bfloat16)
  assert attention.attention(qb, qb, qb, causal=False, impl='auto').dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='float32'):
    attention.attention(qb, qb, qb, causal=False, impl='cpu_flash')


def test_unavailable_kernel_gives_a_reason_and_auto_uses_chunked(monkeypatch, tmp_path, capsys):
  """No compiler (CXX that fails) or LARP_JAX_NATIVE=0: a one-line reason on stderr, 'auto'
  resolves to 'chunked', an explicit 'cpu_flash' raises with the reason."""
  monkeypatch.setattr(native, '_state', {})
  monkeypatch.setenv('LARP_JAX_NATIVE_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')
  assert 'failed' in native.unavailable_reason()
  assert 'unavailable' in capsys.readouterr().err
  assert attention.resolve_attention_impl('auto') == 'chunked'
  q = jnp.ones((1, 8, 1, 16))
  with pytest.raises(ValueError, match="'cpu_flash' cannot run here"):
    attention.attention(q, q, q, causal=False, impl='cpu_flash')
  monkeypatch.setattr(native, '_state', {})
  monkeypatch.setenv('LARP_JAX_NATIVE', '0')
  assert 'LARP_JAX_NATIVE=0' in native.unavailable_reason()


@needs_kernel
def test_compiler_errors_are_reported(monkeypatch, tmp_path):
  bad = tmp_path / 'broken.cc'
  bad.write_text('this is not C++\n')
  monkeypatch.setattr(native, 'SOURCE', bad)
  monkeypatch.setenv('LARP_JAX_NATIVE_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(RuntimeError, match='compiling broken.cc failed'):
    native.build()
  assert not list((tmp_path / 'cache').glob('*.so'))  # no half-written library left


_SHARDED = r"""
import os
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from larp_jax.models import attention
from larp_jax.native import flash_attention as native
x = jax.random.normal(jax.random.key(1), (1, 20, 1, 16))      # the module on its own, first
direct = native.flash_attention(x, x, x, jax.numpy.zeros((2,), jax.numpy.uint32), False, 0.0)
print('DIRECT', float(np.abs(np.asarray(direct) - np.asarray(
    attention.attention(x, x, x, causal=False, impl='xla'))).max()))
print('AUTO', attention.resolve_attention_impl('auto'))
mesh = Mesh(np.array(jax.devices()), ('data',))
q = jax.random.normal(jax.random.key(0), (4, 48, 2, 16))
spec = NamedSharding(mesh, P('data'))
f = jax.jit(lambda q: attention.attention(q, q, q, causal=True, impl='cpu_flash'),
            out_shardings=spec)
ref = attention.attention(q, q, q, causal=True, impl='xla')
print('DIFF', float(np.abs(np.asarray(f(jax.device_put(q, spec))) - np.asarray(ref)).max()))
"""


@needs_kernel
def test_several_cpu_devices_auto_is_chunked_and_explicit_cpu_flash_is_still_right():
  """In a fresh process: the module called directly (it loads itself), 'auto' with 4 CPU
  devices, and an explicit 'cpu_flash' under a sharded jit."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(
    [sys.executable, '-c', _SHARDED],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  lines = dict(
    l.split(' ', 1) for l in r.stdout.splitlines() if l.startswith(('AUTO', 'DIFF', 'DIRECT'))
  )
  assert lines.get('AUTO') == 'chunked', r.stdout + r.stderr[-2000:]
  assert float(lines['DIFF']) < 1e-5 and float(lines['DIRECT']) < 1e-5
