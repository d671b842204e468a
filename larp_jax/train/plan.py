r"""``--mode=plan``: the mesh, the sharding and the memory per device of a run, before launching it.

  python -m larp_jax.main --config=configs/ucf101.py --workdir=runs/larp_l --mode=plan
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m larp_jax.main \
      --config=configs/ucf101.py --workdir=runs/larp_l --mode=plan \
      --config.mesh.data=1 --config.mesh.fsdp=8   # plan for 8 devices on a CPU

Nothing is put on a device and no step runs. The train state is the loop's own abstract state
(``jax.eval_shape`` of the task's init, with the shardings the loop would give it); the batch, the
key and the task's extras are ``jax.ShapeDtypeStruct``s carrying their shardings; the step is the
loop's jitted step (``loop.make_train_step``), lowered on them and compiled ahead of time for the
backend at hand, whose XLA memory analysis says what one device needs (argument, output, temp,
generated code). ``config.plan_compile=False`` skips the compilation (a large model on a small CPU
can take minutes); the plan then counts the state, extras and batch only, a lower bound.

``config.plan_device_memory_gb`` (GiB per device, None: no check) turns a plan that does not fit
into a ``WARNING`` line naming the excess and what to change. The plan is printed and written as
JSON to ``<workdir>/plan.json`` (nothing else is written there: no lock, no config, no
checkpoints); where the run directory cannot be created or written, the plan is only printed and
says so.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from typing import Optional

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from larp_jax import checkpoint, errors, sharding
from larp_jax.train import loop

PLAN_FILE = 'plan.json'
GIB = 2**30
# Fields whose parameter trees get one line per top-level module (other fields: one line each).
_MODULE_ROLES = ('params', 'discriminator')
_ROLE_ORDER = ('params', 'optimizer', 'discriminator', 'ema', 'other', 'extras', 'batch')


# ---------------------------------------------------------------------------------- the leaves


def _key_name(k) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def shard_shape(shape, spec: P, mesh_shape: dict) -> tuple:
  """The shape of one device's shard of a global ``shape`` under the mesh ``spec`` (uneven
  splits round up, as XLA pads them)."""
  out = []
  for i, d in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    out.append(-(-int(d) // math.prod(int(mesh_shape[a]) for a in axes)))
  return tuple(out)


def _itemsize(dtype) -> int:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 8  # a threefry key: two uint32
  return np.dtype(dtype).itemsize


def _spec_str(entries) -> str:
  """('fsdp', None, ('data', 'fsdp')) -> 'fsdp,-,data+fsdp'; () -> '-' (replicated)."""
  if not entries:
    return '-'
  parts = []
  for e in entries:
    parts.append('-' if e is None else e if isinstance(e, str) else '+'.join(e))
  return ','.join(parts)


def leaf_records(tree, shardings, mesh, *, logical=None, roles=None, prefix=None) -> list:
  """One dict per array leaf of ``tree`` (ShapeDtypeStructs): path, role, group, global shape,
  dtype, logical axes, mesh spec, bytes (global and on one device).

  A train state: ``roles`` maps its top-level fields to roles (``Task.state_roles``; unlisted:
  'other'), and a parameter tree is grouped by its top-level modules. Anything else (extras, the
  batch): ``prefix`` is its role, its group and the first part of its paths.
  """
  is_spec = lambda x: isinstance(x, P)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if isinstance(shardings, jax.sharding.Sharding):
    shard_leaves = [shardings] * len(leaves)
  else:
    shard_leaves = jax.tree_util.tree_leaves(shardings)
  log_leaves = (
    [None] * len(leaves) if logical is None else jax.tree.leaves(logical, is_leaf=is_spec)
  )
  if not len(leaves) == len(shard_leaves) == len(log_leaves):
    raise ValueError('the tree, its logical specs and its shardings differ in structure')
  mesh_shape = dict(mesh.shape)
  out = []
  for (path, leaf), shard, log in zip(leaves, shard_leaves, log_leaves):
    names = [_key_name(k) for k in path]
    if prefix is not None:
      field, role, group, names = prefix, prefix, prefix, [prefix] + names
    else:
      field = names[0]
      role = roles.get(field, 'other')
      by_module = role in _MODULE_ROLES and len(path) > 1
      by_module = by_module and isinstance(path[1], jax.tree_util.DictKey)
      group = f'{field}/{names[1]}' if by_module else 'other' if role == 'other' else field
    local = shard_shape(leaf.shape, shard.spec, mesh_shape)
    size = _itemsize(leaf.dtype)
    out.append(
      dict(
        path='/'.join(names),
        field=field,
        role=role,
        group=group,
        shape=list(leaf.shape),
        dtype=str(leaf.dtype),
        logical=None if log is None else [None if a is None else str(a) for a in tuple(log)],
        spec=[e if e is None or isinstance(e, str) else list(e) for e in tuple(shard.spec)],
        elements=int(math.prod(leaf.shape)),
        bytes=int(math.prod(leaf.shape)) * size,
        device_bytes=int(math.prod(local)) * size,
        device_shape=list(local),
      )
    )
  return out


def group_records(leaves: list) -> list:
  """Leaves aggregated by group (top-level module of a parameter tree, else state field): one
  record each, with every logical axis's mesh axes and the largest leaf."""
  groups = collections.OrderedDict()
  for r in leaves:
    g = groups.setdefault(
      r['group'],
      dict(
        group=r['group'],
        role=r['role'],
        fields=[],
        leaves=0,
        elements=0,
        bytes=0,
        device_bytes=0,
        dtypes=[],
        axes={},
        largest=None,
      ),
    )
    if r['field'] not in g['fields']:
      g['fields'].append(r['field'])
    g['leaves'] += 1
    for k in ('elements', 'bytes', 'device_bytes'):
      g[k] += r[k]
    if r['dtype'] not in g['dtypes']:
      g['dtypes'].append(r['dtype'])
    for i, name in enumerate(r['logical'] or ()):
      if name is None:
        continue
      mesh_axes = _spec_str([r['spec'][i] if i < len(r['spec']) else None])
      seen = g['axes'].setdefault(name, [])
      if mesh_axes not in seen:
        seen.append(mesh_axes)
    if g['largest'] is None or r['elements'] > g['largest']['elements']:
      g['largest'] = {k: r[k] for k in ('path', 'shape', 'logical', 'spec', 'elements')}
  order = {role: i for i, role in enumerate(_ROLE_ORDER)}
  return sorted(groups.values(), key=lambda g: order.get(g['role'], len(order)))


