"""The AR generator task through the shared loop: training on a frozen tokenizer's tokens (encoded
inside the step), evaluation (held-out NLL, samples, gFVD plumbing), --mode=sample, the params
export, frame prediction, AdamW's decay mask, and the config mistakes caught before compiling."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from larp_jax import errors, params_io, tokenize
from larp_jax.configs import demo, ucf101_ar
from larp_jax.evaluation import class_probe
from larp_jax.evaluation import fvd as fvd_lib
from larp_jax.generation import evaluate as evaluate_lib
from larp_jax.tasks import generator as gen_task
from larp_jax.tasks import tokenizer as tok_task
from larp_jax.train import loop, optim


def tok_config():
  c = demo.get_config('tiny')
  c.loss.lpips_weight = 0.0
  c.data.update(synthetic_num_train=24, synthetic_num_eval=8)
  return c


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
  """A tiny tokenizer's params directory (freshly initialised: what the generator needs from it
  is a fixed encoder and decoder), shared by the tests of this file."""
  d = str(tmp_path_factory.mktemp('tok') / 'params')
  c = tok_config()
  model = tok_task.make_model(c.model)
  variables = jax.jit(lambda: nn.unbox(tok_task.boxed_variables(model, 0)))()
  params_io.save(d, variables, config=c, step=0, task='tokenizer')
  return d


def gen_config(tokenizer_dir, **overrides):
  tok = tok_config()
  c = ucf101_ar.get_config('tiny')
  c.tokenizer = tok
  c.data = tok.data
  c.tokenizer_path = tokenizer_dir
  c.model.num_classes = int(tok.data.synthetic_num_classes)
  for k, v in overrides.items():
    node = c
    *head, last = k.split('.')
    for h in head:
      node = node[h]
    node[last] = v
  return c


def test_trains_from_a_token_dataset_evaluates_samples_and_exports(tokenizer_dir, tmp_path):
  tokens_dir = str(tmp_path / 'tokens')
  tokenize.tokenize(tokenizer_dir, tok_config(), tokens_dir, batch_size=8, shard_size=8)
  c = gen_config(tokenizer_dir, total_steps=30, eval_every=30, log_every=10, checkpoint_every=30)
  c.tokens_dir = tokens_dir
  c.optim.lr = 3e-3
  c.model.update(class_dropout=0.1, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
  c.model.dtype = 'float32'
  c.sample.cfg_scale = 1.5
  wd = str(tmp_path / 'ar')
  loop.run(gen_task.GeneratorTask, c, wd)
  lines = [json.loads(x) for x in open(os.path.join(wd, 'metrics.jsonl'))]
  n_codes = c.model.vocab_size
  # zero-initialised head: the first loss is the uniform distribution's; then it learns
  assert abs(lines[0]['loss'] - np.log(n_codes)) < 1e-3
  assert lines[-1]['loss'] < lines[0]['loss'] - 0.5, lines
  rec = json.load(open(os.path.join(wd, 'eval', '30.json')))
  assert rec['token_nll'] < np.log(n_codes) and 0 <= rec['token_top1'] <= 1
  assert rec['sampling']['cfg_scale'] == 1.5
  for path in [rec['samples']['mp4'], *rec['samples']['png'].values()]:
    assert os.path.getsize(path) > 0
  toks = np.load(rec['samples']['tokens'])
  assert toks['tokens'].shape == (2, c.model.seq_len) and toks['tokens'].max() < n_codes
  assert np.all(toks['logprobs'] <= 0)
  info = params_io.read_info(os.path.join(wd, 'params'))
  assert info['task'] == 'generator' and info['step'] == 30
  # --mode=sample from the params directory and from the run directory: the same samples
  out_a = loop.sample_run(gen_task.GeneratorTask, c, os.path.join(wd, 'params'))
  out_b = loop.sample_run(gen_task.GeneratorTask, c, wd)
  a = np.load(out_a['files']['tokens'])['tokens']
  b = np.load(out_b['files']['tokens'])['tokens']
  np.testing.assert_array_equal(a, b)


def test_frame_prediction_trains_and_samples_from_a_prefix(tokenizer_dir, tmp_path):
  c = gen_config(tokenizer_dir, eval_every=4)
  c.model.frame_prediction = True
  c.sample.cfg_scale = 1.0
  c.num_cond_frames = 1
  wd = str(tmp_path / 'fp')
  metrics = loop.run(gen_task.GeneratorTask, c, wd)
  assert np.isfinite(metrics['loss'])
  rec = json.load(open(os.path.join(wd, 'eval', '4.json')))
  assert np.isfinite(rec['token_nll'])
  assert os.path.exists(rec['samples']['mp4'])


def test_gfvd_pairs_each_sample_with_a_real_clip_and_caches_the_reals(
  tokenizer_dir, tmp_path, monkeypatch
):
  """The gFVD plumbing with a stand-in feature extractor (I3D needs 9+ frames and seconds a
  clip): as many fakes as reals, the labels of the real clips, the real statistics cached by
  protocol, the protocol and sampling settings recorded."""
  monkeypatch.setattr(fvd_lib, 'MIN_FRAMES', 1)
  calls = []

  def fake_features(videos):
    videos = np.asarray(videos, np.float32)
    calls.append(len(videos))
    f = np.concatenate([videos.mean((1, 2, 3)), videos.std((1, 2, 3))], axis=1)
    return np.tile(f, (1, 400 // f.shape[1] + 1))[:, :400].astype(np.float32)

  c = gen_config(tokenizer_dir)
  task = gen_task.build(c)
  ev = evaluate_lib.GeneratorEvaluator(task)
  ev._extractor = fake_features
  params = jax.jit(lambda: nn.unbox(task.boxed_params(0)))()
  st = evaluate_lib.SampleSettings(batch_size=2, seed=3)
  out = ev.gfvd(params, num_samples=5, settings=st, workdir=str(tmp_path))
  assert out['gfvd_samples'] == 5 and np.isfinite(out['gfvd']) and out['gfvd'] >= 0
  assert out['gfvd_protocol']['split'] == c.data.train_split
  assert out['gfvd_protocol']['sampling']['seed'] == 3
  assert 0 < out['sample_nll'] < 20
  assert sum(calls) == 10  # 5 fakes + 5 reals
  calls.clear()
  again = ev.gfvd(params, num_samples=5, settings=st, workdir=str(tmp_path))
  assert sum(calls) == 5  # the reals came from the cache
  assert again['gfvd'] == pytest.approx(out['gfvd'], rel=1e-6)


def test_class_accuracy_scores_eval_clips_their_reconstructions_and_samples_of_their_labels(
  tokenizer_dir, tmp_path, monkeypatch
):
  """The class-accuracy pass: the first eval clips, the tokenizer's reconstructions of exactly
  those clips and samples conditioned on their labels go to the probe; the accuracies are the
  probe's hand-counted hits; the probe is trained once and then read from the cache."""
  from larp_jax import data as data_lib

  c = gen_config(tokenizer_dir)
  c.eval.class_probe.update(steps=2, batch_size=4)
  task = gen_task.build(c)
  ev = evaluate_lib.GeneratorEvaluator(task)
  params = jax.jit(lambda: nn.unbox(task.boxed_params(0)))()
  seen = {}
  add = class_probe.ProbeCounter.add

  def spy(self, name, videos, labels):
    seen.setdefault(name, []).append((np.asarray(videos), np.asarray(labels)))
    add(self, name, videos, labels)

  monkeypatch.setattr(class_probe.ProbeCounter, 'add', spy)
  st = evaluate_lib.SampleSettings(batch_size=2, seed=3)
  out = ev.class_accuracy(params, num_clips=5, settings=st, workdir=str(tmp_path))
  cat = lambda name, i: np.concatenate([x[i] for x in seen[name]])
  shape = task.tokenizer.video_shape
  with data_lib.get_dataset(c.data, 'eval', shape, batch_size=5, seed=0) as it:
    first = next(iter(it))
  np.testing.assert_allclose(cat('real', 0), first['video'], atol=1e-6)
  for name in ('real', 'recon', 'samples'):
    np.testing.assert_array_equal(cat(name, 1), first['label'])
  np.testing.assert_allclose(cat('recon', 0), ev.reconstruct(first['video']), atol=1e-5)
  assert cat('samples', 0).shape == first['video'].shape
  assert out['class_accuracy_clips'] == 5
  assert out['class_accuracy_chance'] == pytest.approx(1 / task.num_classes)
  model, variables = class_probe.cached_probe(
    c.data, shape, class_probe.ProbeSettings(steps=2, batch_size=4), str(tmp_path / 'fvd_cache')
  )
  counter = class_probe.ProbeCounter(model, variables)
  for name in ('real', 'recon', 'samples'):
    hits = (counter.predict(cat(name, 0)) == first['label']).sum()
    assert out[f'class_accuracy_{name}'] == pytest.approx(hits / 5)
  monkeypatch.setattr(class_probe, 'train_probe', lambda *a, **k: 1 / 0)
  again = ev.class_accuracy(params, num_clips=5, settings=st, workdir=str(tmp_path))
  assert again['class_accuracy_samples'] == out['class_accuracy_samples']


