"""The benchmark's record: the JSON entry of one measurement (``measurement_record``) and its
MFU (``add_mfu``), the run's git state and versions, the printed table (``format_table``) and
the JSON file (``write_record``)."""

from __future__ import annotations

import json
import os
import re
import statistics
from typing import Optional

from larp_jax.bench.flops import TWIN_NOTE, analytic_flops, needs_cost_twin
from larp_jax.bench.memory import compiled_memory, device_peak_bytes
from larp_jax.bench.timing import stats


def measurement_record(
  what, exp, cfg, batch, times, compile_times, compiled, xla_step, xla_per_device
):
  """The JSON record of one measurement; ``times`` None when it could not run."""
  analytic = analytic_flops(what, exp.model, exp.disc, cfg.loss, batch)
  med = statistics.median(times) if times else None
  return {
    'what': what,
    'seconds_per_step': stats(times) if times else None,
    'clips_per_s': {'median': batch / med, 'min': batch / max(times), 'max': batch / min(times)}
    if times
    else None,
    'compile': compile_times,
    'flops_per_step': {
      'xla': xla_step,
      'xla_per_device_program': xla_per_device,
      'analytic_transformer': analytic['transformer'],
      'analytic_lpips': analytic['lpips'],
      'analytic_total': analytic['total'],
    },
    'flops_per_clip': {
      'xla': xla_step / batch if xla_step is not None else None,
      'analytic_transformer': analytic['transformer'] / batch,
      'analytic_lpips': analytic['lpips'] / batch,
      'analytic_total': analytic['total'] / batch,
    },
    'xla_over_analytic': (xla_step / analytic['total'] if xla_step and analytic['total'] else None),
    'achieved_flops_per_s': xla_step / med if (xla_step and med) else None,
    'analytic_flops_per_s': analytic['total'] / med if med else None,
    'xla_flops_source': TWIN_NOTE if needs_cost_twin(exp.model) else 'compiled program',
    'attention_impl': exp.model.attention_impl,
    'memory': {'compiled': compiled_memory(compiled), 'device_peak_bytes': device_peak_bytes()},
  }


def add_mfu(
  result: dict, peak_per_device: Optional[float], datasheet: Optional[float], n_dev: int
) -> None:
  ach, model = result.get('achieved_flops_per_s'), result.get('analytic_flops_per_s')
  result['mfu'] = ach / (peak_per_device * n_dev) if ach and peak_per_device else None
  result['mfu_analytic'] = model / (peak_per_device * n_dev) if model and peak_per_device else None
  result['mfu_datasheet'] = ach / (datasheet * n_dev) if ach and datasheet else None


def config_name(spec: str) -> str:
  """'configs/bench.py:tiny,dtype=bfloat16' -> 'bench-tiny-dtype-bfloat16'."""
  path, _, args = spec.partition(':')
  name = os.path.splitext(os.path.basename(path))[0] or 'config'
  if args:
    name += '-' + args
  return re.sub(r'[^A-Za-z0-9_.]+', '-', name).strip('-')


def git_state() -> Optional[dict]:
  """{'commit', 'dirty'} of the larp_jax checkout, if it is one (best effort)."""
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    commit = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ['git', 'status', '--porcelain', '--untracked-files=no'],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=10,
      check=True,
    ).stdout
  except Exception:  # pylint: disable=broad-except
    return None
  return {'commit': commit, 'dirty': bool(dirty.strip())}


def jaxlib_version():
  try:
    import jaxlib

    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return None


def _g(x, scale=1e9, fmt='{:.2f}'):
  return '-' if x is None else fmt.format(x / scale)


def _bytes(m):
  if m['device_peak_bytes'] is not None:
    return f'{m["device_peak_bytes"] / 2**30:.2f}G*'
  if m['compiled']:
    return f'{m["compiled"]["total_bytes"] / 2**30:.2f}G'
  return '-'


