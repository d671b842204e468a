"""The training loop: the only loop in larp_jax (STYLE section 1).

``run(config, workdir)`` builds the mesh, the models and the state (born sharded), restores the
latest checkpoint in ``workdir`` if there is one, and trains to ``config.total_steps``:

  * the pure, jitted step from ``larp_jax.train.steps`` with in/out shardings and a donated state;
  * the host reads metrics only on log steps (no sync otherwise) and stops on NaN/Inf;
  * Orbax checkpoints every ``checkpoint_every`` steps, at the end, and on SIGTERM (preemption);
  * clu writers (TensorBoard + log), ``metrics.jsonl``, progress with ETA, reconstructions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from larp_jax import checkpoint, config_lib, sharding, visualize
from larp_jax import data as data_lib
from larp_jax import workdir as workdir_lib
from larp_jax.data import config as data_config
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
    variables = self.model.init({'params': k_params, 'vq': k_vq, 'dropout': k_drop}, video,
                                train=True)
    disc_params = self.disc.init(k_disc, video)['params']
    return state_lib.create(variables['params'], disc_params, self.gen_tx, self.disc_tx,
                            use_ema=self.config.optim.ema_decay > 0,
                            batch_stats=variables.get('batch_stats'))

  def abstract_state(self):
    """(abstract unboxed state, its NamedShardings), without allocating anything."""
    return sharding.state_shardings(functools.partial(self.boxed_init, 0), self.mesh, self.rules)


def build(config, devices=None) -> Experiment:
  """Validates ``config`` and builds models, optimisers and the mesh (no compilation)."""
  devices = jax.devices() if devices is None else devices
  config_lib.validate(config, num_devices=len(devices))
  model = LARPTokenizer(**model_kwargs(config))
  data_config.validate(config.data, 'train', model.video_shape)
  if config.get('eval_every'):
    data_config.validate(config.data, 'eval', model.video_shape)
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


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class _Preemption:
  """SIGTERM/SIGINT flag: the loop saves a checkpoint and exits cleanly at the next step.

  A second signal (a second Ctrl-C) ends the process at once, without that checkpoint: the last
  periodic checkpoint stays the newest good one (an unfinished save is never taken for one).
  """

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
    if self.requested:
      logging.warning('Second signal %d: exiting now, without the stop checkpoint.', signum)
      sys.stderr.flush()
      os._exit(128 + signum)
    logging.warning('Received signal %d: checkpointing and stopping after this step '
                    '(send it again to exit at once).', signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _Eta:
  """Steps/s and ETA from the steps after the first one (which includes compilation)."""

  def __init__(self, first_step: int):
    self.first_step = first_step
    self.t_first = None

  def mark_first_done(self):
    self.t_first = time.time()

  def line(self, step: int, total: int) -> str:
    done = step - self.first_step
    if self.t_first is None or done <= 0:
      return 'compiling'
    rate = done / max(time.time() - self.t_first, 1e-9)
    return f'{rate:.2f} steps/s | ETA {_fmt_eta((total - step) / max(rate, 1e-9))}'


def prepare_workdir(config, workdir: str):
  """Checks and claims the run directory before anything in it is written.

  Returns (lock or None, allowed config differences). Process 0 alone writes and locks.
  """
  if jax.process_index() != 0:
    return None, {}
  workdir_lib.writable_or_raise(workdir)
  lock = workdir_lib.Lock(workdir).acquire()
  try:
    diff = workdir_lib.check_config(workdir, config)
  except BaseException:
    lock.release()
    raise
  return lock, diff


def run(config, workdir: str, *, evaluate_fn=None, stop_at: Optional[int] = None) -> dict:
  """Trains the tokenizer described by ``config`` in ``workdir``; returns the last metrics.

  ``evaluate_fn(exp, state, workdir, step)``, if given, runs every ``config.eval_every`` steps
  and at the end (the evaluation module provides it). ``stop_at`` ends the run after that step
  with a checkpoint, as a preemption would (for notebooks and resume tests); the schedule is
  still that of ``config.total_steps``.

  Everything that can be checked before training (the config, the data config, the run
  directory: writable, not in use, holding no other model) is checked before anything is written
  to ``workdir`` (``larp_jax/workdir.py``). The input iterator, the checkpoint manager and the
  writers are closed, in that order, on every way out.
  """
  exp = build(config)
  workdir = os.path.abspath(workdir)
  lock, diff = prepare_workdir(config, workdir)
  try:
    return _train(exp, workdir, diff, evaluate_fn=evaluate_fn, stop_at=stop_at)
  finally:
    if lock is not None:
      lock.release()


def _train(exp, workdir, diff, *, evaluate_fn, stop_at) -> dict:
  config = exp.config
  is_main = jax.process_index() == 0
  total = int(config.total_steps)
  # Closed in reverse order on every way out: the input threads first (nothing waits on them
  # afterwards), then the pending checkpoint writes, the manager, the writers; the signal
  # handler stays until the end, so a Ctrl-C during the last save is still handled.
  with contextlib.ExitStack() as stack:
    preemption = stack.enter_context(_Preemption())
    mngr = checkpoint.manager(workdir, keep=int(config.keep_checkpoints))
    stack.callback(mngr.close)
    start_step, state, state_shardings = init_or_restore(exp, mngr)
    if is_main:
      workdir_lib.write_config(workdir, config, start_step=start_step, diff=diff)
      workdir_lib.truncate_metrics(workdir, start_step)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    stack.callback(writer.close)
    stack.callback(mngr.wait_until_finished)
    if start_step == 0 and is_main:
      parameter_overview.log_parameter_overview(state.params, msg='tokenizer (with prior)')
      parameter_overview.log_parameter_overview(state.disc_params, msg='discriminator')
    logging.info('Mesh %s on %d devices; starting at step %d of %d.', dict(exp.mesh.shape),
                 jax.device_count(), start_step, total)
    if start_step >= total:
      logging.info('Nothing to do: checkpoint step %d >= total_steps %d.', start_step, total)
      return {}
    per_host = config.batch_size // jax.process_count()
    train_iter = stack.enter_context(data_lib.get_dataset(
        config.data, 'train', video_shape=exp.model.video_shape, batch_size=per_host,
        seed=int(config.seed), start_step=start_step))
    lpips_params = load_lpips(exp)
    train_step = make_train_step(exp, state_shardings)
    with sharding.logical_context(exp.mesh, exp.rules):
      return _steps(exp, workdir, mngr, writer, train_iter, state, start_step, train_step,
                    lpips_params, preemption, evaluate_fn=evaluate_fn, stop_at=stop_at)


def _steps(exp, workdir, mngr, writer, train_iter, state, start_step, train_step, lpips_params,
           preemption, *, evaluate_fn, stop_at) -> dict:
  config = exp.config
  is_main = jax.process_index() == 0
  total = int(config.total_steps)
  key = jax.random.key(int(config.seed))
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=int(config.log_every), every_secs=None)
  metrics_path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  eta = _Eta(start_step + 1)
  last_metrics = {}

  def checked(metrics, step):
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k, v in host.items() if not math.isfinite(v)]
    if bad:
      raise NonFiniteLossError(
          f'non-finite {", ".join(bad)} at step {step}; stopping. The last good checkpoint '
          f'(step {mngr.latest_step()}) is kept in {mngr.directory}. Lower the learning rate '
          f'or use float32 (config.model.dtype) and restart.')
    return host

  for step in range(start_step + 1, total + 1):
    batch = data_lib.make_global_batch({'video': next(train_iter)['video']}, exp.mesh,
                                       sharding.batch_sharding(exp.mesh))
    state, metrics = train_step(state, batch, key, lpips_params)
    report(step)
    is_last = step == total
    # Read the signal flag once per step: a SIGTERM that lands after this line (the handler
    # runs whenever the main thread waits, e.g. on the metrics below) stops the *next*
    # step, so the run never exits between deciding to checkpoint and saving.
    preempted = preemption.requested
    stop_now = preempted or (stop_at is not None and step >= stop_at)
    first = step == start_step + 1
    log_now = step % int(config.log_every) == 0 or is_last or first or stop_now
    ckpt_now = step % int(config.checkpoint_every) == 0 or is_last or stop_now
    if log_now or ckpt_now:
      host = checked(metrics, step)   # also guards every checkpoint against NaN state
      last_metrics = host
    if first:
      eta.mark_first_done()
    if log_now:
      host = dict(host, skipped_files=float(data_lib.num_skipped(train_iter)))
      writer.write_scalars(step, host)
      if is_main:
        with open(metrics_path, 'a') as f:
          f.write(json.dumps({'step': step, **host}) + '\n')
        logging.info('step %d/%d | loss %.4f | l1 %.4f | prior %.3f | %s', step, total,
                     host['loss'], host['l1_loss'], host.get('prior_loss', 0.0),
                     eta.line(step, total))
    if ckpt_now:
      checkpoint.save(mngr, step, state, force=True)
    if evaluate_fn is not None and config.eval_every and not preempted and (
        step % int(config.eval_every) == 0 or is_last):   # preempted: no time to evaluate
      eval_metrics = evaluate_fn(exp, state, workdir, step)
      if eval_metrics:
        writer.write_scalars(step, {f'eval/{k}': v for k, v in eval_metrics.items()
                                    if isinstance(v, (int, float))})
    if stop_now:
      mngr.wait_until_finished()
      logging.warning('Stopping at step %d: checkpoint saved, exiting.', step)
      break
  return last_metrics
