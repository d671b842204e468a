"""timm's ViT block and the stack of them: the tokenizer's encoder and decoder and the
discriminator (the official `models/transformer.py` and `models/loss.py`).

``ViTBlock``: pre-LN, one fused qkv Dense without bias, bidirectional attention, exact (erf)
GELU MLP; ``out_slice``: a last block that computes only the rows kept. ``ViTStack``: ``depth``
blocks, optionally rematerialised and/or scanned over layers.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from larp_jax.models.attention import attention
from larp_jax.models.layers import Dtype, Mlp, constrain, dense, layer_norm

REMAT_CHOICES = ('none', 'full', 'dots')


class ViTAttention(nn.Module):
  """Bidirectional MHA with a fused bias-free qkv projection laid out [q | k | v].

  With ``out_slice=(start, stop)`` (Python slice bounds: ``(-n, None)`` is the last n tokens)
  only the tokens ``start:stop`` query (all tokens still give keys and values) and the output
  holds just those rows: the same rows as the full output, without computing the others."""

  num_heads: int
  impl: str = 'xla'
  out_slice: Optional[Tuple[int, Optional[int]]] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, l, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = dense(3 * d, ('embed', 'qkv'), use_bias=False, name='qkv', **kw)(x)
    q, k, v = jnp.split(qkv.reshape(b, l, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
    if self.out_slice is not None:
      q = q[:, self.out_slice[0] : self.out_slice[1]]
    out = attention(q, k, v, causal=False, impl=self.impl).reshape(b, q.shape[1], d)
    return dense(d, ('qkv', 'embed'), name='proj', **kw)(out)


class ViTBlock(nn.Module):
  """timm ViT block: x += Attn(LN1(x)); x += MLP(LN2(x)). No LayerScale, drop-path or dropout.

  ``out_slice=(start, stop)``: compute and return only the tokens ``start:stop`` (attending to
  all tokens), for a last block whose other outputs are discarded."""

  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5
  attention_impl: str = 'xla'
  out_slice: Optional[Tuple[int, Optional[int]]] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, _=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    x = constrain(x)
    a = ViTAttention(self.num_heads, self.attention_impl, self.out_slice, name='attn', **kw)(
      layer_norm(self.norm_eps, name='norm1', **kw)(x)
    )
    if self.out_slice is not None:
      x = x[:, self.out_slice[0] : self.out_slice[1]]
    x = x + a
    x = x + Mlp(int(d * self.mlp_ratio), name='mlp', **kw)(
      layer_norm(self.norm_eps, name='norm2', **kw)(x)
    )
    return constrain(x), None


class ViTStack(nn.Module):
  """``depth`` ViT blocks, optionally rematerialised and/or scanned over layers.

  With ``scan=True`` the block parameters are stacked along a leading 'layers' axis
  (faster compiles for deep stacks); otherwise blocks are named ``blocks_0..blocks_{depth-1}``
  like the official ``blocks.i`` state-dict entries.
  """

  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5
  attention_impl: str = 'xla'
  remat: str = 'none'  # 'none' | 'full' | 'dots' (save matmul outputs)
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, out_slice: Optional[Tuple[int, Optional[int]]] = None):
    """x [B, L, D] -> [B, L, D], or only the tokens ``out_slice=(start, stop)`` of the last
    block's output. Unscanned, that block computes only those rows (the same values); with
    ``scan=True`` the full output is sliced."""
    block = ViTBlock
    if self.remat != 'none':
      policy = {'full': None, 'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}[
        self.remat
      ]
      block = nn.remat(block, policy=policy, prevent_cse=not self.scan)
    kw = dict(
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      norm_eps=self.norm_eps,
      attention_impl=self.attention_impl,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    if self.scan:
      scanned = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      x, _ = scanned(name='blocks', **kw)(x, None)
      return x if out_slice is None else x[:, out_slice[0] : out_slice[1]]
    for i in range(self.depth):
      last = out_slice if i == self.depth - 1 else None
      x, _ = block(name=f'blocks_{i}', out_slice=last, **kw)(x, None)
    return x
