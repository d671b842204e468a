r"""Model benchmark: clips/s, FLOPs, MFU, compile time and memory of the tokenizer's programs.

  python -m larp_jax.bench --config=configs/bench.py:tiny
  python -m larp_jax.bench --config=configs/bench.py:larp_l --what=gen,forward --runs=3
  python -m larp_jax.bench --config=configs/ucf101.py:size=B --batch=8 --what=train \
      --config.model.dtype=bfloat16 --out=/tmp/b.json

Measurements (``--what``, comma separated; default all):
  train    the real training step (``larp_jax.train.loop.make_train_step``: sharded, state
           donated), timed over ``loss.disc_every`` consecutive steps and divided, so the
           discriminator update is amortised exactly as in training;
  gen      the same step with ``gan_weight=0`` (no discriminator) plus
           ``config.bench.gen_overrides`` (the bench presets also drop LPIPS);
  encode   video -> tokens (deterministic); decode: tokens -> video; forward: both, one program.

Each is compiled (timed separately), run ``warmup`` times, then timed ``runs`` times on random
input of the config's shape with a fixed seed; the median, min and max are reported. FLOPs come
from XLA's cost analysis of the compiled program and are cross-checked against an analytic count
of the transformer matmuls (``flops.analytic_flops``). MFU = achieved FLOP/s / the matmul rate
measured in the same run on the same device (``timing.measure_peak``); on a known GPU/TPU also
against the datasheet. BENCHMARKS.md explains every number and holds results.
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from typing import Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from larp_jax.bench.flops import needs_cost_twin, xla_flops
from larp_jax.bench.memory import host_memory_error
from larp_jax.bench.record import (
  add_mfu,
  config_name,
  format_table,
  git_state,
  jaxlib_version,
  measurement_record,
  write_record,
)
from larp_jax.bench.timing import (
  datasheet_peak,
  default_peak_size,
  log,
  lower_compile,
  measure_peak,
  time_runs,
)

MEASUREMENTS = ('train', 'gen', 'encode', 'decode', 'forward')


def _loss_overrides(config, what: str) -> dict:
  bench = config.get('bench', None)
  overrides = {'gan_weight': 0.0} if what == 'gen' else {}
  if bench is not None and f'{what}_overrides' in bench:
    overrides.update(dict(bench[f'{what}_overrides']))
  return overrides


def _with_loss(config, overrides: dict):
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    for k, v in overrides.items():
      if k not in cfg.loss:
        raise ValueError(f'bench loss override {k!r} is not a field of config.loss')
      cfg.loss[k] = type(cfg.loss[k])(v) if cfg.loss[k] is not None else v
  return cfg


def _fresh_state(exp):
  from larp_jax import sharding

  _, shardings = exp.abstract_state()
  init = jax.jit(lambda: nn.unbox(exp.boxed_init(int(exp.config.seed))), out_shardings=shardings)
  with sharding.logical_context(exp.mesh, exp.rules):
    state = init()
  return state, shardings


def _random_video(exp, batch: int, seed: int):
  from larp_jax import sharding

  shape = (batch, *exp.model.video_shape, 3)
  video = jax.random.uniform(jax.random.key(seed), shape, jnp.float32)
  return jax.device_put(video, sharding.batch_sharding(exp.mesh))


def _disc_update_flops(exp, state, video) -> Optional[float]:
  """XLA FLOPs (global, before partitioning) of one discriminator update, to amortise it."""
  from larp_jax.train import steps

  cfg = exp.config

  def f(st, real, key):
    return steps.discriminator_update(
      st,
      real,
      real,
      key,
      disc=exp.disc,
      disc_tx=exp.disc_tx,
      loss_cfg=cfg.loss,
      optim_cfg=cfg.optim,
      total_steps=int(cfg.total_steps),
    )

  return xla_flops(jax.jit(f).lower(state, video, jax.random.key(0)))


def _cost_twin(config):
  twin = copy.deepcopy(config)
  with twin.unlocked():
    twin.model.scan_layers = False
    twin.model.attention_impl = 'xla'
  return twin


def _step_flops(exp, batch_in, key, lpips, period: int) -> tuple:
  """(global XLA FLOPs of one train step of ``exp``'s cost twin, compiled but never run, or
  None if ``exp`` needs no twin; XLA FLOPs of one discriminator update, or None if
  ``period`` is 1).

  XLA counts the ``lax.cond`` around the discriminator update as its larger branch, i.e. as if
  the update ran every step; the caller subtracts ``(1 - 1/period)`` updates. The update's
  count comes from the lowered (unoptimised) program, which is accurate for it (plain matmuls);
  a lowered step would not be: ``jnp.cumsum`` (code sampling) is a quadratic reduce-window
  before XLA's optimisations."""
  from larp_jax import sharding
  from larp_jax.tasks import tokenizer as tokenizer_task
  from larp_jax.train import loop

  twin = tokenizer_task.build(_cost_twin(exp.config)) if needs_cost_twin(exp.model) else exp
  abstract, shardings = twin.abstract_state()
  with sharding.logical_context(twin.mesh, twin.rules):
    flops = None
    if twin is not exp:
      flops = xla_flops(
        loop.make_train_step(twin, shardings).lower(abstract, batch_in, key, lpips).compile()
      )
      flops = flops * twin.mesh.devices.size if flops is not None else None
    disc = _disc_update_flops(twin, abstract, batch_in['video']) if period > 1 else None
  return flops, disc