# ---------------------------------------------------------------------------------- the plan


def _abstract(tree, shardings):
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), tree)
  return checkpoint.abstract_with_shardings(tree, shardings)


def _limit_gb(config) -> Optional[float]:
  value = config.get('plan_device_memory_gb')
  if value is None:
    return None
  if not float(value) > 0:
    raise errors.ConfigError(
      f'config.plan_device_memory_gb must be positive (GiB per device) or None, got {value}'
    )
  return float(value)


def make_plan(task_cls, config, devices=None) -> dict:
  """The plan of a run of ``config`` (``task_cls`` a ``tasks.base.Task`` class) over ``devices``
  (default all) as a JSON-able dict; ``'summary'`` is its text. Allocates nothing on a device."""
  limit_gb = _limit_gb(config)
  task = loop.make_task(task_cls, config, devices, plan=True)
  mesh = task.mesh
  abstract, logical, shardings = task.state_layout()
  state_s, batch_s, key_s, extras_s = loop.step_in_shardings(task, shardings)
  batch_size = int(config.batch_size)
  try:
    batch = task.abstract_batch(batch_size)
  except NotImplementedError:
    raise errors.UserError(
      f'--mode=plan: the {task.name} task does not describe its batch (Task.abstract_batch)'
    ) from None
  extras = task.abstract_extras()
  leaves = leaf_records(abstract, shardings, mesh, logical=logical, roles=dict(task.state_roles))
  leaves += leaf_records(extras, extras_s, mesh, prefix='extras')
  leaves += leaf_records(batch, batch_s, mesh, prefix='batch')
  device_bytes = collections.Counter()
  for r in leaves:
    device_bytes[r['role']] += r['device_bytes']
  device_bytes = {k: int(device_bytes[k]) for k in _ROLE_ORDER if k in device_bytes}
  device_bytes['total'] = int(sum(device_bytes.values()))
  devices_used = list(mesh.devices.flat)
  dp = int(mesh.shape['data']) * int(mesh.shape['fsdp'])
  record = dict(
    task=task.name,
    mesh=dict(
      axes={k: int(v) for k, v in mesh.shape.items()},
      device_kind=devices_used[0].device_kind,
      platform=devices_used[0].platform,
      device_count=len(devices_used),
      process_count=jax.process_count(),
    ),
    batch_size=batch_size,
    batch_per_device=batch_size // dp,
    parameters=int(sum(r['elements'] for r in leaves if r['role'] == 'params')),
    notes=list(getattr(task, 'plan_notes', None) or []),
    groups=group_records(leaves),
    device_bytes=device_bytes,
    compiled=None,
    leaves=leaves,
  )
  if config.get('plan_compile', True):
    args = (
      _abstract(abstract, state_s),
      _abstract(batch, batch_s),
      _abstract(jax.eval_shape(lambda: jax.random.key(0)), key_s),
      _abstract(extras, extras_s),
    )
    record['compiled'] = compiled_memory(task, shardings, args)
  else:
    record['notes'].append(
      'config.plan_compile=False: the train step was not compiled; the totals count the state, '
      'extras and batch only (no activations or XLA temporaries): a lower bound'
    )
  record['limit_gb'] = limit_gb
  record['need_bytes'] = (
    record['compiled']['peak_bytes'] if record['compiled'] else device_bytes['total']
  )
  record['warnings'] = fit_warnings(task, record, limit_gb)
  record['fits'] = None if limit_gb is None else not record['warnings']
  return record