def test_adamw_decays_dense_kernels_only():
  params = {
    'layers_0': {'attention': {'wqkv': {'kernel': jnp.ones((2, 6))}}},
    'tok_embeddings': {'embedding': jnp.ones((4, 2))},
    'abs_pe': jnp.ones((1, 3, 2)),
    'norm': {'weight': jnp.ones((2,))},
  }
  mask = optim.decay_mask(params)
  assert mask['layers_0']['attention']['wqkv']['kernel'] is True
  assert not mask['tok_embeddings']['embedding'] and not mask['abs_pe']
  assert not mask['norm']['weight']
  cfg = ucf101_ar.get_config('tiny').optim
  cfg.update(lr=0.1, weight_decay=0.5, warmup_steps=0, start_lr_mult=1.0, min_lr_mult=1.0)
  tx = optim.adamw_optimizer(cfg, total_steps=10)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # zero gradients: only the decay moves a weight, by -lr * wd * w = -0.05
  np.testing.assert_allclose(updates['layers_0']['attention']['wqkv']['kernel'], -0.05)
  np.testing.assert_allclose(updates['tok_embeddings']['embedding'], 0.0)
  np.testing.assert_allclose(updates['abs_pe'], 0.0)
  assert optax.tree.norm(updates['norm']) == 0


