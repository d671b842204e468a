"""LARPAR, the stage-2 generator: layout, parameter counts against the official module's
arithmetic, dropout of the class label, causality, KV-cache decoding against the full forward,
input errors and the logical sharding of every parameter."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larp_jax import config_lib, errors, sharding
from larp_jax.models import larp_ar

TINY = dict(
  vocab_size=32, num_classes=5, dim=32, depth=2, num_heads=4, seq_len=8, attention_impl='xla'
)
B = 3


def tiny(**kw):
  return larp_ar.LARPAR(**dict(TINY, **kw))


def cond_kwargs(model, batch=B, seed=4):
  if model.frame_prediction:
    prefix = jax.random.randint(jax.random.key(seed), (batch, model.seq_len), 0, model.vocab_size)
    return dict(prefix=prefix)
  return dict(labels=jnp.arange(batch, dtype=jnp.int32) % model.num_classes)


def tokens_for(model, batch=B, seed=3):
  return jax.random.randint(jax.random.key(seed), (batch, model.seq_len), 0, model.vocab_size)


@functools.lru_cache(maxsize=None)
def random_head_variables(fp=False, **kw):
  """Variables of a tiny model with a random (not zero) output head, so logits differ."""
  model = tiny(frame_prediction=fp, **kw)
  params = nn.unbox(model.init(jax.random.key(0), tokens_for(model), **cond_kwargs(model)))
  params = params['params']
  params['output']['kernel'] = jax.random.normal(jax.random.key(9), (model.dim, model.vocab_size))
  return model, {'params': params}


def num_params(**kw):
  model = larp_ar.LARPAR(**kw)
  cond = dict(prefix=jnp.zeros((1, model.seq_len), jnp.int32))
  if not model.frame_prediction:
    cond = dict(labels=jnp.zeros((1,), jnp.int32))
  # One token is enough: parameter shapes do not depend on the input length.
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32), **cond)
  )
  return sum(x.size for x in jax.tree_util.tree_leaves(shapes)), nn.unbox(shapes)['params']


def test_shapes_dtypes_and_uniform_logits_at_init():
  model = tiny()
  tokens = tokens_for(model)
  variables = model.init(jax.random.key(0), tokens, **cond_kwargs(model))
  logits = model.apply(variables, tokens, **cond_kwargs(model))
  assert logits.shape == (B, model.seq_len, model.vocab_size) and logits.dtype == jnp.float32
  # The zero-initialised head: every token equally likely, the loss log(vocab).
  np.testing.assert_array_equal(logits, 0.0)
  np.testing.assert_allclose(larp_ar.cross_entropy(logits, tokens), np.log(32), rtol=1e-6)
  np.testing.assert_allclose(
    larp_ar.log_likelihood(model, variables, tokens, **cond_kwargs(model)), -np.log(32), rtol=1e-6
  )
  # Shorter inputs: logits for the tokens given.
  assert model.apply(variables, tokens[:, :3], **cond_kwargs(model)).shape == (B, 3, 32)
  # A valid mask leaves the invalid samples out of the mean.
  nll = np.asarray(larp_ar.token_nll(logits + jnp.arange(32.0), tokens))
  got = larp_ar.cross_entropy(logits + jnp.arange(32.0), tokens, valid=jnp.array([1, 0, 1]))
  np.testing.assert_allclose(got, nll[[0, 2]].mean(), rtol=1e-6)


def test_bf16_compute_keeps_float32_params_and_logits():
  model, variables = random_head_variables()
  tokens, cond = tokens_for(model), cond_kwargs(model)
  m16 = tiny(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  assert all(
    x.dtype == jnp.float32
    for x in jax.tree_util.tree_leaves(
      jax.eval_shape(lambda: m16.init(jax.random.key(0), tokens, **cond))
    )
  )
  ref = model.apply(variables, tokens, **cond)
  got = m16.apply(variables, tokens, **cond)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, atol=0.05 * float(jnp.abs(ref).max()))
  assert float(jnp.abs(got - ref).max()) > 0  # really computed in bf16


def test_class_dropout_and_negative_labels_use_the_null_class():
  model, variables = random_head_variables()
  tokens = tokens_for(model)
  null = jnp.full((B,), model.num_classes, jnp.int32)
  ref_null = model.apply(variables, tokens, null)
  # Negative labels are the null class.
  np.testing.assert_array_equal(
    model.apply(variables, tokens, -jnp.ones((B,), jnp.int32)), ref_null
  )
  # Class dropout 1.0 in training: every label is the null class (other dropouts off).
  off = dict(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
  always = tiny(class_dropout=1.0, **off)
  rngs = {'dropout': jax.random.key(1)}
  labels = cond_kwargs(model)['labels']
  np.testing.assert_array_equal(
    always.apply(variables, tokens, labels, train=True, rngs=rngs), ref_null
  )
  assert float(jnp.abs(model.apply(variables, tokens, labels) - ref_null).max()) > 1e-3
  # Rate 0.5: some rows keep their class, others get the null class, per the 'dropout' key.
  half = tiny(class_dropout=0.5, **off)
  many = jnp.arange(64, dtype=jnp.int32) % 5
  tok64 = jnp.zeros((64, model.seq_len), jnp.int32)
  got = half.apply(variables, tok64, many, train=True, rngs=rngs)
  is_null = np.all(np.isclose(got, model.apply(variables, tok64, jnp.full((64,), 5))), axis=(1, 2))
  assert 16 < is_null.sum() < 48
  # Eval mode never drops.
  np.testing.assert_array_equal(
    always.apply(variables, tokens, labels), model.apply(variables, tokens, labels)
  )


# Parameter counts, from the official `models/larp_ar.py` layout (bias-free Linears, 8192 codes,
# 101 classes + the null row, seq_len 1024, cls_token_num 1). Per layer: wqkv dim*3dim + wo
# dim^2 + SwiGLU 3*dim*hidden + two RMSNorms 2*dim; plus tok_embeddings 8192*dim, the class
# table 102*dim, abs_pe 1024*dim, norm dim, output dim*8192.
#   S  (384, 12, 6),   hidden 1024: 12*1,770,240  + 6,291,456 + 39,168 + 393,216 + 384    = 27,967,104
#   B  (768, 12, 12),  hidden 2048: 12*7,079,424  + 12,582,912 + 78,336 + 786,432 + 768   = 98,401,536
#   L  (1024, 24, 16), hidden 2816: 24*12,847,104 + 16,777,216 + 104,448 + 1,048,576 + 1024 = 326,261,760
#   LP (1280, 30, 20), hidden 3584: 30*20,318,720 + 20,971,520 + 130,560 + 1,310,720 + 1280 = 631,975,680
@pytest.mark.parametrize(
  'name,count', [('S', 27_967_104), ('B', 98_401_536), ('L', 326_261_760), ('LP', 631_975_680)]
)
def test_parameter_counts(name, count):
  assert num_params(**larp_ar.preset_kwargs(name))[0] == count


def test_frame_prediction_layout():
  # FP LP: token table 8193 rows (the separator), no class table, 2048 PE rows.
  count, params = num_params(**larp_ar.preset_kwargs('LP', frame_prediction=True))
  assert count == 30 * 20_318_720 + 8193 * 1280 + 2048 * 1280 + 1280 + 1280 * 8192
  assert params['abs_pe'].shape == (1, 2048, 1280)
  assert params['tok_embeddings']['embedding'].shape == (8193, 1280)
  assert 'cls_embedding' not in params
  assert larp_ar.ffn_hidden(1280) == 3584 and larp_ar.ffn_hidden(1024) == 2816
  model = tiny(frame_prediction=True)
  assert (model.prefix_len, model.max_len, model.separator_id) == (9, 16, 32)


@pytest.mark.parametrize('fp', [False, True])
def test_causal(fp):
  model, variables = random_head_variables(fp)
  tokens, cond = tokens_for(model), cond_kwargs(model)
  ref = model.apply(variables, tokens, **cond)
  j = 3
  other = model.apply(variables, tokens.at[:, j].set((tokens[:, j] + 1) % 32), **cond)
  np.testing.assert_allclose(other[:, : j + 1], ref[:, : j + 1], atol=1e-6)
  assert float(jnp.abs(other[:, j + 1] - ref[:, j + 1]).min()) > 0  # position j+1 reads token j


@pytest.mark.parametrize('fp', [False, True])
def test_cached_decoding_matches_the_full_forward(fp):
  model, variables = random_head_variables(fp)
  tokens, cond = tokens_for(model), cond_kwargs(model)
  ref = model.apply(variables, tokens, **cond)
  cache = larp_ar.init_cache(model, B)
  assert cache['layers_0']['k'].shape == (B, 4, model.max_len, 8)
  logits, cache = model.apply(variables, cache, **cond, method=model.prefill)
  decode = jax.jit(functools.partial(model.apply, method=model.decode_step))
  steps = [logits]
  for i in range(model.seq_len - 1):
    logits, cache = decode(variables, cache, tokens[:, i], model.prefix_len + i)
    steps.append(logits)
  np.testing.assert_allclose(jnp.stack(steps, 1), ref, atol=2e-5)


def test_remat_gives_the_same_loss_and_gradients():
  model, variables = random_head_variables()
  tokens, cond = tokens_for(model), cond_kwargs(model)
  rngs = {'dropout': jax.random.key(2)}

  def grads(m):
    def loss(p):
      logits = m.apply({'params': p}, tokens, **cond, train=True, rngs=rngs)
      return larp_ar.cross_entropy(logits, tokens)

    return jax.jit(jax.value_and_grad(loss))(variables['params'])

  ref, got = grads(model), grads(tiny(remat='full'))
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got[1], ref[1])


def test_input_and_config_errors():
  model, variables = random_head_variables()
  tokens, labels = tokens_for(model), cond_kwargs(model)['labels']
  run = lambda *a, **k: model.apply(variables, *a, **k)
  with pytest.raises(errors.DataError, match='token id 32 is out of range'):
    run(tokens.at[0, 0].set(32), labels)
  with pytest.raises(errors.DataError, match='token id -1 is out of range'):
    run(tokens.at[0, 0].set(-1), labels)
  with pytest.raises(errors.DataError, match='class id 6 is out of range'):
    run(tokens, labels.at[0].set(6))
  with pytest.raises(errors.DataError, match='1 <= L <= seq_len=8'):
    run(jnp.zeros((B, 9), jnp.int32), labels)
  with pytest.raises(errors.DataError, match='batch 3 but the conditioning has 2'):
    run(tokens, labels[:2])
  with pytest.raises(errors.DataError, match='needs labels'):
    run(tokens)
  with pytest.raises(errors.DataError, match='not prefix'):
    run(tokens, prefix=tokens)
  fp, fp_vars = random_head_variables(True)
  with pytest.raises(errors.DataError, match=r'prefix must be \[batch, seq_len=8\]'):
    fp.apply(fp_vars, tokens, prefix=tokens[:, :4])
  with pytest.raises(errors.DataError, match='prefix token id 32'):
    fp.apply(fp_vars, tokens, prefix=tokens.at[1, 1].set(32))
  with pytest.raises(errors.ConfigError, match='not a multiple of num_heads'):
    tiny(num_heads=5)
  with pytest.raises(errors.ConfigError, match='attention_impl'):
    tiny(attention_impl='flash')
  with pytest.raises(errors.ConfigError, match='class_dropout=1.5'):
    tiny(class_dropout=1.5)
  with pytest.raises(errors.ConfigError, match='unknown LARPAR preset'):
    larp_ar.preset_kwargs('M')


def test_every_parameter_has_logical_axes_and_fsdp_shardings():
  model = larp_ar.LARPAR(**larp_ar.preset_kwargs('S', vocab_size=64, seq_len=16))
  init = lambda: model.init(
    jax.random.key(0), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32)
  )
  boxed = jax.eval_shape(init)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  _, shardings = sharding.state_shardings(init, mesh, config_lib.DEFAULT_SHARDING_RULES)
  specs = jax.tree_util.tree_map(lambda s: tuple(s.spec), shardings['params'])
  assert all(
    isinstance(s, jax.sharding.NamedSharding) for s in jax.tree_util.tree_leaves(shardings)
  )
  layer = specs['layers_0']
  assert layer['attention']['wqkv']['kernel'] == ('fsdp', 'tensor')
  assert layer['attention']['wo']['kernel'] == ('tensor', 'fsdp')
  assert layer['feed_forward']['w1']['kernel'] == ('fsdp', 'tensor')
  assert layer['feed_forward']['w2']['kernel'] == ('tensor', 'fsdp')
  assert specs['tok_embeddings']['embedding'] == (None, 'fsdp')
  assert specs['output']['kernel'] == ('fsdp', None)
  assert specs['abs_pe'] == (None, None, 'fsdp')
