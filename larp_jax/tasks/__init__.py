"""Tasks: what one model brings to the shared training loop (``larp_jax/train/loop.py``).

``config.task`` names the task of a run (default ``'tokenizer'``); ``get(name)`` returns its
class. A task is built from ``(config, mesh)`` and implements ``tasks.base.Task``.
"""

from __future__ import annotations

import importlib

from larp_jax import errors

# name -> 'module:Class', imported on demand (a task's models load only when it runs).
_REGISTRY = {
  'tokenizer': 'larp_jax.tasks.tokenizer:TokenizerTask',
  'generator': 'larp_jax.tasks.generator:GeneratorTask',
}
DEFAULT = 'tokenizer'


def names() -> tuple:
  return tuple(sorted(_REGISTRY))


def name_of(config) -> str:
  return str(config.get('task', None) or DEFAULT)


def get(name: str):
  """The task class registered under ``name``."""
  if name not in _REGISTRY:
    raise errors.ConfigError(f'config.task={name!r} is not a task; choose one of {names()}')
  module, _, cls = _REGISTRY[name].partition(':')
  return getattr(importlib.import_module(module), cls)
