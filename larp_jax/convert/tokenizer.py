"""The official ``LARPTokenizer`` (the official `models/larp_tokenizer.py`, with its bottleneck
`models/bottleneck.py` and prior `models/gptc.py`) -> our ``LARPTokenizer`` and back.

Three tables:
  * ``TOKENIZER_ARGS`` (and the nested ``BOTTLENECK_ARGS``, ``VQ_ARGS``, ``PRIOR_ARGS``,
    ``GPTC_ARGS``): every constructor argument that config.json can hold -> our settings
    ('model.<kwarg>', 'loss.<field>'), or a check, or a refusal naming it.
  * ``RULES``: every tensor of the official state dict -> our parameter path. Dense kernels are
    the torch weights transposed; the Conv3d patch embedding [D, 3, kt, kh, kw] becomes the Dense
    kernel over patches flattened (kt, kh, kw, c); the fused qkv stays fused ([q | k | v]); the
    prior's separate query/key/value stay separate.
  * ``buffers(model)``: the fixed sin-cos tables the official model stores as buffers, computed
    by us; the checkpoint's are compared with them, never loaded.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from larp_jax.convert import args as A
from larp_jax.convert.table import Rule, layer_norm, linear
from larp_jax.models import embeddings

OFFICIAL_CLASS = 'LARPTokenizer'
OURS = 'LARPTokenizer'
TASK = 'tokenizer'

# timm's ViT block used torch's LayerNorm default (eps 1e-5) before timm 1.0.16 and eps 1e-6
# from then on; the released checkpoints were trained with the former.
RELEASED_NORM_EPS = 1e-5

# GPTC presets of the official `models/gptc.py`: name -> (depth, heads, width).
GPTC_PRESETS = {
  'gptc-L': (24, 16, 1024),
  'gptc-B': (12, 12, 768),
  'gptc-M': (12, 8, 512),
  'gptc-S': (12, 6, 384),
  'gptc-XS': (6, 6, 384),
  'gptc-XXS': (6, 4, 256),
}
_NONE_NAMES = ('none', 'no', 'null', '')
# Official Bottleneck(norm=...) -> ours. 'ln_d_na' is built but never applied by the official
# project_in (it has no branch for it), so the official forward pass has no normalisation.
_NORMS = {None: 'none', 'no': 'none', 'none': 'none', 'ln_d_na': 'none'}
_NORMS.update({k: k for k in ('bn_bn', 'bn_b', 'ln_d', 'ln_nd')})


def is_official_config(cfg: Mapping[str, Any]) -> bool:
  """Whether a config.json holds the official tokenizer's constructor arguments."""
  return 'bottleneck' in cfg and 'prior_model' in cfg


# ---------------------------------------------------------------- constructor arguments


def _norm(v, a, m):
  key = v.lower() if isinstance(v, str) else v
  if key not in _NORMS:
    raise A.Refused(f'unknown bottleneck norm; the official ones are {sorted(_NORMS, key=str)}')
  return {'model.bottleneck_norm': _NORMS[key]}


def _vq_type(v, a, m):
  if v and not a['l2_normalized']:
    raise A.Refused('stochastic sampling needs l2_normalized=True (the official code asserts it)')
  return {'model.vq_type': 'svq' if v else 'nearest'}


def _temperature(v, a, m):
  if not a['stochastic']:
    return 'no effect: the quantizer is not stochastic'
  if v > 0:
    return {'model.vq_temperature': float(v), 'model.vq_temperature_learnable': False}
  # < 0: a learned inverse temperature, initialised to 10 (our vq_temperature=0.1).
  return {'model.vq_temperature': 0.1, 'model.vq_temperature_learnable': True}


def _entropy_weight(v, a, m):
  if v > 0 and a['stochastic']:
    raise A.Refused(
      'the official entropy loss needs the non-stochastic quantizer (with stochastic=True its '
      'distances are undefined and the official forward fails)'
    )
  return {'model.vq_entropy_weight': float(v)}


def _entropy_temperature(v, a, m):
  # The official logits are -squared distance / T; for unit vectors that is 2 cos / T - const,
  # i.e. our cosine logits at temperature T / 2.
  return {'model.vq_entropy_temperature': float(v) / 2 if a['l2_normalized'] else float(v)}


