"""The tokenizer evaluator: JSON record, metrics against hand computation, the FVD real-stats
cache, --mode=eval restore, and sharded (8 CPU devices) == single-device evaluation."""

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from larp_jax import checkpoint, visualize
from larp_jax import data as data_lib
from larp_jax.configs import demo
from larp_jax.evaluation import baselines
from larp_jax.evaluation import evaluator
from larp_jax.evaluation import fvd as fvd_lib
from larp_jax.tasks import tokenizer as tokenizer_task
from larp_jax.tasks.tokenizer import TokenizerTask
from larp_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = (
  'psnr',
  'ssim',
  'lpips',
  'fvd',
  'mse',
  'codebook_usage',
  'codebook_perplexity',
  'prior_top1',
  'prior_top5',
  'prior_ce',
  'num_clips',
  'step',
  'seconds',
  'seconds_per_clip',
  'protocol',
  'baselines',
  'baseline_clips',
)


def tiny_config(video_shape=(16, 16, 16), patch=(4, 8, 8), **eval_kw):
  c = demo.get_config('tiny')
  c.model.update(video_shape=video_shape, patch_size=patch)
  c.disc.update(patch_size=patch)
  c.batch_size = 4
  c.eval.update(
    dict(num_clips=6, batch_size=4, num_videos_to_show=2, fvd=False, lpips=False), **eval_kw
  )
  return c


def init_state(exp, seed=0):
  return jax.jit(lambda: nn.unbox(exp.boxed_init(seed)))()


def evaluate(task, params, workdir, step):
  """A fresh evaluator of ``task`` (its config as it is now) on ``params``."""
  ev = evaluator.Evaluator(
    task.config, task.model, task.mesh, task.rules, task.variable_shardings()[1]
  )
  return ev.evaluate({'params': params}, workdir, step)


class CountingExtractor:
  """Stand-in for the I3D (seconds per clip on CPU): a fixed random projection to 400-d."""

  calls = 0
  clips = 0

  def __init__(self, batch_size=8):
    del batch_size

  def __call__(self, videos):
    v = np.asarray(videos, np.float32).reshape(len(videos), -1)
    proj = np.random.default_rng(0).standard_normal((v.shape[1], fvd_lib.FEATURE_DIM))
    CountingExtractor.calls += 1
    CountingExtractor.clips += len(videos)
    return (v @ proj / math.sqrt(v.shape[1])).astype(np.float32)


def eval_clips(config, n):
  it = data_lib.get_dataset(
    config.data,
    'eval',
    video_shape=tuple(config.model.video_shape),
    batch_size=n,
    seed=int(config.seed),
  )
  batch = next(it)
  assert batch['mask'].all()
  return batch['video']


