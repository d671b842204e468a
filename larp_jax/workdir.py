"""The run directory: one config per run, one trainer at a time, a metrics log that matches the
checkpoints.

A run directory (``--workdir``) holds ``config.json``, ``checkpoints/``, ``metrics.jsonl``,
TensorBoard events and ``eval/``. Three rules keep it whole across restarts:

* **One config.** ``config.json`` is written once, by the run's first start. A restart whose
  config changes the network (any ``model.*`` or ``disc.*`` field but those in
  ``RESTARTABLE_MODEL_FIELDS``) or whether an EMA is kept is refused with one line naming each
  differing field, before anything in the directory is written. Other changes (steps, learning rates, logging, the data source, the
  attention kernel, ...) are allowed; they are logged and kept beside it as
  ``config.restart-<step>.json``, never over ``config.json``.
* **One trainer.** ``Lock`` holds ``<workdir>/lock`` with an exclusive ``flock`` for the whole
  run; the file says who holds it (host, pid, start time). The kernel drops the lock when its
  process dies, however it dies, so a stale lock file is simply taken over.
* **One line per step.** On resume from step ``s``, ``metrics.jsonl`` keeps the lines of steps up
  to ``s`` (each once, in order) and drops the rest: they belong to steps that will run again.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
from typing import Optional

from larp_jax import errors

_ABSENT = '<absent>'
CONFIG_FILE = 'config.json'
LOCK_FILE = 'lock'
METRICS_FILE = 'metrics.jsonl'

# Fields under config.model / config.disc that may change on a restart: how the same network is
# computed (kernel, rematerialisation, compute dtype), its training-time knobs (sampling
# temperature, loss weights, dropout, scheduled-sampling rounds) and init-only settings. Every
# other field defines the network itself (its shapes or its function) and is fixed for the run.
RESTARTABLE_MODEL_FIELDS = (
  'attention_impl',
  'remat',
  'dtype',
  'vq_temperature',
  'vq_commit_weight',
  'vq_codebook_weight',
  'prior_dropout',
  'prior_attn_dropout_in_eval',
  'prior_n_rounds',
  'prior_ce_temperature',
  'query_init',
  'query_init_std',
  'vq_temperature_start',
  'vq_temperature_ramp_steps',
  'vq_entropy_weight',
  'vq_entropy_temperature',
)


class WorkdirError(errors.UserError):
  """A run directory that cannot be used as asked (one line for the user)."""


def writable_or_raise(path: str, what: str = 'the run directory') -> None:
  """Creates ``path`` if needed and checks that a file can be written in it."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write-test-'):
      pass
  except OSError as e:
    raise WorkdirError(
      f'cannot write to {what} {path}: {e.strerror or e}; '
      f'choose a writable --workdir (or free some space)'
    ) from None


def is_writable(path: str) -> bool:
  try:
    writable_or_raise(path)
    return True
  except WorkdirError:
    return False


def user_cache_dir(*parts: str) -> str:
  """``$XDG_CACHE_HOME/larp_jax/...`` (default ``~/.cache/larp_jax/...``)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'larp_jax', *parts)


# ------------------------------------------------------------------------------------- lock


class Lock:
  """An exclusive lock on a run directory, held from ``acquire()`` to ``release()``.

  Raises WorkdirError naming the holder when another live process holds it. ``flock`` locks are
  released by the kernel when their process exits, so a lock left by a killed run never blocks.
  (On network file systems ``flock`` is as reliable as the file system's lock support.)
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: Optional[int] = None

  def acquire(self) -> 'Lock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirError(
        f'{os.path.dirname(self.path)} is in use by another trainer ({_describe(self.path)}); '
        f'wait for it to finish or stop it, or use another --workdir'
      ) from None
    self._fd = fd
    owner = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'since': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }
    try:
      os.ftruncate(fd, 0)
      os.write(fd, (json.dumps(owner) + '\n').encode())
    except BaseException:
      self.release()
      raise
    return self

  def release(self) -> None:
    if self._fd is not None:
      fd, self._fd = self._fd, None
      try:
        os.ftruncate(fd, 0)
      finally:
        os.close(fd)  # closing drops the flock

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _describe(lock_path: str) -> str:
  try:
    with open(lock_path) as f:
      owner = json.loads(f.read() or '{}')
    return f'host {owner["host"]}, pid {owner["pid"]}, since {owner["since"]}'
  except (OSError, ValueError, KeyError):
    return 'owner unknown'