def _model_fns(model):
  from larp_jax.models.tokenizer import LARPTokenizer

  encode = lambda p, v: model.apply({'params': p}, v, method=LARPTokenizer.encode)
  decode = lambda p, t: model.apply({'params': p}, t, method=LARPTokenizer.decode)
  return {'encode': encode, 'decode': decode, 'forward': lambda p, v: decode(p, encode(p, v))}


def bench_step(config, what: str, *, batch: int, runs: int, warmup: int, seed: int) -> dict:
  """Compiles and times the real train step ('train' or 'gen')."""
  from larp_jax import sharding
  from larp_jax.tasks import tokenizer as tokenizer_task
  from larp_jax.train import loop

  overrides = _loss_overrides(config, what)
  cfg = _with_loss(config, overrides)
  exp = tokenizer_task.build(cfg)
  state, shardings = _fresh_state(exp)
  lpips = tokenizer_task.load_lpips(exp)
  step = loop.make_train_step(exp, shardings)
  batch_in = {'video': _random_video(exp, batch, seed)}
  key = jax.random.key(seed)
  period = int(cfg.loss.disc_every) if cfg.loss.gan_weight > 0 else 1
  n_dev = exp.mesh.devices.size
  log(f'{what}: compiling the train step (loss overrides {overrides})')
  with sharding.logical_context(exp.mesh, exp.rules):
    compiled, compile_times = lower_compile(step, state, batch_in, key, lpips)
  per_device = xla_flops(compiled)
  xla_step = per_device * n_dev if per_device is not None else None
  twin_flops, disc_flops = _step_flops(exp, batch_in, key, lpips, period)
  if twin_flops is not None:
    xla_step = twin_flops
  if xla_step is not None and disc_flops is not None:
    xla_step -= disc_flops * (1.0 - 1.0 / period)
  holder = {'state': state}
  del state

  def once():
    new_state, metrics = compiled(holder['state'], batch_in, key, lpips)
    holder['state'] = new_state
    return metrics

  log(
    f'{what}: compiled in {compile_times["total_s"]:.1f} s; {warmup} warm-up and {runs} '
    f'timed runs of {period} step(s)'
  )
  times, loss, error = None, None, host_memory_error(compiled)
  if error is None:
    times = time_runs(once, period=period, runs=runs, warmup=warmup)
    loss = float(jax.device_get(once()['loss']))
  result = measurement_record(
    what, exp, cfg, batch, times, compile_times, compiled, xla_step, per_device
  )
  result.update(
    loss_overrides=overrides,
    steps_per_run=period,
    final_loss=loss,
    xla_disc_update_flops=disc_flops,
  )
  if error:
    result['error'] = error
  holder.clear()  # frees the benchmarked state before the next measurement
  return result


