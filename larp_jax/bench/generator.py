r"""Benchmark of the AR generator ``LARPAR`` (configs with ``task = 'generator'``).

  python -m larp_jax.bench --config=configs/bench.py:gen_tiny
  python -m larp_jax.bench --config=configs/bench.py:gen_b --what=train,sample --runs=2

Measurements (``--what``; default all):
  train      ``generator_step.generator_train_step`` (next-token cross-entropy, dropouts on, AdamW
             with the config's optimiser), jitted on one device with the state donated;
             sequences/s (= clips/s) and tokens/s.
  sample     ``generation.sampling.sample`` (KV cache, prefill + one ``lax.scan``) at each batch
             of ``config.bench.sample_batches``; generated tokens/s over all rows.
  recompute  ``sampling.sample_by_recompute`` (a full forward per token) at
             ``config.bench.recompute_batch``. With ``config.bench.recompute_full`` False (the B
             preset: all 1024 tokens take an hour on a CPU core) it times one step of that loop,
             the deterministic forward over the full token buffer, which is what every token
             of the program costs, and reports seq_len / that time (``extrapolated: true``).

FLOPs: XLA's cost analysis of the train step's twin with ``attention_impl='xla'`` (the C++ kernel
is a custom call XLA counts as 0) and the analytic matmul count (``flops.larp_ar_*``: backward =
2x forward); sampling has analytic FLOPs only (XLA counts a loop body once). MFU is against the
float32 matmul rate measured in the same run, as for the tokenizer.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from larp_jax.bench.flops import larp_ar_forward_flops, larp_ar_sample_flops, xla_flops
from larp_jax.bench.memory import compiled_memory, device_peak_bytes
from larp_jax.bench.timing import log, lower_compile, stats, time_runs

MEASUREMENTS = ('train', 'sample', 'recompute')


def make_model(model_cfg, **overrides):
  from larp_jax.tasks import generator as generator_task

  cfg = copy.deepcopy(model_cfg)
  with cfg.unlocked():
    cfg.update(overrides)
  return generator_task.make_model(cfg)


def init_params(model, seed: int):
  n = int(model.seq_len)
  labels = None if model.frame_prediction else jnp.zeros((1,), jnp.int32)
  prefix = jnp.zeros((1, n), jnp.int32) if model.frame_prediction else None
  init = jax.jit(
    lambda k: model.init({'params': k}, jnp.zeros((1, n), jnp.int32), labels, prefix)['params']
  )
  return jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, init(jax.random.key(seed)))


def random_batch(model, batch: int, seed: int) -> dict:
  kt, kl, kp = jax.random.split(jax.random.key(seed), 3)
  n, v = int(model.seq_len), int(model.vocab_size)
  out = {'tokens': jax.random.randint(kt, (batch, n), 0, v, jnp.int32)}
  if model.frame_prediction:
    out['cond_tokens'] = jax.random.randint(kp, (batch, n), 0, v, jnp.int32)
    out['label'] = jnp.zeros((batch,), jnp.int32)
  else:
    out['label'] = jax.random.randint(kl, (batch,), 0, int(model.num_classes), jnp.int32)
  return out


def train_step_fn(config, model):
  """(jitted step(state, batch, key) with the state donated, init_state(params))."""
  import functools

  from larp_jax.train import generator_step, optim

  total = int(config.get('total_steps', 1000))
  tx = optim.adamw_optimizer(config.optim, total)
  lr_fn = optim.schedule(float(config.optim.lr), config.optim, total)

  def apply_fn(params, tokens, labels, prefix, key):
    labels = None if model.frame_prediction else labels
    return model.apply(
      {'params': params}, tokens, labels, prefix, train=True, rngs={'dropout': key}
    )

  step = functools.partial(
    generator_step.generator_train_step, model=model, tx=tx, lr_fn=lr_fn, apply_fn=apply_fn
  )
  jitted = jax.jit(lambda s, b, k: step(s, b, k, {}), donate_argnums=0)
  return jitted, lambda params: generator_step.create(params, tx)


def _record(what, batch, tokens_per_run, times, compile_times, analytic, xla=None, compiled=None):
  med = statistics.median(times)
  return {
    'what': what,
    'batch': batch,
    'tokens_per_run': tokens_per_run,
    'seconds_per_step': stats(times),
    'clips_per_s': {'median': batch / med, 'min': batch / max(times), 'max': batch / min(times)},
    'tokens_per_s': {
      'median': tokens_per_run / med,
      'min': tokens_per_run / max(times),
      'max': tokens_per_run / min(times),
    },
    'compile': compile_times,
    'flops_per_step': {'xla': xla, 'analytic_total': analytic},
    'flops_per_clip': {
      'xla': xla / batch if xla else None,
      'analytic_transformer': analytic / batch,
      'analytic_lpips': 0,
      'analytic_total': analytic / batch,
    },
    'xla_over_analytic': xla / analytic if xla else None,
    'achieved_flops_per_s': xla / med if xla else None,
    'analytic_flops_per_s': analytic / med,
    'memory': {
      'compiled': compiled_memory(compiled) if compiled is not None else None,
      'device_peak_bytes': device_peak_bytes(),
    },
  }


def bench_train(config, model, *, batch: int, runs: int, warmup: int, seed: int) -> dict:
  step, init_state = train_step_fn(config, model)
  state = init_state(init_params(model, seed))
  data = random_batch(model, batch, seed)
  key = jax.random.key(seed)
  log('train: compiling the generator train step')
  compiled, compile_times = lower_compile(step, state, data, key)
  xla = xla_flops(compiled)
  if model.attention_impl != 'xla' or xla is None:  # custom calls count as 0: the twin's count
    twin = make_model(config.model, attention_impl='xla')
    twin_step, _ = train_step_fn(config, twin)
    xla = xla_flops(twin_step.lower(state, data, key).compile())
  holder = {'state': state}
  del state

  def once():
    holder['state'], metrics = compiled(holder['state'], data, key)
    return metrics

  log(f'train: compiled in {compile_times["total_s"]:.1f} s; timing')
  times = time_runs(once, period=1, runs=runs, warmup=warmup)
  loss = float(jax.device_get(once()['loss']))
  analytic = 3 * larp_ar_forward_flops(model, batch)
  out = _record('train', batch, batch * int(model.seq_len), times, compile_times, analytic, xla)
  out['final_loss'] = loss
  out['memory']['compiled'] = compiled_memory(compiled)
  holder.clear()
  return out


def bench_sample(model, params, *, batch: int, runs: int, warmup: int, seed: int) -> dict:
  from larp_jax.generation import sampling

  data = random_batch(model, batch, seed)
  labels = None if model.frame_prediction else data['label']
  prefix = data.get('cond_tokens')
  key = jax.random.key(seed)
  variables = {'params': params}
  run = lambda: sampling.sample(model, variables, labels, key, prefix=prefix)['tokens']
  log(f'sample (batch {batch}): compiling')
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  first = time.perf_counter() - t0
  log(f'sample (batch {batch}): first call (compile + run) {first:.1f} s; timing')
  times = time_runs(run, period=1, runs=runs, warmup=max(warmup - 1, 0))
  n = int(model.seq_len)
  out = _record(
    f'sample_b{batch}',
    batch,
    batch * n,
    times,
    {'total_s': first, 'includes_one_run': True},
    larp_ar_sample_flops(model, batch),
  )
  out.update(cached=True, extrapolated=False)
  return out


def bench_recompute(
  model, params, *, batch: int, runs: int, warmup: int, seed: int, full: bool
) -> dict:
  from larp_jax.generation import sampling

  data = random_batch(model, batch, seed)
  labels = None if model.frame_prediction else data['label']
  prefix = data.get('cond_tokens')
  variables = {'params': params}
  n = int(model.seq_len)
  forward = larp_ar_forward_flops(model, batch)
  if full:
    key = jax.random.key(seed)
    run = lambda: sampling.sample_by_recompute(model, variables, labels, key, prefix=prefix)
    log(f'recompute (batch {batch}): compiling')
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - t0
    times = time_runs(run, period=1, runs=runs, warmup=max(warmup - 1, 0))
    compile_times = {'total_s': first, 'includes_one_run': True}
  else:
    # One step of sample_by_recompute's loop: the deterministic forward over the whole buffer.
    fwd = jax.jit(lambda p, t: model.apply({'params': p}, t, labels, prefix))
    log(f'recompute (batch {batch}): compiling one step (the full forward)')
    compiled, compile_times = lower_compile(fwd, params, data['tokens'])
    step_times = time_runs(
      lambda: compiled(params, data['tokens']), period=1, runs=runs, warmup=warmup
    )
    times = [t * n for t in step_times]
  out = _record(f'recompute_b{batch}', batch, batch * n, times, compile_times, n * forward)
  out.update(cached=False, extrapolated=not full)
  if not full:
    out['seconds_per_token_step'] = stats(step_times)
  return out


def run_measurements(config, what: Sequence[str], *, batch: int, runs: int, warmup: int) -> dict:
  """{name: record} of the generator's measurements; 'sample' gives one per sample batch."""
  bench = config.get('bench', None) or {}
  seed = int(config.get('seed', 0))
  model = make_model(config.model)
  results = {}
  for w in what:
    if w == 'train':
      results['train'] = bench_train(
        config, model, batch=batch, runs=runs, warmup=warmup, seed=seed
      )
      continue
    params = init_params(model, seed)
    if w == 'sample':
      for b in bench.get('sample_batches', (1, 16)):
        results[f'sample_b{b}'] = bench_sample(
          model, params, batch=int(b), runs=runs, warmup=warmup, seed=seed
        )
    elif w == 'recompute':
      b = int(bench.get('recompute_batch', 1))
      results[f'recompute_b{b}'] = bench_recompute(
        model,
        params,
        batch=b,
        runs=int(bench.get('recompute_runs', runs)),
        warmup=min(warmup, 1),
        seed=seed,
        full=bool(bench.get('recompute_full', True)),
      )
  return results


