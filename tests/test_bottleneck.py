"""Official bottleneck options: normalisations, entropy loss, temperature ramp and learned
temperature, VQ-loss warm-up (official models/bottleneck.py, trainers/larp_tokenizer_trainer.py).

Every option is checked against hand-computed values; the default model against the model with
every switch written out at its default; the batch norms for running statistics in eval and for
statistics of the global batch under a sharded ``jit``.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larp_jax import LARPTokenizer
from larp_jax.models import quantizer as q
from tests.conftest import ROOT, run_result_script, tiny_tokenizer_kwargs

EPS = 1e-5
DEFAULTS = dict(
  bottleneck_norm='none',
  vq_temperature=0.03,
  vq_temperature_learnable=False,
  vq_temperature_start=0.03,
  vq_temperature_ramp_steps=0,
  vq_entropy_weight=0.0,
  vq_entropy_temperature=0.01,
)
OPTIONS = {
  'bn_bn': dict(bottleneck_norm='bn_bn'),
  'bn_b': dict(bottleneck_norm='bn_b'),
  'ln_d': dict(bottleneck_norm='ln_d'),
  'ln_nd': dict(bottleneck_norm='ln_nd'),
  'ln_d_na': dict(bottleneck_norm='ln_d_na'),
  'entropy': dict(vq_entropy_weight=0.5),
  'ramp': dict(vq_temperature_start=1.0, vq_temperature_ramp_steps=10),
  'learnable': dict(vq_temperature_learnable=True, vq_temperature=0.1),
}


def rngs(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {'params': k[0], 'vq': k[1], 'dropout': k[2]}


def latents(shape=(3, 2, 4), seed=0):
  return 2.0 * jax.random.normal(jax.random.key(seed), shape) + 1.0


def init_model(model, batch=2, seed=0):
  video = jax.random.uniform(jax.random.key(seed + 100), (batch, *model.video_shape, 3))
  variables = nn.unbox(model.init(rngs(seed), video, train=True))
  params = variables['params']
  params['final_linear']['kernel'] = 0.1 * jax.random.normal(
    jax.random.key(9), params['final_linear']['kernel'].shape
  )
  return variables, video


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)))


# ---------------------------------------------------------------- normalisations


@pytest.mark.parametrize('kind', ['ln_d', 'ln_nd', 'ln_d_na'])
def test_layer_norms_match_hand_computed(kind):
  z = latents()
  norm = q.BottleneckNorm(kind)
  variables = nn.unbox(norm.init(jax.random.key(0), z, train=True))
  zz = np.asarray(z, np.float64)
  axes = (-2, -1) if kind == 'ln_nd' else (-1,)
  y = (zz - zz.mean(axes, keepdims=True)) / np.sqrt(zz.var(axes, keepdims=True) + EPS)
  if kind == 'ln_d_na':
    assert variables == {}  # no affine parameters
  else:
    shape = (2, 4) if kind == 'ln_nd' else (4,)
    assert variables['params']['scale'].shape == shape
    scale = 1.0 + 0.1 * np.arange(np.prod(shape)).reshape(shape)
    bias = -0.2 * np.arange(np.prod(shape)).reshape(shape)
    variables = {
      'params': {'scale': jnp.asarray(scale, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)}
    }
    y = y * scale + bias
  out = norm.apply(variables, z, train=True)
  np.testing.assert_allclose(out, y, atol=1e-5)
  # no batch statistics: eval is the same computation
  np.testing.assert_array_equal(norm.apply(variables, z, train=False), out)


def _rows(z, kind):
  """[B, N, d] -> [values, features]: the values each feature is normalised over."""
  z = np.asarray(z, np.float64)
  return z.reshape(-1, z.shape[-1]) if kind == 'bn_bn' else z.reshape(z.shape[0], -1)


@pytest.mark.parametrize('kind', ['bn_bn', 'bn_b'])
def test_batch_norms_match_hand_computed_and_update_running_stats(kind):
  z = latents()
  b, n, d = z.shape
  norm = q.BottleneckNorm(kind)
  variables = nn.unbox(norm.init(jax.random.key(0), z, train=True))
  feat = d if kind == 'bn_bn' else n * d
  assert variables['params']['scale'].shape == (feat,)
  # init leaves the torch initial statistics alone
  np.testing.assert_array_equal(variables['batch_stats']['mean'], np.zeros(feat))
  np.testing.assert_array_equal(variables['batch_stats']['var'], np.ones(feat))
  scale = 1.0 + 0.1 * np.arange(feat)
  bias = 0.05 * np.arange(feat)
  variables['params'] = {
    'scale': jnp.asarray(scale, jnp.float32),
    'bias': jnp.asarray(bias, jnp.float32),
  }

  rows = _rows(z, kind)
  count = rows.shape[0]  # 6 (B x N) or 3 (B)
  mean, var = rows.mean(0), rows.var(0)
  expected = ((rows - mean) / np.sqrt(var + EPS) * scale + bias).reshape(b, n, d)

  out, updates = norm.apply(variables, z, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(out, expected, atol=1e-5)
  stats = updates['batch_stats']
  np.testing.assert_allclose(stats['mean'], 0.1 * mean, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * var * count / (count - 1), atol=1e-5)

  # eval: the running statistics, nothing to mutate
  new = {'params': variables['params'], 'batch_stats': stats}
  ev = norm.apply(new, z, train=False)
  rm, rv = np.asarray(stats['mean']), np.asarray(stats['var'])
  ev_expected = ((rows - rm) / np.sqrt(rv + EPS) * scale + bias).reshape(b, n, d)
  np.testing.assert_allclose(ev, ev_expected, atol=1e-5)

  # a training apply must say that the statistics change (nothing is dropped silently)
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    norm.apply(new, z, train=True)


@pytest.mark.parametrize('kind', ['bn_bn', 'bn_b'])
def test_frozen_batch_norm_trains_on_running_stats_after_its_step(kind):
  z = latents()
  b, n, d = z.shape
  norm = q.BottleneckNorm(kind, freeze_step=2)
  variables = nn.unbox(norm.init(jax.random.key(0), z, train=True))
  feat = variables['params']['scale'].shape[0]
  stats = {
    'mean': jnp.asarray(0.3 * np.arange(feat), jnp.float32),
    'var': jnp.asarray(1.0 + 0.5 * np.arange(feat), jnp.float32),
  }
  variables = {'params': variables['params'], 'batch_stats': stats}
  rows = _rows(z, kind)
  mean, var = rows.mean(0), rows.var(0)
  rm, rv = np.asarray(stats['mean']), np.asarray(stats['var'])
  live = ((rows - mean) / np.sqrt(var + EPS)).reshape(b, n, d)
  frozen = ((rows - rm) / np.sqrt(rv + EPS)).reshape(b, n, d)
  for step, want, moved in ((2, live, True), (3, frozen, False), (None, live, True)):
    out, upd = norm.apply(variables, z, train=True, step=step, mutable=['batch_stats'])
    np.testing.assert_allclose(out, want, atol=1e-5, err_msg=f'step {step}')
    same = np.allclose(upd['batch_stats']['mean'], rm) and np.allclose(
      upd['batch_stats']['var'], rv
    )
    assert same != moved, f'step {step}: running statistics {"frozen" if same else "moved"}'
  # under jit with a traced step, the same switch
  f = jax.jit(lambda s: norm.apply(variables, z, train=True, step=s, mutable=['batch_stats']))
  np.testing.assert_allclose(f(jnp.int32(3))[0], frozen, atol=1e-5)
  np.testing.assert_allclose(f(jnp.int32(1))[0], live, atol=1e-5)


def test_batch_norm_over_the_batch_only_needs_two_clips():
  norm = q.BottleneckNorm('bn_b')
  z = latents((1, 2, 4))
  variables = norm.init(jax.random.key(0), z, train=True)  # init with one clip is fine
  with pytest.raises(ValueError, match='more than one value per channel'):
    norm.apply(variables, z, train=True, mutable=['batch_stats'])


@pytest.mark.parametrize('kind', ['bn_bn', 'bn_b'])
def test_batch_statistics_are_those_of_the_global_batch(kind):
  """What SyncBatchNorm computes on 4 GPUs of 2 clips each (count-weighted pooled moments) is
  what one call on the global batch of 8 computes, and differs from a device's own batch."""
  z = latents((8, 2, 4), seed=3)
  norm = q.BottleneckNorm(kind)
  variables = norm.init(jax.random.key(0), z, train=True)
  _, upd = norm.apply(variables, z, train=True, mutable=['batch_stats'])
  shards = [_rows(z[2 * i : 2 * i + 2], kind) for i in range(4)]
  counts = np.array([s.shape[0] for s in shards], np.float64)
  means = np.stack([s.mean(0) for s in shards])
  sq = np.stack([(s**2).mean(0) for s in shards])
  g_mean = (counts[:, None] * means).sum(0) / counts.sum()
  g_var = (counts[:, None] * sq).sum(0) / counts.sum() - g_mean**2
  n = counts.sum()
  np.testing.assert_allclose(upd['batch_stats']['mean'], 0.1 * g_mean, atol=1e-6)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 + 0.1 * g_var * n / (n - 1), atol=1e-5)
  _, local = norm.apply(variables, z[:2], train=True, mutable=['batch_stats'])
  assert not np.allclose(local['batch_stats']['mean'], upd['batch_stats']['mean'], atol=1e-3)


