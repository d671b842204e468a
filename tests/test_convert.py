"""larp_jax.convert: official PyTorch checkpoints -> params directories.

Without torch: our random models go to the official layout by the inverse table and come back
identical (tiny: values; LARP-L: shapes only, nothing allocated); every way a checkpoint can fail
to fit names what is wrong; the CLI writes a directory that load_tokenizer, --mode=eval and
config.init_from use. With torch and the official code (LARP_TORCH_PYTHON, LARP_OFFICIAL_DIR):
parity of tokens, reconstructions and prior logits against the official forward pass.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import flax
import jax
import ml_collections
import numpy as np
import pytest

from larp_jax import checkpoint, convert, errors, load_tokenizer, params_io
from larp_jax.configs import demo, ucf101
from larp_jax.convert import ar as ar_map
from larp_jax.convert import files, table
from larp_jax.convert import tokenizer as tok_map
from larp_jax.tasks import tokenizer as task
from larp_jax.tasks.tokenizer import TokenizerTask
from larp_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VARIANTS = {
  'released_layout': {},
  'bn_learned_temperature_no_prior': dict(
    bottleneck_norm='bn_bn', vq_temperature_learnable=True, vq_temperature=0.1, use_prior=False
  ),
  'ln_nd_nearest': dict(bottleneck_norm='ln_nd', vq_type='nearest', prior_dropout=0.0),
}


# The smallest official prior preset (gptc-XXS); the official GPTC max_seq_len is explicit.
XXS_PRIOR = dict(prior_depth=6, prior_heads=4, prior_width=256, prior_max_len=16)


def tiny_config(**model):
  c = ucf101.get_config('tiny')
  c.model.update(XXS_PRIOR)
  c.model.update(model)
  return c


def model_fields(config):
  """The fields of config.model's LARPTokenizer (defaults included), without the prior's when
  it has no prior."""
  model = task.make_model(config.model)
  d = {
    f.name: getattr(model, f.name)
    for f in dataclasses.fields(model)
    if f.name not in ('parent', 'name')
  }
  return d if d['use_prior'] else {k: v for k, v in d.items() if not k.startswith('prior_')}


def random_variables(config, seed=0):
  """Variables of the config's model with every entry random (the zero-init output layer and
  the unit LayerNorms would hide a mapping that mixes them up)."""
  model = task.make_model(config.model)
  v = flax.linen.unbox(task.boxed_variables(model, seed))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    r = rng.standard_normal(x.shape).astype(np.float32) * 0.3
    return np.abs(r) + 0.5 if jax.tree_util.keystr(path).endswith("['var']") else r

  return model, jax.tree_util.tree_map_with_path(draw, v)


def flat(tree):
  return flax.traverse_util.flatten_dict(dict(tree), sep='/')


def back(config, sd, **kw):
  return convert.convert_state_dict(
    convert.official_config(config), list(sd), sd.__getitem__, norm_eps=config.model.norm_eps, **kw
  )


@pytest.mark.parametrize('variant', sorted(TINY_VARIANTS))
def test_round_trip_tiny_is_identical(variant):
  config = tiny_config(**TINY_VARIANTS[variant])
  _, variables = random_variables(config)
  sd = convert.to_official(config, variables)
  assert all(isinstance(x, np.ndarray) for x in sd.values())
  config2, got, report = back(config, sd)
  want = flat(variables)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == np.float32 and np.array_equal(got[k], want[k]), k
  assert model_fields(config2) == model_fields(config)
  for k in ('mix_max_ratio', 'mix_ramp_fraction'):
    assert config2.loss[k] == config.loss[k]
  assert report['tensors'] == len(want)
  assert all(b['status'] == 'same' for b in report['buffers'].values()), report['buffers']


def test_patch_embedding_is_the_conv3d_weight_rearranged():
  """Our Dense kernel row (kt, kh, kw, c) is the Conv3d weight [D, c, kt, kh, kw] entry."""
  config = tiny_config()
  _, variables = random_variables(config)
  sd = convert.to_official(config, variables)
  w, k = sd['x_embedder.proj.weight'], variables['params']['patch_embed']['kernel']
  d, c, kt, kh, kw = w.shape
  assert (c, kt, kh, kw) == (3, *config.model.patch_size)
  row = lambda t, i, j, ch: ((t * kh + i) * kw + j) * 3 + ch
  for t, i, j, ch, o in [(0, 0, 0, 0, 0), (1, 3, 5, 2, 7), (1, 7, 7, 1, d - 1)]:
    assert k[row(t, i, j, ch), o] == w[o, ch, t, i, j]
  qkv = sd['encoder.blocks.0.attn.qkv.weight']  # fused [q | k | v] kept fused: [3D, D]
  assert qkv.shape == (3 * config.model.width, config.model.width)
  np.testing.assert_array_equal(
    qkv.T, variables['params']['encoder']['blocks_0']['attn']['qkv']['kernel']
  )


def released_config_json():
  """config.json of the released tokenizer as the official save_pretrained writes it: the
  arguments of the official cfgs/larp_tokenizer.yaml with the overrides of its reproduce
  script (16 frames of 128x128, 12 + 12 blocks)."""
  vq = dict(
    codebook_size=8192,
    commitment_loss_weight=0.25,
    codebook_loss_weight=1.0,
    entropy_loss_weight=0.0,
    entropy_loss_temperature=0.01,
    l2_normalized=True,
    stochastic=True,
    stochastic_temperature=0.03,
  )
  return dict(
    bottleneck=dict(
      name='bottleneck',
      args=dict(bottleneck_dim=16, norm='none', regularizer=dict(name='vq', args=vq)),
    ),
    prior_model=dict(
      name='gptc-S',
      use_mix_ss=True,
      mix_ss_max_ratio=0.5,
      mix_ss_peak_steps_ratio=0.3,
      n_rounds=2,
      avg_loss_over_rounds=True,
      no_grad_before_last_round=False,
      no_dropout=False,
      latent_ce_temperature=1.0,
      args=dict(l2_normalized=True),
    ),
    transformer_name='transformer_encoder_parallel',
    encoder_name='none',
    decoder_name='none',
    bottleneck_token_num=1024,
    input_size=128,
    frame_num=16,
    temporal_patch_size=4,
    patch_size=8,
    decoder_temporal_patch_size=4,
    decoder_patch_size=8,
    in_channels=3,
    encoder_hidden_size=768,
    decoder_hidden_size=768,
    encoder_num_heads=12,
    decoder_num_heads=12,
    encoder_depth=12,
    decoder_depth=12,
    learned_encoder_patch_pe=False,
    learned_encoder_latent_query_embed=True,
    learned_decoder_latent_pe=False,
    learned_decoder_patch_query_embed=False,
    use_encoder_patch_token_type_embed=False,
    use_encoder_latent_query_token_type_embed=False,
    use_decoder_latent_token_type_embed=False,
    use_decoder_patch_query_token_type_embed=True,
    encoder_query_gaussian_init=True,
    latent_pe_scale_factor=10000,
    query_init_std=0.02,
  )


def test_larp_l_round_trip_shapes_and_parameter_counts():
  """LARP-L through the inverse table and back, shapes only (jax.eval_shape: nothing allocated);
  the released config.json gives the released recipe's model; 172.18M + 21.70M parameters."""
  config = ucf101.get_config()
  model = task.make_model(config.model)
  abstract = jax.eval_shape(lambda: flax.linen.unbox(task.boxed_variables(model)))
  sd = convert.to_official(config, abstract)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in sd.values())
  assert sd['x_embedder.proj.weight'].shape == (768, 3, 4, 8, 8)
  assert sd['prior_model.blocks.11.attn.query.weight'].shape == (384, 384)
  got_config, got, report = convert.convert_state_dict(
    released_config_json(), list(sd), sd.__getitem__
  )
  want = flat(abstract)
  assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
  config.model.prior_max_len = 1024  # the official max_seq_len (= N here)
  # The official entropy temperature T is ours T / 2 (quantizer.VectorQuantizer); weight 0 here.
  config.model.vq_entropy_temperature = 0.005
  assert model_fields(got_config) == model_fields(config)
  assert report['norm_eps']['value'] == 1e-5
  assert round(report['parameters_without_prior'] / 1e6, 2) == 172.18
  assert round((report['parameters'] - report['parameters_without_prior']) / 1e6, 2) == 21.70
  assert {b['status'] for b in report['buffers'].values()} == {'shape only'}


