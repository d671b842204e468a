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
of the transformer matmuls (``analytic_flops``). MFU = achieved FLOP/s / the matmul rate measured
in the same run on the same device (``measure_peak``); on a known GPU/TPU also against the
datasheet. BENCHMARKS.md explains every number and holds results.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

MEASUREMENTS = ('train', 'gen', 'encode', 'decode', 'forward')

# Datasheet dense bf16 matmul peaks (FLOP/s per device), matched in order against
# ``device.device_kind`` (substring, case-insensitive).
DATASHEET_PEAK_BF16 = (
    ('H100 PCIe', 756e12),
    ('H200', 989e12),
    ('H100', 989e12),              # SXM
    ('A100', 312e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),       # v5e reports 'TPU v5 lite'
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),            # v5p reports 'TPU v5'
    ('TPU v6 lite', 918e12),       # v6e (Trillium)
    ('TPU v6e', 918e12),
)


def datasheet_peak(device_kind: str) -> Optional[float]:
  kind = device_kind.lower()
  for name, peak in DATASHEET_PEAK_BF16:
    if name.lower() in kind:
      return peak
  return None


# ----------------------------------------------------------------------------- FLOP counting


def xla_flops(compiled_or_lowered) -> Optional[float]:
  """'flops' of XLA's cost analysis (``Compiled`` or ``Lowered``); None if unavailable.

  ``cost_analysis()`` is a dict in recent jax and a list of per-module dicts in older ones.
  For a compiled SPMD program the count is that of one device's program. A ``lax.cond`` counts
  as its most expensive branch."""
  try:
    ca = compiled_or_lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
    return None
  if ca is None:
    return None
  if isinstance(ca, dict):
    ca = [ca]
  flops = [float(d['flops']) for d in ca if d and 'flops' in d]
  return sum(flops) if flops else None


def vit_layer_flops(batch: int, length: int, width: int, mlp_ratio: float = 4.0,
                    queries: Optional[int] = None) -> int:
  """Forward matmul FLOPs of one transformer block: qkv + proj + MLP (2*B*L*(4d^2 + 2*d*hidden),
  i.e. 2*B*L*12*d^2 at mlp_ratio 4) plus attention scores and values (4*B*L^2*d). Norms,
  biases, softmax and GELU are not counted; causal attention counts the full L^2 (model
  FLOPs: 'xla' computes them all, 'chunked' skips the masked blocks).

  ``queries``: a block that computes only that many output rows (``ViTBlock(out_slice=...)``):
  qkv still runs on all ``length`` tokens, attention has ``queries`` queries, and proj and MLP
  run on ``queries`` rows."""
  q = length if queries is None else queries
  hidden = int(width * mlp_ratio)
  return (2 * batch * length * 3 * width * width + 4 * batch * q * length * width
          + 2 * batch * q * (width * width + 2 * width * hidden))


def vit_stack_flops(depth: int, batch: int, length: int, width: int, mlp_ratio: float = 4.0,
                    kept: Optional[int] = None) -> int:
  """Forward matmul FLOPs of ``depth`` blocks whose last block computes only ``kept`` output
  tokens (``ViTStack(out_slice=...)``)."""
  if depth == 0:
    return 0
  return ((depth - 1) * vit_layer_flops(batch, length, width, mlp_ratio)
          + vit_layer_flops(batch, length, width, mlp_ratio, queries=kept))


def _taps(size: int, k: int, stride: int, pad: int) -> tuple:
  """(output size, number of kernel taps that fall inside the input, summed over the outputs)
  along one axis of a convolution; taps on the zero padding are not counted (as in XLA)."""
  out = (size + 2 * pad - k) // stride + 1
  taps = sum(sum(1 for i in range(k) if 0 <= o * stride - pad + i < size) for o in range(out))
  return out, taps


def _conv_flops(n, h, w, k, cin, cout, stride=1, pad=None):
  """(FLOPs of a k x k convolution on n images of h x w, output h, output w). Stride-1 convs
  on maps under 4 pixels run as an im2col matmul in ``larp_jax.losses.perceptual`` and multiply
  the padding too."""
  pad = (k - 1) // 2 if pad is None else pad
  oh, th = _taps(h, k, stride, pad)
  ow, tw = _taps(w, k, stride, pad)
  if stride == 1 and min(h, w) < 4:
    th, tw = oh * k, ow * k
  return 2 * n * th * tw * cin * cout, oh, ow


