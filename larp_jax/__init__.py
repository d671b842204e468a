"""larp_jax: LARP video tokenizer and AR generator in JAX/Flax.

Library entry points:
  LARPTokenizer  -- the Flax tokenizer module (``LARPTokenizer(**config.model)``).
"""

from larp_jax.models.tokenizer import LARPTokenizer

__all__ = ['LARPTokenizer']