_MESH_SCRIPT = r"""
import os, sys, json
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, {root!r})
from larp_jax.models.quantizer import BottleneckNorm
mesh = Mesh(np.asarray(jax.devices()).reshape(8), ('data',))
z = 2.0 * jax.random.normal(jax.random.key(3), (16, 4, 8)) + 1.0
out = {{}}
for kind in ('bn_bn', 'bn_b'):
  norm = BottleneckNorm(kind)
  variables = norm.init(jax.random.key(0), z, train=True)
  f = jax.jit(lambda v, x: norm.apply(v, x, train=True, mutable=['batch_stats']))
  one = f(variables, z)
  zs = jax.device_put(z, NamedSharding(mesh, P('data')))
  rep = jax.device_put(variables, NamedSharding(mesh, P()))
  eight = f(rep, zs)
  hlo = f.lower(rep, zs).compile().as_text()
  out[kind] = dict(
      shards=len(zs.sharding.device_set),
      out=float(np.max(np.abs(np.asarray(one[0]) - np.asarray(eight[0])))),
      stats=float(max(np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in zip(
          jax.tree_util.tree_leaves(one[1]), jax.tree_util.tree_leaves(eight[1])))),
      all_reduce='all-reduce' in hlo)
print('RESULT' + json.dumps(out), flush=True)
os._exit(0)
"""