def format_table(record: dict) -> str:
  d = record['device']
  lines = [
    f'larp_jax bench  {record["config"] or "(config)"}  batch {record["batch"]}  '
    f'{record["dtype"]}  {d["count"]} x {d["kind"]} ({d["platform"]})  '
    f'jax {record["versions"]["jax"]}',
  ]
  for name, p in record['peak']['measured'].items():
    seen = [p['flops_per_s'], *record['peak']['rechecks_flops_per_s'][name]]
    lines.append(
      f'peak matmul {name} ({p["size"]}x{p["size"]}, chain {p["chain"]}): '
      f'{max(seen) / 1e9:.1f} GFLOP/s per device (best of {len(seen)} measurements: '
      f'{", ".join(f"{x / 1e9:.1f}" for x in seen)})'
    )
  if record['peak']['datasheet_bf16_per_device']:
    lines.append(
      f'datasheet bf16 peak: {record["peak"]["datasheet_bf16_per_device"] / 1e12:.0f} '
      'TFLOP/s per device'
    )
  head = (
    f'{"what":8s} {"s/step med":>10s} {"[min, max]":>17s} {"clips/s":>8s} '
    f'{"GF/clip xla":>11s} {"analytic":>9s} {"+lpips":>7s} {"GFLOP/s":>8s} {"MFU":>6s} '
    f'{"MFU an.":>7s} {"compile s":>9s} {"memory":>7s}'
  )
  lines += [head, '-' * len(head)]
  errors = []
  pct = lambda x: '-' if x is None else f'{100 * x:.1f}%'
  for w, r in record['measurements'].items():
    if r.get('error'):
      errors.append(f'{w}: {r["error"]}')
    if 'flops_per_clip' not in r:  # failed before compiling
      lines.append(f'{w:8s} {"failed":>10s}')
      continue
    s, fc, mem = r['seconds_per_step'], r['flops_per_clip'], r['memory']
    med = '-' if s is None else f'{s["median"]:.4f}'
    span = '-' if s is None else '[{:.4f}, {:.4f}]'.format(s['min'], s['max'])
    cps = '-' if r['clips_per_s'] is None else f'{r["clips_per_s"]["median"]:.2f}'
    lines.append(
      f'{w:8s} {med:>10s} {span:>17s} {cps:>8s} {_g(fc["xla"]):>11s} '
      f'{_g(fc["analytic_transformer"]):>9s} {_g(fc["analytic_lpips"]):>7s} '
      f'{_g(r["achieved_flops_per_s"], 1e9, "{:.1f}"):>8s} {pct(r.get("mfu")):>6s} '
      f'{pct(r.get("mfu_analytic")):>7s} {r["compile"]["total_s"]:9.1f} {_bytes(mem):>7s}'
    )
  lines += errors
  inp = record['input']
  if inp is not None:
    if 'error' in inp:
      lines.append(f'input pipeline ({inp["source"]}): not measured: {inp["error"]}')
    else:
      lines.append(
        f'input pipeline ({inp["source"]}, batch {inp["batch_per_host"]} per host): '
        f'{inp["clips_per_s"]:.1f} clips/s'
      )
  lines.append(
    'GF = GFLOP per clip; "train" is amortised over loss.disc_every steps; MFU: XLA '
    'FLOPs, MFU an.: analytic + LPIPS FLOPs, both over the measured peak; memory: '
    'compiled argument+output+temp-alias per device (G* = device peak_bytes_in_use, '
    'process high-water mark).'
  )
  return '\n'.join(lines)


def write_record(record: dict, out: Optional[str], out_dir: str) -> str:
  if not out:
    name = record['config_name'] or 'config'
    out = os.path.join(out_dir, f'{name}-{"_".join(record["what"])}.json')
  parent = os.path.dirname(out)
  if parent:
    os.makedirs(parent, exist_ok=True)
  with open(out, 'w') as f:
    json.dump(record, f, indent=2)
  return out