VQ_ARGS = {
  'codebook_size': A.Arg(A.REQUIRED, A.to('model.codebook_size', int)),
  'commitment_loss_weight': A.Arg(0.25, A.to('model.vq_commit_weight', float)),
  'codebook_loss_weight': A.Arg(1.0, A.to('model.vq_codebook_weight', float)),
  'entropy_loss_weight': A.Arg(0.0, _entropy_weight),
  'entropy_loss_temperature': A.Arg(0.01, _entropy_temperature),
  'l2_normalized': A.Arg(False, A.to('model.vq_l2_normalized', bool)),
  'stochastic': A.Arg(False, _vq_type),
  'stochastic_temperature': A.Arg(1.0, _temperature),
  'same_index_shape': A.Arg(True, A.only(True, why='indices are always [B, N]')),
  'dim': A.Arg(None, A.injected('model.code_dim', 'the official Bottleneck')),
  'token_nums': A.Arg(None, A.injected('model.num_latent_tokens', 'the official Bottleneck')),
}


def _regularizer(v, a, m):
  if not isinstance(v, Mapping) or str(v.get('name', '')).lower() != 'vq':
    raise A.Refused("only the vector quantizer (name 'vq') has a larp_jax equivalent")
  for key in v:
    if key not in ('name', 'args'):
      m.problems.append(f'bottleneck.args.regularizer.{key}: unknown argument')
  m.run('bottleneck.args.regularizer.args.', v.get('args', {}), VQ_ARGS)
  return {}  # the entries are reported one by one


def _code_dim(v, a, m):
  if not v or int(v) <= 0:
    raise A.Refused('a bottleneck without a projection (bottleneck_dim <= 0) is not supported')
  return {'model.code_dim': int(v)}


BOTTLENECK_ARGS = {
  'bottleneck_dim': A.Arg(A.REQUIRED, _code_dim),
  'norm': A.Arg(None, _norm),
  'regularizer': A.Arg(None, _regularizer),
  'param_names': A.Arg(None, A.no_effect('stored by the official Bottleneck, never read')),
  'input_dim': A.Arg(None, A.injected('model.width', 'the official LARPTokenizer')),
  'output_dim': A.Arg(None, A.injected('model.width', 'the official LARPTokenizer')),
  'token_nums': A.Arg(None, A.injected('model.num_latent_tokens', 'the official LARPTokenizer')),
}


def _bottleneck(v, a, m):
  if not isinstance(v, Mapping) or v.get('name') != 'bottleneck':
    raise A.Refused("expected {'name': 'bottleneck', 'args': {...}}")
  for key in v:
    if key not in ('name', 'args'):
      m.problems.append(f'bottleneck.{key}: unknown argument')
  m.run('bottleneck.args.', v.get('args', {}), BOTTLENECK_ARGS)
  return {}  # the entries are reported one by one


def _dropout(v, a, m):
  if m.settings.get('model.prior_dropout') == 0.0 and m.context.get('no_dropout'):
    return 'no effect: prior_model.no_dropout=True sets every prior dropout to 0'
  if not (v == a['resid_pdrop'] == a['attn_pdrop']):
    raise A.Refused(
      f'larp_jax has one prior dropout rate; embd_pdrop, resid_pdrop and attn_pdrop differ '
      f'({v}, {a["resid_pdrop"]}, {a["attn_pdrop"]})'
    )
  return {'model.prior_dropout': float(v)}


def _refuse_size(v, a, m):
  if v is None:
    return 'checked (set by the preset)'
  raise A.Refused('the preset (prior_model.name) fixes the size; the official GPTC_* refuse it')