def test_batch_statistics_under_sharded_jit_match_one_device():
  """8 simulated devices, the batch sharded over them: plain jit gives the global statistics
  (the compiled program all-reduces), equal to the unsharded computation."""
  out = run_result_script(_MESH_SCRIPT.format(root=ROOT), timeout=300)
  for kind in ('bn_bn', 'bn_b'):
    assert out[kind]['shards'] == 8
    assert out[kind]['all_reduce'], kind
    assert out[kind]['out'] < 1e-5 and out[kind]['stats'] < 1e-6, out[kind]


# ---------------------------------------------------------------- entropy loss


def test_entropy_loss_matches_hand_computed():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  per_sample = -np.mean(np.sum(p * np.log(p), -1))
  pbar = p.mean(0)
  batch = -np.sum(pbar * np.log(pbar + 1e-5))
  loss, s, a = q.entropy_loss(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose([loss, s, a], [per_sample - batch, per_sample, batch], rtol=1e-5)


@pytest.mark.parametrize('deterministic', [False, True])
def test_entropy_loss_uses_cosine_over_its_temperature_and_joins_vq_loss(deterministic):
  """Runs with SVQ sampling too (the official code cannot: its affinity exists only in the
  non-stochastic branch)."""
  codebook = jnp.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
  z = jnp.array([[[1.0, 1.0]], [[2.0, 0.0]]])  # [B=2, N=1, d=2]
  cos = np.array([[0.5**0.5, 0.5**0.5, -(0.5**0.5)], [1.0, 0.0, -1.0]])
  losses = {}
  for w in (0.0, 0.3):
    vq = q.VectorQuantizer(3, 2, temperature=0.5, entropy_weight=w, entropy_temperature=0.2)
    _, aux = vq.apply(
      {'params': {'codebook': codebook}},
      z,
      deterministic=deterministic,
      rngs={'vq': jax.random.key(0)},
    )
    losses[w] = aux
  expected, _, _ = q.entropy_loss(jnp.asarray(cos / 0.2, jnp.float32))
  np.testing.assert_allclose(losses[0.3]['entropy_loss'], expected, rtol=1e-5)
  np.testing.assert_allclose(
    losses[0.3]['vq_loss'] - losses[0.0]['vq_loss'], 0.3 * expected, rtol=1e-5, atol=1e-6
  )
  assert 'entropy_loss' not in losses[0.0]


def test_entropy_loss_gradient_reaches_encoder_and_codebook():
  model = LARPTokenizer(**tiny_tokenizer_kwargs(vq_entropy_weight=1.0, use_prior=False))
  variables, video = init_model(model)
  g = jax.grad(
    lambda p: model.apply({'params': p}, video, train=True, rngs=rngs(1))[1]['entropy_loss']
  )(variables['params'])
  assert _norm(g['quantizer']) > 0 and _norm(g['encoder']) > 0 and _norm(g['in_linear']) > 0
  assert _norm(g['decoder']) == 0


# ---------------------------------------------------------------- temperature


def test_temperature_ramp_matches_hand_computed():
  t = [float(q.scheduled_temperature(s, 1.0, 0.1, 10)) for s in (0, 1, 5, 9, 10, 20)]
  np.testing.assert_allclose(t, [1.0, 0.91, 0.55, 0.19, 0.1, 0.1], rtol=1e-6)


def test_quantizer_follows_the_ramp_and_its_end_without_a_step():
  codebook = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  z = jnp.array([[[3.0, 4.0]]])
  cos = np.array([0.6, 0.8, -0.6])
  vq = q.VectorQuantizer(3, 2, temperature=0.1, temperature_start=1.0, temperature_ramp_steps=10)
  variables = {'params': {'codebook': codebook}}
  np.testing.assert_allclose(
    vq.apply(variables, z, 5, method=vq.logits)[0, 0], cos / 0.55, rtol=1e-5
  )
  np.testing.assert_allclose(vq.apply(variables, z, method=vq.logits)[0, 0], cos / 0.1, rtol=1e-5)
  _, aux = vq.apply(variables, z, deterministic=False, step=5, rngs={'vq': jax.random.key(0)})
  np.testing.assert_allclose(aux['vq_temperature'], 0.55, rtol=1e-6)
  # the tokenizer hands its step to the quantizer
  model = LARPTokenizer(**tiny_tokenizer_kwargs(**OPTIONS['ramp'], vq_temperature=0.1))
  variables, video = init_model(model)
  _, aux = model.apply(variables, video, train=True, step=5, rngs=rngs(1))
  np.testing.assert_allclose(aux['vq_temperature'], 0.55, rtol=1e-6)


def test_learnable_temperature_is_an_inverse_temperature_parameter():
  vq = q.VectorQuantizer(3, 2, temperature=0.1, learnable_temperature=True)
  z = jnp.array([[[3.0, 4.0]]])
  variables = nn.unbox(
    vq.init({'params': jax.random.key(0), 'vq': jax.random.key(1)}, z, deterministic=True)
  )
  assert float(variables['params']['inv_temperature']) == 10.0  # official init 10
  variables['params'] = {
    'codebook': jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]),
    'inv_temperature': jnp.float32(2.0),
  }
  np.testing.assert_allclose(
    vq.apply(variables, z, method=vq.logits)[0, 0], 2.0 * np.array([0.6, 0.8, -0.6]), rtol=1e-6
  )
  _, aux = vq.apply(variables, z, deterministic=True)
  np.testing.assert_allclose(aux['vq_temperature'], 0.5)


