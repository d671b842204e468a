"""Transformer GAN discriminator (the official `models/loss.py`, ``TransformerDiscriminator``).

video [B, T, H, W, 3] -> 3D patches -> Dense(width) + fixed 3D sin-cos PE -> [CLS ; tokens]
-> ViT blocks -> CLS -> LayerNorm(1e-6) -> Dense(1) -> one logit per video [B].
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from larp_jax.models import embeddings, layers, patches, vit


def _torch_xavier_uniform_3d(key, shape, dtype=jnp.float32):
  """torch xavier_uniform_ on a (1, 1, D) tensor: fan_in = fan_out = D."""
  bound = math.sqrt(6.0 / (2 * shape[-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class TransformerDiscriminator(nn.Module):
  video_shape: Sequence[int] = (16, 128, 128)
  patch_size: Sequence[int] = (4, 8, 8)
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5
  attention_impl: str = 'auto'  # see models.attention.resolve_attention_impl
  remat: str = 'none'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for dim, s, p in zip('THW', self.video_shape, self.patch_size):
      if s % p:
        raise ValueError(f'discriminator patch_size {dim}={p} does not divide video {dim}={s}')
    if self.width % self.num_heads or self.width % 4:
      raise ValueError(
        f'discriminator width={self.width} must be divisible by num_heads={self.num_heads} and by 4'
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, video):
    """video [B, T, H, W, 3] in [0, 1] (unclamped reconstructions allowed) -> logits [B] float32."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    grid = [s // p for s, p in zip(self.video_shape, self.patch_size)]
    x = patches.patchify(video.astype(self.dtype), self.patch_size)
    x = layers.dense(self.width, ('patch', 'embed'), name='patch_embed', **kw)(x)
    x = x + jnp.asarray(embeddings.sincos_3d(self.width, *grid)).astype(x.dtype)
    cls = self.param(
      'cls_token',
      nn.with_logical_partitioning(_torch_xavier_uniform_3d, (None, None, 'embed')),
      (1, 1, self.width),
      self.param_dtype,
    )
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    x = vit.ViTStack(
      self.depth,
      self.num_heads,
      self.mlp_ratio,
      self.norm_eps,
      self.attention_impl,
      self.remat,
      name='blocks',
      **kw,
    )(x, out_slice=(0, 1))  # only the CLS output is used
    x = layers.layer_norm(1e-6, name='norm', **kw)(x[:, 0])
    return layers.dense(1, ('embed', None), name='head', **kw)(x)[:, 0].astype(jnp.float32)