def bench_model_fns(
  config, whats: Sequence[str], *, batch: int, runs: int, warmup: int, seed: int
) -> dict:
  """Compiles and times encode / decode / forward (deterministic) with freshly initialised
  parameters."""
  from larp_jax import sharding
  from larp_jax.tasks import tokenizer as tokenizer_task

  exp = tokenizer_task.build(config)
  state, _ = _fresh_state(exp)
  params = state.params
  del state
  model = exp.model
  video = _random_video(exp, batch, seed)
  tokens = jax.device_put(
    jax.random.randint(
      jax.random.key(seed + 1), (batch, model.num_latent_tokens), 0, model.codebook_size, jnp.int32
    ),
    sharding.batch_sharding(exp.mesh),
  )
  fns = _model_fns(model)
  args = {'encode': video, 'decode': tokens, 'forward': video}
  twin = None
  if needs_cost_twin(model):
    twin = tokenizer_task.build(_cost_twin(config))
    twin_params = twin.abstract_state()[0].params
  n_dev = exp.mesh.devices.size
  out = {}
  for what in whats:
    fn, arg = fns[what], args[what]
    log(f'{what}: compiling')
    with sharding.logical_context(exp.mesh, exp.rules):
      compiled, compile_times = lower_compile(jax.jit(fn), params, arg)
    log(f'{what}: compiled in {compile_times["total_s"]:.1f} s; timing')
    per_device = xla_flops(compiled)
    xla_total = per_device * n_dev if per_device is not None else None
    if twin is not None:
      with sharding.logical_context(twin.mesh, twin.rules):
        twin_flops = xla_flops(
          jax.jit(_model_fns(twin.model)[what]).lower(twin_params, arg).compile()
        )
      xla_total = twin_flops * n_dev if twin_flops is not None else None
    error = host_memory_error(compiled)
    times = (
      None
      if error
      else time_runs(lambda: compiled(params, arg), period=1, runs=runs, warmup=warmup)
    )
    out[what] = measurement_record(
      what, exp, config, batch, times, compile_times, compiled, xla_total, per_device
    )
    if error:
      out[what]['error'] = error
  return out