def test_no_loss_reaches_the_learnable_temperature():
  """As in the official code: the sampled index is not differentiable, so the temperature
  parameter gets a zero gradient from every loss (its torch .grad stays None)."""
  model = LARPTokenizer(**tiny_tokenizer_kwargs(**OPTIONS['learnable'], vq_entropy_weight=1.0))
  variables, video = init_model(model)

  def loss(p):
    recon, aux = model.apply({'params': p}, video, train=True, rngs=rngs(1), mix_ratio=0.5)
    return jnp.mean(jnp.abs(recon - video)) + aux['vq_loss'] + aux['prior_loss']

  g = jax.grad(loss)(variables['params'])
  assert float(g['quantizer']['inv_temperature']) == 0.0
  assert _norm(g['quantizer']['codebook']) > 0


# ---------------------------------------------------------------- VQ-loss warm-up


def test_vq_warmup_ratio_matches_hand_computed():
  r = lambda s, ratio, epochs: float(q.vq_warmup_ratio(s, ratio, epochs, 10))
  np.testing.assert_allclose(
    [r(s, 0.2, 3) for s in (1, 10, 11, 20, 21, 100)], [0.2, 0.2, 0.6, 0.6, 1.0, 1.0], rtol=1e-6
  )
  np.testing.assert_allclose([r(s, 0.5, 2) for s in (1, 10, 11)], [0.5, 0.5, 1.0])
  assert r(1, 0.0, 1) == 1.0  # the released '1.0_1' (and any E <= 1) is off