def test_evaluate_record_hand_metrics_fvd_cache_and_workdir(tmp_path, monkeypatch):
  monkeypatch.setattr(fvd_lib, 'I3DFeatureExtractor', CountingExtractor)
  CountingExtractor.calls = CountingExtractor.clips = 0
  config = tiny_config(fvd=True)
  # Teacher-forced prior without attention dropout: comparable to one full-batch model call.
  config.model.prior_attn_dropout_in_eval = False
  exp = tokenizer_task.build(config)
  state = init_state(exp)
  wd = str(tmp_path / 'run')

  m = evaluate(exp, state.params, wd, 0)

  # --- the JSON record
  with open(os.path.join(wd, 'eval', '0.json')) as f:
    rec = json.load(f)
  assert set(REQUIRED) <= set(rec)
  assert rec['lpips'] is None and 'lpips' not in m  # off in this config: no number
  for k in REQUIRED:
    if k not in ('lpips', 'protocol', 'baselines'):
      assert math.isfinite(rec[k]), (k, rec[k])
  assert rec['num_clips'] == 6 and rec['step'] == 0
  p = rec['protocol']
  assert p['quantization'] == 'argmax' and p['n_clips'] == 6 and p['num_frames'] == 16
  assert p['resolution'] == [16, 16] and p['seed'] == config.seed and p['split'] == 'test'
  assert p['i3d'] == fvd_lib.I3D_NAME
  assert os.path.exists(os.path.join(wd, 'eval', '0_recon.png'))
  assert os.path.exists(os.path.join(wd, 'eval', '0_recon.mp4'))

  # --- metrics by hand from the model's own eval pass on the same 6 clips (one batch)
  video = eval_clips(config, 6)
  recon, aux = exp.model.apply(
    {'params': state.params},
    video,
    train=False,
    rngs={'vq': jax.random.key(1), 'dropout': jax.random.key(2)},
  )
  recon = np.clip(np.asarray(recon, np.float64), 0, 1)
  mse = ((recon - video) ** 2).mean(axis=(1, 2, 3, 4))
  np.testing.assert_allclose(m['psnr'], np.mean(-10 * np.log10(mse)), rtol=1e-5)
  np.testing.assert_allclose(m['mse'], mse.mean(), rtol=1e-4)
  tokens = np.asarray(aux['tokens'])

  # --- baselines: on the same 6 clips (kept as uint8), in the JSON, the metrics and the summary
  ref = baselines.baseline_metrics(visualize.to_uint8(video), config.model.patch_size)
  assert rec['baseline_clips'] == rec['num_clips'] == ref['clips'] == 6 == m['baseline_clips']
  assert set(rec['baselines']) == set(baselines.names()) == set(ref['baselines'])
  for name, v in ref['baselines'].items():
    for k in ('psnr', 'mse'):
      assert rec['baselines'][name][k] == pytest.approx(v[k], rel=1e-9), (name, k)
      assert m[f'baseline_{name}_{k}'] == pytest.approx(v[k], rel=1e-9), (name, k)
  assert rec['baselines']['pca16']['components'] == 16
  assert p['baselines']['clips'] == 6 and p['baselines']['capped'] is False
  assert p['baselines']['patch_size'] == [4, 8, 8]
  summary = evaluator.format_summary(rec)
  assert summary == evaluator.format_summary(m)
  pmean = rec['baselines']['patch_mean']['psnr']
  assert f'patch-mean {pmean:.2f}' in summary and 'pca1/4/16 ' in summary
  counts = np.bincount(tokens.ravel(), minlength=64)
  probs = counts[counts > 0] / counts.sum()
  assert m['codebook_usage'] == pytest.approx(np.mean(counts > 0))
  assert m['codebook_perplexity'] == pytest.approx(np.exp(-(probs * np.log(probs)).sum()), rel=1e-6)
  for k, ak in (
    ('prior_top1', 'prior_top1'),
    ('prior_top5', 'prior_top5'),
    ('prior_ce', 'prior_ce_round1'),
  ):
    assert m[k] == pytest.approx(float(aux[ak]), rel=1e-5, abs=1e-6), k

  # --- FVD: real stats computed once (real + fake clips went through the extractor) and cached
  assert CountingExtractor.clips == 12
  cache = os.listdir(os.path.join(wd, 'fvd_cache'))
  assert len(cache) == 1 and cache[0].startswith('fvd_stats_')
  assert fvd_lib.FeatureStats.load(os.path.join(wd, 'fvd_cache', cache[0])).n == 6

  # --- --mode=eval: no checkpoint -> ValueError; then the latest checkpoint is evaluated,
  # reusing the cached real stats (only the 6 reconstructions go through the extractor).
  with pytest.raises(ValueError, match='no checkpoint'):
    loop.evaluate_run(TokenizerTask, config, wd)
  mngr = checkpoint.manager(wd, async_save=False)
  checkpoint.save(mngr, 3, state.replace(step=np.int32(3)), force=True)
  checkpoint.save(mngr, 7, state.replace(step=np.int32(7)), force=True)
  mngr.close()
  out = loop.evaluate_run(TokenizerTask, config, wd)
  assert CountingExtractor.clips == 18
  assert 'step 7' in out['summary'] and os.path.exists(os.path.join(wd, 'eval', '7.json'))
  for k in ('psnr', 'ssim', 'mse', 'fvd', 'codebook_usage', 'prior_ce'):
    assert out[k] == pytest.approx(m[k], rel=1e-5, abs=1e-6), k


