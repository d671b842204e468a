"""larp_jax: LARP video tokenizer and AR generator in JAX/Flax.

Library entry points:
  LARPTokenizer   -- the Flax tokenizer module (``LARPTokenizer(**config.model)``).
  LARPAR          -- the Flax AR generator module (``LARPAR(**config.model)``); sampling in
                     ``larp_jax.generation.sampling``.
  load_tokenizer  -- a trained tokenizer from a run directory, with jitted encode/decode.
"""

from larp_jax.api import Tokenizer, load_tokenizer
from larp_jax.models.larp_ar import LARPAR
from larp_jax.models.tokenizer import LARPTokenizer

__all__ = ['LARPAR', 'LARPTokenizer', 'Tokenizer', 'load_tokenizer']
