"""Device mesh and logical-axis sharding.

Models name their parameter and activation axes ('embed', 'mlp', 'batch', ...); the config maps
those names to mesh axes ('data', 'fsdp', 'tensor'). State is born sharded: the abstract state
from ``jax.eval_shape`` gives the logical specs, which become ``NamedSharding``s that are the
``out_shardings`` of the jitted init.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from larp_jax import errors

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_cfg, num_devices: int) -> dict:
  """Resolves ``{'data': -1, 'fsdp': 1, 'tensor': 1}`` (one -1 allowed) for ``num_devices``."""
  sizes = {k: int(v) for k, v in dict(mesh_cfg).items()}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise errors.ConfigError(f'config.mesh may contain at most one -1, got {sizes}')
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise errors.ConfigError(f'config.mesh sizes must be positive or -1, got {sizes}')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise errors.ConfigError(f'config.mesh {sizes} does not divide the {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise errors.ConfigError(
      f'config.mesh {sizes} has {math.prod(sizes.values())} devices but '
      f'{num_devices} are available; use -1 for one axis'
    )
  return sizes


def _granules(devices) -> tuple[str, int]:
  """('slice', n) for a multi-slice TPU job, ('process', n) for several hosts, else ('', 1)."""
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  if len(slices) > 1:
    return 'slice', len(slices)
  processes = {d.process_index for d in devices}
  return ('process', len(processes)) if len(processes) > 1 else ('', 1)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 (fill the remaining devices).

  One slice on one host: ``mesh_utils.create_device_mesh`` (devices ordered by the physical
  topology on TPU). Several TPU slices, or several hosts: a hybrid mesh whose ``data`` axis spans
  the slices / hosts (data-parallel traffic over the slow network, fsdp and tensor inside one
  slice or host), so ``data`` must be a multiple of their number. Raises ``ConfigError`` when the
  requested shape does not fit the devices, naming both.
  """
  devices = jax.devices() if devices is None else list(devices)
  unknown = set(dict(mesh_cfg)) - set(MESH_AXES)
  if unknown:
    raise errors.ConfigError(f'config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}')
  sizes = mesh_shape({a: dict(mesh_cfg).get(a, 1) for a in MESH_AXES}, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  kind, n = _granules(devices)
  try:
    if n > 1:
      if shape[0] % n:
        raise errors.ConfigError(
          f'config.mesh {sizes}: the data axis ({shape[0]}) must be a multiple of the {n} '
          f'{kind}es of this job (the mesh spans them along data); e.g. '
          f'--config.mesh.data={n} --config.mesh.fsdp=-1'
        )
      device_array = mesh_utils.create_hybrid_device_mesh(
        (shape[0] // n, *shape[1:]), (n, 1, 1), devices, process_is_granule=kind == 'process'
      )
    else:
      device_array = mesh_utils.create_device_mesh(shape, devices)
  except errors.UserError:
    raise
  except (AssertionError, ValueError, NotImplementedError) as e:
    raise errors.ConfigError(
      f'config.mesh {sizes} cannot be laid out on {len(devices)} '
      f'{devices[0].device_kind} devices: {" ".join(str(e).split())}'
    ) from None
  return Mesh(device_array, MESH_AXES)


def rules(config) -> tuple:
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def logical_context(mesh: Mesh, logical_rules):
  """Mesh + logical axis rules active, so ``nn.with_logical_constraint`` takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules):
    yield


def state_layout(boxed_init: Callable[[], Any], mesh: Mesh, logical_rules):
  """(abstract unboxed state, logical PartitionSpec tree, NamedSharding tree) for a state built
  by ``boxed_init``, whose parameters are ``nn.Partitioned`` boxes carrying logical axis names
  (a leaf without a box has the logical spec ``P()``: replicated)."""
  abstract = jax.eval_shape(boxed_init)
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, logical_rules)
  return strip_boxes(abstract), specs, shardings


def state_shardings(boxed_init: Callable[[], Any], mesh: Mesh, logical_rules):
  """(abstract unboxed state, NamedSharding tree) for a state built by ``boxed_init``, whose
  parameters are ``nn.Partitioned`` boxes carrying logical axis names."""
  abstract, _, shardings = state_layout(boxed_init, mesh, logical_rules)
  return abstract, shardings


def strip_boxes(tree):
  """The values inside ``nn.Partitioned`` boxes, with no sharding constraint applied.

  ``nn.unbox`` applies each box's constraint whenever a mesh is set (``jax.set_mesh``), which
  outside ``jit`` fails on abstract values and plain arrays alike; this works in any context.
  """
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree_util.tree_map(
    lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box
  )