def test_evaluate_workdir_without_checkpoint(tmp_path):
  config = tiny_config()
  with pytest.raises(ValueError, match='no checkpoint'):
    loop.evaluate_run(TokenizerTask, config, str(tmp_path / 'empty'))
  assert not os.path.exists(tmp_path / 'empty')  # nothing created by a failed eval


def test_short_clips_skip_fvd(tmp_path, monkeypatch):
  monkeypatch.setattr(fvd_lib, 'I3DFeatureExtractor', CountingExtractor)
  CountingExtractor.calls = 0
  config = tiny_config(
    video_shape=(4, 16, 16),
    patch=(2, 8, 8),
    fvd=True,
    num_clips=2,
    batch_size=2,
    num_videos_to_show=0,
  )
  exp = tokenizer_task.build(config)
  m = evaluate(exp, init_state(exp).params, str(tmp_path), 1)
  with open(tmp_path / 'eval' / '1.json') as f:
    rec = json.load(f)
  assert rec['fvd'] is None and 'fvd' not in m and CountingExtractor.calls == 0
  assert rec['num_clips'] == 2 and math.isfinite(rec['psnr'])


_SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update('jax_disable_most_optimizations', True)
    assert jax.device_count() == 8, jax.devices()
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import flax.linen as nn
    from larp_jax.tasks import tokenizer as tokenizer_task
    from test_evaluator import evaluate, tiny_config

    out = {{}}
    params = None
    for name, data, devices, eval_bs in (('single', 1, jax.devices()[:1], 4),
                                         ('sharded', 8, jax.devices(), 4)):
      c = tiny_config(video_shape=(4, 16, 16), patch=(2, 8, 8), lpips=True, num_clips=6,
                      batch_size=eval_bs, num_videos_to_show=0)
      c.mesh.data = data
      c.batch_size = 8
      exp = tokenizer_task.build(c, devices=devices)
      if params is None:
        params = jax.device_get(nn.unbox(exp.boxed_init(0)).params)
      m = evaluate(exp, params, {wd!r} + '/' + name, 0)
      out[name] = m
    print('RESULT' + json.dumps(out))
""")


def test_sharded_eval_equals_single_device(tmp_path):
  code = _SHARDED.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), wd=str(tmp_path))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  r = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
  )
  assert r.returncode == 0, r.stderr[-4000:]
  line = [l for l in r.stdout.splitlines() if l.startswith('RESULT')][-1]
  res = json.loads(line[len('RESULT') :])
  single, sharded = res['single'], res['sharded']
  assert single['num_clips'] == sharded['num_clips'] == 6
  for k in (
    'psnr',
    'ssim',
    'lpips',
    'mse',
    'codebook_usage',
    'codebook_perplexity',
    'prior_top1',
    'prior_top5',
    'prior_ce',
    'baseline_clips',
    'baseline_clip_mean_psnr',
    'baseline_pca16_mse',
  ):
    assert abs(single[k] - sharded[k]) <= 1e-5 * max(1.0, abs(single[k])), (
      k,
      single[k],
      sharded[k],
    )


def test_recon_png_header():
  rng = np.random.default_rng(0)
  a, b = rng.random((2, 2, 4, 8, 8, 3))
  header = ['tokenizer 15.20 dB', 'baselines: clip-mean colour 18.10 | PCA-1/4/16 1/2/3 dB']
  with tempfile.TemporaryDirectory() as d:
    visualize.write_reconstructions(d, 'plain', a, b)
    paths = visualize.write_reconstructions(d, 'head', a, b, header=header)
    plain = np.asarray(Image.open(os.path.join(d, 'plain.png')))
    head = np.asarray(Image.open(paths['png']))
    assert os.path.getsize(paths['mp4']) > 0
  top = head.shape[0] - plain.shape[0]
  assert top > 20 and head.shape[1] == max(plain.shape[1], visualize.HEADER_MIN_WIDTH)
  np.testing.assert_array_equal(head[top:, : plain.shape[1]], plain)  # the frames, unchanged
  assert (head[:top] < 100).any() and (head[:top] == 255).mean() > 0.5  # dark text on white
  lines = evaluator.recon_header(
    {
      'step': 3,
      'num_clips': 6,
      'psnr': 15.2,
      'baseline_clips': 6,
      'baselines': {'clip_mean': {'psnr': 18.1}, 'pca4': {'psnr': 20}, 'pca16': {'psnr': 21}},
    }
  )
  assert lines[0] == 'step 3, 6 eval clips: PSNR tokenizer 15.20 dB'
  assert lines[1].startswith(
    'baselines (same 6 clips): clip-mean colour 18.10 | PCA-4/16 20.00/21.00 dB'
  )
  assert lines[2].endswith('frames in time order, left to right')


def _clip_mean_forward(module, video):
  """A stand-in tokenizer whose reconstruction is each clip's mean colour."""
  recon = jnp.broadcast_to(jnp.mean(video, axis=(1, 2, 3), keepdims=True), video.shape)
  return recon, jnp.zeros((video.shape[0], module.num_latent_tokens), jnp.int32), {}