def tiny_official():
  config = tiny_config()
  _, variables = random_variables(config)
  return config, variables, convert.to_official(config, variables)


@pytest.mark.parametrize(
  'edit, match',
  [
    (
      lambda sd: sd.update({'encoder.blocks.0.attn.extra': np.zeros(3)}),
      r'no rule maps: encoder\.blocks\.0\.attn\.extra',
    ),
    (
      lambda sd: sd.update({'encoder.blocks.5.norm1.weight': np.ones(32)}),
      r'does not have: encoder\.blocks\.5\.norm1\.weight -> params/encoder/blocks_5/norm1/scale',
    ),
    (
      lambda sd: sd.pop('decoder.blocks.0.mlp.fc2.bias'),
      r'no official tensor fills: params/decoder/blocks_0/mlp/fc2/bias',
    ),
    (
      lambda sd: sd.update({'bottleneck.in_linear.weight': sd['bottleneck.in_linear.weight'][:-1]}),
      r'shape mismatch: bottleneck\.in_linear\.weight \(32, 7\) -> params/in_linear/kernel \(32, 8\)',
    ),
  ],
  ids=['leftover', 'not_ours', 'missing', 'shape'],
)
def test_tensor_problems_name_the_tensors(edit, match):
  config, _, sd = tiny_official()
  edit(sd)
  with pytest.raises(errors.ConfigError, match=match):
    back(config, sd)


