"""Tokenizer (larp_jax/api.py): input checks of encode/decode on a tiny randomly initialised model."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from larp_jax import LARPTokenizer, Tokenizer
from tests.conftest import tiny_tokenizer_kwargs


@pytest.fixture(scope='module')
def tok():
  model = LARPTokenizer(**tiny_tokenizer_kwargs())
  k = jax.random.split(jax.random.key(0), 3)
  video = jnp.zeros((1, *model.video_shape, 3))
  params = model.init({'params': k[0], 'vq': k[1], 'dropout': k[2]}, video, train=True)['params']
  return Tokenizer(model=model, params=nn.unbox(params), config=ml_collections.ConfigDict(), step=0)


def _uint8_video(tok, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (batch, *tok.video_shape, 3), dtype=np.uint8)


def _tokens(tok, fill):
  return np.full((2, tok.num_tokens), fill, np.int32)


# ---------------------------------------------------------------- decode


def test_decode_valid_ids(tok):
  k = tok.model.codebook_size
  tokens = np.tile(np.array([0, k - 1], np.int64), (2, tok.num_tokens // 2))
  out = np.asarray(tok.decode(tokens))
  assert out.shape == (2, *tok.video_shape, 3) and out.dtype == np.float32
  assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
  np.testing.assert_array_equal(out, np.asarray(tok.decode(jnp.asarray(tokens, jnp.int32))))


@pytest.mark.parametrize('bad', ['K', 'K+7', -1])
def test_decode_rejects_out_of_range_ids(tok, bad):
  k = tok.model.codebook_size
  value = {'K': k, 'K+7': k + 7}.get(bad, bad)
  tokens = _tokens(tok, 3)
  tokens[1, -1] = value
  with pytest.raises(ValueError, match=rf'\[0, {k}\).*min {min(3, value)}, max {max(3, value)}'):
    tok.decode(tokens)
  with pytest.raises(ValueError, match=rf'\[0, {k}\)'):
    tok.decode(jnp.asarray(tokens))


@pytest.mark.parametrize('shape', [(2, 7), (2, 9), (8,), (1, 2, 8)])
def test_decode_rejects_wrong_shape(tok, shape):
  with pytest.raises(ValueError, match=re.escape(f'[B, {tok.num_tokens}], got {shape}')):
    tok.decode(np.zeros(shape, np.int32))


def test_decode_rejects_float_tokens(tok):
  with pytest.raises(ValueError, match='integer'):
    tok.decode(_tokens(tok, 1).astype(np.float32))


# ---------------------------------------------------------------- encode


def test_encode_uint8_equals_float_in_0_1(tok):
  u = _uint8_video(tok)
  t_u8 = np.asarray(tok.encode(u))
  t_f = np.asarray(tok.encode(u.astype(np.float32) / 255.0))
  assert t_u8.shape == (2, tok.num_tokens) and t_u8.dtype == np.int32
  np.testing.assert_array_equal(t_u8, t_f)
  np.testing.assert_array_equal(t_f, np.asarray(tok.encode(jnp.asarray(u))))
  # The uint8 path really scales: a different video gives different tokens.
  assert not np.array_equal(t_u8, np.asarray(tok.encode(_uint8_video(tok, seed=1))))


def test_encode_accepts_tiny_round_off(tok):
  v = _uint8_video(tok).astype(np.float32) / 255.0
  v[0, 0, 0, 0] = [-5e-4, 1.0 + 5e-4, 0.5]
  assert tok.encode(v).shape == (2, tok.num_tokens)


@pytest.mark.parametrize('as_jax', [False, True])
def test_encode_rejects_0_255_floats(tok, as_jax):
  v = _uint8_video(tok).astype(np.float32)
  v = jnp.asarray(v) if as_jax else v
  with pytest.raises(ValueError, match=r'\[0, 1\], found \[0, 255\].*divide it by 255'):
    tok.encode(v)


@pytest.mark.parametrize('lo,hi', [(-0.5, 1.0), (0.0, 1.01), (0.0, np.nan)])
def test_encode_rejects_other_out_of_range_floats(tok, lo, hi):
  v = np.full((1, *tok.video_shape, 3), 0.5, np.float32)
  v[0, 0, 0, 0, :2] = [lo, hi]
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\]'):
    tok.encode(v)


def test_encode_rejects_int32_0_255(tok):
  with pytest.raises(ValueError, match='uint8'):
    tok.encode(_uint8_video(tok).astype(np.int32))


@pytest.mark.parametrize(
  'shape', [(2, 4, 16, 16), (4, 16, 16, 3), (2, 4, 16, 8, 3), (2, 2, 16, 16, 3), (2, 4, 16, 16, 1)]
)
def test_encode_rejects_wrong_shape(tok, shape):
  with pytest.raises(ValueError, match=r'shape \[B, 4, 16, 16, 3\]'):
    tok.encode(np.zeros(shape, np.float32))