# ----------------------------------------------------------------------------------- config


def config_dict(config) -> dict:
  """A config as the plain JSON dict that ``config.json`` holds (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def differences(old: dict, new: dict) -> dict:
  """{'a.b': (old value, new value)} for every leaf that differs (missing: '<absent>')."""
  a, b = _flatten(old), _flatten(new)
  missing = _ABSENT
  return {
    k: (a.get(k, missing), b.get(k, missing))
    for k in sorted(set(a) | set(b))
    if a.get(k, missing) != b.get(k, missing)
  }


def _module_default(section: str, field: str):
  """The default of a LARPTokenizer ('model') or discriminator ('disc') field, as JSON."""
  from larp_jax.models.discriminator import TransformerDiscriminator
  from larp_jax.models.tokenizer import LARPTokenizer

  module = {'model': LARPTokenizer, 'disc': TransformerDiscriminator}[section]
  for f in dataclasses.fields(module):
    if f.name == field and f.default is not dataclasses.MISSING:
      return json.loads(json.dumps(f.default, default=str))
  return _ABSENT


def _changes_checkpoint(key: str, old, new) -> bool:
  section, _, field = key.partition('.')
  if key == 'task':  # runs from before config.task trained the tokenizer
    return (old if old != _ABSENT else 'tokenizer') != (new if new != _ABSENT else 'tokenizer')
  if section in ('model', 'disc'):
    if old == _ABSENT:  # a field added to the code after the run started: its default is what ran
      return new != _module_default(section, field)
    return field not in RESTARTABLE_MODEL_FIELDS
  if key == 'optim.ema_decay':  # an EMA copy of the parameters exists or not
    return (float(old or 0) > 0) != (float(new or 0) > 0)
  return False


def check_config(workdir: str, config) -> dict:
  """Compares ``config`` with the run's ``config.json``; returns the allowed differences.

  Raises WorkdirError, naming each field with its old and new value, when the difference changes
  what the checkpoints hold. Returns {} for a new run directory or an identical config.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      old = json.load(f)
  except ValueError as e:
    raise WorkdirError(f'{path} is not valid JSON ({e}); move it away to reuse this --workdir')
  diff = differences(old, config_dict(config))
  fatal = {k: v for k, v in diff.items() if _changes_checkpoint(k, *v)}
  if fatal:
    listed = ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in fatal.items())
    raise WorkdirError(
      f'{workdir} holds a run with another model ({listed}); resume it with its own config '
      f'({path}), or start a new run with another --workdir'
    )
  return diff


def write_config(workdir: str, config, *, start_step: int, diff: dict) -> None:
  """``config.json`` on the first start; on a restart with allowed changes, the new config as
  ``config.restart-<step>.json`` (``config.json`` is never overwritten)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    if not diff:
      return
    logging.warning(
      'Restarting at step %d with config changes: %s',
      start_step,
      ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in diff.items()),
    )
    path = os.path.join(workdir, f'config.restart-{int(start_step)}.json')
  _write_atomic(path, config.to_json_best_effort(indent=2))


def _write_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------- metrics


def truncate_metrics(workdir: str, last_step: int) -> int:
  """Keeps the lines of ``metrics.jsonl`` with step <= ``last_step``, each step once (its first
  line) and in step order; drops the rest and any torn line. Returns the number dropped."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return 0
  kept, dropped = {}, 0
  with open(path) as f:
    for line in f:
      try:
        step = int(json.loads(line)['step'])
      except (ValueError, KeyError, TypeError):
        dropped += 1
        continue
      if step <= last_step and step not in kept:
        kept[step] = line if line.endswith('\n') else line + '\n'
      else:
        dropped += 1
  if dropped:
    _write_atomic(path, ''.join(kept[s] for s in sorted(kept)))
    logging.info('metrics.jsonl: dropped %d lines past the restored step %d', dropped, last_step)
  return dropped