def test_a_parameter_filled_twice_is_refused():
  rules = [table.Rule('a.weight', 'params/x'), table.Rule('b.weight', 'params/x')]
  sd = {'a.weight': np.zeros(2), 'b.weight': np.ones(2)}
  with pytest.raises(errors.ConfigError, match=r'filled twice: b\.weight -> params/x'):
    table.map_tensors(sd, sd.__getitem__, rules, {'params/x': (2,)}, ctx={})


def test_config_arguments_unknown_or_refused_are_named():
  cfg = released_config_json()
  cfg['frobnicate'] = 1
  cfg['learned_encoder_patch_pe'] = True
  cfg['decoder_hidden_size'] = 512
  cfg['bottleneck']['args']['regularizer']['args']['zzz'] = 2
  cfg['prior_model']['name'] = 'gptc-Q'
  with pytest.raises(errors.ConfigError) as e:
    tok_map.map_config(cfg)
  line = str(e.value)
  assert '\n' not in line and '5 argument(s)' in line
  for part in (
    'frobnicate=1: unknown argument',
    'learned_encoder_patch_pe=True: larp_jax has a fixed 3D patch PE only',
    'decoder_hidden_size=512: must equal encoder_hidden_size=768',
    'bottleneck.args.regularizer.args.zzz=2: unknown argument',
    "prior_model.name='gptc-Q': unknown prior",
  ):
    assert part in line, part
  cfg = released_config_json()
  del cfg['prior_model']['n_rounds']
  with pytest.raises(errors.ConfigError, match='prior_model.n_rounds=.*missing'):
    tok_map.map_config(cfg)
  with pytest.raises(errors.UserError, match='neither the official LARPTokenizer .* nor LARP_AR'):
    convert.convert_state_dict({'width': 8}, [], None)


def test_every_argument_is_reported_and_defaults_are_the_official_ones():
  minimal = {
    'bottleneck': released_config_json()['bottleneck'],
    'prior_model': {'name': 'none'},
    'use_decoder_patch_query_token_type_embed': True,  # the official default False is refused
  }
  m = tok_map.map_config(minimal)
  names = {line[0] for line in m.lines}
  assert set(tok_map.TOKENIZER_ARGS) - {'bottleneck', 'prior_model'} <= names
  assert m.settings['model.encoder_depth'] == 6  # the official constructor's default
  assert m.settings['model.use_prior'] is False
  assert not any(line[3] for line in m.lines if line[0] == 'encoder_depth')  # not given
  del minimal['use_decoder_patch_query_token_type_embed']
  with pytest.raises(errors.ConfigError, match='use_decoder_patch_query_token_type_embed=False'):
    tok_map.map_config(minimal)


