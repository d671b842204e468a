"""Orbax checkpointing: asynchronous, keep-N, restored into the sharded abstract state.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
checkpoint that was being written when the process died is never taken for the last good one.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> bool:
  return mngr.save(int(step), args=ocp.args.StandardSave(state), force=force)


def abstract_with_shardings(abstract_state, shardings):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, shardings) -> tuple[Optional[int], Any]:
  """(step, state) of the latest complete checkpoint, or (None, None) when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None, None
  target = abstract_with_shardings(abstract_state, shardings)
  logging.info('Restoring checkpoint at step %d from %s', step, mngr.directory)
  return step, mngr.restore(step, args=ocp.args.StandardRestore(target))