def bench_input(config, batch: int, steps: int) -> dict:
  """Clips/s of the config's input pipeline at ``batch`` (this host's share), measured alone."""
  from larp_jax.data import bench_input as input_lib

  per_host = max(1, batch // jax.process_count())
  shape = tuple(config.model.video_shape)
  try:
    rate = input_lib.clips_per_s(config.data, shape, per_host, steps)
  except Exception as e:  # pylint: disable=broad-except  (missing data must not stop the bench)
    return {'source': config.data.source, 'error': f'{type(e).__name__}: {e}'.splitlines()[0]}
  return {
    'source': config.data.source,
    'batch_per_host': per_host,
    'steps': steps,
    'clips_per_s': rate * jax.process_count(),
  }


def run(
  config,
  *,
  what: Optional[Sequence[str]] = None,
  batch: Optional[int] = None,
  runs: Optional[int] = None,
  warmup: Optional[int] = None,
  measure_input: bool = True,
  peak_size: Optional[int] = None,
  config_spec: str = '',
) -> dict:
  """Runs the benchmark of ``config``; returns the JSON-able record (see BENCHMARKS.md).
  A generator config (``task = 'generator'``) has the measurements of ``bench.generator``."""
  from larp_jax.bench import generator as generator_bench

  is_generator = config.get('task', 'tokenizer') == 'generator'
  choices = generator_bench.MEASUREMENTS if is_generator else MEASUREMENTS
  what = list(dict.fromkeys(w.strip() for w in (what or choices) if w.strip()))
  unknown = [w for w in what if w not in choices]
  if unknown or not what:
    raise ValueError(f'--what: unknown measurement(s) {unknown}; choose from {choices}')
  bench_cfg = config.get('bench', None) or {}
  runs = int(runs or bench_cfg.get('runs', 5))
  warmup = int(bench_cfg.get('warmup', 2) if warmup is None else warmup)
  if runs < 1 or warmup < 0:
    raise ValueError(f'need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}')
  config = copy.deepcopy(config)
  with config.unlocked():
    if batch:
      config.batch_size = int(batch)
  batch = int(config.batch_size)
  seed = int(config.seed)
  devices = jax.devices()
  dev = devices[0]
  from larp_jax import config_lib

  if not is_generator:
    config_lib.validate(config, num_devices=len(devices))
  n_dev = len(devices)

  # Peak matmul rate of one device, same run, same device.
  size = int(peak_size or bench_cfg.get('peak_size', 0) or default_peak_size(dev.platform))
  log(f'{n_dev} x {dev.device_kind}; measuring the peak matmul rate ({size}x{size})')
  peak_dtypes = ['float32'] + (['bfloat16'] if dev.platform != 'cpu' else [])
  peaks = {d: measure_peak(d, size) for d in peak_dtypes}
  # Measured again after each measurement; the best rate seen is the peak (on a shared host
  # a single measurement can catch a busy moment and make MFU exceed 100%).
  rechecks = {d: [] for d in peak_dtypes}
  model_dtype = jnp.dtype(config.model.dtype).name
  datasheet = datasheet_peak(dev.device_kind) if dev.platform != 'cpu' else None

  results = {}
  fn_whats = [w for w in what if w in ('encode', 'decode', 'forward')]
  if is_generator:
    results = generator_bench.run_measurements(config, what, batch=batch, runs=runs, warmup=warmup)
    for d in peak_dtypes:
      rechecks[d].append(measure_peak(d, size, runs=3, warmup=1)['flops_per_s'])
    what = list(results)
  for w in [] if is_generator else what:
    try:
      if w in ('train', 'gen'):
        results[w] = bench_step(config, w, batch=batch, runs=runs, warmup=warmup, seed=seed)
      elif w == fn_whats[0]:
        results.update(
          bench_model_fns(config, fn_whats, batch=batch, runs=runs, warmup=warmup, seed=seed)
        )
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of device memory)
      if isinstance(e, ValueError):
        raise
      msg = f'{type(e).__name__}: {e}'.splitlines()[0][:500]
      log(f'{w}: failed: {msg}')
      for x in [w] if w in ('train', 'gen') else fn_whats:
        results.setdefault(x, {'what': x, 'error': msg})
    if w in ('train', 'gen') or w == fn_whats[-1]:
      for d in peak_dtypes:
        rechecks[d].append(measure_peak(d, size, runs=3, warmup=1)['flops_per_s'])
  best = {d: max([peaks[d]['flops_per_s'], *rechecks[d]]) for d in peak_dtypes}
  peak = best.get(model_dtype, best['float32'])
  for r in results.values():
    if r.get('error'):
      log(f'{r["what"]}: {r["error"]}')
    add_mfu(r, peak, datasheet, n_dev)
  results = {w: results[w] for w in what}

  if measure_input and not is_generator:
    log(f'input pipeline ({config.data.source})')
  record = {
    'config': config_spec,
    'config_name': config_name(config_spec.split(' ')[0]) if config_spec else None,
    'batch': batch,
    'dtype': model_dtype,
    'param_dtype': jnp.dtype(config.model.param_dtype).name,
    'video_shape': None if is_generator else list(config.model.video_shape),
    'seed': seed,
    'runs': runs,
    'warmup': warmup,
    'what': list(what),
    'device': {
      'kind': dev.device_kind,
      'platform': dev.platform,
      'count': n_dev,
      'process_count': jax.process_count(),
      'host_cpus': os.cpu_count(),
    },
    'versions': {
      'jax': jax.__version__,
      'jaxlib': jaxlib_version(),
      'flax': flax.__version__,
      'python': platform.python_version(),
    },
    'git': git_state(),
    'xla': {
      'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
      'jax_disable_most_optimizations': bool(jax.config.read('jax_disable_most_optimizations')),
    },
    'peak': {
      'measured': peaks,
      'rechecks_flops_per_s': rechecks,
      'best_flops_per_s': best,
      'used_for_mfu': {
        'dtype': model_dtype if model_dtype in best else 'float32',
        'flops_per_s_per_device': peak,
      },
      'datasheet_bf16_per_device': datasheet,
    },
    'measurements': results,
    'input': bench_input(config, batch, int(bench_cfg.get('input_steps', 10)))
    if measure_input and not is_generator
    else None,
    'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
  }
  if is_generator:
    record['task'] = 'generator'
    record['model'] = dict(config.model)
    record['cached_over_recompute'] = generator_bench.cached_over_recompute(results)
  return record