def test_prior_none_gives_a_tokenizer_without_prior():
  config, _, sd = tiny_official()
  cfg = convert.official_config(config)
  cfg['prior_model'] = {'name': 'none'}
  with pytest.raises(errors.ConfigError, match=r'does not have: prior_model\.'):
    convert.convert_state_dict(cfg, list(sd), sd.__getitem__, norm_eps=1e-5)
  sd = {k: v for k, v in sd.items() if not k.startswith('prior_model.')}
  config2, got, _ = convert.convert_state_dict(cfg, list(sd), sd.__getitem__, norm_eps=1e-5)
  assert config2.model.use_prior is False and not any(k.startswith('params/prior/') for k in got)


def test_a_tampered_buffer_is_reported_not_loaded():
  config, variables, sd = tiny_official()
  sd['decoder_latent_pe'] = sd['decoder_latent_pe'] + 0.01
  _, got, report = back(config, sd)
  b = report['buffers']
  assert b['decoder_latent_pe']['status'].startswith('differs')
  assert b['decoder_latent_pe']['max_abs_diff'] == pytest.approx(0.01, rel=1e-3)
  assert b['encoder_patch_pe']['status'] == 'same'
  assert 'decoder_latent_pe: differs' in convert.format_report(report)
  for k, v in flat(variables).items():
    assert np.array_equal(got[k], v), k


def test_half_precision_sources_are_cast(tmp_path):
  config, variables, sd = tiny_official()
  files.write_official(
    str(tmp_path), convert.official_config(config), {k: v.astype(np.float16) for k, v in sd.items()}
  )
  _, got, report = convert.from_official(str(tmp_path))
  assert 'float16' in report['cast'] and report['source_dtypes'] == {'float16': len(sd) - 3}
  kernel = got['params']['final_linear']['kernel']
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
    kernel, variables['params']['final_linear']['kernel'].astype(np.float16)
  )


def demo_config():
  c = demo.get_config('tiny')
  c.model.update(XXS_PRIOR)
  c.eval.update(
    num_clips=2, batch_size=2, num_videos_to_show=0, fvd=False, lpips=False, baseline_max_clips=0
  )
  return c


def test_cli_writes_a_params_dir_that_loads_evaluates_and_fine_tunes(tmp_path):
  config = demo_config()
  model, variables = random_variables(config)
  src, out = str(tmp_path / 'official'), str(tmp_path / 'converted')
  files.write_official(src, convert.official_config(config), convert.to_official(config, variables))
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1', PYTHONPATH=ROOT)
  cmd = [sys.executable, '-m', 'larp_jax.convert', f'--from={src}', f'--to={out}']
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'written to' in r.stdout and 'encoder_patch_pe: same' in r.stdout
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
    f'error: {out} exists and is not empty; pass --overwrite or choose another'
  ]

  # load_tokenizer: the same tokens and videos as the in-memory model.
  tok = load_tokenizer(out)
  video = np.random.default_rng(1).uniform(size=(2, *model.video_shape, 3)).astype(np.float32)
  run = jax.jit(lambda v, x, method: model.apply(v, x, method=method), static_argnums=2)
  want = run(variables, video, 'encode')  # jitted like the Tokenizer's: the same XLA program
  np.testing.assert_array_equal(tok.encode(video), want)
  np.testing.assert_array_equal(tok.decode(want), run(variables, want, 'decode'))
  info = params_io.read_info(out)
  for name in (files.CONFIG_FILE, files.WEIGHTS_FILE):
    digest = hashlib.sha256(open(os.path.join(src, name), 'rb').read()).hexdigest()
    assert info['source']['sha256'][name] == digest
  assert info['source']['norm_eps'] == 1e-5 and info['task'] == 'tokenizer'

  # --mode=eval on it: the record says where the parameters came from.
  config.eval.output_dir = str(tmp_path / 'eval')
  loop.evaluate_run(TokenizerTask, config, out)
  with open(tmp_path / 'eval' / '0.json') as f:
    assert json.load(f)['params_source'] == info['source']

  # config.init_from: a fresh run starts from them; the discriminator stays fresh.
  config.init_from = out
  t = loop.make_task(TokenizerTask, config)
  mngr = checkpoint.manager(str(tmp_path / 'run'), async_save=False)
  step, state, _ = loop.init_or_restore(t, mngr)
  mngr.close()
  assert step == 0
  for k, v in flat(variables['params']).items():
    np.testing.assert_array_equal(np.asarray(flat(state.params)[k]), v, err_msg=k)
  fresh = flax.linen.unbox(t.boxed_init(int(config.seed)))
  np.testing.assert_array_equal(
    jax.tree_util.tree_leaves(state.disc_params)[0], jax.tree_util.tree_leaves(fresh.disc_params)[0]
  )
  assert t.params_source()['init_source'] == info['source']