GPTC_ARGS = {
  'embd_pdrop': A.Arg(0.1, _dropout),
  'resid_pdrop': A.Arg(0.1, lambda v, a, m: 'checked (== embd_pdrop)'),
  'attn_pdrop': A.Arg(0.1, lambda v, a, m: 'checked (== embd_pdrop)'),
  'max_seq_len': A.Arg(1024, A.to('model.prior_max_len', int)),
  'n_ind': A.Arg(None, A.injected('model.code_dim', 'the official LARPTokenizer')),
  'n_classes': A.Arg(None, A.injected('model.codebook_size', 'the official LARPTokenizer')),
  'n_embd': A.Arg(None, _refuse_size),
  'n_head': A.Arg(None, _refuse_size),
  'n_layer': A.Arg(None, _refuse_size),
  'detach_x': A.Arg(
    False, A.no_effect('read only by GPTC.compute_prior_loss, which LARP never calls')
  ),
  'detach_target': A.Arg(
    True, A.no_effect('read only by GPTC.compute_prior_loss, which LARP never calls')
  ),
  'l2_normalized': A.Arg(True, A.only(True, why='our prior always l2-normalises its predictions')),
  'fully_separated': A.Arg(False, A.no_effect('stored by GPTC, never read')),
}


def _prior_name(v, a, m):
  if str(v).lower() in _NONE_NAMES:
    return {'model.use_prior': False}
  if v not in GPTC_PRESETS:
    raise A.Refused(f'unknown prior; the official ones are {sorted(GPTC_PRESETS)} or none')
  depth, heads, width = GPTC_PRESETS[v]
  return {
    'model.use_prior': True,
    'model.prior_depth': depth,
    'model.prior_heads': heads,
    'model.prior_width': width,
  }


def _needs_prior(rule):
  """Prior settings are read by the official code only when a prior is built."""

  def wrapped(v, a, m):
    if not m.settings.get('model.use_prior'):
      return 'no effect: no prior'
    if v is A.REQUIRED:
      raise A.Refused('missing (the official prior reads it)')
    return rule(v, a, m)

  wrapped.accepts_missing = True  # without a prior, its required entries may be absent
  return wrapped


def _use_mix_ss(v, a, m):
  if A.REQUIRED in (a['mix_ss_max_ratio'], a['mix_ss_peak_steps_ratio']):
    return 'checked (a missing ratio is reported below)'
  if v:
    return {
      'loss.mix_max_ratio': float(a['mix_ss_max_ratio']),
      'loss.mix_ramp_fraction': float(a['mix_ss_peak_steps_ratio']),
    }
  return {'loss.mix_max_ratio': 1.0, 'loss.mix_ramp_fraction': 0.0}  # every position resampled


def _rounds_only_one(what):
  def rule(v, a, m):
    if a['n_rounds'] is not A.REQUIRED and int(a['n_rounds']) > 1 and v != (what == 'avg'):
      raise A.Refused(
        'larp_jax averages the loss over all rounds, each with gradients'
        if what == 'avg'
        else 'larp_jax keeps the gradients of every round'
      )
    return 'checked'

  return rule


def _no_dropout(v, a, m):
  m.context['no_dropout'] = bool(v)
  return {'model.prior_dropout': 0.0} if v else 'checked'


def _prior_args(v, a, m):
  m.run('prior_model.args.', v, GPTC_ARGS)
  return {}  # the entries are reported one by one


PRIOR_ARGS = {
  'name': A.Arg('', _prior_name),
  'no_dropout': A.Arg(False, _needs_prior(_no_dropout)),
  'n_rounds': A.Arg(A.REQUIRED, _needs_prior(A.to('model.prior_n_rounds', int))),
  'avg_loss_over_rounds': A.Arg(A.REQUIRED, _needs_prior(_rounds_only_one('avg'))),
  'no_grad_before_last_round': A.Arg(A.REQUIRED, _needs_prior(_rounds_only_one('grad'))),
  'use_mix_ss': A.Arg(A.REQUIRED, _needs_prior(_use_mix_ss)),
  'mix_ss_max_ratio': A.Arg(A.REQUIRED, _needs_prior(lambda v, a, m: 'checked (with use_mix_ss)')),
  'mix_ss_peak_steps_ratio': A.Arg(
    A.REQUIRED, _needs_prior(lambda v, a, m: 'checked (with use_mix_ss)')
  ),
  'latent_ce_temperature': A.Arg(
    A.REQUIRED, _needs_prior(A.to('model.prior_ce_temperature', float))
  ),
  'args': A.Arg({}, _needs_prior(_prior_args)),
}


