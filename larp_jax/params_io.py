"""Parameters only: save a model's variables apart from its training state, load them anywhere.

A *params directory* holds what inference, fine-tuning from weights, the converter of released
checkpoints and stage-2 models need, and nothing else:

    <dir>/config.json          the run's config (the model's keyword arguments under ``model``)
    <dir>/params_info.json     {'format', 'task', 'step', 'source', 'num_parameters'}
    <dir>/variables/           an Orbax pytree: {'params': ..., 'batch_stats': ... (if any)}

``load_variables(path, ...)`` reads the model's variables from a params directory or from a run
directory (the newest training checkpoint that restores, reading only the fields it needs, not
the optimiser state or the discriminator), into whatever shardings the caller asks for: one
device after an FSDP run on many, or a mesh of its own.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from larp_jax import checkpoint, errors
from larp_jax import workdir as workdir_lib

FORMAT = 'larp_jax.params/1'
INFO_FILE = 'params_info.json'
VARIABLES_DIR = 'variables'


def is_params_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, INFO_FILE))


def num_parameters(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def save(
  directory: str,
  variables: dict,
  *,
  config,
  step: int,
  task: str,
  source: str | dict = 'larp_jax training',
) -> str:
  """Writes ``variables`` (on any mesh) as a params directory; returns its absolute path.

  ``source`` says where the parameters came from ('larp_jax training', or a conversion's record
  of its files and their sha256: ``larp_jax.convert``); ``--mode=eval`` copies it into the
  evaluation JSON as 'params_source'.

  Every process calls it (Orbax writes each array's shards from the process that holds them);
  process 0 writes the JSON files. Refuses to overwrite an existing params directory.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
    raise errors.UserError(f'{directory} already holds parameters; choose another directory')
  workdir_lib.writable_or_raise(directory, 'the parameters directory')
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, VARIABLES_DIR), variables)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    config_dict = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
    _write_json(os.path.join(directory, workdir_lib.CONFIG_FILE), config_dict)
    _write_json(
      os.path.join(directory, INFO_FILE),
      dict(
        format=FORMAT,
        task=task,
        step=int(step),
        source=source,
        num_parameters=num_parameters(variables.get('params', variables)),
      ),
    )
  return directory


def read_info(directory: str) -> dict:
  with open(os.path.join(directory, INFO_FILE)) as f:
    info = json.load(f)
  if info.get('format') != FORMAT:
    raise errors.UserError(
      f'{directory}: params format {info.get("format")!r} is not '
      f'{FORMAT!r} (written by another larp_jax version?)'
    )
  return info


def load(directory: str, abstract, shardings) -> Any:
  """The variables of a params directory, placed in ``shardings`` (any mesh)."""
  info = read_info(directory)
  target = checkpoint.abstract_with_shardings(abstract, shardings)
  path = os.path.join(os.path.abspath(directory), VARIABLES_DIR)
  stored = checkpoint.stored_shapes(epath.Path(path))
  mismatch = checkpoint.first_mismatch(stored, checkpoint.shapes(target))
  if mismatch:
    raise errors.UserError(
      f'the parameters in {directory} do not fit the model of its config.json: {mismatch}'
    )
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(path, target)
  del info
  return variables


def load_variables(
  path: str, abstract: dict, shardings: dict, state_fields: Optional[dict] = None
) -> tuple[Any, int, str]:
  """(variables, step, kind) from a params directory or a run directory.

  Args:
    path: a params directory (``save``) or a run directory (``--workdir`` of a training run).
    abstract / shardings: the model's abstract variables ({'params', ...}) and where to put them.
    state_fields: for a run directory, the train-state field that holds each collection of
      ``abstract`` (e.g. {'params': 'ema_params'}); default: the same names.

  Returns:
    the variables, the training step they belong to, and 'params' or 'run'.

  Raises:
    UserError: ``path`` is neither, holds no checkpoint, or holds another model.
  """
  path = os.path.abspath(path)
  if is_params_dir(path):
    return load(path, abstract, shardings), int(read_info(path)['step']), 'params'
  ckpt_dir = os.path.join(path, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise errors.UserError(
      f'{path} is neither a params directory (no {INFO_FILE}) nor a run '
      f'directory with checkpoints; train first (python -m larp_jax.main '
      f'--config=... --workdir={path})'
    )
  fields = state_fields or {k: k for k in abstract}
  mngr = checkpoint.manager(path, async_save=False)
  try:
    step, restored = checkpoint.restore_latest_fields(
      mngr, {fields[k]: abstract[k] for k in abstract}, {fields[k]: shardings[k] for k in abstract}
    )
  finally:
    mngr.close()
  if restored is None:
    raise errors.UserError(
      f'no checkpoint in {ckpt_dir}: train first (python -m larp_jax.main '
      f'--config=... --workdir={path})'
    )
  return {k: restored[fields[k]] for k in abstract}, int(step), 'run'


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
