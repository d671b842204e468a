"""Tokenizer, quantizer and prior: shapes, counts, determinism and gradient routing."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larp_jax import LARPTokenizer, errors
from larp_jax.models import embeddings, prior
from larp_jax.models.tokenizer import count_params
from tests.conftest import tiny_tokenizer_kwargs


def rngs(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {'params': k[0], 'vq': k[1], 'dropout': k[2]}


def init(model, batch=2, seed=0):
  video = jax.random.uniform(jax.random.key(seed + 100), (batch, *model.video_shape, 3))
  variables = model.init(rngs(seed), video, train=True)
  return nn.unbox(variables['params']), video


# ---------------------------------------------------------------- sizes and embeddings


def test_larp_l_parameter_counts():
  model = LARPTokenizer()  # defaults are LARP-L
  shapes = jax.eval_shape(lambda: model.init(rngs(), jnp.zeros((1, 16, 128, 128, 3)), train=True))
  params = nn.unbox(shapes['params'])
  total, n_prior = count_params(params), count_params(params['prior'])
  assert abs((total - n_prior) / 172.18e6 - 1) < 1e-3, total - n_prior
  assert abs(n_prior / 21.70e6 - 1) < 1e-3, n_prior


def test_3d_pe_reference_figures():
  pe = embeddings.sincos_3d(768, 4, 16, 16).astype(np.float64)
  assert pe.shape == (1024, 768)
  np.testing.assert_allclose(pe.sum(), 770345.1248, rtol=1e-7)
  np.testing.assert_allclose((pe**2).sum(), 1158051.319, rtol=1e-7)
  np.testing.assert_allclose(pe[1, [0, 192, 384, 576]], [0.84147, 0.54030, 1.0, 2.0], atol=1e-5)
  np.testing.assert_allclose(pe[256, [0, 384, 767]], [0.84147, 0.54030, 2.0], atol=1e-5)


def test_1d_pe_reference_figures():
  pe = embeddings.sincos_1d_table(768, 1024).astype(np.float64)
  assert pe.shape == (1024, 768)
  np.testing.assert_allclose(pe.sum(), 179812.9855, rtol=1e-7)
  # sines first, then cosines: position 0 is [0...0, 1...1]
  np.testing.assert_array_equal(pe[0], np.r_[np.zeros(384), np.ones(384)])


# ---------------------------------------------------------------- API shapes


@pytest.mark.parametrize(
  'video_shape,patch,n',
  [((4, 16, 16), (2, 8, 8), 8), ((8, 16, 32), (4, 8, 8), 16), ((2, 24, 16), (1, 8, 8), 5)],
)
def test_encode_decode_shapes(video_shape, patch, n):
  model = LARPTokenizer(
    **tiny_tokenizer_kwargs(video_shape=video_shape, patch_size=patch, num_latent_tokens=n)
  )
  assert model.video_shape == video_shape
  params, video = init(model)
  tokens = model.apply({'params': params}, video, method=LARPTokenizer.encode)
  chex.assert_shape(tokens, (2, n))
  assert tokens.dtype == jnp.int32
  assert int(tokens.min()) >= 0 and int(tokens.max()) < model.codebook_size
  out = model.apply({'params': params}, tokens, method=LARPTokenizer.decode)
  chex.assert_shape(out, (2, *video_shape, 3))
  assert out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  recon, aux = model.apply({'params': params}, video, train=True, rngs=rngs(1), mix_ratio=0.3)
  chex.assert_shape(recon, (2, *video_shape, 3))
  chex.assert_shape(aux['tokens'], (2, n))
  for key in (
    'vq_loss',
    'prior_loss',
    'prior_top1',
    'prior_top5',
    'codebook_usage',
    'codebook_perplexity',
    'commitment_loss',
    'codebook_loss',
  ):
    assert aux[key].shape == () and aux[key].dtype == jnp.float32, key
    assert np.isfinite(float(aux[key])), key


def test_uint8_input_and_bf16_compute():
  model = LARPTokenizer(**tiny_tokenizer_kwargs(dtype=jnp.bfloat16))
  params, video = init(model)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  as_uint8 = (video * 255).astype(jnp.uint8)
  recon, aux = model.apply({'params': params}, as_uint8, train=True, rngs=rngs(1))
  assert recon.dtype == jnp.float32 and aux['vq_loss'].dtype == jnp.float32


def test_zero_init_output_layer_gives_constant_recon():
  model = LARPTokenizer(**tiny_tokenizer_kwargs())
  params, video = init(model)
  assert not np.any(params['final_linear']['kernel']) and not np.any(params['final_linear']['bias'])
  recon, _ = model.apply({'params': params}, video, train=True, rngs=rngs(1))
  np.testing.assert_array_equal(recon, 0.0)


def test_decoding_from_tokens_equals_deterministic_pass():
  model = LARPTokenizer(**tiny_tokenizer_kwargs())
  params, video = init(model)
  params['final_linear']['kernel'] = (
    jax.random.normal(jax.random.key(5), params['final_linear']['kernel'].shape) * 0.1
  )
  recon, aux = model.apply({'params': params}, video, train=False, rngs=rngs(1))
  decoded = model.apply({'params': params}, aux['tokens'], method=LARPTokenizer.decode)
  np.testing.assert_allclose(decoded, jnp.clip(recon, 0, 1), atol=1e-5)


# ---------------------------------------------------------------- determinism


def test_encoding_is_deterministic_and_sampling_follows_the_key():
  model = LARPTokenizer(**tiny_tokenizer_kwargs(vq_temperature=1.0))  # hot: codes vary
  params, video = init(model)
  enc = lambda: model.apply({'params': params}, video, method=LARPTokenizer.encode)
  np.testing.assert_array_equal(enc(), enc())
  fwd = lambda seed: model.apply({'params': params}, video, train=True, rngs=rngs(seed))[1][
    'tokens'
  ]
  np.testing.assert_array_equal(fwd(3), fwd(3))
  assert np.any(np.asarray(fwd(3)) != np.asarray(fwd(4)))
  # eval pass defaults to argmax and ignores the key
  ev = lambda seed: model.apply({'params': params}, video, train=False, rngs=rngs(seed))[1][
    'tokens'
  ]
  np.testing.assert_array_equal(ev(3), ev(4))
  np.testing.assert_array_equal(ev(3), enc())


def test_nearest_vq_never_samples():
  model = LARPTokenizer(**tiny_tokenizer_kwargs(vq_type='nearest', vq_temperature=1.0))
  params, video = init(model)
  fwd = lambda seed: model.apply({'params': params}, video, train=True, rngs=rngs(seed))[1][
    'tokens'
  ]
  np.testing.assert_array_equal(fwd(3), fwd(4))


def test_sampling_follows_softmax_of_cosine_over_temperature():
  from larp_jax.models.quantizer import VectorQuantizer

  vq = VectorQuantizer(codebook_size=4, code_dim=2, temperature=0.5)
  z = jnp.tile(jnp.array([[1.0, 0.2]]), (20000, 1))
  variables = vq.init(
    {'params': jax.random.key(0), 'vq': jax.random.key(1)}, z, deterministic=False
  )
  cb = nn.unbox(variables['params'])['codebook']
  _, aux = vq.apply(variables, z, deterministic=False, rngs={'vq': jax.random.key(2)})
  freq = np.bincount(np.asarray(aux['indices']), minlength=4) / z.shape[0]
  cbn = cb / np.linalg.norm(cb, axis=1, keepdims=True)
  zn = np.array([1.0, 0.2]) / np.linalg.norm([1.0, 0.2])
  expected = np.exp(cbn @ zn / 0.5)
  np.testing.assert_allclose(freq, expected / expected.sum(), atol=0.015)


# ---------------------------------------------------------------- gradients


def _grads(model, params, video, loss_of):
  def loss_fn(p):
    recon, aux = model.apply({'params': p}, video, train=True, rngs=rngs(7), mix_ratio=0.5)
    return loss_of(recon, aux, video)

  return jax.grad(loss_fn)(params)


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)))


def _trained_like(model):
  params, video = init(model)
  # a nonzero output layer so the reconstruction depends on everything upstream
  params['final_linear']['kernel'] = 0.1 * jax.random.normal(
    jax.random.key(9), params['final_linear']['kernel'].shape
  )
  return params, video


def test_reconstruction_gradient_passes_the_straight_through_estimator():
  model = LARPTokenizer(**tiny_tokenizer_kwargs())
  params, video = _trained_like(model)
  g = _grads(model, params, video, lambda r, a, v: jnp.mean(jnp.abs(r - v)))
  for name in (
    'patch_embed',
    'encoder',
    'latent_queries',
    'in_linear',
    'out_linear',
    'decoder',
    'query_type_embed',
    'final_linear',
  ):
    assert _norm(g[name]) > 0, name
  assert _norm(g['quantizer']) == 0  # the codebook sees the recon loss only through sg()
  assert _norm(g['prior']) == 0


def test_codebook_gradient_comes_only_from_the_codebook_loss():
  model = LARPTokenizer(**tiny_tokenizer_kwargs())
  params, video = _trained_like(model)
  g_cb = _grads(model, params, video, lambda r, a, v: a['codebook_loss'])
  g_commit = _grads(model, params, video, lambda r, a, v: a['commitment_loss'])
  assert _norm(g_cb['quantizer']) > 0
  assert _norm(g_cb['encoder']) == 0 and _norm(g_cb['in_linear']) == 0
  assert _norm(g_commit['quantizer']) == 0
  assert _norm(g_commit['encoder']) > 0


def test_prior_loss_reaches_prior_and_encoder_but_not_codebook():
  model = LARPTokenizer(**tiny_tokenizer_kwargs())
  params, video = _trained_like(model)
  g = _grads(model, params, video, lambda r, a, v: a['prior_loss'])
  assert _norm(g['prior']) > 0
  assert _norm(g['encoder']) > 0 and _norm(g['latent_queries']) > 0
  assert _norm(g['quantizer']) == 0
  assert _norm(g['decoder']) == 0 and _norm(g['final_linear']) == 0


# ---------------------------------------------------------------- prior and schedule


def test_mix_ratio_schedule():
  total = 1000
  r = np.array([float(prior.mix_ratio(s, total)) for s in (0, 1, 150, 300, 301, 1000)])
  np.testing.assert_allclose(r, [0.0, 0.5 / 300, 0.25, 0.5, 0.5, 0.5], rtol=1e-6)
  assert float(prior.mix_ratio(10, total, max_ratio=0.2, ramp_fraction=0.1)) == pytest.approx(0.02)


def test_scheduled_sampling_replaces_inputs_by_ratio():
  """With ratio 0 every round sees the ground truth (rounds give equal loss); with ratio 1 the
  second round sees only sampled codes."""
  b, l, d, k = 2, 6, 4, 8
  cb = jax.random.normal(jax.random.key(0), (k, d))
  cb = cb / jnp.linalg.norm(cb, axis=-1, keepdims=True)
  targets = jax.random.randint(jax.random.key(1), (b, l), 0, k)
  x = cb[targets]
  seen = []

  def predict(inp):
    seen.append(inp)
    return inp  # "predict the previous token"

  out0 = prior.scheduled_sampling_loss(
    predict, x, targets, cb, rng=jax.random.key(2), mix_ratio=0.0, n_rounds=2
  )
  np.testing.assert_array_equal(seen[0], seen[1])
  seen.clear()
  prior.scheduled_sampling_loss(
    predict, x, targets, cb, rng=jax.random.key(2), mix_ratio=1.0, n_rounds=2
  )
  assert np.any(np.asarray(seen[0][:, 1:]) != np.asarray(seen[1][:, 1:]))
  np.testing.assert_array_equal(seen[0][:, 0], seen[1][:, 0])  # position 0 stays ground truth
  # round-2 inputs at positions 1.. are codewords
  dots = jnp.einsum('bld,kd->blk', seen[1][:, 1:-1], cb)
  np.testing.assert_allclose(jnp.max(dots, -1), 1.0, atol=1e-5)
  assert 0.0 <= float(out0['prior_top1']) <= float(out0['prior_top5']) <= 1.0


def test_prior_is_causal():
  p = prior.PriorGPT(depth=1, num_heads=2, width=16, max_len=8, input_dim=4, dropout=0.0)
  x = jax.random.normal(jax.random.key(0), (1, 8, 4))
  params = p.init(jax.random.key(1), x, deterministic=True)
  y1 = p.apply(params, x, deterministic=True)
  y2 = p.apply(params, x.at[:, 5:].set(0.0), deterministic=True)
  np.testing.assert_allclose(y1[:, :5], y2[:, :5], atol=1e-6)
  assert not np.allclose(y1[:, 5:], y2[:, 5:])


def test_sincos_query_init_is_the_1d_table():
  model = LARPTokenizer(**tiny_tokenizer_kwargs(query_init='sincos'))
  params, _ = init(model)
  q = params['latent_queries']
  np.testing.assert_allclose(q, embeddings.sincos_1d_table(q.shape[1], q.shape[0]), atol=1e-7)


def test_l2_normalize_has_finite_gradient_at_zero():
  from larp_jax.models.quantizer import l2_normalize

  g = jax.grad(lambda x: jnp.sum(l2_normalize(x) * jnp.arange(3.0)))(jnp.zeros(3))
  assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_allclose(l2_normalize(jnp.array([3.0, 4.0])), [0.6, 0.8], rtol=1e-6)


# ---------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
  'overrides,match',
  [
    (dict(video_shape=(5, 16, 16)), 'not divisible by patch_size T'),
    (dict(num_heads=3), 'not divisible by num_heads'),
    (dict(vq_type='fsq'), 'vq_type'),
    (dict(query_init='zeros'), 'query_init'),
    (dict(prior_max_len=3), 'prior_max_len'),
  ],
)
def test_bad_tokenizer_kwargs_fail_at_construction(overrides, match):
  with pytest.raises(ValueError, match=match):
    LARPTokenizer(**tiny_tokenizer_kwargs(**overrides))


def test_wrong_video_shape_is_a_clear_error():
  model = LARPTokenizer(**tiny_tokenizer_kwargs())
  params, _ = init(model)
  with pytest.raises(ValueError, match='video must have shape'):
    model.apply({'params': params}, jnp.zeros((1, 4, 16, 16, 1)), method=LARPTokenizer.encode)


# ---------------------------------------------------------------- experimental switches (off by default)


def _identity_blocks(params, stack):
  """Zeroes the residual branches of ``params[stack]``: every block becomes the identity."""
  for block in params[stack].values():
    for branch, proj in (('attn', 'proj'), ('mlp', 'fc2')):
      block[branch][proj] = jax.tree_util.tree_map(jnp.zeros_like, block[branch][proj])
  return params


def test_patch_skips_and_bypass_add_no_parameters_and_are_off_by_default():
  base = LARPTokenizer(**tiny_tokenizer_kwargs())
  assert not (base.query_patch_skip or base.latent_patch_skip or base.vq_bypass)
  params, video = init(base)
  for kw in (dict(query_patch_skip=True), dict(latent_patch_skip=True), dict(vq_bypass=True)):
    model = LARPTokenizer(**tiny_tokenizer_kwargs(**kw))
    other, _ = init(model)
    chex.assert_trees_all_equal_shapes(params, other)
    params['final_linear']['kernel'] = jnp.ones_like(params['final_linear']['kernel']) * 0.01
    r0, _ = base.apply({'params': params}, video, train=False, rngs=rngs(1))
    r1, _ = model.apply({'params': params}, video, train=False, rngs=rngs(1))
    assert not np.allclose(r0, r1), kw


@pytest.mark.parametrize('n', [8, 16])
def test_latent_patch_skip_routes_latent_j_to_patch_j(n):
  """Identity decoder blocks: only the skip moves a token's code into the patches, so changing
  token k changes patch k % num_patches alone (8 patches in the tiny model)."""
  model = LARPTokenizer(**tiny_tokenizer_kwargs(num_latent_tokens=n, latent_patch_skip=True))
  params, _ = init(model)
  params = _identity_blocks(params, 'decoder')
  params['final_linear']['kernel'] = jax.random.normal(
    jax.random.key(3), params['final_linear']['kernel'].shape
  )
  tokens = jnp.zeros((1, n), jnp.int32)
  decode = lambda t: model.apply(
    {'params': params}, t, method=lambda m, t: m.patchify(m.decode_latents(m.quantizer.lookup(t)))
  )
  base = decode(tokens)
  for k in (0, 5, n - 1):
    moved = decode(tokens.at[0, k].set(7))
    changed = np.flatnonzero(np.abs(np.asarray(moved - base)).max(-1)[0] > 1e-6)
    np.testing.assert_array_equal(changed, [k % 8])


def test_query_patch_skip_gives_query_i_patch_i():
  """Identity encoder blocks: latent i is in_linear(query_i + embedded patch i % P)."""
  model = LARPTokenizer(**tiny_tokenizer_kwargs(num_latent_tokens=16, query_patch_skip=True))
  params, video = init(model)
  params = _identity_blocks(params, 'encoder')
  z = model.apply({'params': params}, video, method=model.encode_latents)
  x = model.apply(
    {'params': params}, video, method=lambda m, v: m.patch_embed(m.patchify(v)) + m._patch_pe()
  )
  q = params['latent_queries'][None] + jnp.tile(x, (1, 2, 1))
  expected = model.apply({'params': params}, q, method=lambda m, h: m.in_linear(m.encoder(h)))
  np.testing.assert_allclose(z, expected, atol=1e-5)


def _skip_kwargs(n, proj, **kw):
  return tiny_tokenizer_kwargs(
    num_latent_tokens=n, query_patch_skip=True, latent_patch_skip=True, patch_skip_proj=proj, **kw
  )


def test_patch_skip_proj_adds_one_projection_per_skip_and_checks_its_settings():
  """k = N / num_patches copies per patch: [width, k x width] into the queries, [k x width,
  width] out of the latents, no bias; nothing without the skips or with N not k x P."""
  base, _ = init(LARPTokenizer(**_skip_kwargs(16, False)))
  params, _ = init(LARPTokenizer(**_skip_kwargs(16, True)))
  assert set(params) - set(base) == {'query_skip_proj', 'latent_skip_proj'}
  assert params['query_skip_proj']['kernel'].shape == (32, 64)  # tiny: width 32, 8 patches
  assert params['latent_skip_proj']['kernel'].shape == (64, 32)
  assert set(params['query_skip_proj']) == {'kernel'}
  with pytest.raises(errors.ConfigError, match='multiple of the number of patches'):
    LARPTokenizer(**_skip_kwargs(12, True))
  with pytest.raises(errors.ConfigError, match='both are off'):
    LARPTokenizer(**tiny_tokenizer_kwargs(num_latent_tokens=16, patch_skip_proj=True))


@pytest.mark.parametrize('proj', [False, True])
def test_patch_skip_proj_gives_the_copies_of_a_patch_their_own_gradient(proj):
  """Identity decoder blocks (only the skip reaches the patches): with the plain skip the two
  tokens of a patch (j and j + P) get the very same gradient, so they cannot learn different
  codes; with a projection per copy they do. Routing stays local either way: token k moves
  patch k % P alone."""
  model = LARPTokenizer(**_skip_kwargs(16, proj))
  params, _ = init(model)
  params = _identity_blocks(params, 'decoder')
  params['final_linear']['kernel'] = jax.random.normal(
    jax.random.key(3), params['final_linear']['kernel'].shape
  )
  z = jax.random.normal(jax.random.key(4), (1, 16, model.code_dim))
  target = jax.random.normal(jax.random.key(5), (1, 8, model.patch_dim))
  decode = lambda z: model.apply(
    {'params': params}, z, method=lambda m, z: m.patchify(m.decode_latents(z))
  )
  g = jax.grad(lambda z: jnp.sum(decode(z) * target))(z)
  diff = float(jnp.abs(g[:, :8] - g[:, 8:]).max())
  assert diff > 1e-3 if proj else diff == 0.0, diff
  base = decode(z)
  for k in (0, 5, 13):
    moved = decode(z.at[0, k].add(1.0))
    changed = np.flatnonzero(np.abs(np.asarray(moved - base)).max(-1)[0] > 1e-6)
    np.testing.assert_array_equal(changed, [k % 8])


def test_patch_skip_proj_adds_its_projection_of_patch_j_to_copy_c():
  """Identity encoder blocks: latent c x P + j is in_linear(query + (x_j W)[c-th width slice])."""
  model = LARPTokenizer(**_skip_kwargs(16, True))
  params, video = init(model)
  params = _identity_blocks(params, 'encoder')
  z = model.apply({'params': params}, video, method=model.encode_latents)
  x = model.apply(
    {'params': params}, video, method=lambda m, v: m.patch_embed(m.patchify(v)) + m._patch_pe()
  )
  w = params['query_skip_proj']['kernel']
  skip = jnp.concatenate([x @ w[:, :32], x @ w[:, 32:]], axis=1)  # copy 0 (tokens 0-7), copy 1
  q = params['latent_queries'][None] + skip
  expected = model.apply({'params': params}, q, method=lambda m, h: m.in_linear(m.encoder(h)))
  np.testing.assert_allclose(z, expected, atol=1e-5)


def test_vq_bypass_passes_the_normalised_latents():
  model = LARPTokenizer(**tiny_tokenizer_kwargs(vq_bypass=True))
  params, video = init(model)
  z = model.apply({'params': params}, video, method=model.encode_latents)
  z_st, aux = model.apply({'params': params}, z, method=model.quantize)
  zn = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  np.testing.assert_allclose(z_st, zn, atol=1e-6)
  assert aux['indices'].shape == z.shape[:-1]