def _prior_model(v, a, m):
  if not isinstance(v, Mapping):
    raise A.Refused('expected a dict')
  # Required entries are REQUIRED only with a prior: run() reports them through _needs_prior.
  m.run('prior_model.', v, PRIOR_ARGS)
  return {}  # the entries are reported one by one


def _video_shape(v, a, m):
  return {'model.video_shape': (int(a['frame_num']), int(v), int(v))}


def _patch_size(v, a, m):
  if int(a['temporal_patch_size']) <= 1:
    raise A.Refused('per-frame patches (temporal_patch_size=1, a Conv2d) are not supported')
  return {'model.patch_size': (int(a['temporal_patch_size']), int(v), int(v))}


def _stack(v, a, m):
  name = a['transformer_name']
  if v is not None and str(v).lower() not in _NONE_NAMES:
    name = v
  if name != 'transformer_encoder_parallel':
    raise A.Refused('only transformer_encoder_parallel (the [context ; queries] stack) exists here')
  return 'checked'


def _pe_scale(v, a, m):
  if float(v) != 10000.0:
    # Only the decoder's 1D latent PE uses it; the 3D patch PE keeps base 10000, and our pe_base
    # sets both.
    raise A.Refused('only 10000 (the 3D patch PE always uses 10000; larp_jax has one base)')
  return {'model.pe_base': 10000.0}


def _released_only(value, what):
  return A.only(value, why=f'larp_jax has {what}')


TOKENIZER_ARGS = {
  'bottleneck_token_num': A.Arg(1024, A.to('model.num_latent_tokens', int)),
  'frame_num': A.Arg(16, lambda v, a, m: 'checked (with input_size)'),
  'input_size': A.Arg(128, _video_shape),
  'temporal_patch_size': A.Arg(4, lambda v, a, m: 'checked (with patch_size)'),
  'patch_size': A.Arg(8, _patch_size),
  'decoder_temporal_patch_size': A.Arg(
    4, A.equals('temporal_patch_size', 'the official unpatchify uses the encoder patch size')
  ),
  'decoder_patch_size': A.Arg(
    8, A.equals('patch_size', 'the official unpatchify uses the encoder patch size')
  ),
  'in_channels': A.Arg(3, A.only(3, why='RGB videos only')),
  'transformer_name': A.Arg('transformer_encoder_parallel', lambda v, a, m: 'checked (below)'),
  'encoder_name': A.Arg(None, _stack),
  'decoder_name': A.Arg(None, _stack),
  'latent_pe_scale_factor': A.Arg(10000, _pe_scale),
  'query_init_std': A.Arg(0.02, A.to('model.query_init_std', float)),
  'encoder_hidden_size': A.Arg(768, A.to('model.width', int)),
  'decoder_hidden_size': A.Arg(768, A.equals('encoder_hidden_size', 'larp_jax has one width')),
  'encoder_num_heads': A.Arg(12, A.to('model.num_heads', int)),
  'decoder_num_heads': A.Arg(12, A.equals('encoder_num_heads', 'larp_jax has one head count')),
  'encoder_depth': A.Arg(6, A.to('model.encoder_depth', int)),
  'decoder_depth': A.Arg(6, A.to('model.decoder_depth', int)),
  'learned_encoder_patch_pe': A.Arg(False, _released_only(False, 'a fixed 3D patch PE only')),
  'learned_encoder_latent_query_embed': A.Arg(
    True, _released_only(True, 'learned latent queries only')
  ),
  'learned_decoder_latent_pe': A.Arg(False, _released_only(False, 'a fixed 1D latent PE only')),
  'learned_decoder_patch_query_embed': A.Arg(
    False, _released_only(False, 'fixed 3D patch-query PEs only')
  ),
  'use_encoder_patch_token_type_embed': A.Arg(
    False, _released_only(False, 'no encoder patch type vector')
  ),
  'use_encoder_latent_query_token_type_embed': A.Arg(
    False, _released_only(False, 'no latent-query type vector')
  ),
  'use_decoder_latent_token_type_embed': A.Arg(
    False, _released_only(False, 'no decoder latent type vector')
  ),
  'use_decoder_patch_query_token_type_embed': A.Arg(
    False, _released_only(True, 'the patch-query type vector always (released: True)')
  ),
  'encoder_query_gaussian_init': A.Arg(
    True, A.to('model.query_init', lambda v: 'normal' if v else 'sincos')
  ),
  'bottleneck': A.Arg(A.REQUIRED, _bottleneck),
  'prior_model': A.Arg(A.REQUIRED, _prior_model),
}