_USAGE = """python -m larp_jax.bench --config=configs/bench.py:PRESET [flags]

Times the tokenizer's training step and its encode/decode/forward, counts FLOPs (XLA and
analytic), reports MFU against a matmul peak measured in the same run, and writes a JSON record
(BENCHMARKS.md explains every column)."""


def _flags(argv):
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config',
    None,
    'Config file (path[:args]).',
    flag_values=fv,
    lock_config=False,
    sys_argv=list(argv),
  )
  flags.DEFINE_list(
    'what',
    None,
    f'Measurements, any of {MEASUREMENTS} (a generator config: train, sample, recompute); '
    'default all.',
    flag_values=fv,
  )
  flags.DEFINE_integer('batch', None, 'Global batch (default: config.batch_size).', flag_values=fv)
  flags.DEFINE_integer(
    'runs', None, 'Timed runs (default: config.bench.runs or 5).', flag_values=fv
  )
  flags.DEFINE_integer(
    'warmup',
    None,
    'Untimed runs after compiling (default: config.bench.warmup or 2).',
    flag_values=fv,
  )
  flags.DEFINE_bool(
    'input', True, "Also measure the config's input pipeline (clips/s).", flag_values=fv
  )
  flags.DEFINE_integer(
    'peak_size',
    None,
    'Matmul size of the peak measurement (default: '
    'config.bench.peak_size, else 2048 on CPU and 8192 on GPU/TPU).',
    flag_values=fv,
  )
  flags.DEFINE_string(
    'out', None, 'JSON output path (default: <out_dir>/<config-name>-<what>.json).', flag_values=fv
  )
  flags.DEFINE_string('out_dir', 'bench_results', 'Directory of the default --out.', flag_values=fv)
  from larp_jax import cli_env, errors

  cli_env.parse_flags(fv, list(argv)[1:], _USAGE)
  if fv.config is None:
    raise errors.UserError('--config is required, e.g. --config=configs/bench.py:tiny')
  return fv


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Parses ``argv`` (``sys.argv`` by default; argv[0] is the program name), runs the bench,
  prints the table, writes the JSON and returns the record."""
  from ml_collections import config_flags

  argv = list(sys.argv if argv is None else argv)
  fv = _flags(argv)
  spec = config_flags.get_config_filename(fv['config'])
  overrides = config_flags.get_override_values(fv['config'])
  if overrides:
    spec += ' ' + ' '.join(f'--config.{k}={v}' for k, v in sorted(overrides.items()))
  record = run(
    fv.config,
    what=fv.what,
    batch=fv.batch,
    runs=fv.runs,
    warmup=fv.warmup,
    measure_input=fv.input,
    peak_size=fv.peak_size,
    config_spec=spec,
  )
  path = write_record(record, fv.out, fv.out_dir)
  print(format_table(record))
  if record.get('task') == 'generator':
    from larp_jax.bench import generator as generator_bench

    print('\n'.join(generator_bench.table_lines(record)))
  print(f'wrote {path}')
  return record