# ---------------------------------------------------------------- the tokenizer


def test_default_model_is_unchanged():
  base = LARPTokenizer(**tiny_tokenizer_kwargs())
  explicit = LARPTokenizer(**tiny_tokenizer_kwargs(**DEFAULTS))
  va, video = init_model(base)
  vb, _ = init_model(explicit)
  assert set(va) == {'params'} and set(vb) == {'params'}
  assert jax.tree_util.tree_structure(va) == jax.tree_util.tree_structure(vb)
  for a, b in zip(jax.tree_util.tree_leaves(va), jax.tree_util.tree_leaves(vb)):
    np.testing.assert_array_equal(a, b)
  for kw in (dict(train=True, mix_ratio=0.3), dict(train=True, step=7), dict(train=False)):
    ra, aa = base.apply(va, video, rngs=rngs(1), **kw)
    rb, ab = explicit.apply(va, video, rngs=rngs(1), **kw)
    np.testing.assert_array_equal(ra, rb)
    assert (
      set(aa)
      == set(ab)
      == {
        'tokens',
        'vq_loss',
        'commitment_loss',
        'codebook_loss',
        'codebook_usage',
        'codebook_perplexity',
        'prior_loss',
        'prior_top1',
        'prior_top5',
        'prior_ce_round1',
      }
    )
    for k in aa:
      np.testing.assert_array_equal(aa[k], ab[k], err_msg=k)


@pytest.mark.parametrize('kind', ['bn_bn', 'bn_b'])
def test_eval_uses_running_statistics(kind):
  model = LARPTokenizer(**tiny_tokenizer_kwargs(bottleneck_norm=kind))
  assert model.uses_batch_stats
  variables, video = init_model(model, batch=3)
  assert set(variables['batch_stats']['norm_layer']) == {'mean', 'var'}
  _, upd = model.apply(variables, video, train=True, rngs=rngs(1), mutable=['batch_stats'])
  variables = dict(variables, **upd)
  enc = lambda v, train, **kw: model.apply(
    variables, v, train=train, method=model.encode_latents, **kw
  )
  # eval: one clip's latents do not depend on the rest of the batch
  np.testing.assert_allclose(enc(video[:1], False), enc(video, False)[:1], atol=1e-5)
  # ... and are the pre-norm latents normalised with the running statistics
  stats = variables['batch_stats']['norm_layer']
  pre = LARPTokenizer(**tiny_tokenizer_kwargs()).apply(
    {'params': {k: v for k, v in variables['params'].items() if k != 'norm_layer'}},
    video[:1],
    method=LARPTokenizer.encode_latents,
  )
  p = variables['params']['norm_layer']
  x = pre.reshape(-1, model.code_dim) if kind == 'bn_bn' else pre.reshape(1, -1)
  want = (x - stats['mean']) / np.sqrt(stats['var'] + EPS) * p['scale'] + p['bias']
  np.testing.assert_allclose(enc(video[:1], False), want.reshape(pre.shape), atol=1e-5)
  # training: batch statistics, so the batch matters
  train_one = enc(video[:2], True, mutable=['batch_stats'])[0][:1]
  train_all = enc(video, True, mutable=['batch_stats'])[0][:1]
  assert not np.allclose(train_one, train_all, atol=1e-4)
  # the public encode / decode and the eval pass run with the statistics, immutably
  tokens = model.apply(variables, video, method=LARPTokenizer.encode)
  _, aux = model.apply(variables, video, train=False, rngs=rngs(2))
  np.testing.assert_array_equal(tokens, aux['tokens'])