def lpips_flops(frames: int, height: int, width: int, net: str = 'vgg') -> int:
  """Forward FLOPs of LPIPS on ``frames`` image pairs: the backbone on 2*frames images (one
  pass on each side of the pair) plus the 1x1 linear heads; convolutions only, multiply-adds on
  the zero padding not counted (XLA's convention)."""
  n = 2 * frames
  total, heads = 0, 0
  h, w = height, width
  if net.lower() in ('vgg', 'vgg16'):
    cin = 3
    cfg = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512]
    taps = (1, 4, 8, 12, 16)
    for i, v in enumerate(cfg):
      if v == 'M':
        h, w = h // 2, w // 2
        continue
      flops, h, w = _conv_flops(n, h, w, 3, cin, v)
      total += flops
      cin = v
      if i in taps:
        heads += 2 * frames * h * w * v
  elif net.lower() in ('alex', 'alexnet'):
    cin = 3
    for i, (cout, k, stride, pad) in enumerate(((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1),
                                                (256, 3, 1, 1), (256, 3, 1, 1))):
      if i in (1, 2):                                    # 3x3 max pool, stride 2, VALID
        h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1
      flops, h, w = _conv_flops(n, h, w, k, cin, cout, stride, pad)
      total += flops
      heads += 2 * frames * h * w * cout
      cin = cout
  else:
    raise ValueError(f'unknown LPIPS net {net!r}')
  return total + heads


