"""Device mesh and logical-axis sharding (STYLE section 4).

Models name their parameter and activation axes ('embed', 'mlp', 'batch', ...); the config maps
those names to mesh axes ('data', 'fsdp', 'tensor'). State is born sharded: the abstract state
from ``jax.eval_shape`` gives the logical specs, which become ``NamedSharding``s that are the
``out_shardings`` of the jitted init.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from larp_jax import config_lib

MESH_AXES = ('data', 'fsdp', 'tensor')


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 (fill the remaining devices)."""
  devices = jax.devices() if devices is None else devices
  unknown = set(dict(mesh_cfg)) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}')
  sizes = config_lib.mesh_shape({a: dict(mesh_cfg).get(a, 1) for a in MESH_AXES}, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # CPU / odd topologies: plain reshape
    device_array = np.asarray(devices).reshape(shape)
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


def state_shardings(boxed_init: Callable[[], Any], mesh: Mesh, logical_rules):
  """(abstract unboxed state, NamedSharding tree) for a state built by ``boxed_init``, whose
  parameters are ``nn.Partitioned`` boxes carrying logical axis names."""
  abstract = jax.eval_shape(boxed_init)
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, logical_rules)
  return strip_boxes(abstract), shardings


def strip_boxes(tree):
  """The values inside ``nn.Partitioned`` boxes, with no sharding constraint applied.

  ``nn.unbox`` applies each box's constraint whenever a mesh is set (``jax.set_mesh``), which
  outside ``jit`` fails on abstract values and plain arrays alike; this works in any context.
  """
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree_util.tree_map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x,
                                tree, is_leaf=is_box)

