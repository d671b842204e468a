"""Memory of the benchmark's programs: XLA's memory analysis of a compiled program, the
device's high-water mark, and on CPU a check that a program fits in the host's memory."""

from __future__ import annotations

from typing import Optional

import jax


def compiled_memory(compiled) -> Optional[dict]:
  """Bytes from ``compiled.memory_analysis()`` (argument, output, temp, alias, generated code)
  and their total argument + output + temp - alias; None if the backend has none."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if ma is None:
    return None
  if isinstance(ma, (list, tuple)):
    ma = ma[0] if ma else None
    if ma is None:
      return None
  out = {}
  for name in ('argument', 'output', 'temp', 'alias', 'generated_code'):
    v = getattr(ma, f'{name}_size_in_bytes', None)
    if v is not None:
      out[f'{name}_bytes'] = int(v)
  out['total_bytes'] = (
    out.get('argument_bytes', 0)
    + out.get('output_bytes', 0)
    + out.get('temp_bytes', 0)
    - out.get('alias_bytes', 0)
  )
  return out


def host_available_bytes() -> Optional[int]:
  """MemAvailable of /proc/meminfo (Linux), else None."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def host_memory_error(compiled) -> Optional[str]:
  """On CPU: an error message if the program's new buffers (temp + output - aliased) exceed
  90% of the host's available memory less 1 GiB, so that the bench reports it instead of being
  OOM-killed."""
  if jax.devices()[0].platform != 'cpu':
    return None
  mem, avail = compiled_memory(compiled), host_available_bytes()
  if not mem or avail is None:
    return None
  need = mem.get('temp_bytes', 0) + mem.get('output_bytes', 0) - mem.get('alias_bytes', 0)
  if need > 0.9 * avail - 2**30:  # margin for the runtime, Python and other processes
    return (
      f'does not fit in host memory: the program needs {need / 2**30:.1f} GiB more '
      f'(XLA memory analysis), {avail / 2**30:.1f} GiB available'
    )
  return None


def device_peak_bytes() -> Optional[int]:
  """Largest ``peak_bytes_in_use`` over the local devices (GPU/TPU; None on CPU). It is the
  process's high-water mark so far, not per measurement."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None