def tokenizer_forward_flops(model, batch: int) -> dict:
  """Forward matmul FLOPs of the tokenizer's pieces for ``batch`` clips (``model``: a
  ``LARPTokenizer`` or anything with its attributes)."""
  b, d, n = batch, model.width, model.num_latent_tokens
  p = math.prod(s // q for s, q in zip(model.video_shape, model.patch_size))
  pd = math.prod(model.patch_size) * 3
  k, cd, r = model.codebook_size, model.code_dim, model.mlp_ratio
  out = {
      'patch_embed': 2 * b * p * pd * d,
      'encoder': vit_stack_flops(model.encoder_depth, b, p + n, d, r, kept=n),
      'in_linear': 2 * b * n * d * cd,
      'vq_logits': 2 * b * n * k * cd,
      'out_linear': 2 * b * n * cd * d,
      'decoder': vit_stack_flops(model.decoder_depth, b, n + p, d, r, kept=p),
      'final_linear': 2 * b * p * d * pd,
  }
  if model.use_prior:
    pw, ln = model.prior_width, n - 1
    out['prior'] = (2 * b * ln * cd * pw + model.prior_depth * vit_layer_flops(b, ln, pw, r)
                    + 2 * b * ln * pw * cd)          # one round: input proj, blocks, head
    out['prior_logits'] = 2 * b * ln * k * cd        # one round: cosine against the codebook
  return out


def discriminator_forward_flops(disc, batch: int) -> int:
  p = math.prod(s // q for s, q in zip(disc.video_shape, disc.patch_size))
  pd = math.prod(disc.patch_size) * 3
  return (2 * batch * p * pd * disc.width
          + vit_stack_flops(disc.depth, batch, p + 1, disc.width, disc.mlp_ratio, kept=1)
          + 2 * batch * disc.width)


def analytic_flops(what: str, model, disc, loss_cfg, batch: int) -> dict:
  """Analytic matmul FLOPs of one ``what`` program for ``batch`` clips.

  Returns {'transformer': matmul FLOPs of the tokenizer, prior and discriminator,
  'lpips': the LPIPS estimate (0 without LPIPS), 'total': their sum}. For training steps:
  backward = 2x forward for the trained networks (input and weight gradients); 1x where only
  input gradients flow (the frozen discriminator in the generator's GAN loss, the prior's
  cosine logits against the detached codebook); LPIPS 1.5x (input gradients of the
  reconstructions' backbone pass only); none for the VQ logits (codes are sampled). The
  discriminator update (real and fake forward + backward) is amortised over ``disc_every``."""
  f = tokenizer_forward_flops(model, batch)
  enc = f['patch_embed'] + f['encoder'] + f['in_linear'] + f['vq_logits']
  dec = f['out_linear'] + f['decoder'] + f['final_linear']
  if what == 'encode':
    return {'transformer': enc, 'lpips': 0, 'total': enc}
  if what == 'decode':
    return {'transformer': dec, 'lpips': 0, 'total': dec}
  if what == 'forward':
    return {'transformer': enc + dec, 'lpips': 0, 'total': enc + dec}
  if what not in ('train', 'gen'):
    raise ValueError(f'unknown measurement {what!r}')
  trained = enc - f['vq_logits'] + dec
  total = 3 * trained + f['vq_logits']
  if model.use_prior:
    rounds = int(model.prior_n_rounds)
    total += rounds * (3 * f['prior'] + 2 * f['prior_logits'])
  if loss_cfg.gan_weight > 0:
    d = discriminator_forward_flops(disc, batch)
    total += 2 * d                                       # G loss: forward + input gradients
    total += 6 * d / max(int(loss_cfg.disc_every), 1)    # D update on real + fake, amortised
  lp = 0
  if loss_cfg.lpips_weight > 0:
    t, h, w = model.video_shape
    # Forward on reconstructions and targets; input gradients for the reconstructions only
    # (their own backbone pass), i.e. half the forward (the 1x1 heads, <0.1%, counted at half).
    lp = 3 * lpips_flops(batch * t, h, w, loss_cfg.lpips_net) // 2
  return {'transformer': int(total), 'lpips': int(lp), 'total': int(total + lp)}


# ----------------------------------------------------------------------------- timing


def _log(msg: str) -> None:
  """Progress on stderr (the table and the JSON path go to stdout)."""
  print(f'[bench {time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def _stats(values: Sequence[float]) -> dict:
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values),
          'all': list(values)}


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


def measure_peak(dtype=jnp.float32, size: int = 2048, chain: int = 4, runs: int = 5,
                 warmup: int = 1, device=None) -> dict:
  """Matrix-multiply rate of one device: a jitted chain of ``chain`` dependent
  ``size x size`` matmuls in ``dtype``; FLOPs 2*size^3 per matmul (XLA's count is recorded)."""
  device = device or jax.devices()[0]
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(ka, (size, size), jnp.float32).astype(dtype), device)
  b = jax.device_put((jax.random.normal(kb, (size, size), jnp.float32) / math.sqrt(size)
                      ).astype(dtype), device)

  def f(a, b):
    for _ in range(chain):
      a = a @ b
    return a

  compiled = jax.jit(f).lower(a, b).compile()
  times = time_runs(lambda: compiled(a, b), period=1, runs=runs, warmup=warmup)
  flops = 2.0 * size ** 3 * chain
  best = min(times)
  return {'dtype': jnp.dtype(dtype).name, 'size': size, 'chain': chain,
          'flops_per_call': flops, 'xla_flops_per_call': xla_flops(compiled),
          'seconds': _stats(times), 'flops_per_s': flops / best,
          'flops_per_s_median': flops / statistics.median(times)}


# ----------------------------------------------------------------------------- memory


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
  out['total_bytes'] = (out.get('argument_bytes', 0) + out.get('output_bytes', 0)
                        + out.get('temp_bytes', 0) - out.get('alias_bytes', 0))
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
  if need > 0.9 * avail - 2**30:     # margin for the runtime, Python and other processes
    return (f'does not fit in host memory: the program needs {need / 2**30:.1f} GiB more '
            f'(XLA memory analysis), {avail / 2**30:.1f} GiB available')
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


# ----------------------------------------------------------------------------- the benchmark


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
  init = jax.jit(lambda: nn.unbox(exp.boxed_init(int(exp.config.seed))),
                 out_shardings=shardings)
  with sharding.logical_context(exp.mesh, exp.rules):
    state = init()
  return state, shardings


def _random_video(exp, batch: int, seed: int):
  from larp_jax import sharding
  shape = (batch, *exp.model.video_shape, 3)
  video = jax.random.uniform(jax.random.key(seed), shape, jnp.float32)
  return jax.device_put(video, sharding.batch_sharding(exp.mesh))


def _lower_compile(jitted, *args) -> tuple:
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, {'lower_s': t1 - t0, 'compile_s': t2 - t1, 'total_s': t2 - t0}


