"""Timing of the benchmark: ``time_runs`` (warm-up, then timed rounds), ``lower_compile``
(lowering and compile seconds), the matmul rate of a device (``measure_peak``) and the
datasheet peaks (``datasheet_peak``), ``stats`` of a list of seconds and ``log`` (progress on
stderr)."""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from larp_jax.bench.flops import xla_flops

# Datasheet dense bf16 matmul peaks (FLOP/s per device), matched in order against
# ``device.device_kind`` (substring, case-insensitive).
DATASHEET_PEAK_BF16 = (
  ('H100 PCIe', 756e12),
  ('H200', 989e12),
  ('H100', 989e12),  # SXM
  ('A100', 312e12),
  ('TPU v4', 275e12),
  ('TPU v5 lite', 197e12),  # v5e reports 'TPU v5 lite'
  ('TPU v5e', 197e12),
  ('TPU v5p', 459e12),
  ('TPU v5', 459e12),  # v5p reports 'TPU v5'
  ('TPU v6 lite', 918e12),  # v6e (Trillium)
  ('TPU v6e', 918e12),
)


def datasheet_peak(device_kind: str) -> Optional[float]:
  kind = device_kind.lower()
  for name, peak in DATASHEET_PEAK_BF16:
    if name.lower() in kind:
      return peak
  return None


def log(msg: str) -> None:
  """Progress on stderr (the table and the JSON path go to stdout)."""
  print(f'[bench {time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def stats(values: Sequence[float]) -> dict:
  return {
    'median': statistics.median(values),
    'min': min(values),
    'max': max(values),
    'all': list(values),
  }


def time_runs(run_once: Callable[[], Any], *, period: int, runs: int, warmup: int) -> list:
  """Seconds per call of ``run_once``: ``warmup`` untimed rounds, then ``runs`` timed rounds of
  ``period`` consecutive calls each, blocked on the last output, divided by ``period``."""
  for _ in range(warmup):
    for _ in range(period):
      out = run_once()
    jax.block_until_ready(out)
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    for _ in range(period):
      out = run_once()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / period)
  return times


def default_peak_size(platform_name: str) -> int:
  return 2048 if platform_name == 'cpu' else 8192


def measure_peak(
  dtype=jnp.float32, size: int = 2048, chain: int = 4, runs: int = 5, warmup: int = 1, device=None
) -> dict:
  """Matrix-multiply rate of one device: a jitted chain of ``chain`` dependent
  ``size x size`` matmuls in ``dtype``; FLOPs 2*size^3 per matmul (XLA's count is recorded)."""
  device = device or jax.devices()[0]
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(ka, (size, size), jnp.float32).astype(dtype), device)
  b = jax.device_put(
    (jax.random.normal(kb, (size, size), jnp.float32) / math.sqrt(size)).astype(dtype), device
  )

  def f(a, b):
    for _ in range(chain):
      a = a @ b
    return a

  compiled = jax.jit(f).lower(a, b).compile()
  times = time_runs(lambda: compiled(a, b), period=1, runs=runs, warmup=warmup)
  flops = 2.0 * size**3 * chain
  best = min(times)
  return {
    'dtype': jnp.dtype(dtype).name,
    'size': size,
    'chain': chain,
    'flops_per_call': flops,
    'xla_flops_per_call': xla_flops(compiled),
    'seconds': stats(times),
    'flops_per_s': flops / best,
    'flops_per_s_median': flops / statistics.median(times),
  }


def lower_compile(jitted, *args) -> tuple:
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, {'lower_s': t1 - t0, 'compile_s': t2 - t1, 'total_s': t2 - t0}
