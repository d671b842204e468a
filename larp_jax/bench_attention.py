r"""Attention kernel benchmark: forward and forward + backward of each ``attention`` impl.

  python -m larp_jax.bench_attention                         # LARP-L encoder/decoder shape
  python -m larp_jax.bench_attention --shape=1,1023,6,64 --causal --dropout=0.1   # its prior
  python -m larp_jax.bench_attention --impls=xla,dot_product_attention --dtype=bfloat16 --shape=8,2048,12,64

For each impl of ``larp_jax.models.attention.attention`` it compiles the forward and the
gradient w.r.t. q, k and v of ``sum(attention(q, k, v) * cotangent)``, then times them in
interleaved rounds (every impl once per round, so a drifting machine hits all of them alike)
and reports the median and min, the achieved FLOP/s and its fraction of the matmul rate
measured in the same run (``bench.timing.measure_peak``), and the largest difference of the
output and of the gradients from the 'xla' impl computed in float32 (the kernels must agree,
dropout included: all impls draw the same counter-based mask).

FLOPs are model FLOPs: 4 * B * H * Lq * Lk * Dh for the forward (QK^T and PV; half of it with a
causal mask), twice that for the backward (dV, dP, dK, dQ). A kernel that recomputes the scores
in its backward pass (flash attention) does more work than it is credited with.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from larp_jax.bench import timing
from larp_jax.models import attention

DEFAULT_SHAPE = (1, 2048, 12, 64)  # LARP-L: 1024 patches + 1024 queries, 12 heads of 64


def attention_flops(
  b: int, q_len: int, k_len: int, heads: int, head_dim: int, causal: bool
) -> dict:
  fwd = 4.0 * b * heads * q_len * k_len * head_dim * (0.5 if causal else 1.0)
  return {'forward': fwd, 'forward_backward': 3.0 * fwd}


def _inputs(shape, q_len, dtype, seed):
  b, l, h, d = shape
  kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, q_len, h, d), jnp.float32)
  k = jax.random.normal(kk, (b, l, h, d), jnp.float32)
  v = jax.random.normal(kv, (b, l, h, d), jnp.float32)
  g = jax.random.normal(kg, (b, q_len, h, d), jnp.float32)
  return tuple(x.astype(dtype) for x in (q, k, v, g))


def _programs(impl, *, causal, rate, rng):
  def fwd(q, k, v):
    return attention.attention(
      q, k, v, causal=causal, impl=impl, dropout_rate=rate, dropout_rng=rng if rate > 0 else None
    )

  def grads(q, k, v, g):
    return jax.grad(
      lambda q, k, v: jnp.sum((fwd(q, k, v) * g).astype(jnp.float32)), argnums=(0, 1, 2)
    )(q, k, v)

  return jax.jit(fwd), jax.jit(grads)


def _max_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def default_impls(shape: Sequence[int] = DEFAULT_SHAPE, dtype: str = 'float32') -> list:
  """'cpu_flash' (where it runs: CPU, built, float32, head dim a multiple of 16), 'chunked',
  'xla'."""
  from larp_jax.native import flash_attention as native

  x = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
  return ['cpu_flash', 'chunked', 'xla'] if native.cannot_run(x, x) is None else ['chunked', 'xla']


def run(
  *,
  shape: Sequence[int] = DEFAULT_SHAPE,
  q_len: Optional[int] = None,
  causal: bool = False,
  dropout: float = 0.0,
  impls: Optional[Sequence[str]] = None,
  dtype: str = 'float32',
  runs: int = 10,
  warmup: int = 2,
  peak: bool = True,
  seed: int = 0,
) -> dict:
  """Times every impl (default: ``default_impls()``) and returns the JSON record (see the
  module docstring)."""
  if len(shape) != 4 or min(shape) < 1:
    raise ValueError(f'shape must be four positive sizes B,L,H,Dh, got {list(shape)}')
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'dropout={dropout} must be in [0, 1)')
  b, l, h, d = shape
  q_len = l if q_len is None else q_len
  if q_len < 1:
    raise ValueError(f'q_len={q_len} must be >= 1 (or left unset: q_len = L)')
  if causal and q_len != l:
    raise ValueError(
      f'a causal mask needs q_len == L, got q_len={q_len} and L={l}; drop --q_len or --causal'
    )
  if runs < 1 or warmup < 0:
    raise ValueError(f'runs={runs} must be >= 1 and warmup={warmup} >= 0')
  impls = default_impls(shape, dtype) if impls is None else list(impls)
  q, k, v, g = _inputs(shape, q_len, jnp.dtype(dtype), seed)
  # The kernel each impl runs as; a clear error now for an unknown name or one that cannot run.
  ran_as = {i: attention.select_attention_impl(i, q, k, v, dropout=dropout > 0) for i in impls}
  rng = jax.random.key(seed + 1)
  flops = attention_flops(b, q_len, l, h, d, causal)

  ref_fwd, ref_grads = _programs('xla', causal=causal, rate=dropout, rng=rng)
  f32 = lambda *xs: tuple(x.astype(jnp.float32) for x in xs)
  ref_out, ref_g = ref_fwd(*f32(q, k, v)), ref_grads(*f32(q, k, v, g))

  compiled, results = {}, {}
  for impl in impls:
    timing.log(f'{impl}: compiling')
    fwd, grads = _programs(impl, causal=causal, rate=dropout, rng=rng)
    t0 = time.perf_counter()
    cf = fwd.lower(q, k, v).compile()
    cg = grads.lower(q, k, v, g).compile()
    compile_s = time.perf_counter() - t0
    out, gr = cf(q, k, v), cg(q, k, v, g)
    results[impl] = {
      'compile_s': compile_s,
      'ran_as': ran_as[impl],
      'max_abs_diff_vs_xla_f32': {
        'out': _max_diff(out, ref_out),
        **{f'd{n}': _max_diff(a, r) for n, a, r in zip('qkv', gr, ref_g)},
      },
      'forward_s': [],
      'forward_backward_s': [],
    }
    compiled[impl] = (lambda cf=cf: cf(q, k, v), lambda cg=cg: cg(q, k, v, g))
  timing.log(f'timing {len(impls)} impls in {runs} interleaved rounds')
  for impl, (f, fb) in compiled.items():
    for _ in range(warmup):
      jax.block_until_ready(f())
      jax.block_until_ready(fb())
  for _ in range(runs):
    for impl, (f, fb) in compiled.items():
      for key, call in (('forward_s', f), ('forward_backward_s', fb)):
        t = time.perf_counter()
        jax.block_until_ready(call())
        results[impl][key].append(time.perf_counter() - t)

  device = jax.devices()[0]
  peak_rec = (
    timing.measure_peak(jnp.dtype(dtype), timing.default_peak_size(device.platform))
    if peak
    else None
  )
  peak_rate = peak_rec['flops_per_s'] if peak_rec else None
  for impl, r in results.items():
    for key, what in (('forward_s', 'forward'), ('forward_backward_s', 'forward_backward')):
      times = r.pop(key)
      med = statistics.median(times)
      r[what] = {
        'seconds': timing.stats(times),
        'flops': flops[what],
        'flops_per_s': flops[what] / med,
        'fraction_of_peak': flops[what] / med / peak_rate if peak_rate else None,
      }
  return {
    'shape': {'batch': b, 'q_len': q_len, 'k_len': l, 'heads': h, 'head_dim': d},
    'causal': causal,
    'dropout': dropout,
    'dtype': jnp.dtype(dtype).name,
    'runs': runs,
    'warmup': warmup,
    'backend': jax.default_backend(),
    'device_kind': device.device_kind,
    'peak': peak_rec,
    'impls': results,
  }


def format_table(record: dict) -> str:
  s = record['shape']
  lines = [
    f'attention [B={s["batch"]}, Lq={s["q_len"]}, Lk={s["k_len"]}, H={s["heads"]}, '
    f'Dh={s["head_dim"]}] {record["dtype"]}, causal={record["causal"]}, '
    f'dropout={record["dropout"]}, on {record["device_kind"]}',
    f'{"impl":31s} {"fwd ms med [min]":>21s} {"GFLOP/s":>8s} {"of peak":>8s}'
    f'   {"fwd+bwd ms med [min]":>21s} {"GFLOP/s":>8s} {"of peak":>8s}  max |diff| vs xla',
  ]
  for impl, r in record['impls'].items():
    cells = []
    for what in ('forward', 'forward_backward'):
      m = r[what]
      frac = m['fraction_of_peak']
      cells.append(
        f'{m["seconds"]["median"] * 1e3:11.2f} [{m["seconds"]["min"] * 1e3:7.2f}]'
        f' {m["flops_per_s"] / 1e9:8.1f} {"" if frac is None else f"{frac:.1%}":>8s}'
      )
    diff = max(r['max_abs_diff_vs_xla_f32'].values())
    name = impl if r['ran_as'] == impl else f'{impl} (ran {r["ran_as"]})'
    lines.append(f'{name:31s} {cells[0]}   {cells[1]}  {diff:.2e}')
  if record['peak']:
    lines.append(
      f'peak: {record["peak"]["flops_per_s"] / 1e9:.1f} GFLOP/s '
      f'({record["peak"]["size"]}^3 {record["peak"]["dtype"]} matmuls, same run)'
    )
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_list(
    'shape', [str(x) for x in DEFAULT_SHAPE], 'B,L,H,Dh of k and v.', flag_values=fv
  )
  flags.DEFINE_integer(
    'q_len', None, 'Queries (default L; fewer = the kept rows of a last block).', flag_values=fv
  )
  flags.DEFINE_bool('causal', False, 'Lower-triangular mask (the prior).', flag_values=fv)
  flags.DEFINE_float('dropout', 0.0, 'Attention-dropout rate (the prior: 0.1).', flag_values=fv)
  flags.DEFINE_list(
    'impls',
    None,
    f'Any of {attention.ATTENTION_CHOICES} (default: '
    "'cpu_flash' where it runs: CPU, float32, head dim % 16 == 0; 'chunked', "
    "'xla').",
    flag_values=fv,
  )
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'q, k, v dtype.', flag_values=fv)
  flags.DEFINE_integer('runs', 10, 'Interleaved timed rounds.', flag_values=fv)
  flags.DEFINE_integer('warmup', 2, 'Untimed runs of each program first.', flag_values=fv)
  flags.DEFINE_bool('peak', True, 'Also measure the matmul rate (for "of peak").', flag_values=fv)
  flags.DEFINE_string('out', None, 'JSON output path (default: none).', flag_values=fv)
  from larp_jax import cli_env, errors

  cli_env.parse_flags(fv, list(sys.argv if argv is None else argv)[1:], __doc__)
  try:
    shape = [int(x) for x in fv.shape]
  except ValueError:
    raise errors.UserError(
      f'--shape must be four integers B,L,H,Dh, got {",".join(fv.shape)}'
    ) from None
  record = run(
    shape=shape,
    q_len=fv.q_len,
    causal=fv.causal,
    dropout=fv.dropout,
    impls=fv.impls,
    dtype=fv.dtype,
    runs=fv.runs,
    warmup=fv.warmup,
    peak=fv.peak,
  )
  print(format_table(record))
  if fv.out:
    with open(fv.out, 'w') as f:
      json.dump(record, f, indent=2)
    print(f'wrote {fv.out}')
  return record


def _run():
  from larp_jax import cli_env, host_malloc

  host_malloc.reexec_if_needed()  # CPU: keep XLA's buffers mapped (host_malloc.py)
  # A user's mistake is one line (exit 2); a bug shows its traceback (exit 1).
  sys.exit(cli_env.run_command(lambda args: main(['larp_jax.bench_attention', *args])))


if __name__ == '__main__':
  _run()