def _disc_update_flops(exp, state, video) -> Optional[float]:
  """XLA FLOPs (global, before partitioning) of one discriminator update, to amortise it."""
  from larp_jax.train import steps
  cfg = exp.config

  def f(st, real, key):
    return steps.discriminator_update(st, real, real, key, disc=exp.disc, disc_tx=exp.disc_tx,
                                      loss_cfg=cfg.loss, optim_cfg=cfg.optim,
                                      total_steps=int(cfg.total_steps))
  return xla_flops(jax.jit(f).lower(state, video, jax.random.key(0)))


TWIN_NOTE = ("XLA's cost analysis counts a loop body once (scan_layers, 'chunked' attention) and "
             "custom calls (cuDNN attention, 'cpu_flash') as 0, so these FLOPs are those of the "
             "same program with scan_layers=False and attention_impl='xla' (compiled for cost "
             "analysis only)")


def needs_cost_twin(model) -> bool:
  """True if XLA's FLOP count of ``model``'s programs would miss work (loops, custom calls)."""
  from larp_jax.models import attention
  return (bool(model.scan_layers)
          or attention.resolve_attention_impl(model.attention_impl) != 'xla')


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
  from larp_jax.train import loop
  twin = loop.build(_cost_twin(exp.config)) if needs_cost_twin(exp.model) else exp
  abstract, shardings = twin.abstract_state()
  with sharding.logical_context(twin.mesh, twin.rules):
    flops = None
    if twin is not exp:
      flops = xla_flops(loop.make_train_step(twin, shardings).lower(
          abstract, batch_in, key, lpips).compile())
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
  from larp_jax.train import loop
  overrides = _loss_overrides(config, what)
  cfg = _with_loss(config, overrides)
  exp = loop.build(cfg)
  state, shardings = _fresh_state(exp)
  lpips = loop.load_lpips(exp)
  step = loop.make_train_step(exp, shardings)
  batch_in = {'video': _random_video(exp, batch, seed)}
  key = jax.random.key(seed)
  period = int(cfg.loss.disc_every) if cfg.loss.gan_weight > 0 else 1
  n_dev = exp.mesh.devices.size
  _log(f'{what}: compiling the train step (loss overrides {overrides})')
  with sharding.logical_context(exp.mesh, exp.rules):
    compiled, compile_times = _lower_compile(step, state, batch_in, key, lpips)
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
    holder['state'], metrics = compiled(holder['state'], batch_in, key, lpips)
    return metrics

  _log(f'{what}: compiled in {compile_times["total_s"]:.1f} s; {warmup} warm-up and {runs} '
       f'timed runs of {period} step(s)')
  times, loss, error = None, None, host_memory_error(compiled)
  if error is None:
    times = time_runs(once, period=period, runs=runs, warmup=warmup)
    loss = float(jax.device_get(once()['loss']))
  result = _result(what, exp, cfg, batch, times, compile_times, compiled, xla_step, per_device)
  result.update(loss_overrides=overrides, steps_per_run=period, final_loss=loss,
                xla_disc_update_flops=disc_flops)
  if error:
    result['error'] = error
  del holder
  return result


def bench_model_fns(config, whats: Sequence[str], *, batch: int, runs: int, warmup: int,
                    seed: int) -> dict:
  """Compiles and times encode / decode / forward (deterministic) with freshly initialised
  parameters."""
  from larp_jax import sharding
  from larp_jax.train import loop
  exp = loop.build(config)
  state, _ = _fresh_state(exp)
  params = state.params
  del state
  model = exp.model
  video = _random_video(exp, batch, seed)
  tokens = jax.device_put(
      jax.random.randint(jax.random.key(seed + 1), (batch, model.num_latent_tokens), 0,
                         model.codebook_size, jnp.int32), sharding.batch_sharding(exp.mesh))
  fns = _model_fns(model)
  args = {'encode': video, 'decode': tokens, 'forward': video}
  twin = None
  if needs_cost_twin(model):
    twin = loop.build(_cost_twin(config))
    twin_params = twin.abstract_state()[0].params
  n_dev = exp.mesh.devices.size
  out = {}
  for what in whats:
    fn, arg = fns[what], args[what]
    _log(f'{what}: compiling')
    with sharding.logical_context(exp.mesh, exp.rules):
      compiled, compile_times = _lower_compile(jax.jit(fn), params, arg)
    _log(f'{what}: compiled in {compile_times["total_s"]:.1f} s; timing')
    per_device = xla_flops(compiled)
    xla_total = per_device * n_dev if per_device is not None else None
    if twin is not None:
      with sharding.logical_context(twin.mesh, twin.rules):
        twin_flops = xla_flops(jax.jit(_model_fns(twin.model)[what]).lower(
            twin_params, arg).compile())
      xla_total = twin_flops * n_dev if twin_flops is not None else None
    error = host_memory_error(compiled)
    times = None if error else time_runs(lambda: compiled(params, arg), period=1, runs=runs,
                                         warmup=warmup)
    out[what] = _result(what, exp, config, batch, times, compile_times, compiled, xla_total,
                        per_device)
    if error:
      out[what]['error'] = error
  return out


