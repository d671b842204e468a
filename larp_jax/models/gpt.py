"""The prior's transformer block (the official `models/gptc.py`): pre-LN, separate q/k/v Dense
with bias, causal attention, dropout on the attention probabilities and the residual paths. ``PriorGPT``
(``larp_jax.models.prior``) stacks these blocks.

Only the full-sequence (training) call exists: the prior is never sampled. The generator's
KV-cache decoding (an explicit cache pytree, a decode method beside each block's full-sequence
call) is in ``larp_jax.models.larp_ar`` (``LARPAR.prefill`` / ``decode_step``, ``Block.decode``);
a decode mode for this block would follow the same pattern.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from larp_jax.models.attention import attention
from larp_jax.models.dropout import Dropout
from larp_jax.models.layers import Dtype, Mlp, constrain, dense, layer_norm


class GPTBlock(nn.Module):
  """The prior's block: LN -> causal MHA (separate q/k/v with bias) -> LN -> MLP, with dropout.

  ``__call__`` runs the whole sequence (see the module docstring for decoding)."""

  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5
  dropout: float = 0.0
  attn_dropout_in_eval: bool = False
  attention_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    b, l, d = x.shape
    h_dim = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = constrain(x)
    h = layer_norm(self.norm_eps, name='ln_1', **kw)(x)
    q, k, v = (
      dense(d, ('embed', 'qkv'), name=n, **kw)(h).reshape(b, l, self.num_heads, h_dim)
      for n in ('q', 'k', 'v')
    )
    # The official prior passes its attention dropout straight to SDPA, so it stays active in
    # eval mode as well; ``attn_dropout_in_eval`` reproduces that (the official `models/gptc.py`).
    attn_on = (not deterministic) or self.attn_dropout_in_eval
    rng = self.make_rng('dropout') if (attn_on and self.dropout > 0) else None
    a = attention(
      q, k, v, causal=True, dropout_rng=rng, dropout_rate=self.dropout, impl=self.attention_impl
    )
    a = dense(d, ('qkv', 'embed'), name='proj', **kw)(a.reshape(b, l, d))
    x = x + Dropout(self.dropout)(a, deterministic=deterministic)
    h = layer_norm(self.norm_eps, name='ln_2', **kw)(x)
    x = x + Mlp(int(d * self.mlp_ratio), dropout=self.dropout, name='mlp', **kw)(
      h, deterministic=deterministic
    )
    return constrain(x), None
