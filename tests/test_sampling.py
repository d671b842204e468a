"""Sampling from LARPAR: the KV-cache sampler against full recomputation, guidance, filtering,
log-probabilities against the training forward, keys, and the checks made before compiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larp_jax import errors
from larp_jax.generation import sampling
from larp_jax.models import larp_ar
from tests.conftest import run_result_script
from tests.test_larp_ar import B, cond_kwargs, random_head_variables, tiny


@pytest.mark.parametrize('fp', [False, True])
def test_greedy_with_cache_equals_greedy_by_recompute(fp):
  model, variables = random_head_variables(fp)
  cond = cond_kwargs(model)
  got = sampling.sample(model, variables, greedy=True, **cond)
  ref = sampling.sample_by_recompute(model, variables, greedy=True, **cond)
  assert got['tokens'].shape == (B, model.seq_len) and got['tokens'].dtype == jnp.int32
  assert got['logprobs'].dtype == jnp.float32
  np.testing.assert_array_equal(got['tokens'], ref['tokens'])
  np.testing.assert_allclose(got['logprobs'], ref['logprobs'], atol=1e-5)
  # Greedy really is the argmax of the model's logits given the tokens so far.
  logits = model.apply(variables, got['tokens'], **cond)
  np.testing.assert_array_equal(jnp.argmax(logits, -1), got['tokens'])
  assert len(set(np.asarray(got['tokens']).ravel().tolist())) > 3  # not a constant sequence


def test_samples_keys_and_logprobs():
  model, variables = random_head_variables()
  cond = cond_kwargs(model)
  key = jax.random.key(5)
  a = sampling.sample(model, variables, key=key, **cond)
  # Same key, same sample; the cache-free reference draws the same tokens with the same key.
  np.testing.assert_array_equal(
    sampling.sample(model, variables, key=key, **cond)['tokens'], a['tokens']
  )
  ref = sampling.sample_by_recompute(model, variables, key=key, **cond)
  np.testing.assert_array_equal(ref['tokens'], a['tokens'])
  other = sampling.sample(model, variables, key=jax.random.key(6), **cond)
  assert np.any(np.asarray(other['tokens']) != np.asarray(a['tokens']))
  # The sampler's log-probs are those of the training forward (temperature 1, no filtering).
  ll = larp_ar.log_likelihood(model, variables, a['tokens'], **cond)
  np.testing.assert_allclose(a['logprobs'], ll, atol=1e-5)
  assert float(jnp.max(a['logprobs'])) < 0
  # top_k=1 and a near-zero temperature are greedy.
  greedy = sampling.sample(model, variables, greedy=True, **cond)['tokens']
  np.testing.assert_array_equal(
    sampling.sample(model, variables, key=key, top_k=1, **cond)['tokens'], greedy
  )
  cold = sampling.sample(model, variables, key=key, temperature=1e-6, **cond)
  np.testing.assert_array_equal(cold['tokens'], greedy)
  np.testing.assert_allclose(cold['logprobs'], 0.0, atol=1e-5)


def test_frame_prediction_samples_match_the_training_forward():
  model, variables = random_head_variables(True)
  cond = cond_kwargs(model)
  a = sampling.sample(model, variables, key=jax.random.key(7), **cond)
  np.testing.assert_allclose(
    a['logprobs'], larp_ar.log_likelihood(model, variables, a['tokens'], **cond), atol=1e-5
  )
  # The prefix matters.
  b = sampling.sample(model, variables, key=jax.random.key(7), **cond_kwargs(model, seed=8))
  assert np.any(np.asarray(a['tokens']) != np.asarray(b['tokens']))


def test_guidance():
  model, variables = random_head_variables()
  cond = cond_kwargs(model)
  key = jax.random.key(5)
  plain = sampling.sample(model, variables, key=key, **cond)
  # The doubled-batch path at scale 1 is the conditional model: same draws with the same key.
  doubled = sampling._program(model, True, True, 0, False, False)(
    variables, cond['labels'], key, jnp.float32(1.0), jnp.int32(-1), jnp.float32(1.0), 1.0
  )
  np.testing.assert_array_equal(doubled['tokens'], plain['tokens'])
  np.testing.assert_allclose(doubled['logprobs'], plain['logprobs'], atol=1e-5)
  # Scale 3, guiding tokens 0 .. 2 only (cfg_interval=1): greedy tokens are the argmax of
  # u + 3 (c - u) there and of the conditional logits after, given the tokens drawn.
  s = 3.0
  got = sampling.sample(model, variables, greedy=True, cfg_scale=s, cfg_interval=1, **cond)
  toks = got['tokens']
  c = model.apply(variables, toks, **cond)
  u = model.apply(variables, toks, jnp.full((B,), model.num_classes, jnp.int32))
  guided = jnp.argmax(u + s * (c - u), -1)
  np.testing.assert_array_equal(toks[:, :3], guided[:, :3])
  np.testing.assert_array_equal(toks[:, 3:], jnp.argmax(c, -1)[:, 3:])
  always = sampling.sample(model, variables, greedy=True, cfg_scale=s, **cond)['tokens']
  c = model.apply(variables, always, **cond)
  u = model.apply(variables, always, jnp.full((B,), model.num_classes, jnp.int32))
  np.testing.assert_array_equal(always, jnp.argmax(u + s * (c - u), -1))
  assert np.any(np.asarray(always) != np.asarray(jnp.argmax(c, -1)))  # guidance changed tokens
  # Cached and recomputed guided sampling draw alike.
  kw = dict(key=key, cfg_scale=1.5, top_k=20, top_p=0.9, temperature=0.8, **cond)
  np.testing.assert_array_equal(
    sampling.sample(model, variables, **kw)['tokens'],
    sampling.sample_by_recompute(model, variables, **kw)['tokens'],
  )


def test_top_p_and_top_k_filters():
  # Probabilities 0.05, 0.5, 0.15, 0.3 (unsorted on purpose).
  probs = np.array([0.05, 0.5, 0.15, 0.3])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  kept = lambda x: np.isfinite(np.asarray(x[0])).nonzero()[0].tolist()
  # Smallest set with mass >= p: 0.5 < 0.7 <= 0.5 + 0.3.
  assert kept(sampling.top_p_filter(logits, 0.7)) == [1, 3]
  assert kept(sampling.top_p_filter(logits, 0.9)) == [1, 2, 3]
  assert kept(sampling.top_p_filter(logits, 0.4)) == [1]
  assert kept(sampling.top_p_filter(logits, 0.99)) == [0, 1, 2, 3]
  assert kept(sampling.top_k_filter(logits, 2)) == [1, 3]
  assert kept(sampling.top_k_filter(logits, 1)) == [1]
  assert kept(sampling.top_k_filter(logits, 9)) == [0, 1, 2, 3]
  # The distribution drawn from is renormalised over the kept tokens, after the temperature.
  out = sampling.filter_logits(logits, top_p=0.7)
  np.testing.assert_allclose(jax.nn.softmax(out)[0], [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=1e-6)
  out = sampling.filter_logits(logits, temperature=0.5, top_k=3)
  p = probs[[1, 2, 3]] ** 2
  np.testing.assert_allclose(jax.nn.softmax(out)[0], [0, *(p / p.sum())], rtol=1e-5)


def test_user_errors_are_raised_before_compiling(monkeypatch):
  model, variables = random_head_variables()
  labels = cond_kwargs(model)['labels']
  no_cfg, no_cfg_vars = random_head_variables(class_dropout=0.0)
  fp, fp_vars = random_head_variables(True)

  def no_compile(*a, **k):
    raise AssertionError('compiled before the check')

  monkeypatch.setattr(sampling, '_program', no_compile)
  key = jax.random.key(0)
  cases = [
    (
      errors.ConfigError,
      'needs a model trained with class dropout',
      no_cfg,
      no_cfg_vars,
      dict(labels=labels, cfg_scale=1.5),
    ),
    (
      errors.DataError,
      r'class id 5 is out of range \[0, 4\]',
      model,
      variables,
      dict(labels=labels.at[0].set(5)),
    ),
    (
      errors.DataError,
      'class id -1 is out of range',
      model,
      variables,
      dict(labels=labels.at[0].set(-1)),
    ),
    (errors.DataError, r'labels must be \[batch\]', model, variables, dict(labels=labels[:, None])),
    (errors.DataError, 'needs labels', model, variables, dict()),
    (errors.ConfigError, 'no null class', fp, fp_vars, dict(cfg_scale=2.0, **cond_kwargs(fp))),
    (errors.DataError, 'needs prefix', fp, fp_vars, dict()),
    (
      errors.DataError,
      'prefix token id 32',
      fp,
      fp_vars,
      dict(prefix=cond_kwargs(fp)['prefix'].at[0, 0].set(32)),
    ),
    (errors.ConfigError, 'top_p=0.0', model, variables, dict(labels=labels, top_p=0.0)),
    (errors.ConfigError, 'top_k=-1', model, variables, dict(labels=labels, top_k=-1)),
    (errors.ConfigError, 'temperature=-1', model, variables, dict(labels=labels, temperature=-1.0)),
    (errors.ConfigError, 'cfg_interval=-2', model, variables, dict(labels=labels, cfg_interval=-2)),
  ]
  for exc, msg, m, v, kw in cases:
    for fn in (sampling.sample, sampling.sample_by_recompute):
      with pytest.raises(exc, match=msg):
        fn(m, v, key=key, **kw)
  with pytest.raises(errors.ConfigError, match='needs a PRNG key'):
    sampling.sample(model, variables, labels)


_FSDP_SAMPLE = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from larp_jax import config_lib, sharding
from larp_jax.generation import sampling
from larp_jax.models import larp_ar
assert jax.device_count() == 8
model = larp_ar.LARPAR(vocab_size=32, num_classes=5, dim=32, depth=2, num_heads=4, seq_len=8,
                       attention_impl='xla')
labels = jnp.arange(8, dtype=jnp.int32) % 5
init = lambda: model.init(jax.random.key(0), jnp.zeros((8, 8), jnp.int32), labels)
mesh = sharding.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
rules = config_lib.DEFAULT_SHARDING_RULES
_, shardings = sharding.state_shardings(init, mesh, rules)
with sharding.logical_context(mesh, rules):
  variables = jax.jit(lambda: sharding.strip_boxes(init()), out_shardings=shardings)()
p = variables['params']
p['output']['kernel'] = jax.device_put(
  jax.random.normal(jax.random.key(9), (32, 32)), p['output']['kernel'].sharding)
leaves = jax.tree_util.tree_leaves(p)
named = all(isinstance(s, jax.sharding.NamedSharding) for s in jax.tree_util.tree_leaves(shardings))
split = sum(x.sharding.shard_shape(x.shape) != x.shape for x in leaves)
with sharding.logical_context(mesh, rules):
  got = sampling.sample(model, variables, labels, jax.random.key(3), cfg_scale=1.5)
one = jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), variables)
ref = sampling.sample(model, one, labels, jax.random.key(3), cfg_scale=1.5)
print('RESULT' + json.dumps(dict(named=named, split=int(split), leaves=len(leaves),
  same=bool(np.array_equal(got['tokens'], ref['tokens'])),
  logprobs=float(np.abs(np.asarray(got['logprobs']) - np.asarray(ref['logprobs'])).max()))))
"""