def test_baselines_cap_off_and_clip_mean_model(tmp_path, monkeypatch):
  monkeypatch.setattr(evaluator, '_eval_forward', _clip_mean_forward)
  config = tiny_config(
    video_shape=(4, 16, 16),
    patch=(2, 8, 8),
    num_clips=6,
    batch_size=4,
    num_videos_to_show=2,
    baseline_max_clips=5,
  )
  exp = tokenizer_task.build(config)
  params = init_state(exp).params
  clips = np.asarray(eval_clips(config, 6))

  def run(step):
    m = evaluate(exp, params, str(tmp_path), step)
    with open(tmp_path / 'eval' / f'{step}.json') as f:
      return m, json.load(f)

  # Capped at 5 of the 6 clips (4 from the first batch, 1 from the second).
  m, rec = run(1)
  assert rec['num_clips'] == 6 and rec['baseline_clips'] == 5 and m['baseline_clips'] == 5
  assert rec['protocol']['baselines']['capped'] is True
  ref = baselines.baseline_metrics(visualize.to_uint8(clips[:5]), (2, 8, 8))['baselines']
  for name, v in ref.items():
    assert rec['baselines'][name]['psnr'] == pytest.approx(v['psnr'], rel=1e-9), name

  # 0 switches them off: null in the JSON, absent from the metrics and the summary.
  exp.config.eval.baseline_max_clips = 0
  m, rec = run(2)
  assert rec['baselines'] is None and rec['baseline_clips'] is None
  assert not any(k.startswith('baseline') for k in m)
  assert 'baseline' not in evaluator.format_summary(rec)

  # Default cap (512): all 6 clips. A tokenizer that outputs the clip mean scores what the
  # clip-mean baseline scores (up to the baselines' 8-bit rounding of the clips).
  del exp.config.eval['baseline_max_clips']
  m, rec = run(3)
  assert rec['baseline_clips'] == 6 and rec['protocol']['baselines']['max_clips'] == 512
  exact = baselines.baseline_metrics(clips, (2, 8, 8))['baselines']['clip_mean']
  assert m['psnr'] == pytest.approx(exact['psnr'], rel=1e-5)
  assert m['mse'] == pytest.approx(exact['mse'], rel=1e-5)
  assert abs(m['psnr'] - m['baseline_clip_mean_psnr']) < 0.02
  assert m['mse'] == pytest.approx(m['baseline_clip_mean_mse'], rel=1e-2)
  assert abs(m['psnr'] - m['baseline_patch_mean_psnr']) > 0.1