def _result(what, exp, cfg, batch, times, compile_times, compiled, xla_step, xla_per_device):
  """The JSON record of one measurement; ``times`` None when it could not run."""
  analytic = analytic_flops(what, exp.model, exp.disc, cfg.loss, batch)
  med = statistics.median(times) if times else None
  return {
      'what': what,
      'seconds_per_step': _stats(times) if times else None,
      'clips_per_s': {'median': batch / med, 'min': batch / max(times),
                      'max': batch / min(times)} if times else None,
      'compile': compile_times,
      'flops_per_step': {'xla': xla_step, 'xla_per_device_program': xla_per_device,
                         'analytic_transformer': analytic['transformer'],
                         'analytic_lpips': analytic['lpips'],
                         'analytic_total': analytic['total']},
      'flops_per_clip': {'xla': xla_step / batch if xla_step is not None else None,
                         'analytic_transformer': analytic['transformer'] / batch,
                         'analytic_lpips': analytic['lpips'] / batch,
                         'analytic_total': analytic['total'] / batch},
      'xla_over_analytic': (xla_step / analytic['total']
                            if xla_step and analytic['total'] else None),
      'achieved_flops_per_s': xla_step / med if (xla_step and med) else None,
      'analytic_flops_per_s': analytic['total'] / med if med else None,
      'xla_flops_source': TWIN_NOTE if needs_cost_twin(exp.model) else 'compiled program',
      'attention_impl': exp.model.attention_impl,
      'memory': {'compiled': compiled_memory(compiled), 'device_peak_bytes': device_peak_bytes()},
  }


def _add_mfu(result: dict, peak_per_device: Optional[float], datasheet: Optional[float],
             n_dev: int) -> None:
  ach, model = result.get('achieved_flops_per_s'), result.get('analytic_flops_per_s')
  result['mfu'] = ach / (peak_per_device * n_dev) if ach and peak_per_device else None
  result['mfu_analytic'] = model / (peak_per_device * n_dev) if model and peak_per_device else None
  result['mfu_datasheet'] = ach / (datasheet * n_dev) if ach and datasheet else None


