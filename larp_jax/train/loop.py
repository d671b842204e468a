"""The training loop: the only loop in larp_jax (STYLE section 1).

``run(config, workdir)`` builds the mesh, the models and the state (born sharded), restores the
latest checkpoint in ``workdir`` if there is one, and trains to ``config.total_steps``:

  * the pure, jitted step from ``larp_jax.train.steps`` with in/out shardings and a donated state;
  * the host reads metrics only on log steps (no sync otherwise) and stops on NaN/Inf;
  * Orbax checkpoints every ``checkpoint_every`` steps, at the end, and on SIGTERM (preemption);
  * clu writers (TensorBoard + log), ``metrics.jsonl``, progress with ETA, reconstructions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from larp_jax import checkpoint, config_lib, sharding, visualize
from larp_jax import data as data_lib
from larp_jax.losses import perceptual
from larp_jax.models.discriminator import TransformerDiscriminator
from larp_jax.models.tokenizer import LARPTokenizer
from larp_jax.train import optim, state as state_lib, steps


class NonFiniteLossError(RuntimeError):
  pass


def model_kwargs(config) -> dict:
  """config.model -> LARPTokenizer kwargs (dtype names -> jnp dtypes, lists -> tuples)."""
  kw = config_lib.as_kwargs(config.model)
  for k in ('dtype', 'param_dtype'):
    if isinstance(kw.get(k), str):
      kw[k] = jnp.dtype(kw[k])
  return kw


@dataclasses.dataclass
class Experiment:
  """Everything built from a config, before any state exists."""
  config: Any
  model: LARPTokenizer
  disc: TransformerDiscriminator
  gen_tx: Any
  disc_tx: Any
  mesh: Any
  rules: tuple

  def boxed_init(self, seed: int):
    """A fresh TokenizerTrainState whose parameters are nn.Partitioned boxes."""
    k_params, k_vq, k_drop, k_disc = jax.random.split(jax.random.key(seed), 4)
    video = jnp.zeros((1, *self.model.video_shape, 3), jnp.float32)
    params = self.model.init({'params': k_params, 'vq': k_vq, 'dropout': k_drop}, video,
                             train=True)['params']
    disc_params = self.disc.init(k_disc, video)['params']
    return state_lib.create(params, disc_params, self.gen_tx, self.disc_tx,
                            use_ema=self.config.optim.ema_decay > 0)

  def abstract_state(self):
    """(abstract unboxed state, its NamedShardings), without allocating anything."""
    return sharding.state_shardings(functools.partial(self.boxed_init, 0), self.mesh, self.rules)


def build(config, devices=None) -> Experiment:
  """Validates ``config`` and builds models, optimisers and the mesh (no compilation)."""
  devices = jax.devices() if devices is None else devices
  config_lib.validate(config, num_devices=len(devices))
  model = LARPTokenizer(**model_kwargs(config))
  disc_kw = config_lib.as_kwargs(config.disc)
  disc = TransformerDiscriminator(video_shape=model.video_shape, dtype=model.dtype,
                                  param_dtype=model.param_dtype,
                                  attention_impl=model.attention_impl, **disc_kw)
  total = int(config.total_steps)
  return Experiment(config=config, model=model, disc=disc,
                    gen_tx=optim.generator_optimizer(config.optim, total),
                    disc_tx=optim.discriminator_optimizer(config.optim, total),
                    mesh=sharding.make_mesh(config.mesh, devices), rules=sharding.rules(config))


def make_train_step(exp: Experiment, state_shardings):
  """The jitted, sharded, state-donating train step: (state, batch, key, lpips) -> (state, m)."""
  cfg = exp.config
  step_fn = functools.partial(
      steps.tokenizer_train_step, model=exp.model, disc=exp.disc, gen_tx=exp.gen_tx,
      disc_tx=exp.disc_tx, loss_cfg=cfg.loss, optim_cfg=cfg.optim,
      total_steps=int(cfg.total_steps))
  rep = sharding.replicated(exp.mesh)
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, {'video': sharding.batch_sharding(exp.mesh)},
                               rep, rep),
                 out_shardings=(state_shardings, rep), donate_argnums=0)


def init_or_restore(exp: Experiment, mngr):
  """(start_step, sharded state): the latest checkpoint in the workdir, else a fresh init."""
  abstract, shardings = exp.abstract_state()
  step, state = checkpoint.restore_latest(mngr, abstract, shardings)
  if state is None:
    init = jax.jit(lambda: nn.unbox(exp.boxed_init(int(exp.config.seed))),
                   out_shardings=shardings)
    with sharding.logical_context(exp.mesh, exp.rules):
      state = init()
    step = 0
  return int(step), state, shardings


def load_lpips(exp: Experiment):
  if exp.config.loss.lpips_weight <= 0:
    return {}
  params = perceptual.load_lpips_params(exp.config.loss.lpips_net)
  return jax.device_put(params, sharding.replicated(exp.mesh))


def save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class _Preemption:
  """SIGTERM/SIGINT flag: the loop saves a checkpoint and exits cleanly at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning('Received signal %d: checkpointing and stopping after this step.', signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run(config, workdir: str, *, evaluate_fn=None, stop_at: Optional[int] = None) -> dict:
  """Trains the tokenizer described by ``config`` in ``workdir``; returns the last metrics.

  ``evaluate_fn(exp, state, workdir, step)``, if given, runs every ``config.eval_every`` steps
  and at the end (the evaluation module provides it). ``stop_at`` ends the run after that step
  with a checkpoint, as a preemption would (for notebooks and resume tests); the schedule is
  still that of ``config.total_steps``.
  """
  exp = build(config)
  workdir = os.path.abspath(workdir)
  save_config(config, workdir)
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  mngr = checkpoint.manager(workdir, keep=int(config.keep_checkpoints))
  start_step, state, state_shardings = init_or_restore(exp, mngr)
  total = int(config.total_steps)
  if start_step == 0 and is_main:
    parameter_overview.log_parameter_overview(state.params, msg='tokenizer (with prior)')
    parameter_overview.log_parameter_overview(state.disc_params, msg='discriminator')
  logging.info('Mesh %s on %d devices; starting at step %d of %d.', dict(exp.mesh.shape),
               jax.device_count(), start_step, total)
  if start_step >= total:
    logging.info('Nothing to do: checkpoint step %d >= total_steps %d.', start_step, total)
    mngr.close()
    return {}

  per_host = config.batch_size // jax.process_count()
  train_iter = data_lib.get_dataset(config.data, 'train', video_shape=exp.model.video_shape,
                                    batch_size=per_host, seed=int(config.seed),
                                    start_step=start_step)
  lpips_params = load_lpips(exp)
  train_step = make_train_step(exp, state_shardings)
  key = jax.random.key(int(config.seed))
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=int(config.log_every), every_secs=None)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  last_metrics, t_start, step = {}, time.time(), start_step

  def checked(metrics, step):
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k, v in host.items() if not math.isfinite(v)]
    if bad:
      raise NonFiniteLossError(
          f'non-finite {", ".join(bad)} at step {step}; stopping. The last good checkpoint '
          f'(step {mngr.latest_step()}) is kept in {mngr.directory}. Lower the learning rate '
          f'or use float32 (config.model.dtype) and restart.')
    return host

  with _Preemption() as preemption, sharding.logical_context(exp.mesh, exp.rules):
    try:
      for step in range(start_step + 1, total + 1):
        batch = data_lib.make_global_batch({'video': next(train_iter)['video']}, exp.mesh,
                                           sharding.batch_sharding(exp.mesh))
        state, metrics = train_step(state, batch, key, lpips_params)
        report(step)
        is_last = step == total
        # Read the signal flag once per step: a SIGTERM that lands after this line (the handler
        # runs whenever the main thread waits, e.g. on the metrics below) stops the *next*
        # step, so the run never exits between deciding to checkpoint and saving.
        stop_now = preemption.requested or (stop_at is not None and step >= stop_at)
        log_now = step % int(config.log_every) == 0 or is_last or step == start_step + 1
        ckpt_now = step % int(config.checkpoint_every) == 0 or is_last or stop_now
        if log_now or ckpt_now:
          host = checked(metrics, step)   # also guards every checkpoint against NaN state
          last_metrics = host
        if log_now:
          host = dict(host, skipped_files=float(data_lib.num_skipped(train_iter)))
          writer.write_scalars(step, host)
          if is_main:
            with open(metrics_path, 'a') as f:
              f.write(json.dumps({'step': step, **host}) + '\n')
            done = step - start_step
            rate = done / max(time.time() - t_start, 1e-9)
            logging.info('step %d/%d | loss %.4f | l1 %.4f | prior %.3f | %.2f steps/s | ETA %s',
                         step, total, host['loss'], host['l1_loss'], host.get('prior_loss', 0.0),
                         rate, _fmt_eta((total - step) / max(rate, 1e-9)))
        if ckpt_now:
          checkpoint.save(mngr, step, state, force=True)
        if evaluate_fn is not None and config.eval_every and (
            step % int(config.eval_every) == 0 or is_last):
          eval_metrics = evaluate_fn(exp, state, workdir, step)
          if eval_metrics:
            writer.write_scalars(step, {f'eval/{k}': v for k, v in eval_metrics.items()
                                        if isinstance(v, (int, float))})
        if stop_now:
          logging.warning('Stopping at step %d: checkpoint saved, exiting.', step)
          break
    finally:
      mngr.wait_until_finished()
      writer.flush()
  mngr.close()
  return last_metrics
