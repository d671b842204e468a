"""Configs live in the package; configs/*.py at the top level load the same configs by path."""

import os

import pytest

from larp_jax import config_lib
from larp_jax.configs import bench, common, demo, ucf101
from tests.conftest import ROOT


@pytest.mark.parametrize(
  'name,arg',
  [
    ('ucf101', 'size=B,source=folder'),
    ('demo', 'steps=50'),
    ('bench', 'micro'),
    ('demo', 'tiny'),
    ('ucf101', 'tiny'),
  ],
)
def test_top_level_files_give_the_package_configs(name, arg):
  module = {'ucf101': ucf101, 'demo': demo, 'bench': bench}[name]
  by_path = config_lib.load_config(os.path.join(ROOT, 'configs', f'{name}.py') + ':' + arg)
  assert by_path.to_dict() == module.get_config(arg).to_dict()


def test_tiny_gives_the_shared_test_model():
  for c in (demo.get_config('tiny'), ucf101.get_config('tiny')):
    for k, v in common.TINY_MODEL.items():
      assert tuple(c.model[k]) == v if isinstance(v, tuple) else c.model[k] == v, k
    assert tuple(c.model.video_shape) == common.TINY_VIDEO_SHAPE
    assert c.total_steps == 4 and c.batch_size == 2 and c.eval_every == 0
  assert demo.get_config('tiny').loss.lpips_net == 'alex'  # the demo's choices are kept
  assert demo.get_config().model.width == 128  # and untouched without tiny


def test_stage_configs_embed_others_by_calling_get_config():
  assert demo.get_config().data.source == 'synthetic'
  assert demo.get_config().task == ucf101.get_config().task == 'tokenizer'
  assert bench.get_config('larp_l').model.width == ucf101.get_config().model.width