def map_config(cfg: Mapping[str, Any]) -> A.Mapper:
  """The settings of an official config.json; ConfigError listing every refused argument."""
  m = A.Mapper()
  m.run('', cfg, TOKENIZER_ARGS)
  m.raise_problems(f'config.json of the official {OFFICIAL_CLASS}')
  return m


def official_config_of(model: Mapping[str, Any], loss: Mapping[str, Any]) -> dict:
  """Our model kwargs (and loss settings) -> the official config.json (the inverse of
  ``map_config``, for the settings it maps). ConfigError for a model with no official form."""
  from larp_jax import errors

  def need(cond, msg):
    if not cond:
      raise errors.ConfigError(f'no official LARPTokenizer has {msg}')

  t, h, w = (int(s) for s in model['video_shape'])
  pt, ph, pw = (int(s) for s in model['patch_size'])
  need(h == w and ph == pw, f'a non-square video or patch ({(t, h, w)}, {(pt, ph, pw)})')
  need(pt > 1, 'per-frame patches')
  need(float(model.get('pe_base', 10000.0)) == 10000.0, 'pe_base != 10000')
  for key in ('query_patch_skip', 'latent_patch_skip', 'patch_skip_proj', 'vq_bypass'):
    need(not model.get(key, False), f'{key}=True')
  need(float(model.get('mlp_ratio', 4.0)) == 4.0, 'mlp_ratio != 4')
  norm = model.get('bottleneck_norm', 'none')
  need(norm != 'ln_d_na', "bottleneck_norm='ln_d_na' applied (the official one is a no-op)")
  learned = bool(model.get('vq_temperature_learnable', False))
  l2 = bool(model.get('vq_l2_normalized', True))
  stochastic = model.get('vq_type', 'svq') == 'svq'
  ent_t = float(model.get('vq_entropy_temperature', 0.01))
  vq = dict(
    codebook_size=int(model['codebook_size']),
    commitment_loss_weight=float(model.get('vq_commit_weight', 0.25)),
    codebook_loss_weight=float(model.get('vq_codebook_weight', 1.0)),
    entropy_loss_weight=float(model.get('vq_entropy_weight', 0.0)),
    entropy_loss_temperature=ent_t * 2 if l2 else ent_t,
    l2_normalized=l2,
    stochastic=stochastic,
    stochastic_temperature=-1.0 if learned else float(model.get('vq_temperature', 0.03)),
  )
  need(
    not learned or float(model.get('vq_temperature', 0.1)) == 0.1,
    'a learned temperature not starting at 1/0.1',
  )
  need(int(model.get('vq_temperature_ramp_steps', 0)) == 0, 'a temperature ramp in the model')
  prior = {'name': 'none'}
  if model.get('use_prior', True):
    size = (int(model['prior_depth']), int(model['prior_heads']), int(model['prior_width']))
    names = [k for k, v in GPTC_PRESETS.items() if v == size]
    need(names, f'a prior of depth/heads/width {size} (not a GPTC preset)')
    drop = float(model.get('prior_dropout', 0.1))
    mix_max, ramp = float(loss.get('mix_max_ratio', 0.5)), float(loss.get('mix_ramp_fraction', 0.3))
    mix = not (mix_max == 1.0 and ramp == 0.0)
    prior = dict(
      name=names[0],
      use_mix_ss=mix,
      mix_ss_max_ratio=mix_max if mix else 0.5,
      mix_ss_peak_steps_ratio=ramp if mix else 0.3,
      n_rounds=int(model.get('prior_n_rounds', 2)),
      avg_loss_over_rounds=True,
      no_grad_before_last_round=False,
      no_dropout=False,
      latent_ce_temperature=float(model.get('prior_ce_temperature', 1.0)),
      args=dict(
        l2_normalized=True,
        max_seq_len=int(model.get('prior_max_len') or model['num_latent_tokens']),
        embd_pdrop=drop,
        resid_pdrop=drop,
        attn_pdrop=drop,
      ),
    )
  width, heads = int(model['width']), int(model['num_heads'])
  return dict(
    bottleneck=dict(
      name='bottleneck',
      args=dict(
        bottleneck_dim=int(model['code_dim']),
        norm=norm,
        regularizer=dict(name='vq', args=vq),
      ),
    ),
    prior_model=prior,
    bottleneck_token_num=int(model['num_latent_tokens']),
    input_size=h,
    frame_num=t,
    temporal_patch_size=pt,
    patch_size=ph,
    decoder_temporal_patch_size=pt,
    decoder_patch_size=ph,
    in_channels=3,
    transformer_name='transformer_encoder_parallel',
    encoder_name=None,
    decoder_name=None,
    latent_pe_scale_factor=10000,
    query_init_std=float(model.get('query_init_std', 0.02)),
    encoder_hidden_size=width,
    decoder_hidden_size=width,
    encoder_num_heads=heads,
    decoder_num_heads=heads,
    encoder_depth=int(model['encoder_depth']),
    decoder_depth=int(model['decoder_depth']),
    learned_encoder_patch_pe=False,
    learned_encoder_latent_query_embed=True,
    learned_decoder_latent_pe=False,
    learned_decoder_patch_query_embed=False,
    use_encoder_patch_token_type_embed=False,
    use_encoder_latent_query_token_type_embed=False,
    use_decoder_latent_token_type_embed=False,
    use_decoder_patch_query_token_type_embed=True,
    encoder_query_gaussian_init=model.get('query_init', 'normal') == 'normal',
  )


