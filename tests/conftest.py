"""Shared test fixtures: tiny model kwargs so every test runs in seconds on a 2-core CPU."""

import os
import sys

import pytest

# The repo root on sys.path so that `configs/` files load in tests as from `python -m`.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def assert_vjp_close(got, ref, *, atol_out, atol_grad):
  """``got`` and ``ref`` are (output, (gradients...)) of two kernels: equal within the atols."""
  import numpy as np

  np.testing.assert_allclose(got[0], ref[0], atol=atol_out)
  for a, b in zip(got[1], ref[1]):
    np.testing.assert_allclose(a, b, atol=atol_grad)


def run_result_script(code: str, *, timeout: int, **env):
  """Runs ``code`` in a fresh CPU python (from the repo root) and returns the JSON object it
  prints on a line starting with RESULT (assertion error with its output otherwise)."""
  import json
  import subprocess

  r = subprocess.run(
    [sys.executable, '-c', code],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu', **env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  line = [l for l in r.stdout.splitlines() if l.startswith('RESULT')]
  assert line, r.stdout[-2000:] + r.stderr[-3000:]
  return json.loads(line[0][len('RESULT') :])


def tiny_tokenizer_kwargs(**overrides):
  """LARPTokenizer kwargs of the tiny test model (``larp_jax/configs/common.py``, the configs'
  ``tiny`` argument) on 4x16x16 clips; other fields at the module defaults."""
  from larp_jax.configs import common

  kw = dict(common.TINY_MODEL, video_shape=(4, 16, 16))
  kw.update(overrides)
  return kw


@pytest.fixture
def tiny_kwargs():
  return tiny_tokenizer_kwargs()


_OWN_CACHE = []  # the compilation cache directory this process made (the controller's)


def pytest_configure(config):
  # One persistent XLA compilation cache per suite run, made by the controller and inherited by
  # the xdist workers and every subprocess a test starts (through os.environ): many tests compile
  # the same programs (a restart compiles its first run's train step again, the multi-host
  # reference and its jobs share the evaluation), and a cache hit costs milliseconds. It starts
  # empty, so every program still compiles once per run; programs under a second are not kept.
  import tempfile

  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='larp_jax_tests_xla_')
    _OWN_CACHE.append(os.environ['JAX_COMPILATION_CACHE_DIR'])
  # Tiny models: XLA's optimisation passes cost more than they save.
  import jax

  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_disable_most_optimizations', True)
  # Files in HEAVY_FIRST's order (below), not xdist's by number of tests.
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


# The files whose tests cost the most (seconds of one worker, ``--durations=0`` of a full run here
# (2 cores)), most first. Under ``-n 2 --dist loadfile`` a worker takes one file at a
# time in collection order, and xdist would otherwise order the files by their number of tests: a
# file of four long tests (test_multihost) then starts last and the other worker idles while it
# runs. Heaviest first, the two workers finish within a short file of each other. Only the order
# changes; every test still runs.
HEAVY_FIRST = (  # 2026-12-03, 2-core AMD EPYC: 277, 255, 226, 210, 146, 112, 96, 76, 76, 63 s
  'test_multihost.py',
  'test_cli.py',
  'test_train.py',
  'test_cli_exits.py',
  'test_notebooks.py',
  'test_tokenizer.py',
  'test_bottleneck.py',
  'test_attention.py',
  'test_evaluator.py',
  'test_workdir.py',
)


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


_EXIT_STATUS = [0]


def pytest_sessionfinish(session, exitstatus):
  _EXIT_STATUS[0] = int(exitstatus)


def pytest_unconfigure(config):
  # After pytest has printed its summary: leave without interpreter teardown. Destroying a tf.data
  # iterator whose prefetch thread is inside a numpy_function can deadlock on the GIL (see
  # larp_jax/main.py), which would hang CI after all tests passed.
  import shutil
  import sys

  for d in _OWN_CACHE:
    shutil.rmtree(d, ignore_errors=True)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(_EXIT_STATUS[0])
