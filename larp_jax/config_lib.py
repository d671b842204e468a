"""Helpers shared by the config files in ``configs/``: argument parsing, presets, validation.

Config files live outside the package (``configs/*.py``) and import only this module, so they
load the same way from ``python -m larp_jax.main --config=configs/X.py:args``, from tests and
from notebooks.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any

import ml_collections

from larp_jax.errors import ConfigError  # pylint: disable=unused-import  (configs raise it)

# Tokenizer size presets. Only 'L' is published (the released LARP-L / LARP-L-Long: 768 wide,
# 12 + 12 blocks, 12 heads, 172.18M parameters without the prior). The paper's LARP-S/B sizes are
# not in the official repo; 'S' and 'B' below are our own choices, scaled like ViT-S/B.
TOKENIZER_PRESETS = {
  'S': dict(width=512, encoder_depth=8, decoder_depth=8, num_heads=8),
  'B': dict(width=768, encoder_depth=8, decoder_depth=8, num_heads=12),
  'L': dict(width=768, encoder_depth=12, decoder_depth=12, num_heads=12),
}

# GPTC-S, the released prior (21.70M parameters).
PRIOR_GPTC_S = dict(prior_depth=12, prior_width=384, prior_heads=6)

# Logical-axis -> mesh-axis rules. Names not listed are replicated; the small
# codebook ('vocab', 'code') therefore stays replicated. 'heads' names only the generator's KV
# cache (``models/larp_ar.py``): split over 'tensor' like the qkv projection that fills it.
DEFAULT_SHARDING_RULES = (
  ('batch', ('data', 'fsdp')),
  ('embed', 'fsdp'),
  ('mlp', 'tensor'),
  ('qkv', 'tensor'),
  ('heads', 'tensor'),
)


def add_plan_fields(c: ml_collections.ConfigDict) -> None:
  """The ``--mode=plan`` settings (``larp_jax/train/plan.py``) every run config carries:
  ``plan_device_memory_gb`` (GiB per device the plan checks against; None: no check) and
  ``plan_compile`` (compile the train step for XLA's memory analysis; False: shapes only)."""
  c.plan_device_memory_gb = ml_collections.config_dict.placeholder(float)
  c.plan_compile = True


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``'k1=v1,k2=v2'`` (the part after ``:`` in ``--config=file.py:args``).

  Values are cast to the type of the default; a bare word ``flag`` sets a boolean default to True.
  Unknown keys raise ConfigError naming the accepted ones.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(','):
    if not item:
      continue
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f'unknown config argument {key!r}; accepted: {sorted(defaults)}')
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f'config argument {key!r} needs a value ({key}=...)')
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ConfigError(f'config argument {key}={value!r} must be true or false')
      out[key] = value.lower() in ('true', '1')
    elif default is None or isinstance(default, str):
      out[key] = value
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ConfigError(
          f'config argument {key}={value!r} is not a {type(default).__name__}'
        ) from None
  return out


def tokenizer_preset(size: str) -> dict:
  if size not in TOKENIZER_PRESETS:
    raise ConfigError(
      f'unknown tokenizer size preset {size!r}; choose one of {sorted(TOKENIZER_PRESETS)}'
    )
  return dict(TOKENIZER_PRESETS[size])


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``'path/to/config.py[:args]'`` like ``--config`` does (for tests and generator configs
  that embed a tokenizer config)."""
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise ConfigError(f'config file {path!r} does not exist')
  name = 'larp_config_' + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def validate(config, num_devices: int | None = None) -> None:
  """Fails fast, with one clear line, on run settings that cannot work: the batch/mesh
  arithmetic, steps, logging and evaluation counts. Each task checks its own model config
  when it is built (``larp_jax/tasks/``)."""
  for key in ('batch_size', 'total_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if key in config and int(config[key]) <= 0:
      raise ConfigError(f'config.{key} must be positive, got {config[key]}')
  if 'eval_every' in config and int(config.eval_every or 0) < 0:
    raise ConfigError(
      f'config.eval_every must be >= 0 (0: no evaluation during training), got {config.eval_every}'
    )
  if 'eval' in config:
    for key in ('num_clips', 'batch_size'):
      value = config.eval.get(key)
      if key == 'batch_size' and value is not None and int(value) <= 0:
        raise ConfigError(f'config.eval.batch_size must be positive, got {value}')
      if key == 'num_clips' and value is not None and int(value) < 0:
        raise ConfigError(
          f'config.eval.num_clips must be >= 0 (0: the whole eval split), got {value}'
        )
  if num_devices is not None and 'mesh' in config:
    from larp_jax import sharding  # local: config files import this module

    sizes = sharding.mesh_shape(config.mesh, num_devices)
    dp = sizes.get('data', 1) * sizes.get('fsdp', 1)
    if config.batch_size % dp:
      raise ConfigError(
        f'config.batch_size={config.batch_size} is not divisible by the '
        f'data-parallel size data*fsdp={dp}'
      )


def check_field(config, field: str) -> None:
  """Raises ConfigError naming ``field`` (a dotted path such as ``model.width``) and the closest
  existing names when ``config`` has no such field."""
  node, done = config, []
  for part in field.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      where = 'config.' + '.'.join(done) if done else 'config'
      names = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      close = difflib.get_close_matches(part, names, n=3)
      hint = (
        f'; did you mean {", ".join(".".join(done + [c]) for c in close)}?'
        if close
        else f'; {where} has {", ".join(names)}'
        if names
        else f'; {where} is not a group'
      )
      raise ConfigError(f'the config has no field {field!r}{hint}')
    node = node[part]
    done.append(part)


def as_kwargs(cfg: Any) -> dict:
  """ConfigDict -> plain dict with tuples for sequences (Flax module fields)."""
  out = {}
  for k, v in dict(cfg).items():
    out[k] = tuple(v) if isinstance(v, list) else v
  return out
