"""The device mesh: mesh_utils layouts, one -1 axis, and clear errors instead of a silent reshape."""

import jax
import pytest

from larp_jax import errors, sharding
from tests.conftest import run_result_script


def test_mesh_shape_arithmetic():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 1}, 8) == {
    'data': 4,
    'fsdp': 2,
    'tensor': 1,
  }
  with pytest.raises(errors.ConfigError, match='at most one -1'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1}, 8)
  with pytest.raises(errors.ConfigError, match='does not divide the 8 devices'):
    sharding.mesh_shape({'data': -1, 'fsdp': 3}, 8)
  with pytest.raises(errors.ConfigError, match='has 2 devices but 8 are available'):
    sharding.mesh_shape({'data': 2, 'fsdp': 1}, 8)
  with pytest.raises(errors.ConfigError, match='positive or -1'):
    sharding.mesh_shape({'data': 0}, 8)


def test_make_mesh_one_device_and_unknown_axes():
  mesh = sharding.make_mesh({'data': -1}, jax.devices()[:1])
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  with pytest.raises(errors.ConfigError, match=r"unknown axes \['model'\]"):
    sharding.make_mesh({'data': -1, 'model': 1})


def test_make_mesh_on_eight_devices():
  out = run_result_script(
    """
import json, jax
from larp_jax import errors, sharding
out = {}
for name, cfg in (('dp', {'data': -1}), ('fsdp', {'data': 2, 'fsdp': -1}),
                  ('tp', {'data': 2, 'fsdp': 2, 'tensor': 2})):
  m = sharding.make_mesh(cfg)
  out[name] = [dict(m.shape), sorted(d.id for d in m.devices.flat)]
try:
  sharding.make_mesh({'data': 3, 'fsdp': -1})
except errors.ConfigError as e:
  out['error'] = str(e)
print('RESULT' + json.dumps(out))
""",
    timeout=120,
    XLA_FLAGS='--xla_force_host_platform_device_count=8',
  )
  assert out['dp'][0] == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert out['fsdp'][0] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert out['tp'][0] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert all(ids == list(range(8)) for _, ids in (out['dp'], out['fsdp'], out['tp']))
  assert 'does not divide the 8 devices' in out['error']
