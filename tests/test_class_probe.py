"""The synthetic-class probe behind the generator's class-accuracy figure: it learns the classes,
its counts equal hand-counted predictions, it is trained once per data setting (cached, key
checked) and it refuses data without synthetic labels."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from larp_jax import errors
from larp_jax.configs import demo
from larp_jax.evaluation import class_probe


def data_cfg(**overrides):
  c = demo.get_config('tiny').data
  c.update(synthetic_num_train=64, synthetic_num_eval=8, **overrides)
  return c


class FirstPixelColour(nn.Module):
  """Predicts the brightest channel of the first pixel (3 classes)."""

  @nn.compact
  def __call__(self, video):
    return video[:, 0, 0, 0, :]


def test_counts_equal_hand_counted_predictions():
  counter = class_probe.ProbeCounter(FirstPixelColour(), {}, batch_size=2)
  videos = np.zeros((5, 2, 2, 2, 3), np.float32)
  for i, c in enumerate([0, 1, 2, 2, 1]):
    videos[i, 0, 0, 0, c] = 1.0
  counter.add('a', videos, np.array([0, 1, 0, 2, 0]))  # 3 of 5 right
  counter.add('a', videos[:1], np.array([0]))  # 4 of 6
  counter.add('b', videos[:0], np.zeros((0,), np.int32))
  assert counter.correct == {'a': 4, 'b': 0} and counter.total == {'a': 6, 'b': 0}
  assert class_probe.accuracies(counter.correct, counter.total) == {'a': 4 / 6, 'b': 0.0}


def test_the_probe_learns_the_motion_classes():
  """At the demo's clip size a short training (200 of the default 1500 steps) tells two motion
  classes (left-right against up-down bouncing) apart on held-out clips, far above chance."""
  from larp_jax.data import pipeline as data_lib

  cfg = demo.get_config().data
  cfg.update(synthetic_num_classes=2)
  shape = (16, 32, 32)
  settings = class_probe.ProbeSettings(steps=200, batch_size=16, lr=3e-3)
  model, variables, train_acc = class_probe.train_probe(cfg, shape, settings)
  counter = class_probe.ProbeCounter(model, variables)
  with data_lib.get_dataset(cfg, 'eval', shape, batch_size=64, seed=0) as it:
    batch = next(iter(it))
  counter.add('eval', batch['video'], batch['label'])
  acc = class_probe.accuracies(counter.correct, counter.total)['eval']
  assert acc >= 0.75, (acc, train_acc)  # chance 0.5; 64 clips


def test_trained_once_per_data_setting_and_the_key_is_checked(tmp_path, monkeypatch):
  cfg = data_cfg()
  shape = (4, 16, 16)
  settings = class_probe.ProbeSettings(steps=2, batch_size=4)
  _, v1 = class_probe.cached_probe(cfg, shape, settings, str(tmp_path))
  files = sorted(p.name for p in tmp_path.iterdir())
  assert len(files) == 1 and files[0].startswith('probe_')

  def no_training(*a, **k):
    raise AssertionError('trained again')

  monkeypatch.setattr(class_probe, 'train_probe', no_training)
  _, v2 = class_probe.cached_probe(cfg, shape, settings, str(tmp_path))
  leaves = lambda v: [np.asarray(x) for x in __import__('jax').tree_util.tree_leaves(v)]
  for a, b in zip(leaves(v1), leaves(v2), strict=True):
    np.testing.assert_array_equal(a, b)
  # another style, size or training setting is another probe
  for other in (
    (data_cfg(synthetic_style='simple'), shape, settings),
    (cfg, (4, 32, 32), settings),
    (cfg, shape, class_probe.ProbeSettings(steps=3, batch_size=4)),
  ):
    with pytest.raises(AssertionError, match='trained again'):
      class_probe.cached_probe(*other, str(tmp_path))
  # a file whose stored key is not the one it is named for is refused
  import flax.serialization

  path = tmp_path / files[0]
  stored = flax.serialization.msgpack_restore(path.read_bytes())
  stored['key']['video_shape'] = [9, 9, 9]
  path.write_bytes(flax.serialization.msgpack_serialize(stored))
  with pytest.raises(RuntimeError, match='was trained for'):
    class_probe.cached_probe(cfg, shape, settings, str(tmp_path))


def test_training_is_deterministic_for_a_seed():
  cfg = data_cfg()
  s = class_probe.ProbeSettings(steps=3, batch_size=4, seed=5)
  _, a, _ = class_probe.train_probe(cfg, (4, 16, 16), s)
  _, b, _ = class_probe.train_probe(cfg, (4, 16, 16), s)
  x = jnp.asarray(a['params']['Dense_0']['kernel'])
  np.testing.assert_array_equal(x, b['params']['Dense_0']['kernel'])


def test_data_without_synthetic_labels_and_unknown_settings_are_refused():
  with pytest.raises(errors.ConfigError, match='needs the synthetic data source'):
    class_probe.check_supported(data_cfg(source='folder'))
  with pytest.raises(errors.ConfigError, match=r"unknown fields \['stpes'\]"):
    class_probe.ProbeSettings.from_config({'stpes': 3})
  assert class_probe.ProbeSettings.from_config({'steps': 3}).steps == 3
