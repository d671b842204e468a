"""The CPU entry points re-execute once with glibc tunables that keep XLA's step buffers
mapped (larp_jax/host_malloc.py)."""

import os
import subprocess
import sys

from larp_jax import host_malloc


def test_tuned_environment_adds_the_tunables_once_and_keeps_the_users():
  env = host_malloc.tuned_environment(
    {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}, libc='glibc', on_cpu=True
  )
  tunables = env['GLIBC_TUNABLES'].split(':')
  assert tunables[0] == 'glibc.malloc.arena_max=4'  # the user's value wins
  assert 'glibc.malloc.mmap_max=0' in tunables and len(tunables) == 3
  assert host_malloc.tuned_environment(env, libc='glibc', on_cpu=True) is None  # no loop
  full = host_malloc.tuned_environment({}, libc='glibc', on_cpu=True)
  assert full['GLIBC_TUNABLES'] == ':'.join(host_malloc.TUNABLES)
  assert (
    host_malloc.tuned_environment(full | {host_malloc.OPT_OUT: '1'}, libc='glibc', on_cpu=True)
    is None
  )


def test_no_change_off_cpu_off_glibc_or_when_opted_out():
  assert host_malloc.tuned_environment({}, libc='glibc', on_cpu=False) is None
  assert host_malloc.tuned_environment({}, libc='musl', on_cpu=True) is None
  assert (
    host_malloc.tuned_environment({host_malloc.OPT_OUT: '0'}, libc='glibc', on_cpu=True) is None
  )
  assert host_malloc.runs_on_cpu({'JAX_PLATFORMS': 'cpu'})
  assert not host_malloc.runs_on_cpu({'JAX_PLATFORMS': 'cuda,cpu'})


def test_reexec_runs_the_same_command_with_the_tunables():
  """A real re-execution: the child sees the tunables and runs the same code only once."""
  if host_malloc.tuned_environment({}, on_cpu=True) is None:
    import pytest

    pytest.skip('not a glibc Linux')
  code = (
    'import os, sys; from larp_jax import host_malloc; print("start", flush=True); '
    'host_malloc.reexec_if_needed(); print(os.environ.get("GLIBC_TUNABLES"))'
  )
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', host_malloc.OPT_OUT)}
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True
  ).stdout.split()
  assert out == ['start', 'start', ':'.join(host_malloc.TUNABLES)]