# ---------------------------------------------------------------- the AR generator


def ar_config(**model):
  kw = dict(vocab_size=64, num_classes=5, dim=32, depth=2, num_heads=2, seq_len=8)
  kw.update(model)
  return ml_collections.ConfigDict({'task': 'generator', 'model': kw})


@pytest.mark.parametrize('fp', [False, True], ids=['class', 'fp'])
def test_ar_round_trip_tiny_is_identical(fp, tmp_path):
  config = ar_config(frame_prediction=fp)
  model = ar_map.make_model(config.model)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
    lambda s: rng.standard_normal(s.shape).astype(np.float32), ar_map.abstract_variables(model)
  )
  sd = convert.to_official(config, variables)
  assert sd['layers.1.attention.wqkv.weight'].shape == (96, 32)  # fused, [3D, D]
  assert sd['tok_embeddings.weight'].shape == (64 + fp, 32)  # FP: the separator row
  assert sd['abs_pe'].shape == (1, 16 if fp else 8, 32)
  assert ('cls_embedding.embedding_table.weight' in sd) != fp
  cfg = convert.official_config(config)
  assert cfg['cls_token_num'] == (9 if fp else 1)
  config2, got, report = convert.convert_state_dict(cfg, list(sd), sd.__getitem__)
  want = flat(variables)
  assert sorted(got) == sorted(want)
  for k in want:
    assert np.array_equal(got[k], want[k]), k
  assert config2.task == 'generator' and report['ours'] == 'LARPAR'
  # Written and read back as a params directory.
  files.write_official(str(tmp_path / 'official'), cfg, sd)
  convert.convert(str(tmp_path / 'official'), str(tmp_path / 'out'))
  assert params_io.read_info(str(tmp_path / 'out'))['task'] == 'generator'
  loaded_model, loaded, _ = convert.load_generator(str(tmp_path / 'out'))
  assert loaded_model == model
  for k, v in flat(loaded).items():
    np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)


def test_ar_lp_shapes_and_parameter_count():
  """The released generator's size ('llama-abs-LP', 8192 codes, 101 classes), shapes only."""
  config = ar_config(
    vocab_size=8192, num_classes=101, dim=1280, depth=30, num_heads=20, seq_len=1024
  )
  model = ar_map.make_model(config.model)
  sd = convert.to_official(config, ar_map.abstract_variables(model))
  assert sd['layers.29.feed_forward.w1.weight'].shape == (3584, 1280)
  _, _, report = convert.convert_state_dict(
    convert.official_config(config), list(sd), sd.__getitem__
  )
  assert round(report['parameters'] / 1e6, 2) == 631.98


def test_ar_arguments_refused_are_named():
  cfg = convert.official_config(ar_config())
  cfg.update(n_kv_head=1, use_fixed_pe=True, drop_path_rate=0.1, cls_token_num=2, speed=3)
  with pytest.raises(errors.ConfigError) as e:
    ar_map.map_config(cfg)
  for part in (
    'n_kv_head=1: larp_jax has multi-head attention only',
    'use_fixed_pe=True',
    'drop_path_rate=0.1',
    'cls_token_num=2: must be 1',
    'speed=3: unknown argument',
  ):
    assert part in str(e.value), part
  with pytest.raises(errors.UserError, match='norm_eps'):
    convert.convert_state_dict(convert.official_config(ar_config()), [], None, norm_eps=1e-6)