def compiled_memory(task, state_shardings, args) -> dict:
  """XLA's memory analysis per device of the loop's train step compiled ahead of time on the
  abstract ``args``; peak_bytes = argument + output - alias + temp + generated code."""
  from larp_jax.bench.memory import compiled_memory as analysis

  t0 = time.time()
  step = loop.make_train_step(task, state_shardings)
  with sharding.logical_context(task.mesh, task.rules):
    lowered = step.lower(*args)
  compiled = lowered.compile()
  seconds = time.time() - t0
  mem = analysis(compiled)
  if mem is None:
    return dict(available=False, seconds=round(seconds, 1))
  peak = mem['total_bytes'] + mem.get('generated_code_bytes', 0)
  return dict(mem, available=True, peak_bytes=int(peak), seconds=round(seconds, 1))


def fit_warnings(task, record: dict, limit_gb: Optional[float]) -> list:
  """[one WARNING line] when the plan needs more than ``limit_gb`` GiB per device, else []."""
  if limit_gb is None:
    return []
  need, limit = record['need_bytes'], limit_gb * GIB
  if need <= limit:
    return []
  config, mesh = task.config, record['mesh']['axes']
  dev = record['device_bytes']
  state = sum(v for k, v in dev.items() if k in ('params', 'optimizer', 'discriminator', 'ema'))
  compiled = record['compiled'] or {}
  temp = compiled.get('temp_bytes', 0)
  n = record['mesh']['device_count']
  state_fix, act_fix = [], []
  if mesh['fsdp'] * mesh['tensor'] < n:
    state_fix.append(
      f'FSDP (--config.mesh.data=1 --config.mesh.fsdp=-1: parameters and optimiser state '
      f'split {n // mesh["tensor"]} ways instead of {mesh["fsdp"]})'
    )
  elif n == 1:
    state_fix.append('more devices, with FSDP (--config.mesh.fsdp=-1) to split the state')
  else:
    state_fix.append(f'more devices (the state is already split over all {n})')
  model = config.get('model') or {}
  if str(model.get('remat', 'none')) == 'none':
    act_fix.append('rematerialisation (--config.model.remat=full)')
  if record['batch_per_device'] > 1:
    act_fix.append(
      f'a smaller per-device batch (now {record["batch_per_device"]}: '
      f'--config.batch_size={config.batch_size // 2} or more devices)'
    )
  if str(model.get('dtype', 'float32')) == 'float32':
    act_fix.append('bf16 compute (--config.model.dtype=bfloat16)')
  fixes = state_fix + act_fix if state >= temp else act_fix + state_fix
  what = (
    'the compiled train step'
    if compiled.get('available')
    else 'the state, extras and batch (not compiled)'
  )
  return [
    f'WARNING: does not fit: {what} needs {fmt_bytes(need)} per device, '
    f'{fmt_bytes(need - limit)} over config.plan_device_memory_gb={limit_gb:g} GiB '
    f'(state {fmt_bytes(state)}, temporaries {fmt_bytes(temp)}); try ' + '; '.join(fixes)
  ]


