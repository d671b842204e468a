"""Input pipeline: synthetic, TFDS, video-folder and TFRecord sources behind one `get_dataset`.

    cfg = data.default_config()
    with data.get_dataset(cfg, 'train', video_shape=(16, 128, 128), batch_size=16, seed=0) as it:
      batch = next(it)  # {'video': f32 [16,16,128,128,3], 'label': i32 [16], 'clip_id': i32 [16]}
      global_batch = data.make_global_batch(batch, mesh, sharding)

See README.md in this folder for the sources, the clip protocol and the resume guarantee.

The public names are loaded on first use (PEP 562), so that `default_config()` (what config files
call) does not import TensorFlow; `get_dataset` and the other pipeline names do.
"""

import importlib
import typing

if typing.TYPE_CHECKING:
  from larp_jax.data.config import default_config
  from larp_jax.data.pipeline import DataIterator
  from larp_jax.data.pipeline import get_dataset
  from larp_jax.data.pipeline import make_global_batch
  from larp_jax.data.pipeline import num_skipped

__all__ = ['default_config', 'DataIterator', 'get_dataset', 'make_global_batch', 'num_skipped']

_LAZY = {
  'default_config': 'larp_jax.data.config',
  'DataIterator': 'larp_jax.data.pipeline',
  'get_dataset': 'larp_jax.data.pipeline',
  'make_global_batch': 'larp_jax.data.pipeline',
  'num_skipped': 'larp_jax.data.pipeline',
}


def __getattr__(name: str):
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
