"""The training loop, shared by every model.

``run(task_cls, config, workdir)`` builds the mesh and the task (``larp_jax/tasks/``), the state
(born sharded), restores the latest checkpoint in ``workdir`` if there is one, and trains to
``config.total_steps``:

  * the task's pure step, jitted with in/out shardings and a donated state;
  * the host reads metrics only on log steps (no sync otherwise) and stops on NaN/Inf;
  * Orbax checkpoints every ``checkpoint_every`` steps, at the end, and on SIGTERM (preemption;
    multi-host: a signal to any process stops every process at the same step, agreed by a
    one-integer all-gather per step);
  * clu writers (TensorBoard + log), ``metrics.jsonl``, progress with ETA, periodic evaluation
    (``task.evaluate``), and at the end the model's parameters alone (``params_io``) in
    ``<workdir>/params``.

A fresh run with ``config.init_from`` set starts from the model variables of that params or run
directory (fine-tuning; the optimiser starts fresh).

``evaluate_run(task_cls, config, workdir)`` is ``--mode=eval`` and ``sample_run`` is
``--mode=sample``: they read only the model's variables of the latest checkpoint (or of a params
directory) and evaluate or sample them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from clu import metric_writers, periodic_actions

from larp_jax import checkpoint, config_lib, errors, params_io, sharding
from larp_jax import data as data_lib
from larp_jax import workdir as workdir_lib
from larp_jax.evaluation import multihost

PARAMS_SUBDIR = 'params'  # <workdir>/params: the final model variables, params only


class NonFiniteLossError(errors.UserError):
  """A loss or metric became NaN/Inf (the last good checkpoint is kept)."""


def make_task(task_cls, config, devices=None, *, plan: bool = False):
  """Validates the run settings of ``config``, builds the mesh over ``devices`` and the task
  (``plan``: as ``--mode=plan`` builds it, ``Task.for_plan``)."""
  devices = jax.devices() if devices is None else devices
  config_lib.validate(config, num_devices=len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  return task_cls.for_plan(config, mesh) if plan else task_cls(config, mesh)


def step_in_shardings(task, state_shardings) -> tuple:
  """The shardings of the step's (state, batch, key, extras): the batch split over data x fsdp,
  the key replicated, the extras as the task says (default replicated)."""
  rep = sharding.replicated(task.mesh)
  batch = {k: sharding.batch_sharding(task.mesh) for k in task.batch_keys}
  extras = task.extras_shardings()
  return state_shardings, batch, rep, rep if extras is None else extras


def make_train_step(task, state_shardings):
  """The jitted, sharded, state-donating step: (state, batch, key, extras) -> (state, metrics)."""
  return jax.jit(
    task.train_step(),
    in_shardings=step_in_shardings(task, state_shardings),
    out_shardings=(state_shardings, sharding.replicated(task.mesh)),
    donate_argnums=0,
  )


def init_or_restore(task, mngr):
  """(start_step, sharded state, shardings): the latest checkpoint, else a fresh init."""
  abstract, shardings = task.abstract_state()
  step, state = checkpoint.restore_latest(mngr, abstract, shardings)
  if state is None:
    init = jax.jit(
      lambda: nn.unbox(task.boxed_init(int(task.config.seed))), out_shardings=shardings
    )
    with sharding.logical_context(task.mesh, task.rules):
      state = init()
    step = 0
    if task.config.get('init_from'):
      state = init_from(task, state, task.config.init_from)
  return int(step), state, shardings


def init_from(task, state, path: str):
  """A fresh ``state`` whose model variables are those of ``path`` (``config.init_from``: a
  params directory, e.g. a converted release, or a run directory's latest checkpoint); the
  optimiser state and whatever the export does not hold (the discriminator) stay fresh.
  UserError if ``path`` holds another model (shapes differ)."""
  abstract, shardings = task.variable_shardings()
  variables, step, kind = params_io.load_variables(path, abstract, shardings, task.state_fields())
  logging.info('Model variables initialised from %s (%s, step %d).', path, kind, step)
  return task.with_variables(state, variables)


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
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested:
      logging.warning('Second signal %d: exiting now, without the stop checkpoint.', signum)
      sys.stderr.flush()
      os._exit(128 + signum)
    logging.warning(
      'Received signal %d: checkpointing and stopping after this step '
      '(send it again to exit at once).',
      signum,
    )
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

  Returns (lock or None, allowed config differences). Process 0 alone writes and locks; the
  other processes of a multi-host job learn whether it could (one collective), so a refused run
  directory stops every process with an error instead of leaving them waiting for process 0.
  """
  lock, diff, error = None, {}, None
  if jax.process_index() == 0:
    try:
      workdir_lib.writable_or_raise(workdir)
      lock = workdir_lib.Lock(workdir).acquire()
      diff = workdir_lib.check_config(workdir, config)
    except BaseException as e:
      if lock is not None:
        lock.release()
      error = e
  if multihost.any_true(error is not None):  # every process, once
    if error is not None:
      raise error
    raise errors.UserError(
      f'process 0 could not claim the run directory {workdir} (its log says why); '
      'this process stops too'
    )
  return lock, diff


def run(
  task_cls,
  config,
  workdir: str,
  *,
  evaluate_fn: Optional[Callable] = None,
  stop_at: Optional[int] = None,
  devices=None,
) -> dict:
  """Trains the task ``task_cls`` (a ``tasks.base.Task`` class) of ``config`` in ``workdir``.

  Returns the last metrics read on the host. ``evaluate_fn(task, state, workdir, step)``
  replaces ``task.evaluate`` (run every ``config.eval_every`` steps and at the end; 0 or unset:
  never). ``stop_at`` ends the run after that step with a checkpoint, as a preemption would (for
  notebooks and resume tests); the schedule is still that of ``config.total_steps``.

  Everything that can be checked before training (the config, the data config, the run
  directory: writable, not in use, holding no other model) is checked before anything is written
  to ``workdir`` (``larp_jax/workdir.py``). The input iterator, the checkpoint manager and the
  writers are closed, in that order, on every way out.
  """
  task = make_task(task_cls, config, devices)
  workdir = os.path.abspath(workdir)
  lock, diff = prepare_workdir(config, workdir)
  try:
    return _train(task, workdir, diff, evaluate_fn=evaluate_fn, stop_at=stop_at)
  finally:
    if lock is not None:
      lock.release()


def _train(task, workdir, diff, *, evaluate_fn, stop_at) -> dict:
  config = task.config
  is_main = jax.process_index() == 0
  total = int(config.total_steps)
  # Closed in reverse order on every way out: the input threads first (nothing waits on them
  # afterwards), then the pending checkpoint writes, the manager, the writers; the signal
  # handler stays until the end, so a Ctrl-C during the last save is still handled.
  with contextlib.ExitStack() as stack:
    preemption = stack.enter_context(_Preemption())
    mngr = checkpoint.manager(workdir, keep=int(config.keep_checkpoints))
    stack.callback(mngr.close)
    start_step, state, state_shardings = init_or_restore(task, mngr)
    if is_main:
      workdir_lib.write_config(workdir, config, start_step=start_step, diff=diff)
      workdir_lib.truncate_metrics(workdir, start_step)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    stack.callback(writer.close)
    stack.callback(mngr.wait_until_finished)
    if start_step == 0 and is_main:
      task.log_overview(state)
    logging.info(
      'Task %s, mesh %s on %d devices; starting at step %d of %d.',
      task.name,
      dict(task.mesh.shape),
      jax.device_count(),
      start_step,
      total,
    )
    if start_step >= total:
      logging.info('Nothing to do: checkpoint step %d >= total_steps %d.', start_step, total)
      return {}
    per_host = config.batch_size // jax.process_count()
    train_iter = stack.enter_context(task.train_data(batch_size=per_host, start_step=start_step))
    extras = task.extras()
    train_step = make_train_step(task, state_shardings)
    evaluate = evaluate_fn or (lambda t, s, w, i: t.evaluate(s, w, i))
    with sharding.logical_context(task.mesh, task.rules):
      metrics, state, finished = _steps(
        task,
        workdir,
        mngr,
        writer,
        train_iter,
        state,
        start_step,
        train_step,
        extras,
        preemption,
        evaluate=evaluate,
        stop_at=stop_at,
      )
    if finished:
      export_params(task, state, os.path.join(workdir, PARAMS_SUBDIR), step=total)
    return metrics


def export_params(task, state, directory: str, *, step: int) -> Optional[str]:
  """Writes the task's model variables (``task.export``) as a params directory, replacing an
  older one; None when the task exports nothing."""
  try:
    variables = task.export(state)
  except NotImplementedError:
    return None
  tmp = directory + '.tmp'
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
  _sync('larp_export_start')
  params_io.save(tmp, variables, config=task.config, step=step, task=task.name)
  _sync('larp_export_written')
  if jax.process_index() == 0:
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    logging.info('Parameters of step %d written to %s', step, directory)
  return directory


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _steps(
  task,
  workdir,
  mngr,
  writer,
  train_iter,
  state,
  start_step,
  train_step,
  extras,
  preemption,
  *,
  evaluate,
  stop_at,
) -> tuple[dict, Any, bool]:
  """Runs the steps; returns (last host metrics, state, whether total_steps was reached)."""
  config = task.config
  is_main = jax.process_index() == 0
  total = int(config.total_steps)
  key = jax.random.key(int(config.seed))
  report = periodic_actions.ReportProgress(
    num_train_steps=total, writer=writer, every_steps=int(config.log_every), every_secs=None
  )
  metrics_path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  eta = _Eta(start_step + 1)
  last_metrics = {}
  batch_sharding = sharding.batch_sharding(task.mesh)

  def checked(metrics, step):
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k, v in host.items() if not math.isfinite(v)]
    if bad:
      raise NonFiniteLossError(
        f'non-finite {", ".join(bad)} at step {step}; stopping. The last good checkpoint '
        f'(step {mngr.latest_step()}) is kept in {mngr.directory}. Lower the learning rate '
        f'or use float32 (config.model.dtype) and restart.'
      )
    return host

  for step in range(start_step + 1, total + 1):
    raw = next(train_iter)
    batch = data_lib.make_global_batch(
      {k: raw[k] for k in task.batch_keys}, task.mesh, batch_sharding
    )
    state, metrics = train_step(state, batch, key, extras)
    report(step)
    is_last = step == total
    # Read the signal flag once per step: a SIGTERM that lands after this line (the handler
    # runs whenever the main thread waits, e.g. on the metrics below) stops the *next*
    # step, so the run never exits between deciding to checkpoint and saving. With several
    # processes the flag is OR-ed over all of them (a signal to any one stops the whole job at
    # the same step; each would otherwise wait forever in the other's collectives).
    preempted = multihost.any_true(preemption.requested)
    stop_now = preempted or (stop_at is not None and step >= stop_at)
    first = step == start_step + 1
    log_now = step % int(config.log_every) == 0 or is_last or first or stop_now
    ckpt_now = step % int(config.checkpoint_every) == 0 or is_last or stop_now
    if log_now or ckpt_now:
      host = checked(metrics, step)  # also guards every checkpoint against NaN state
      last_metrics = host
    if first:
      eta.mark_first_done()
    if log_now:
      host = dict(host, **task.data_counters(train_iter))
      writer.write_scalars(step, host)
      if is_main:
        with open(metrics_path, 'a') as f:
          f.write(json.dumps({'step': step, **host}) + '\n')
        logging.info(
          'step %d/%d | %s | %s', step, total, task.log_line(host), eta.line(step, total)
        )
    if ckpt_now:
      checkpoint.save(mngr, step, state, force=True)
    if (
      config.get('eval_every') and not preempted and (step % int(config.eval_every) == 0 or is_last)
    ):  # preempted: no time to evaluate
      eval_metrics = evaluate(task, state, workdir, step)
      if eval_metrics:
        writer.write_scalars(
          step, {f'eval/{k}': v for k, v in eval_metrics.items() if isinstance(v, (int, float))}
        )
    if stop_now:
      mngr.wait_until_finished()
      logging.warning('Stopping at step %d: checkpoint saved, exiting.', step)
      return last_metrics, state, is_last
  return last_metrics, state, True