def cached_over_recompute(results: dict) -> Optional[dict]:
  """tokens/s of the cached sampler over the recompute one, at the recompute batch."""
  rec = [r for r in results.values() if r.get('cached') is False]
  if not rec:
    return None
  r = rec[0]
  cached = results.get(f'sample_b{r["batch"]}')
  if not cached or not cached.get('tokens_per_s'):
    return None
  return {
    'batch': r['batch'],
    'ratio': cached['tokens_per_s']['median'] / r['tokens_per_s']['median'],
    'recompute_extrapolated': r['extrapolated'],
  }


def table_lines(record: dict) -> list:
  """Tokens/s lines under the shared table (format_table prints the per-measurement rows)."""
  lines = []
  for name, r in record['measurements'].items():
    if r.get('tokens_per_s'):
      note = ' (extrapolated from one loop step x seq_len)' if r.get('extrapolated') else ''
      lines.append(
        f'{name}: {r["tokens_per_s"]["median"]:.1f} tokens/s at batch {r["batch"]}{note}'
      )
  ratio = record.get('cached_over_recompute')
  if ratio:
    lines.append(
      f'cached / recompute sampling at batch {ratio["batch"]}: {ratio["ratio"]:.1f}x'
      + (' (recompute extrapolated)' if ratio['recompute_extrapolated'] else '')
    )
  return lines
