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
    ('demo', 'long'),
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


def test_the_demo_recipe_and_its_long_run():
  """The switches that make the demo learn (issue #19) are on; the UCF101 recipe keeps the
  released values; ``long`` is the learning-curve run and ``steps`` still overrides either."""
  c = demo.get_config()
  assert (c.total_steps, c.model.num_latent_tokens, c.eval_every) == (1500, 128, 1500)
  assert c.model.bottleneck_norm == 'bn_b' and c.model.vq_entropy_weight == 0.01
  assert (c.model.codebook_size, c.loss.lpips_weight) == (2048, 0.3)
  assert c.model.query_patch_skip and c.model.latent_patch_skip
  assert c.eval.fvd and c.loss.lpips_weight > 0 and c.loss.gan_weight > 0 and c.model.use_prior
  long = demo.get_config('long')
  assert (long.total_steps, long.model.num_latent_tokens, long.eval_every) == (5000, 512, 500)
  assert (long.loss.l2_weight, c.loss.l2_weight) == (5.0, 0.0)
  assert long.model.patch_skip_proj and not demo.get_config().model.patch_skip_proj
  assert (
    long.model.bottleneck_norm_freeze_step,
    demo.get_config().model.bottleneck_norm_freeze_step,
  ) == (1000, 0)
  assert not long.eval.fvd
  assert (long.model.codebook_size, long.loss.lpips_weight) == (2048, 0.3)  # the demo's
  assert demo.get_config('long,steps=700').total_steps == 700
  assert demo.get_config('steps=50').optim.warmup_steps == 2
  u = ucf101.get_config().model
  assert (u.bottleneck_norm, u.vq_entropy_weight, u.query_patch_skip, u.latent_patch_skip) == (
    'none',
    0.0,
    False,
    False,
  )
