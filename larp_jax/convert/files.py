"""Reading and writing an official checkpoint directory (``save_pretrained`` of the official
models: ``config.json`` + ``model.safetensors``), without torch.

Tensors are read one at a time with the ``safetensors`` package's numpy reader, so a conversion
holds our parameter tree and one source tensor, never a second full copy of the weights.
bfloat16 tensors (which numpy cannot hold) are read through its JAX reader and cast to float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Iterator, Mapping

import numpy as np

from larp_jax import errors

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'


def sha256(path: str, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def paths(directory: str) -> tuple[str, str]:
  """(config.json, model.safetensors) of ``directory``; UserError naming what is missing."""
  if not os.path.isdir(directory):
    raise errors.UserError(f'{directory} is not a directory (download it first, see README)')
  config, weights = (os.path.join(directory, n) for n in (CONFIG_FILE, WEIGHTS_FILE))
  missing = [
    n for n, p in ((CONFIG_FILE, config), (WEIGHTS_FILE, weights)) if not os.path.isfile(p)
  ]
  if missing:
    found = ', '.join(sorted(os.listdir(directory))) or 'nothing'
    raise errors.UserError(
      f'{directory} has no {" or ".join(missing)} (it holds {found}); expected a directory '
      f'written by the official save_pretrained, e.g. huggingface-cli download '
      f'hywang66/LARP-L-long-tokenizer --local-dir DIR'
    )
  return config, weights


def read_config(path: str) -> dict:
  try:
    with open(path) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise errors.UserError(f'{path} is not valid JSON: {e}') from None
  if not isinstance(cfg, dict):
    raise errors.UserError(f'{path} holds {type(cfg).__name__}, not an object of arguments')
  return cfg


class Weights:
  """A lazy view of a safetensors file: ``names``, ``dtype(name)``, ``get(name)`` (numpy)."""

  def __init__(self, path: str):
    from safetensors import safe_open  # local: only conversions need it

    self.path = path
    self._np = safe_open(path, framework='np')
    self._file = self._np.__enter__()
    self.names = list(self._file.keys())

  def dtype(self, name: str) -> str:
    return self._file.get_slice(name).get_dtype()

  def get(self, name: str) -> np.ndarray:
    if self.dtype(name) == 'BF16':
      from safetensors import safe_open

      with safe_open(self.path, framework='flax') as f:
        return np.asarray(f.get_tensor(name).astype('float32'))
    return self._file.get_tensor(name)

  def close(self):
    self._np.__exit__(None, None, None)


@contextlib.contextmanager
def open_weights(path: str) -> Iterator[Weights]:
  try:
    w = Weights(path)
  except Exception as e:  # safetensors raises its own error types for a damaged header
    raise errors.UserError(f'{path} is not a readable safetensors file: {e}') from None
  try:
    yield w
  finally:
    w.close()


def write_official(directory: str, config: Mapping, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes ``config.json`` + ``model.safetensors`` as the official ``save_pretrained`` does
  (for tests and for timing a conversion; larp_jax itself only reads these)."""
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  save_file(
    {k: np.ascontiguousarray(v) for k, v in tensors.items()},
    os.path.join(directory, WEIGHTS_FILE),
  )
