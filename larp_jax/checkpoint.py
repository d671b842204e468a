"""Orbax checkpointing: asynchronous, keep-N, restored into the sharded abstract state.

Orbax writes each checkpoint into a temporary directory (``*.orbax-checkpoint-tmp-*``) and
renames it when complete, so a checkpoint that was being written when the process died is never
taken for the last good one; those directories are Orbax's and are left alone here.

Integrity rule of ``restore_latest``: the steps in ``<workdir>/checkpoints/`` are tried from the
newest to the oldest.

- *Damaged*: the step's tree metadata (``<step>/default/_METADATA``) is missing or unreadable (an
  empty step directory included), or reading its arrays fails (a truncated or missing file). The
  step is named in one warning line, moved aside to
  ``<workdir>/damaged_checkpoints/<step>-<UTC time>/`` (so that training can save that step
  number again; only process 0 moves, and only with ``quarantine=True`` and a writable manager)
  once an older step has restored, and the next older step is tried. Nothing is ever deleted.
  When every step is damaged, nothing is moved (an error common to all steps is more likely the
  environment than the files) and ``ValueError``: starting from scratch is left to the user.
- *Config mismatch*: the metadata reads fine but its parameter names or shapes differ from the
  requested state (the run was restarted with another model). That is no damage: ``ValueError``
  naming the first differing parameter; nothing is moved and no older step is tried.
- Errors of the device or of the storage service (``JaxRuntimeError``, ``MemoryError``,
  TensorStore's UNAVAILABLE, DEADLINE_EXCEEDED, ...) say nothing about the files and propagate.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from larp_jax import errors

_ITEM = 'default'  # the item directory Orbax writes for a single unnamed item
_DAMAGED_DIR = 'damaged_checkpoints'
_TRANSIENT = (
  'UNAVAILABLE',
  'DEADLINE_EXCEEDED',
  'RESOURCE_EXHAUSTED',
  'CANCELLED',
  'ABORTED',
  'UNAUTHENTICATED',
  'PERMISSION_DENIED',
)


def manager(workdir: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, enable_async_checkpointing=async_save
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options
  )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> bool:
  return mngr.save(int(step), args=ocp.args.StandardSave(state), force=force)


def abstract_with_shardings(abstract_state, shardings):
  return jax.tree_util.tree_map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )


def restore_latest(
  mngr: ocp.CheckpointManager, abstract_state, shardings, *, quarantine: bool = True
) -> tuple[Optional[int], Any]:
  """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.

  Damaged steps are skipped with a warning and, when ``quarantine`` (and the manager is writable),
  moved to ``<workdir>/damaged_checkpoints/``; see the module docstring for the rule. Read-only
  callers pass ``quarantine=False``.

  Raises:
    ValueError: every checkpoint is damaged, or the newest readable one was written for another
      model (parameter names or shapes differ from ``abstract_state``).
  """
  return _restore_newest(
    mngr, abstract_with_shardings(abstract_state, shardings), partial=False, quarantine=quarantine
  )


def restore_latest_fields(
  mngr: ocp.CheckpointManager, abstract_fields: dict, shardings: dict
) -> tuple[Optional[int], Optional[dict]]:
  """(step, {field: value}) of some top-level fields of the newest checkpoint that restores.

  Reads only those fields' arrays (e.g. ``{'ema_params': ..., 'batch_stats': ...}`` of a train
  state, without its optimiser state), each placed in the given shardings: any mesh, whatever
  the mesh that wrote them. Read-only: damaged steps are skipped with a warning and left in
  place. (None, None) when there is no checkpoint; ValueError as ``restore_latest``.
  """
  target = {k: abstract_with_shardings(v, shardings[k]) for k, v in abstract_fields.items()}
  return _restore_newest(mngr, target, partial=True, quarantine=False)


def _restore_newest(mngr, target, *, partial: bool, quarantine: bool):
  move = quarantine and not _read_only(mngr)
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    path = _step_dir(mngr, step)
    logging.info('Restoring checkpoint at step %d from %s', step, path)
    state, reason = _try_restore(mngr, step, target, partial=partial)
    if reason is None:
      # Only now, with an older step shown to restore, are the newer ones moved aside: an error
      # that hits every step alike (permissions, a library change) moves nothing.
      for bad, bad_path, why in damaged:
        where = _move_aside(mngr, bad) if move else None
        logging.warning(
          'Checkpoint step %d at %s is damaged (%s); %s; restored step %d.',
          bad,
          bad_path,
          why,
          f'moved it to {where}' if where else 'left it in place',
          step,
        )
      return step, state
    damaged.append((step, path, reason))
  if damaged:
    listed = '; '.join(f'step {s} at {p}: {why}' for s, p, why in damaged)
    raise errors.UserError(
      f'every checkpoint in {mngr.directory} is damaged ({listed}); nothing was moved: '
      f'repair them or move them away to start from scratch, or use a new --workdir.'
    )
  return None, None


def _try_restore(mngr, step: int, target, *, partial: bool = False) -> tuple[Any, Optional[str]]:
  """(state, None), or (None, short reason) when ``step`` is damaged; raises on a config mismatch."""
  try:
    stored = stored_shapes(_step_dir(mngr, step) / _ITEM)
  except Exception as e:  # pylint: disable=broad-except
    if not _is_damage(e):
      raise
    return None, _reason(e)
  mismatch = first_mismatch(stored, shapes(target), partial=partial)
  if mismatch:
    raise errors.ConfigError(
      f'checkpoint step {step} at {_step_dir(mngr, step)} was written for another model: '
      f'{mismatch}. Restore with the config it was trained with, or use a new --workdir.'
    )
  if partial:
    args = ocp.args.PyTreeRestore(
      item=target,
      partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target),
    )
  else:
    args = ocp.args.StandardRestore(target)
  try:
    return mngr.restore(step, args=args), None
  except Exception as e:  # pylint: disable=broad-except
    if not _is_damage(e):
      raise
    return None, _reason(e)


def stored_shapes(item_dir: epath.Path) -> dict[str, tuple]:
  """{parameter name: shape} from the item's ``_METADATA``; raises when it is missing or bad."""
  handler = ocp.StandardCheckpointHandler()
  try:
    tree = handler.metadata(item_dir).tree
  finally:
    handler.close()
  return shapes(tree)


def shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'.'.join(ocp.tree.str_keypath(p)): tuple(getattr(x, 'shape', ())) for p, x in leaves}


def first_mismatch(stored: dict, requested: dict, *, partial: bool = False) -> Optional[str]:
  """The first parameter whose presence or shape differs, in words; None when all agree
  (``partial``: names stored but not requested are fine)."""
  for name, shape in requested.items():
    if name not in stored:
      return f'{name!r} (shape {shape}) is requested but not in the checkpoint'
    if stored[name] != shape:
      return f'{name!r} is stored with shape {stored[name]} but requested with shape {shape}'
  extra = [] if partial else [name for name in stored if name not in requested]
  return f'{extra[0]!r} is in the checkpoint but not requested' if extra else None


def _chain(e: BaseException) -> list[BaseException]:
  """``e`` and its explicit causes, outermost first (Orbax wraps TensorStore's errors)."""
  chain = [e]
  while chain[-1].__cause__ is not None and len(chain) < 10:
    chain.append(chain[-1].__cause__)
  return chain


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [''])[0].split(' [tensorstore_spec')[0]


def _is_damage(e: Exception) -> bool:
  """Whether ``e``, raised reading a checkpoint, is about its files (not the device or network)."""
  chain = _chain(e)
  if any(isinstance(x, (jax.errors.JaxRuntimeError, MemoryError)) for x in chain):
    return False
  return not _first_line(chain[-1]).startswith(_TRANSIENT)


def _reason(e: Exception) -> str:
  """'Type: first line of the message' of the innermost cause: one short line."""
  root = _chain(e)[-1]
  return f'{type(root).__name__}: {_first_line(root)[:300]}'


def _move_aside(mngr, step: int) -> epath.Path:
  """Moves ``step`` to ``<workdir>/damaged_checkpoints/<step>-<UTC time>`` (process 0) and reloads."""
  stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
  dest = epath.Path(mngr.directory).parent / _DAMAGED_DIR / f'{step}-{stamp}'
  if jax.process_index() == 0:
    dest = _unused(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _step_dir(mngr, step).rename(dest)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'larp_checkpoint_move_aside_{step}')
  mngr.reload()
  return dest


def _unused(path: epath.Path) -> epath.Path:
  n = 1
  candidate = path
  while candidate.exists():
    candidate = path.parent / f'{path.name}-{n}'
    n += 1
  return candidate


def _step_dir(mngr, step: int) -> epath.Path:
  return epath.Path(mngr.directory) / str(step)  # ``manager``'s default step names


def _read_only(mngr) -> bool:
  options = getattr(mngr, '_options', None)  # CheckpointManager has no public accessor
  return bool(getattr(options, 'read_only', False))