def test_config_mistakes_are_caught_before_compiling(tokenizer_dir):
  with pytest.raises(errors.ConfigError, match='vocab_size=99 but the tokenizer has 64 codes'):
    gen_task.build(gen_config(tokenizer_dir, **{'model.vocab_size': 99}))
  with pytest.raises(errors.ConfigError, match='seq_len=3 but the tokenizer writes 8 tokens'):
    gen_task.build(gen_config(tokenizer_dir, **{'model.seq_len': 3}))
  with pytest.raises(errors.ConfigError, match='class dropout'):
    gen_task.build(
      gen_config(tokenizer_dir, **{'model.class_dropout': 0.0, 'sample.cfg_scale': 2.0})
    )
  with pytest.raises(errors.ConfigError, match='tokens_dir'):
    gen_task.build(gen_config('', **{'tokenizer_path': ''}))
  with pytest.raises(errors.ConfigError, match='no_such_arg'):
    gen_task.build(gen_config(tokenizer_dir, **{'model.no_such_arg': 1}))
  with pytest.raises(errors.ConfigError, match='needs the synthetic data source'):
    gen_task.build(
      gen_config(tokenizer_dir, **{'eval.class_accuracy_clips': 4, 'data.source': 'folder'})
    )
  with pytest.raises(errors.ConfigError, match='class-conditional generators'):
    gen_task.build(
      gen_config(tokenizer_dir, **{'eval.class_accuracy_clips': 4, 'model.frame_prediction': True})
    )


def test_a_token_dataset_of_another_tokenizer_is_refused_before_training(tokenizer_dir, tmp_path):
  tokens_dir = str(tmp_path / 'tokens')
  tokenize.tokenize(tokenizer_dir, tok_config(), tokens_dir, split='eval', batch_size=8)
  other = str(tmp_path / 'other')
  c = tok_config()
  model = tok_task.make_model(c.model)
  params_io.save(
    other,
    jax.jit(lambda: nn.unbox(tok_task.boxed_variables(model, 1)))(),
    config=c,
    step=0,
    task='tokenizer',
  )
  task = gen_task.build(gen_config(other, tokens_dir=tokens_dir))
  with pytest.raises(errors.ConfigError, match='was written by the tokenizer'):
    task.extras()