# ---------------------------------------------------------------- tensors


def _block_rules(official: str, ours: str) -> list[Rule]:
  """timm's ViT block (the official `models/transformer.py`) -> our ``ViTBlock``."""
  return (
    layer_norm(f'{official}.norm1', f'{ours}/norm1')
    + linear(f'{official}.attn.qkv', f'{ours}/attn/qkv', bias=False)  # fused [q | k | v]
    + linear(f'{official}.attn.proj', f'{ours}/attn/proj')
    + layer_norm(f'{official}.norm2', f'{ours}/norm2')
    + linear(f'{official}.mlp.fc1', f'{ours}/mlp/fc1')
    + linear(f'{official}.mlp.fc2', f'{ours}/mlp/fc2')
  )


def _prior_block_rules(official: str, ours: str) -> list[Rule]:
  """The official GPTC ``Block`` -> our ``GPTBlock``."""
  return (
    layer_norm(f'{official}.ln1', f'{ours}/ln_1')
    + linear(f'{official}.attn.query', f'{ours}/q')
    + linear(f'{official}.attn.key', f'{ours}/k')
    + linear(f'{official}.attn.value', f'{ours}/v')
    + linear(f'{official}.attn.proj', f'{ours}/proj')
    + layer_norm(f'{official}.ln2', f'{ours}/ln_2')
    + linear(f'{official}.mlp.0', f'{ours}/mlp/fc1')
    + linear(f'{official}.mlp.2', f'{ours}/mlp/fc2')
  )