def bench_input(config, batch: int, steps: int) -> dict:
  """Clips/s of the config's input pipeline at ``batch`` (this host's share), measured alone."""
  from larp_jax.data import bench_input as input_lib
  per_host = max(1, batch // jax.process_count())
  shape = tuple(config.model.video_shape)
  try:
    rate = input_lib.clips_per_s(config.data, shape, per_host, steps)
  except Exception as e:  # pylint: disable=broad-except  (missing data must not stop the bench)
    return {'source': config.data.source, 'error': f'{type(e).__name__}: {e}'.splitlines()[0]}
  return {'source': config.data.source, 'batch_per_host': per_host, 'steps': steps,
          'clips_per_s': rate * jax.process_count()}


def config_name(spec: str) -> str:
  """'configs/bench.py:tiny,dtype=bfloat16' -> 'bench-tiny-dtype-bfloat16'."""
  path, _, args = spec.partition(':')
  name = os.path.splitext(os.path.basename(path))[0] or 'config'
  if args:
    name += '-' + args
  return re.sub(r'[^A-Za-z0-9_.]+', '-', name).strip('-')


def run(config, *, what: Sequence[str] = MEASUREMENTS, batch: Optional[int] = None,
        runs: Optional[int] = None, warmup: Optional[int] = None, measure_input: bool = True,
        peak_size: Optional[int] = None, config_spec: str = '') -> dict:
  """Runs the benchmark of ``config``; returns the JSON-able record (see BENCHMARKS.md)."""
  what = list(dict.fromkeys(w.strip() for w in what if w.strip()))
  unknown = [w for w in what if w not in MEASUREMENTS]
  if unknown or not what:
    raise ValueError(f'--what: unknown measurement(s) {unknown}; choose from {MEASUREMENTS}')
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
  config_lib.validate(config, num_devices=len(devices))
  n_dev = len(devices)

  # Peak matmul rate of one device, same run, same device.
  size = int(peak_size or bench_cfg.get('peak_size', 0) or default_peak_size(dev.platform))
  _log(f'{n_dev} x {dev.device_kind}; measuring the peak matmul rate ({size}x{size})')
  peak_dtypes = ['float32'] + (['bfloat16'] if dev.platform != 'cpu' else [])
  peaks = {d: measure_peak(d, size) for d in peak_dtypes}
  # Measured again after each measurement; the best rate seen is the peak (on a shared host
  # a single measurement can catch a busy moment and make MFU exceed 100%).
  rechecks = {d: [] for d in peak_dtypes}
  model_dtype = jnp.dtype(config.model.dtype).name
  datasheet = datasheet_peak(dev.device_kind) if dev.platform != 'cpu' else None

  results = {}
  fn_whats = [w for w in what if w in ('encode', 'decode', 'forward')]
  for w in what:
    try:
      if w in ('train', 'gen'):
        results[w] = bench_step(config, w, batch=batch, runs=runs, warmup=warmup, seed=seed)
      elif w == fn_whats[0]:
        results.update(bench_model_fns(config, fn_whats, batch=batch, runs=runs, warmup=warmup,
                                       seed=seed))
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of device memory)
      if isinstance(e, ValueError):
        raise
      msg = f'{type(e).__name__}: {e}'.splitlines()[0][:500]
      _log(f'{w}: failed: {msg}')
      for x in ([w] if w in ('train', 'gen') else fn_whats):
        results.setdefault(x, {'what': x, 'error': msg})
    if w in ('train', 'gen') or w == fn_whats[-1]:
      for d in peak_dtypes:
        rechecks[d].append(measure_peak(d, size, runs=3, warmup=1)['flops_per_s'])
  best = {d: max([peaks[d]['flops_per_s'], *rechecks[d]]) for d in peak_dtypes}
  peak = best.get(model_dtype, best['float32'])
  for r in results.values():
    if r.get('error'):
      _log(f'{r["what"]}: {r["error"]}')
    _add_mfu(r, peak, datasheet, n_dev)
  results = {w: results[w] for w in what}

  if measure_input:
    _log(f'input pipeline ({config.data.source})')
  record = {
      'config': config_spec,
      'config_name': config_name(config_spec.split(' ')[0]) if config_spec else None,
      'batch': batch, 'dtype': model_dtype, 'param_dtype': jnp.dtype(config.model.param_dtype).name,
      'video_shape': list(config.model.video_shape), 'seed': seed, 'runs': runs,
      'warmup': warmup, 'what': list(what),
      'device': {'kind': dev.device_kind, 'platform': dev.platform, 'count': n_dev,
                 'process_count': jax.process_count(), 'host_cpus': os.cpu_count()},
      'versions': {'jax': jax.__version__, 'jaxlib': _jaxlib_version(), 'flax': flax.__version__,
                   'python': platform.python_version()},
      'git': _git_state(),
      'xla': {'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
              'jax_disable_most_optimizations':
                  bool(jax.config.read('jax_disable_most_optimizations'))},
      'peak': {'measured': peaks, 'rechecks_flops_per_s': rechecks,
               'best_flops_per_s': best,
               'used_for_mfu': {'dtype': model_dtype if model_dtype in best else 'float32',
                                'flops_per_s_per_device': peak},
               'datasheet_bf16_per_device': datasheet},
      'measurements': results,
      'input': bench_input(config, batch, int(bench_cfg.get('input_steps', 10)))
               if measure_input else None,
      'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
  }
  return record