# ---------------------------------------------------------------- against the official code

TORCH_PYTHON = os.environ.get('LARP_TORCH_PYTHON')
OFFICIAL_DIR = os.environ.get('LARP_OFFICIAL_DIR')


@pytest.fixture(scope='module')
def official_reference(tmp_path_factory):
  if not (TORCH_PYTHON and OFFICIAL_DIR):
    pytest.skip(
      'parity with the official code needs LARP_TORCH_PYTHON (a Python with torch) and '
      'LARP_OFFICIAL_DIR (a checkout of github.com/hywang66/LARP); see README'
    )
  out = str(tmp_path_factory.mktemp('official'))
  r = subprocess.run(
    [
      TORCH_PYTHON,
      os.path.join(ROOT, 'tests', 'official_reference.py'),
      f'--official_dir={OFFICIAL_DIR}',
      f'--out={out}',
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  return out


def _prior_logits(m, video):
  from larp_jax.models.quantizer import l2_normalize

  z_q, _ = m.quantize(m.encode_latents(video), deterministic=True)
  pred = l2_normalize(m.prior(z_q[:, :-1], deterministic=True))
  return (
    jax.numpy.einsum('bld,kd->blk', pred, m.quantizer.normalized_codebook())
    / m.prior_ce_temperature
  )


@pytest.mark.parametrize('variant', ['plain', 'bn_learned_temperature'])
def test_parity_with_the_official_tokenizer(official_reference, variant):
  ref = dict(np.load(os.path.join(official_reference, f'{variant}.npz')))
  # The eps of the timm the official side ran with (1e-6 from timm 1.0.16 on).
  config, variables, report = convert.from_official(
    os.path.join(official_reference, variant), norm_eps=float(ref['norm_eps'])
  )
  assert all(b['status'] == 'same' for b in report['buffers'].values()), report['buffers']
  config.model.prior_attn_dropout_in_eval = False  # the reference turned it off too
  model = task.make_model(config.model)
  video = ref['videos']
  tokens = np.asarray(model.apply(variables, video, method='encode'))
  np.testing.assert_array_equal(tokens, ref['tokens'])
  recon = model.apply(
    variables, tokens, method=lambda m, t: m.decode_latents(m.quantizer.lookup(t))
  )
  err = np.abs(np.asarray(recon) - ref['recon']).max() / np.abs(ref['recon']).max()
  print(f'{variant}: recon max rel diff {err:.3g}')
  assert err < 1e-4
  if 'prior_logits' in ref:
    logits = np.asarray(model.apply(variables, video, method=_prior_logits))
    err = np.abs(logits - ref['prior_logits']).max()
    print(f'{variant}: prior logits max abs diff {err:.3g}')
    assert err < 1e-4


@pytest.mark.parametrize('variant', ['ar_class', 'ar_fp'])
def test_parity_with_the_official_generator(official_reference, variant):
  from larp_jax.generation import sampling

  ref = dict(np.load(os.path.join(official_reference, f'{variant}.npz')))
  config, variables, _ = convert.from_official(os.path.join(official_reference, variant))
  model = ar_map.make_model(config.model)
  cond = dict(prefix=ref['prefix']) if 'prefix' in ref else dict(labels=ref['labels'])
  logits = np.asarray(model.apply(variables, ref['tokens'], **cond))
  err = np.abs(logits - ref['logits']).max()
  print(f'{variant}: logits max abs diff {err:.3g} (scale {np.abs(ref["logits"]).max():.3g})')
  assert err < 1e-4
  for key in (k for k in ref if k.startswith('greedy_cfg')):
    scale = float(key[len('greedy_cfg') :])
    out = sampling.sample(model, variables, cfg_scale=scale, greedy=True, **cond)
    np.testing.assert_array_equal(np.asarray(out['tokens']), ref[key], err_msg=key)