RULES: list[Rule] = [
  Rule('x_embedder.proj.weight', 'params/patch_embed/kernel', 'conv3d_patch'),
  Rule('x_embedder.proj.bias', 'params/patch_embed/bias'),
  Rule('encoder_latent_query_embed', 'params/latent_queries'),
  *_block_rules('encoder.blocks.{i}', 'params/encoder/blocks_{i}'),
  *linear('bottleneck.in_linear', 'params/in_linear'),
  Rule('bottleneck.norm_layer.weight', 'params/norm_layer/scale'),
  Rule('bottleneck.norm_layer.bias', 'params/norm_layer/bias'),
  Rule('bottleneck.norm_layer.running_mean', 'batch_stats/norm_layer/mean'),
  Rule('bottleneck.norm_layer.running_var', 'batch_stats/norm_layer/var'),
  Rule('bottleneck.regularizer.embedding.weight', 'params/quantizer/codebook'),
  Rule('bottleneck.regularizer.stochastic_temperature_inv', 'params/quantizer/inv_temperature'),
  *linear('bottleneck.out_linear', 'params/out_linear'),
  Rule('decoder_patch_query_token_type_embed', 'params/query_type_embed'),
  *_block_rules('decoder.blocks.{i}', 'params/decoder/blocks_{i}'),
  *layer_norm('final_layer.norm_final', 'params/final_norm'),
  *linear('final_layer.linear', 'params/final_linear'),
  Rule('prior_model.pos_emb', 'params/prior/pos_embed'),
  *linear('prior_model.input_proj', 'params/prior/input_proj'),
  *_prior_block_rules('prior_model.blocks.{i}', 'params/prior/blocks_{i}'),
  *layer_norm('prior_model.ln_f', 'params/prior/ln_f'),
  *linear('prior_model.head', 'params/prior/head'),
]

# Official tensors that are not loaded, and why.
IGNORED = {
  r'^bottleneck\.norm_layer\.num_batches_tracked$': (
    "BatchNorm's step counter: read only with momentum=None, and the official momentum is 0.1"
  ),
}


def buffers(model) -> dict:
  """Official buffer name -> a function giving our value of it (the fixed sin-cos tables)."""
  width, grid, n = model.width, model.grid, model.num_latent_tokens
  patch_pe = lambda: embeddings.sincos_3d(width, *grid, base=10000.0)[None]
  return {
    'encoder_patch_pe': patch_pe,
    'decoder_patch_query_embed': patch_pe,
    'decoder_latent_pe': lambda: embeddings.sincos_1d_table(width, n, model.pe_base)[None],
  }


def official_extras(model) -> dict:
  """The non-parameter entries an official state dict of ``model`` holds besides the buffers."""
  if model.bottleneck_norm in ('bn_bn', 'bn_b'):
    return {'bottleneck.norm_layer.num_batches_tracked': np.asarray(0, np.int64)}
  return {}


def transform_context(model) -> dict:
  return {'patch_size': tuple(int(p) for p in model.patch_size)}


def count(tree_shapes: Mapping[str, tuple], prefix: str = '') -> int:
  return sum(math.prod(s) for k, s in tree_shapes.items() if k.startswith(prefix))


def counts(expected_shapes: Mapping[str, tuple]) -> dict:
  """Parameter counts for the report (batch statistics are not parameters)."""
  params = {k: v for k, v in expected_shapes.items() if k.startswith('params/')}
  total = count(params)
  return {'parameters': total, 'parameters_without_prior': total - count(params, 'params/prior/')}


def run_config(settings: Mapping[str, Any], norm_eps):
  """The released recipe (``configs/ucf101.py``) with the converted model and loss settings
  and the LayerNorm eps chosen."""
  from larp_jax.configs import ucf101

  c = ucf101.get_config()
  for key, value in settings.items():
    group, name = key.split('.', 1)
    c[group][name] = value
  c.model.norm_eps = float(RELEASED_NORM_EPS if norm_eps is None else norm_eps)
  # The discriminator is not released (fresh at fine-tuning); its patches follow the tokenizer's.
  c.disc.patch_size = tuple(c.model.patch_size)
  return c


def norm_eps_record(config, given: bool) -> dict:
  eps = float(config.model.norm_eps)
  if not given:
    why = (
      'default 1e-5: the released checkpoints were trained with timm < 1.0.16, whose ViT blocks '
      "use torch's LayerNorm eps (timm >= 1.0.16 uses 1e-6)"
    )
  else:
    why = 'given (norm_eps)'
  return dict(value=eps, reason=why)


def make_model(model_cfg):
  from larp_jax.tasks import tokenizer as task

  return task.make_model(model_cfg)


def expected(model) -> dict:
  """Our flat variable paths -> shapes, without allocating them."""
  import flax
  import jax

  from larp_jax.tasks import tokenizer as task

  abstract = jax.eval_shape(lambda: flax.linen.unbox(task.boxed_variables(model)))
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract, sep='/').items()}


def official_config(config) -> dict:
  return official_config_of(dict(config['model']), dict(config['loss']))