def _git_state() -> Optional[dict]:
  """{'commit', 'dirty'} of the larp_jax checkout, if it is one (best effort)."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                           capture_output=True, text=True, timeout=10, check=True).stdout
  except Exception:  # pylint: disable=broad-except
    return None
  return {'commit': commit, 'dirty': bool(dirty.strip())}


def _jaxlib_version():
  try:
    import jaxlib
    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return None


# ----------------------------------------------------------------------------- output


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
    lines.append(f'peak matmul {name} ({p["size"]}x{p["size"]}, chain {p["chain"]}): '
                 f'{max(seen) / 1e9:.1f} GFLOP/s per device (best of {len(seen)} measurements: '
                 f'{", ".join(f"{x / 1e9:.1f}" for x in seen)})')
  if record['peak']['datasheet_bf16_per_device']:
    lines.append(f'datasheet bf16 peak: {record["peak"]["datasheet_bf16_per_device"] / 1e12:.0f} '
                 'TFLOP/s per device')
  head = (f'{"what":8s} {"s/step med":>10s} {"[min, max]":>17s} {"clips/s":>8s} '
          f'{"GF/clip xla":>11s} {"analytic":>9s} {"+lpips":>7s} {"GFLOP/s":>8s} {"MFU":>6s} '
          f'{"MFU an.":>7s} {"compile s":>9s} {"memory":>7s}')
  lines += [head, '-' * len(head)]
  errors = []
  pct = lambda x: '-' if x is None else f'{100 * x:.1f}%'
  for w, r in record['measurements'].items():
    if r.get('error'):
      errors.append(f'{w}: {r["error"]}')
    if 'flops_per_clip' not in r:          # failed before compiling
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
        f'{pct(r.get("mfu_analytic")):>7s} {r["compile"]["total_s"]:9.1f} {_bytes(mem):>7s}')
  lines += errors
  inp = record['input']
  if inp is not None:
    if 'error' in inp:
      lines.append(f'input pipeline ({inp["source"]}): not measured: {inp["error"]}')
    else:
      lines.append(f'input pipeline ({inp["source"]}, batch {inp["batch_per_host"]} per host): '
                   f'{inp["clips_per_s"]:.1f} clips/s')
  lines.append('GF = GFLOP per clip; "train" is amortised over loss.disc_every steps; MFU: XLA '
               'FLOPs, MFU an.: analytic + LPIPS FLOPs, both over the measured peak; memory: '
               'compiled argument+output+temp-alias per device (G* = device peak_bytes_in_use, '
               'process high-water mark).')
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


# ----------------------------------------------------------------------------- command line


def _flags(argv):
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config file (path[:args]).', flag_values=fv,
                                  lock_config=False, sys_argv=list(argv))
  flags.DEFINE_list('what', list(MEASUREMENTS), f'Measurements, any of {MEASUREMENTS}.',
                    flag_values=fv)
  flags.DEFINE_integer('batch', None, 'Global batch (default: config.batch_size).',
                       flag_values=fv)
  flags.DEFINE_integer('runs', None, 'Timed runs (default: config.bench.runs or 5).',
                       flag_values=fv)
  flags.DEFINE_integer('warmup', None, 'Untimed runs after compiling (default: '
                       'config.bench.warmup or 2).', flag_values=fv)
  flags.DEFINE_bool('input', True, "Also measure the config's input pipeline (clips/s).",
                    flag_values=fv)
  flags.DEFINE_integer('peak_size', None, 'Matmul size of the peak measurement (default: '
                       'config.bench.peak_size, else 2048 on CPU and 8192 on GPU/TPU).',
                       flag_values=fv)
  flags.DEFINE_string('out', None, 'JSON output path (default: '
                      '<out_dir>/<config-name>-<what>.json).', flag_values=fv)
  flags.DEFINE_string('out_dir', 'bench_results', 'Directory of the default --out.',
                      flag_values=fv)
  rest = fv(list(argv))
  if len(rest) > 1:
    raise ValueError(f'unexpected arguments: {rest[1:]}')
  if fv.config is None:
    raise ValueError('--config is required, e.g. --config=configs/bench.py:tiny')
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
  record = run(fv.config, what=fv.what, batch=fv.batch, runs=fv.runs, warmup=fv.warmup,
               measure_input=fv.input, peak_size=fv.peak_size, config_spec=spec)
  path = write_record(record, fv.out, fv.out_dir)
  print(format_table(record))
  print(f'wrote {path}')
  return record


def _run():
  from larp_jax import host_malloc
  host_malloc.reexec_if_needed()       # CPU: keep XLA's step buffers mapped (host_malloc.py)
  try:
    main()
    code = 0
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    code = 2
  # No interpreter teardown (tf.data iterators can deadlock on exit; see larp_jax/main.py).
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == '__main__':
  _run()
