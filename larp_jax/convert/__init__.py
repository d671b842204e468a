"""Released PyTorch LARP checkpoints -> larp_jax params directories (and back, for the tests).

    python -m larp_jax.convert --from=DIR --to=OUT [--overwrite] [--norm_eps=1e-5]

    config, variables, report = larp_jax.convert.from_official(DIR)
    tok = larp_jax.load_tokenizer(OUT)                   # after the command above

DIR is what the official ``save_pretrained`` writes (``huggingface-cli download
hywang66/LARP-L-long-tokenizer --local-dir DIR``): ``config.json``, the constructor's arguments,
and ``model.safetensors``, read with the ``safetensors`` package (no torch). The arguments are
mapped to a run config (the released recipe of ``configs/ucf101.py`` with the model of the
checkpoint: every argument mapped, checked, or refused by name; ``convert/tokenizer.py``), every
tensor to our parameter tree by a table (``convert/table.py``), with a check that each source
tensor is used once and each parameter filled, shapes equal. The official buffers (the fixed
sin-cos tables) are compared with ours and reported, not loaded. OUT is a params directory
(``params_io``) whose ``params_info.json`` ``source`` records the conversion: the source
directory, the sha256 of both files and the LayerNorm eps chosen.

The LayerNorm eps of the ViT blocks is not in config.json: the released checkpoints were
trained with timm < 1.0.16, whose blocks use torch's default eps 1e-5, and that is the default
here; a model saved by the official code under timm >= 1.0.16 (eps 1e-6) needs
``norm_eps=1e-6``.

The official AR generator (``LARP_AR``, ``hywang66/LARP-L-long-AR`` and ``-AR-FP``) converts the
same way into our ``LARPAR`` (``convert/ar.py``; its RMSNorm eps is in its config.json); OUT is
then a params directory of task 'generator' whose config.json holds ``{'task', 'model'}``
(``load_generator`` reads it until the generator task has its own loader). The discriminator is
not part of the release: fine-tuning a converted tokenizer starts it fresh.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np

from larp_jax import errors
from larp_jax.convert import ar as ar_map
from larp_jax.convert import files, table
from larp_jax.convert import tokenizer as tok_map

__all__ = [
  'from_official',
  'convert_state_dict',
  'to_official',
  'official_config',
  'convert',
  'format_report',
  'load_generator',
]

CONVERTED_BY = 'larp_jax.convert'


# Official class -> the module with its tables (same interface: map_config, run_config,
# make_model, expected, RULES, IGNORED, buffers, official_extras, transform_context, counts,
# norm_eps_record, official_config, TASK, OURS).
KINDS = {tok_map.OFFICIAL_CLASS: tok_map, ar_map.OFFICIAL_CLASS: ar_map}
_BY_TASK = {k.TASK: k for k in KINDS.values()}


def official_class(cfg: Mapping[str, Any]) -> str:
  """'LARPTokenizer' or 'LARP_AR' from a config.json; UserError for anything else."""
  for name, kind in KINDS.items():
    if kind.is_official_config(cfg):
      return name
  raise errors.UserError(
    f'config.json names neither the official LARPTokenizer (bottleneck, prior_model, ...) nor '
    f'LARP_AR (dim, n_layer, n_head, vocab_size, ...); its keys: {", ".join(sorted(cfg)) or "none"}'
  )


def _kind_of(config):
  task = config.get('task', 'tokenizer')
  if task not in _BY_TASK:
    raise errors.ConfigError(f'no official form for task {task!r}; one of {sorted(_BY_TASK)}')
  return _BY_TASK[task]


def convert_state_dict(
  official_cfg: Mapping[str, Any],
  names,
  get,
  *,
  norm_eps: Optional[float] = None,
):
  """The conversion itself, on any source of tensors: (run config, flat variables, report).

  ``names``: the official state dict's names; ``get(name)``: one tensor (numpy, or a
  ``jax.ShapeDtypeStruct`` for a shapes-only check that allocates nothing). ``norm_eps``: the
  tokenizer's ViT LayerNorm eps (None: 1e-5, the released checkpoints'); the generator's
  RMSNorm eps is in its config.json.
  """
  t0 = time.time()
  cls = official_class(official_cfg)
  kind = KINDS[cls]
  mapper = kind.map_config(official_cfg)
  config = kind.run_config(mapper.settings, norm_eps)
  model = kind.make_model(config.model)
  expected = kind.expected(model)
  mapped = table.map_tensors(
    names,
    get,
    kind.RULES,
    expected,
    ctx=kind.transform_context(model),
    buffers=kind.buffers(model),
    ignore=kind.IGNORED,
    dtype=np.dtype(model.param_dtype),
  )
  report = dict(
    official_class=cls,
    ours=kind.OURS,
    task=kind.TASK,
    arguments=[list(line) for line in mapper.lines],
    norm_eps=kind.norm_eps_record(config, norm_eps is not None),
    buffers=mapped.buffers,
    ignored=mapped.ignored,
    source_dtypes=mapped.dtypes,
    param_dtype=str(np.dtype(model.param_dtype)),
    tensors=len(mapped.used),
    **kind.counts(expected),
    seconds=round(time.time() - t0, 3),
  )
  casts = {d: n for d, n in mapped.dtypes.items() if d != report['param_dtype']}
  if casts:
    report['cast'] = f'{casts} source tensors cast to {report["param_dtype"]}'
  return config, mapped.variables, report


def from_official(directory: str, *, norm_eps: Optional[float] = None):
  """(run config, variables {'params', ['batch_stats']} as numpy, report) of an official
  checkpoint directory (``config.json`` + ``model.safetensors``).

  Raises:
    UserError: the directory or a file is missing or unreadable, or the class is not supported.
    ConfigError: an argument of config.json that cannot be converted, a source tensor that no
      rule uses or uses twice, a parameter left unfilled, a shape mismatch (each names them all).
  """
  directory = os.path.abspath(directory)
  cfg_path, weights_path = files.paths(directory)
  official_cfg = files.read_config(cfg_path)
  with files.open_weights(weights_path) as weights:
    config, flat, report = convert_state_dict(
      official_cfg, weights.names, weights.get, norm_eps=norm_eps
    )
  report['source'] = dict(
    converted_by=CONVERTED_BY,
    directory=directory,
    official_class=report['official_class'],
    sha256={
      files.CONFIG_FILE: files.sha256(cfg_path),
      files.WEIGHTS_FILE: files.sha256(weights_path),
    },
    norm_eps=report['norm_eps']['value'],
  )
  return config, flax.traverse_util.unflatten_dict(flat, sep='/'), report


def official_config(config) -> dict:
  """Our run config (a tokenizer's, or {'task': 'generator', 'model': ...}) -> the official
  config.json (``to_official``'s config)."""
  return _kind_of(config).official_config(config)


def to_official(config, variables) -> dict:
  """Our variables ({'params', ['batch_stats']}) -> the official state dict {name: array},
  buffers included: the inverse of ``from_official`` (what the round-trip tests feed it).
  ``jax.ShapeDtypeStruct`` leaves give ``jax.ShapeDtypeStruct`` entries (shapes only)."""
  kind = _kind_of(config)
  model = kind.make_model(config['model'])
  flat = flax.traverse_util.flatten_dict(dict(variables), sep='/')
  out = table.unmap_tensors(flat, kind.RULES, ctx=kind.transform_context(model))
  abstract = any(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())
  extras = {k: f() for k, f in kind.buffers(model).items()}
  extras.update(kind.official_extras(model))
  for name, value in extras.items():
    out[name] = jax.ShapeDtypeStruct(value.shape, value.dtype) if abstract else value
  if abstract:
    return out
  return {k: np.asarray(v) for k, v in out.items()}


def convert(
  src: str, out: str, *, overwrite: bool = False, norm_eps: Optional[float] = None
) -> dict:
  """Converts the official checkpoint ``src`` into the params directory ``out`` (loadable by
  ``larp_jax.load_tokenizer``); returns the report (with 'written_to').

  Raises UserError if ``out`` exists (unless ``overwrite`` and it is a params directory).
  """
  from larp_jax import params_io

  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out):
    if not overwrite:
      raise errors.UserError(f'{out} exists and is not empty; pass --overwrite or choose another')
    if not params_io.is_params_dir(out):
      raise errors.UserError(
        f'{out} is not a params directory; --overwrite only replaces one (remove it yourself)'
      )
  config, variables, report = from_official(src, norm_eps=norm_eps)
  variables = _to_device(variables)
  tmp = out + '.converting'
  shutil.rmtree(tmp, ignore_errors=True)
  params_io.save(
    tmp, variables, config=config, step=0, task=report['task'], source=report['source']
  )
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  report['written_to'] = out
  return report


def load_generator(directory: str):
  """(model, variables, config) of a converted generator's params directory, on one device.

  A stand-in until the generator task brings its own loader: ``LARPAR(**config.model)`` with
  the variables read into that model's shapes (UserError if they do not fit)."""
  from larp_jax import api, params_io, sharding

  config = api.load_config(directory)
  if config.get('task') != ar_map.TASK:
    raise errors.UserError(f'{directory} holds a {config.get("task")!r} model, not a generator')
  model = ar_map.make_model(config.model)
  abstract = ar_map.abstract_variables(model)
  device = sharding.replicated(sharding.make_mesh({'data': 1}, jax.devices()[:1]))
  shardings = jax.tree_util.tree_map(lambda _: device, abstract)
  return model, params_io.load(directory, abstract, shardings), config


def _to_device(variables):
  """The numpy tree as jax arrays, one leaf at a time (each numpy array is dropped as soon as
  its copy exists). Orbax then writes with one host copy of its own (measured for LARP-L: the
  tree plus at most ~0.9 of it), where a numpy tree costs it about two."""
  flat = flax.traverse_util.flatten_dict(variables, sep='/')
  del variables
  for key in list(flat):
    flat[key] = jax.device_put(flat[key])
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def format_report(report: Mapping[str, Any]) -> str:
  """The report as text: arguments, eps, buffers, ignored tensors, counts."""
  lines = [f'official {report["official_class"]} -> larp_jax {report["ours"]}']
  src = report.get('source')
  if src:
    lines.append(f'from {src["directory"]}')
    lines += [f'  sha256 {name} {digest}' for name, digest in src['sha256'].items()]
  lines.append('arguments:')
  for name, value, what, given in report['arguments']:
    lines.append(f'  {name} = {value!r}{"" if given else " (official default)"}: {what}')
  eps = report['norm_eps']
  what = 'LayerNorm eps of the ViT blocks' if report['task'] == 'tokenizer' else 'RMSNorm eps'
  lines.append(f'{what}: {eps["value"]:g} ({eps["reason"]})')
  lines.append('buffers (compared, not loaded):' + ('' if report['buffers'] else ' none'))
  for name, b in report['buffers'].items():
    diff = '' if b['max_abs_diff'] is None else f', max |diff| {b["max_abs_diff"]:.3g}'
    lines.append(f'  {name}: {b["status"]}{diff}')
  for name, why in report['ignored'].items():
    lines.append(f'not loaded: {name} ({why})')
  without = report.get('parameters_without_prior')
  lines.append(
    f'{report["tensors"]} tensors -> {report["parameters"]:,} parameters'
    + (f' ({without:,} without the prior)' if without is not None else '')
    + f', {report["param_dtype"]}; source dtypes {report["source_dtypes"]}'
  )
  if report.get('cast'):
    lines.append(report['cast'])
  if report.get('written_to'):
    how = (
      'larp_jax.load_tokenizer'
      if report['task'] == 'tokenizer'
      else 'larp_jax.convert.load_generator'
    )
    lines.append(f'written to {report["written_to"]} (load with {how})')
  return '\n'.join(lines)