def test_fsdp_sharded_parameters_sample_like_one_device():
  """8 simulated devices, data=2 x fsdp=4: ``state_shardings`` gives every parameter a
  NamedSharding and splits the large ones; the cached sampler (CFG: a doubled batch and its
  cache, constrained to the mesh) draws the same tokens as on one device."""
  out = run_result_script(
    _FSDP_SAMPLE,
    timeout=300,
    XLA_FLAGS='--xla_force_host_platform_device_count=8',
    JAX_DISABLE_MOST_OPTIMIZATIONS='1',
  )
  # Every kernel, both tables and abs_pe split over fsdp; only the 5 RMSNorm scales replicated.
  assert out['named'] and out['split'] == out['leaves'] - 5, out
  assert out['same'] and out['logprobs'] < 1e-5, out


def test_conditioning_arrays_and_scalars_of_any_kind():
  model, variables = random_head_variables()
  labels = cond_kwargs(model)['labels']
  kw = dict(greedy=True, cfg_scale=3.0, cfg_interval=1)
  ref = sampling.sample(model, variables, labels, **kw)['tokens']
  # numpy or list labels, and jnp scalars for the settings: the same program and tokens (a jnp
  # scale once made the static flags unhashable).
  as_list = np.asarray(labels).tolist()
  got = sampling.sample(model, variables, as_list, **dict(kw, cfg_scale=jnp.float32(3.0)))
  np.testing.assert_array_equal(got['tokens'], ref)
  # A device array is range-checked where it lies (min and max only), then used as it is.
  with pytest.raises(errors.DataError, match=r'class id 7 is out of range \[0, 4\]'):
    sampling.sample(model, variables, labels.at[1].set(7), **kw)
  with pytest.raises(errors.DataError, match='class ids must be integers'):
    sampling.sample(model, variables, labels.astype(jnp.float32), **kw)
  with pytest.raises(errors.ConfigError, match='must be numbers'):
    sampling.sample(model, variables, labels, **dict(kw, temperature='hot'))


def test_bf16_compute_samples_like_its_training_forward():
  # bf16 matmuls over float32 parameters: a bf16 cache, float32 log-probs that agree with the
  # bf16 training forward to bf16 rounding (logits here are O(5): a few 1e-2 nats).
  model, variables = random_head_variables()
  m16, cond = tiny(dtype=jnp.bfloat16), cond_kwargs(model)
  assert larp_ar.init_cache(m16, B)['layers_0']['k'].dtype == jnp.bfloat16
  got = sampling.sample(m16, variables, key=jax.random.key(3), **cond)
  assert got['tokens'].dtype == jnp.int32 and got['logprobs'].dtype == jnp.float32
  ll = larp_ar.log_likelihood(m16, variables, got['tokens'], **cond)
  np.testing.assert_allclose(got['logprobs'], ll, atol=0.1)
  assert float(jnp.abs(got['logprobs'] - ll).max()) > 0  # really computed in bf16