# ---------------------------------------------------------------------------------- output


def fmt_bytes(n: float) -> str:
  for unit, size in (('GiB', GIB), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(n) >= size:
      return f'{n / size:.2f} {unit}'
  return f'{int(n)} B'


def _fmt_count(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 1e5 else str(n)


def format_plan(record: dict) -> str:
  """The plan as text: mesh, one line per group, bytes per device, the compiled step, warnings."""
  m = record['mesh']
  axes = ' x '.join(f'{k}={v}' for k, v in m['axes'].items())
  lines = [
    f'plan of the {record["task"]} task: mesh {axes} ({m["device_count"]} x {m["device_kind"]} '
    f'({m["platform"]}), {m["process_count"]} process(es)); global batch '
    f'{record["batch_size"]}, {record["batch_per_device"]} per device; '
    f'{record["parameters"]:,} parameters',
  ]
  lines += [f'note: {n}' for n in record['notes']]
  lines.append('groups (logical axis -> mesh axes; largest leaf: global shape, logical -> spec):')
  width = max(len(g['group']) for g in record['groups'])
  for g in record['groups']:
    big = g['largest']
    axes = ' '.join(f'{k}->{"|".join(v)}' for k, v in g['axes'].items())
    if not axes:  # no logical names (extras, the batch, counters): the mesh spec itself
      spec = _spec_str(big['spec'])
      axes = 'replicated' if set(spec) <= {'-', ','} else f'spec {spec}'
    logical = _spec_str(big['logical']) if big['logical'] else '-'
    lines.append(
      f'  {g["group"]:<{width}}  {g["role"]:<13} {g["leaves"]:>4} leaves {_fmt_count(g["elements"]):>8}'
      f'  {fmt_bytes(g["bytes"]):>10} global {fmt_bytes(g["device_bytes"]):>10}/device  {axes}'
      f'  | [{",".join(map(str, big["shape"]))}] {logical} -> {_spec_str(big["spec"])}'
    )
  dev = record['device_bytes']
  lines.append('bytes per device: ' + ', '.join(f'{k} {fmt_bytes(v)}' for k, v in dev.items()))
  c = record['compiled']
  if c is None:
    lines.append('compiled train step: skipped (config.plan_compile=False)')
  elif not c.get('available'):
    lines.append(f'compiled train step: this backend gives no memory analysis ({c["seconds"]} s)')
  else:
    parts = ', '.join(
      f'{k} {fmt_bytes(c.get(f"{k}_bytes", 0))}'
      for k in ('argument', 'output', 'alias', 'temp', 'generated_code')
    )
    lines.append(
      f'compiled train step (XLA memory analysis per device, compiled in {c["seconds"]} s): '
      f'{parts}; peak {fmt_bytes(c["peak_bytes"])} (argument + output - alias + temp + code)'
    )
  if record['limit_gb'] is not None and not record['warnings']:
    lines.append(
      f'fits: {fmt_bytes(record["need_bytes"])} per device <= '
      f'config.plan_device_memory_gb={record["limit_gb"]:g} GiB'
    )
  lines += record['warnings']
  return '\n'.join(lines)


def write_plan(workdir: str, record: dict) -> Optional[str]:
  """``<workdir>/plan.json`` (process 0), created with its directory; None with the reason
  recorded in ``record['written']`` when the run directory cannot be written."""
  if jax.process_index() != 0:
    return None
  path = os.path.join(os.path.abspath(workdir), PLAN_FILE)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
      json.dump({k: v for k, v in record.items() if k != 'summary'}, f, indent=1)
    os.replace(tmp, path)
  except OSError as e:
    return f'not written ({path}: {e.strerror or e}); the plan is printed only'
  return f'written to {path}'


def run(task_cls, config, workdir: str) -> dict:
  """``--mode=plan``: the plan, printed by ``main`` (its ``'summary'``) and written as JSON to
  ``<workdir>/plan.json`` where the run directory can be written."""
  record = make_plan(task_cls, config)
  where = write_plan(workdir, record)
  summary = format_plan(record)
  if where:
    summary += f'\nplan.json {where}'
  return dict(record, summary=summary)