@pytest.mark.parametrize('option', sorted(OPTIONS))
def test_gradients_pass_the_straight_through_estimator(option):
  model = LARPTokenizer(**tiny_tokenizer_kwargs(**OPTIONS[option]))
  variables, video = init_model(model)
  stats = {k: v for k, v in variables.items() if k != 'params'}
  mutable = ['batch_stats'] if model.uses_batch_stats else False

  def loss(p):
    out = model.apply(
      {'params': p, **stats}, video, train=True, rngs=rngs(7), step=3, mutable=mutable
    )
    recon = out[0][0] if mutable else out[0]
    return jnp.mean(jnp.abs(recon - video))

  g = jax.grad(loss)(variables['params'])
  for name in (
    'patch_embed',
    'encoder',
    'latent_queries',
    'in_linear',
    'out_linear',
    'decoder',
    'final_linear',
  ):
    assert _norm(g[name]) > 0, name
  if 'norm_layer' in g:
    assert _norm(g['norm_layer']) > 0
  assert _norm(g['quantizer']) == 0  # the codebook sees the recon loss only through sg()


@pytest.mark.parametrize(
  'overrides,match',
  [
    (dict(bottleneck_norm='bn'), 'bottleneck_norm'),
    (dict(vq_temperature=-1.0), 'vq_temperature_learnable'),
    (dict(vq_temperature_learnable=True, vq_temperature_ramp_steps=5), 'exclude'),
    (dict(vq_temperature_ramp_steps=5, vq_temperature_start=0.0), 'vq_temperature_start'),
    (dict(vq_entropy_weight=-0.1), 'vq_entropy_weight'),
  ],
)
def test_bad_bottleneck_kwargs_fail_at_construction(overrides, match):
  with pytest.raises(ValueError, match=match):
    LARPTokenizer(**tiny_tokenizer_kwargs(**overrides))


# ---------------------------------------------------------------- the train step


def test_train_step_updates_batch_stats_and_warms_up_the_vq_loss():
  import optax
  from configs import ucf101
  from larp_jax.train import optim, state as state_lib, steps

  c = ucf101.get_config('epochs=1,epoch_size=40,batch=4')  # 10 steps per epoch
  c.loss.update(
    lpips_weight=0.0,
    gan_weight=0.0,
    vq_warmup_start_ratio=0.2,
    vq_warmup_epochs=3,
    vq_warmup_steps_per_epoch=10,
  )
  model = LARPTokenizer(
    **tiny_tokenizer_kwargs(
      bottleneck_norm='bn_bn',
      vq_entropy_weight=0.1,
      vq_temperature_start=1.0,
      vq_temperature_ramp_steps=4,
    )
  )
  variables, video = init_model(model, batch=2)
  gen_tx = optim.generator_optimizer(c.optim, 10)
  state = state_lib.create(
    variables['params'],
    {},
    gen_tx,
    optax.identity(),
    use_ema=False,
    batch_stats=variables['batch_stats'],
  )
  step = jax.jit(
    lambda s, b: steps.tokenizer_train_step(
      s,
      b,
      jax.random.key(0),
      {},
      model=model,
      disc=None,
      gen_tx=gen_tx,
      disc_tx=None,
      loss_cfg=c.loss,
      optim_cfg=c.optim,
      total_steps=10,
    )
  )
  new, m = step(state, {'video': video})
  _, want = model.apply(variables, video, train=True, rngs=rngs(3), mutable=['batch_stats'])
  for a, b in zip(
    jax.tree_util.tree_leaves(new.batch_stats), jax.tree_util.tree_leaves(want['batch_stats'])
  ):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(m['vq_weight'], 0.1 * 0.2, rtol=1e-6)
  np.testing.assert_allclose(m['vq_temperature'], 1.0 + (0.03 - 1.0) / 4, rtol=1e-6)
  np.testing.assert_allclose(
    m['loss'], m['l1_loss'] + 0.02 * m['vq_loss'] + 0.06 * m['prior_loss'], rtol=1e-5
  )
  assert float(m['entropy_loss']) != 0.0
  assert _norm(jax.tree_util.tree_map(lambda a, b: a - b, new.params, state.params)) > 0
