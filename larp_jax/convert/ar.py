"""The official ``LARP_AR`` generator (the official `models/larp_ar.py`, its ``ModelArgs``) ->
our ``LARPAR`` (``larp_jax/models/larp_ar.py``) and back.

config.json of ``LARP_AR.save_pretrained`` is its ``ModelArgs`` dataclass, flat. ``ARGS`` maps
every field to our settings, checks it, or refuses it; ``RULES`` maps every tensor: Linear
weights transposed (the fused ``wqkv`` kept fused), embedding tables as they are, RMSNorm
weights to 'scale'. The official generator has no buffers in its state dict (its KV caches are
built only for sampling).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp

from larp_jax import errors
from larp_jax.convert import args as A
from larp_jax.convert.table import Rule, linear

OFFICIAL_CLASS = 'LARP_AR'
OURS = 'LARPAR'
TASK = 'generator'


def is_official_config(cfg: Mapping[str, Any]) -> bool:
  return {'dim', 'n_layer', 'n_head', 'vocab_size'} <= set(cfg)


def _kv_heads(v, a, m):
  if v is not None and v != a['n_head']:
    raise A.Refused('larp_jax has multi-head attention only (n_kv_head = n_head)')
  return 'checked (multi-head attention)'


def _cls_tokens(v, a, m):
  want = int(a['max_seq_len']) + 1 if a['frame_prediction'] else 1
  if int(v) != want:
    raise A.Refused(
      f'must be {want} (the FP prefix is max_seq_len tokens + the separator)'
      if a['frame_prediction']
      else 'must be 1 (one class token)'
    )
  return 'checked (== the prefix length)'


def _model_type(v, a, m):
  if a['frame_prediction']:
    return 'no effect: frame prediction has no class embedding'
  if v != 'class_cond':
    raise A.Refused("only 'class_cond' (the official code refuses anything else too)")
  return 'checked'


def _class_dropout(v, a, m):
  if a['frame_prediction']:
    return 'no effect: frame prediction has no class embedding'
  if not float(v) > 0:
    raise A.Refused('must be > 0: our class table always has the null-class row')
  return {'model.class_dropout': float(v)}


def _zero(why):
  return A.only(0, 0.0, why=why)


ARGS = {
  'dim': A.Arg(4096, A.to('model.dim', int)),
  'n_layer': A.Arg(32, A.to('model.depth', int)),
  'n_head': A.Arg(32, A.to('model.num_heads', int)),
  'n_kv_head': A.Arg(None, _kv_heads),
  'multiple_of': A.Arg(256, A.to('model.ffn_multiple', int)),
  'ffn_dim_multiplier': A.Arg(
    None, A.only(None, why='larp_jax sizes the SwiGLU as int(8 dim / 3) rounded up only')
  ),
  'rope_base': A.Arg(10000, A.no_effect('the official model has no RoPE; never read')),
  'norm_eps': A.Arg(1e-5, A.to('model.norm_eps', float)),
  'initializer_range': A.Arg(0.02, A.no_effect('initialisation only; the weights are loaded')),
  'token_dropout_p': A.Arg(0.1, A.to('model.token_dropout', float)),
  'attn_dropout_p': A.Arg(0.0, _zero('larp_jax has no attention dropout in the generator')),
  'resid_dropout_p': A.Arg(0.1, A.to('model.resid_dropout', float)),
  'ffn_dropout_p': A.Arg(0.1, A.to('model.ffn_dropout', float)),
  'drop_path_rate': A.Arg(0.0, _zero('larp_jax has no drop-path')),
  'num_classes': A.Arg(101, A.to('model.num_classes', int)),
  'class_dropout_prob': A.Arg(0.1, _class_dropout),
  'model_type': A.Arg('class_cond', _model_type),
  'vocab_size': A.Arg(8192, A.to('model.vocab_size', int)),
  'cls_token_num': A.Arg(1, _cls_tokens),
  'max_batch_size': A.Arg(32, A.no_effect('the official KV-cache batch size; ours is per call')),
  'max_seq_len': A.Arg(1024, A.to('model.seq_len', int)),
  'use_fixed_pe': A.Arg(False, A.only(False, why='larp_jax has the learned absolute PE only')),
  'frame_prediction': A.Arg(False, A.to('model.frame_prediction', bool)),
}


def map_config(cfg: Mapping[str, Any]) -> A.Mapper:
  m = A.Mapper()
  m.run('', cfg, ARGS)
  m.raise_problems(f'config.json of the official {OFFICIAL_CLASS}')
  return m


def run_config(settings: Mapping[str, Any], norm_eps=None):
  """A generator run config (``configs/ucf101_ar.py``, or ``configs/k600_fp.py`` for frame
  prediction) whose ``model`` is the converted LARPAR kwargs: ``--mode=sample`` / ``--mode=eval``
  / ``config.init_from`` take it as it is, with ``config.tokenizer_path`` set to the (converted)
  tokenizer."""
  if norm_eps is not None:
    raise errors.UserError(
      "norm_eps is the tokenizer ViT blocks'; the generator's RMSNorm eps "
      'is in its config.json (norm_eps)'
    )
  from larp_jax.configs import k600_fp, ucf101_ar

  model = {k.split('.', 1)[1]: v for k, v in settings.items()}
  model.update(attention_impl='auto', remat='none', dtype='float32', param_dtype='float32')
  config = (k600_fp if model.get('frame_prediction') else ucf101_ar).get_config()
  with config.unlocked():
    config.model = dict(config.model, **model)
  return config


def make_model(model_cfg):
  """``LARPAR(**config.model)`` (the generator task's constructor, ConfigError on a bad one)."""
  from larp_jax.tasks import generator

  return generator.make_model(model_cfg)


def abstract_variables(model) -> dict:
  """The model's variables as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  cond = (
    dict(prefix=jnp.zeros((1, model.seq_len), jnp.int32))
    if model.frame_prediction
    else dict(labels=jnp.zeros((1,), jnp.int32))
  )
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: flax.linen.unbox(model.init(jax.random.key(0), tokens, **cond)))


def expected(model) -> dict:
  flat = flax.traverse_util.flatten_dict(abstract_variables(model), sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}


def _rms(official: str, ours: str) -> list[Rule]:
  return [Rule(f'{official}.weight', f'{ours}/scale')]


RULES: list[Rule] = [
  Rule('tok_embeddings.weight', 'params/tok_embeddings/embedding'),
  Rule('cls_embedding.embedding_table.weight', 'params/cls_embedding/embedding_table/embedding'),
  Rule('abs_pe', 'params/abs_pe'),
  *linear('layers.{i}.attention.wqkv', 'params/layers_{i}/attention/wqkv', bias=False),
  *linear('layers.{i}.attention.wo', 'params/layers_{i}/attention/wo', bias=False),
  *linear('layers.{i}.feed_forward.w1', 'params/layers_{i}/feed_forward/w1', bias=False),
  *linear('layers.{i}.feed_forward.w2', 'params/layers_{i}/feed_forward/w2', bias=False),
  *linear('layers.{i}.feed_forward.w3', 'params/layers_{i}/feed_forward/w3', bias=False),
  *_rms('layers.{i}.attention_norm', 'params/layers_{i}/attention_norm'),
  *_rms('layers.{i}.ffn_norm', 'params/layers_{i}/ffn_norm'),
  *_rms('norm', 'params/norm'),
  *linear('output', 'params/output', bias=False),
]
IGNORED: dict = {}


def buffers(model) -> dict:
  del model
  return {}


def official_extras(model) -> dict:
  del model
  return {}


def transform_context(model) -> dict:
  del model
  return {}


def counts(expected_shapes: Mapping[str, tuple]) -> dict:
  total = sum(math.prod(s) for s in expected_shapes.values())
  return {'parameters': total}


def norm_eps_record(config, given: bool) -> dict:
  del given  # run_config refuses a given eps
  return dict(value=float(config.model.norm_eps), reason='config.json norm_eps (RMSNorm)')


def official_config(config) -> dict:
  """Our generator config -> the official config.json (its ``ModelArgs``)."""
  model = dict(config['model'])
  fp = bool(model.get('frame_prediction', False))
  seq_len = int(model.get('seq_len', 1024))
  return dict(
    dim=int(model['dim']),
    n_layer=int(model['depth']),
    n_head=int(model['num_heads']),
    n_kv_head=None,
    multiple_of=int(model.get('ffn_multiple', 256)),
    ffn_dim_multiplier=None,
    rope_base=10000,
    norm_eps=float(model.get('norm_eps', 1e-5)),
    initializer_range=0.02,
    token_dropout_p=float(model.get('token_dropout', 0.1)),
    attn_dropout_p=0.0,
    resid_dropout_p=float(model.get('resid_dropout', 0.1)),
    ffn_dropout_p=float(model.get('ffn_dropout', 0.1)),
    drop_path_rate=0.0,
    num_classes=int(model.get('num_classes', 101)),
    class_dropout_prob=float(model.get('class_dropout', 0.1)),
    model_type='class_cond',
    vocab_size=int(model.get('vocab_size', 8192)),
    cls_token_num=seq_len + 1 if fp else 1,
    max_batch_size=32,
    max_seq_len=seq_len,
    use_fixed_pe=False,
    frame_prediction=fp,
  )