def evaluate_run(task_cls, config, workdir: str) -> dict:
  """--mode=eval: evaluates the model variables of ``workdir``'s latest checkpoint (or of a
  params directory) with ``task.evaluate_variables``.

  Returns the metrics plus 'summary' (text to print). Raises ``UserError`` if ``workdir`` holds
  no checkpoint, only damaged ones, or a run of another model than ``config`` describes.
  """
  task, variables, step, workdir, source = load_for_inference(task_cls, config, workdir)
  return task.evaluate_variables(variables, workdir, step, params_source=source)


def sample_run(task_cls, config, workdir: str) -> dict:
  """--mode=sample: samples from the model variables of ``workdir`` (as ``evaluate_run`` reads
  them) with ``task.sample_variables``; returns its record plus 'summary'."""
  task, variables, step, workdir, _ = load_for_inference(task_cls, config, workdir)
  return task.sample_variables(variables, workdir, step)


def load_for_inference(task_cls, config, workdir: str):
  """(task, the model's variables, their step, absolute workdir, the params directory's recorded
  source or None) from a run directory's latest
  restorable checkpoint (model fields only) or from a params directory."""
  workdir = os.path.abspath(workdir)
  if not params_io.is_params_dir(workdir):
    if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
      raise errors.UserError(
        f'no checkpoint in {os.path.join(workdir, "checkpoints")}: train first (python -m '
        f'larp_jax.main --config=... --workdir={workdir}), or point --workdir at a run directory'
      )
    workdir_lib.check_config(workdir, config)
  task = make_task(task_cls, config)
  abstract, shardings = task.variable_shardings()
  variables, step, kind = params_io.load_variables(
    workdir, abstract, shardings, task.state_fields()
  )
  # A params directory says where its parameters came from (training, or a conversion of
  # released weights with the sha256 of its files); the evaluation record keeps that.
  source = params_io.read_info(workdir).get('source') if kind == 'params' else None
  return task, variables, step, workdir, source
