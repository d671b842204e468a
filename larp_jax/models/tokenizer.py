"""The LARP video tokenizer (the paper's Section 3; the official `models/larp_tokenizer.py`).

video [B, T, H, W, 3] in [0, 1]
  -> 3D patches (kt, kh, kw) -> Dense(width) + fixed 3D sin-cos PE            (patch tokens)
  -> ViT over [patch tokens ; N learned holistic queries], keep the N query outputs
  -> Dense(width -> code_dim) [-> bottleneck_norm] -> SVQ (straight-through)
  -> Dense(code_dim -> width)
  -> + fixed 1D sin-cos PE, ViT over [latents ; patch queries (3D PE + type vector)]
  -> keep the patch-query outputs -> LayerNorm(1e-6) -> zero-init Dense -> unpatchify.

Patch vectors are flattened in (kt, kh, kw, c) order on both ends; the official Conv3d weight
[width, 3, kt, kh, kw] maps to our ``patch_embed`` kernel by ``transpose(2, 3, 4, 1, 0)`` and a
reshape. Token order is t-major, then h, then w, as in the official code.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from larp_jax import errors
from larp_jax.models import attention, embeddings, layers, patches, prior as prior_lib, vit
from larp_jax.models.quantizer import (
  BATCH_STAT_NORMS,
  BOTTLENECK_NORMS,
  VQ_TYPES,
  BottleneckNorm,
  VectorQuantizer,
)


QUERY_INITS = ('normal', 'sincos')


def _as_triple(name, value):
  value = tuple(int(v) for v in value)
  if len(value) != 3 or min(value) <= 0:
    raise errors.ConfigError(f'{name} must be three positive ints (T, H, W), got {value}')
  return value


def check_tokenizer_kwargs(
  video_shape,
  patch_size,
  num_latent_tokens,
  width,
  num_heads,
  codebook_size,
  code_dim,
  vq_type,
  query_init,
  remat,
  attention_impl,
  use_prior,
  prior_width,
  prior_heads,
  prior_max_len,
  *,
  bottleneck_norm='none',
  vq_temperature=0.03,
  vq_temperature_learnable=False,
  vq_temperature_start=0.03,
  vq_temperature_ramp_steps=0,
  vq_entropy_weight=0.0,
  vq_entropy_temperature=0.01,
):
  """Raises ValueError (one clear line) for an inconsistent tokenizer configuration."""
  t, h, w = _as_triple('video_shape', video_shape)
  pt, ph, pw = _as_triple('patch_size', patch_size)
  for dim, (size, patch) in zip('THW', ((t, pt), (h, ph), (w, pw))):
    if size % patch:
      raise errors.ConfigError(
        f'video_shape {dim}={size} is not divisible by patch_size {dim}={patch}; '
        f'choose a {dim} that is a multiple of {patch}'
      )
  if num_latent_tokens <= 1:
    raise errors.ConfigError(f'num_latent_tokens must be > 1, got {num_latent_tokens}')
  if width % num_heads:
    raise errors.ConfigError(f'width={width} is not divisible by num_heads={num_heads}')
  if width % 4:
    raise errors.ConfigError(
      f'width={width} must be divisible by 4 for the 2D/3D sin-cos embedding'
    )
  if codebook_size < 2 or code_dim < 1:
    raise errors.ConfigError(f'bad codebook: codebook_size={codebook_size}, code_dim={code_dim}')
  layers.check_choice('vq_type', vq_type, VQ_TYPES)
  layers.check_choice('query_init', query_init, QUERY_INITS)
  layers.check_choice('bottleneck_norm', bottleneck_norm, BOTTLENECK_NORMS)
  if not vq_temperature > 0:
    raise errors.ConfigError(
      f'vq_temperature must be > 0, got {vq_temperature} (the official '
      f'stochastic_temperature < 0, a learned temperature, is '
      f'vq_temperature_learnable=True with vq_temperature=0.1)'
    )
  if vq_temperature_ramp_steps < 0 or not vq_temperature_start > 0:
    raise errors.ConfigError(
      f'vq_temperature_ramp_steps must be >= 0 and vq_temperature_start > 0, got '
      f'{vq_temperature_ramp_steps} and {vq_temperature_start}'
    )
  if vq_temperature_learnable and vq_temperature_ramp_steps > 0:
    raise errors.ConfigError(
      'vq_temperature_learnable=True and vq_temperature_ramp_steps > 0 exclude '
      'each other: choose a learned or a scheduled temperature'
    )
  if vq_entropy_weight < 0 or not vq_entropy_temperature > 0:
    raise errors.ConfigError(
      f'vq_entropy_weight must be >= 0 and vq_entropy_temperature > 0, got '
      f'{vq_entropy_weight} and {vq_entropy_temperature}'
    )
  layers.check_choice('remat', remat, vit.REMAT_CHOICES)
  layers.check_choice('attention_impl', attention_impl, attention.ATTENTION_CHOICES)
  if use_prior:
    if prior_width % prior_heads:
      raise errors.ConfigError(
        f'prior_width={prior_width} is not divisible by prior_heads={prior_heads}'
      )
    if prior_max_len is not None and prior_max_len < num_latent_tokens - 1:
      raise errors.ConfigError(
        f'prior_max_len={prior_max_len} is shorter than the '
        f'{num_latent_tokens - 1} positions the prior must see'
      )


class LARPTokenizer(nn.Module):
  """LARP tokenizer with its training-time AR prior.

  Build it from explicit keyword arguments (``LARPTokenizer(**config.model)``). Videos are float
  in [0, 1] (uint8 is accepted and scaled), channels last, of shape [B, *video_shape, 3].

  Methods (call through ``model.apply(variables, ..., method=...)``):
    __call__(video, train, ...) -> (recon [B,T,H,W,3] float32, aux dict): the training pass.
    encode(video)              -> int32 tokens [B, N] (deterministic quantization).
    decode(tokens)             -> video [B, T, H, W, 3] float32 clamped to [0, 1].
    encode_latents / quantize / decode_latents: the pieces, for custom pipelines.
  RNG streams: 'vq' (code sampling, scheduled sampling) and 'dropout' (the prior).

  With a batch-norm ``bottleneck_norm`` ('bn_bn', 'bn_b'; ``uses_batch_stats``) the variables
  hold a 'batch_stats' collection too: pass it to every apply, and mark it mutable in training
  applies (``mutable=['batch_stats']``); eval and ``encode`` use the running statistics.
  """

  video_shape: Sequence[int] = (16, 128, 128)
  patch_size: Sequence[int] = (4, 8, 8)
  num_latent_tokens: int = 1024
  width: int = 768
  encoder_depth: int = 12
  decoder_depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5  # timm < 1.0.16 ViT block (released checkpoints)
  pe_base: float = 10000.0  # 3D patch PE and 1D latent PE (latent_pe_scale_factor)
  query_init_std: float = 0.02  # latent queries and decoder type vector: randn * std
  query_init: str = 'normal'  # latent queries: 'normal' (randn * query_init_std, released)
  # or 'sincos' (1D sin-cos table; official
  # encoder_query_gaussian_init=False)
  # Not in LARP: query i also receives patch token i (its embedding + PE; with N = k x
  # num_patches, patch i % num_patches), a locality bias that gives every holistic token its own
  # content from the first block on. False: the released queries.
  query_patch_skip: bool = False
  # Not in LARP: the decoder's patch query j also receives latent token j (out_linear output;
  # with num_patches = k x N, token j % N; with N >= num_patches, the sum of tokens j + i x
  # num_patches), the mirror image of query_patch_skip.
  latent_patch_skip: bool = False
  # Not in LARP, with either skip above and N = k x num_patches (k >= 1): each of the k tokens
  # of a patch gets its own learned projection on the skip paths (encoder: query c x P + j also
  # receives W_c x_j; decoder: patch query j receives sum_c V_c z_{c x P + j}), parameters
  # 'query_skip_proj' [width, k x width] and 'latent_skip_proj' [k x width, width], no bias.
  # With the plain skips (False) the k copies enter and leave through the same path: they get
  # the same gradient and end up writing the same code (issue #19: 1.2 distinct codes among the
  # 4 tokens of a patch at N = 4 x num_patches), so k copies carry no more than one.
  patch_skip_proj: bool = False
  codebook_size: int = 8192
  code_dim: int = 16
  vq_type: str = 'svq'
  vq_temperature: float = 0.03
  vq_l2_normalized: bool = True
  vq_commit_weight: float = 0.25
  vq_codebook_weight: float = 1.0
  # Official options beyond the released recipe (official models/bottleneck.py and
  # trainers/larp_tokenizer_trainer.py); the defaults are the released values. See
  # quantizer.BottleneckNorm and quantizer.VectorQuantizer.
  bottleneck_norm: str = 'none'  # 'none' | 'bn_bn' | 'bn_b' | 'ln_d' | 'ln_nd' | 'ln_d_na'
  # Not official: a batch-norm bottleneck trains with its running statistics (frozen) after this
  # optimizer step (0 = never; quantizer.BottleneckNorm.freeze_step).
  bottleneck_norm_freeze_step: int = 0
  vq_temperature_learnable: bool = False  # trained inverse temperature, init 1/vq_temperature
  vq_temperature_start: float = 0.03  # with vq_temperature_ramp_steps > 0: linear ramp from
  vq_temperature_ramp_steps: int = 0  # start to vq_temperature over that many steps (0 = off)
  vq_entropy_weight: float = 0.0  # entropy loss inside vq_loss (0 = off)
  vq_entropy_temperature: float = 0.01
  vq_bypass: bool = False  # diagnostic: the decoder sees continuous latents (not LARP)
  use_prior: bool = True
  prior_depth: int = 12
  prior_width: int = 384
  prior_heads: int = 6
  prior_max_len: Optional[int] = None  # None: num_latent_tokens (1024 in the released model)
  prior_dropout: float = 0.1
  prior_attn_dropout_in_eval: bool = True  # released-code quirk (official models/gptc.py)
  prior_n_rounds: int = 2
  prior_ce_temperature: float = 1.0
  attention_impl: str = 'auto'  # see models.attention.resolve_attention_impl
  remat: str = 'none'
  scan_layers: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_tokenizer_kwargs(
      self.video_shape,
      self.patch_size,
      self.num_latent_tokens,
      self.width,
      self.num_heads,
      self.codebook_size,
      self.code_dim,
      self.vq_type,
      self.query_init,
      self.remat,
      self.attention_impl,
      self.use_prior,
      self.prior_width,
      self.prior_heads,
      self.prior_max_len,
      bottleneck_norm=self.bottleneck_norm,
      vq_temperature=self.vq_temperature,
      vq_temperature_learnable=self.vq_temperature_learnable,
      vq_temperature_start=self.vq_temperature_start,
      vq_temperature_ramp_steps=self.vq_temperature_ramp_steps,
      vq_entropy_weight=self.vq_entropy_weight,
      vq_entropy_temperature=self.vq_entropy_temperature,
    )
    if self.patch_skip_proj:
      p = math.prod(s // k for s, k in zip(self.video_shape, self.patch_size))
      if not (self.query_patch_skip or self.latent_patch_skip):
        raise errors.ConfigError(
          'model.patch_skip_proj=True projects the patch skips, but both are off: set '
          'model.query_patch_skip and/or model.latent_patch_skip, or patch_skip_proj=False'
        )
      if self.num_latent_tokens % p:
        raise errors.ConfigError(
          f'model.patch_skip_proj=True needs num_latent_tokens ({self.num_latent_tokens}) to be '
          f'a multiple of the number of patches ({p}): choose N = k x {p}, or '
          'patch_skip_proj=False'
        )
    super().__post_init__()

  # ---------------------------------------------------------------- geometry
  @property
  def grid(self):
    """(t, h, w) number of patches along each axis."""
    return tuple(s // p for s, p in zip(self.video_shape, self.patch_size))

  @property
  def num_patches(self) -> int:
    return math.prod(self.grid)

  @property
  def patch_dim(self) -> int:
    return math.prod(self.patch_size) * 3

  @property
  def _copies_per_patch(self) -> int:
    return max(self.num_latent_tokens // self.num_patches, 1)

  @property
  def uses_batch_stats(self) -> bool:
    """Whether the variables include a 'batch_stats' collection (batch-norm bottleneck)."""
    return self.bottleneck_norm in BATCH_STAT_NORMS

  # ---------------------------------------------------------------- modules
  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    stack = dict(
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      norm_eps=self.norm_eps,
      attention_impl=self.attention_impl,
      remat=self.remat,
      scan=self.scan_layers,
      **kw,
    )
    # Conv3d(kernel=stride=patch) == Dense on flattened patches; the official init is xavier
    # on the weight viewed as [width, patch_dim], which is the Dense fan_in/fan_out.
    self.patch_embed = layers.dense(self.width, ('patch', 'embed'), name='patch_embed', **kw)
    self.encoder = vit.ViTStack(self.encoder_depth, name='encoder', **stack)
    if self.query_init == 'sincos':
      query_init = lambda key, shape, dtype: jnp.asarray(
        embeddings.sincos_1d_table(shape[1], shape[0]), dtype
      )
    else:
      query_init = nn.initializers.normal(self.query_init_std)
    self.latent_queries = self.param(
      'latent_queries',
      nn.with_logical_partitioning(query_init, ('latent', 'embed')),
      (self.num_latent_tokens, self.width),
      self.param_dtype,
    )
    if self.patch_skip_proj:
      k, w = self._copies_per_patch, self.width
      if self.query_patch_skip:
        self.query_skip_proj = layers.dense(
          k * w, ('embed', 'mlp'), use_bias=False, name='query_skip_proj', **kw
        )
      if self.latent_patch_skip:
        self.latent_skip_proj = layers.dense(
          w, ('mlp', 'embed'), use_bias=False, name='latent_skip_proj', **kw
        )
    self.in_linear = layers.dense(self.code_dim, ('embed', 'code'), name='in_linear', **kw)
    if self.bottleneck_norm != 'none':
      self.norm_layer = BottleneckNorm(
        self.bottleneck_norm,
        freeze_step=self.bottleneck_norm_freeze_step,
        param_dtype=self.param_dtype,
        name='norm_layer',
      )
    self.quantizer = VectorQuantizer(
      self.codebook_size,
      self.code_dim,
      self.vq_type,
      self.vq_temperature,
      self.vq_l2_normalized,
      self.vq_commit_weight,
      self.vq_codebook_weight,
      temperature_start=self.vq_temperature_start,
      temperature_ramp_steps=self.vq_temperature_ramp_steps,
      learnable_temperature=self.vq_temperature_learnable,
      entropy_weight=self.vq_entropy_weight,
      entropy_temperature=self.vq_entropy_temperature,
      bypass=self.vq_bypass,
      param_dtype=self.param_dtype,
      name='quantizer',
    )
    self.out_linear = layers.dense(self.width, ('code', 'embed'), name='out_linear', **kw)
    self.decoder = vit.ViTStack(self.decoder_depth, name='decoder', **stack)
    self.query_type_embed = self.param(
      'query_type_embed',
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, 'embed')),
      (1, 1, self.width),
      self.param_dtype,
    )
    self.final_norm = layers.layer_norm(1e-6, name='final_norm', **kw)
    self.final_linear = layers.dense(
      self.patch_dim, ('embed', 'patch'), name='final_linear', kernel_init=layers.zeros, **kw
    )
    if self.use_prior:
      self.prior = prior_lib.PriorGPT(
        depth=self.prior_depth,
        num_heads=self.prior_heads,
        width=self.prior_width,
        max_len=self.prior_max_len or self.num_latent_tokens,
        input_dim=self.code_dim,
        mlp_ratio=self.mlp_ratio,
        dropout=self.prior_dropout,
        attn_dropout_in_eval=self.prior_attn_dropout_in_eval,
        attention_impl=self.attention_impl,
        name='prior',
        **kw,
      )

  def _patch_pe(self):
    return jnp.asarray(embeddings.sincos_3d(self.width, *self.grid, base=self.pe_base))

  # ---------------------------------------------------------------- pieces
  def patchify(self, video):
    """[B, T, H, W, 3] -> [B, num_patches, patch_dim], patches flattened (kt, kh, kw, c)."""
    return patches.patchify(video, self.patch_size)

  def unpatchify(self, tokens):
    """[B, num_patches, patch_dim] -> [B, T, H, W, 3]."""
    return patches.unpatchify(tokens, self.grid, self.patch_size)

  def _check_video(self, video):
    expected = (*self.video_shape, 3)
    if video.ndim != 5 or tuple(video.shape[1:]) != expected:
      raise ValueError(
        f'video must have shape [B, {", ".join(map(str, expected))}] '
        f'(channels last), got {tuple(video.shape)}'
      )
    if video.dtype == jnp.uint8:
      video = video.astype(jnp.float32) / 255.0
    return video

  def encode_latents(self, video, *, train: bool = False, step: Any = None):
    """video [B, T, H, W, 3] in [0, 1] -> pre-quantization latents [B, N, code_dim] float32.

    ``train`` only matters for a batch-norm ``bottleneck_norm``: batch statistics (and their
    running averages updated) when True, the running statistics when False; ``step`` (optimizer
    step from 1) for ``bottleneck_norm_freeze_step``."""
    video = self._check_video(video)
    x = self.patch_embed(self.patchify(video.astype(self.dtype)))
    x = x + self._patch_pe().astype(x.dtype)
    b = x.shape[0]
    queries = jnp.broadcast_to(
      self.latent_queries.astype(x.dtype)[None], (b, self.num_latent_tokens, self.width)
    )
    if self.query_patch_skip and self.patch_skip_proj:  # copy c of patch j: W_c x_j
      k, p = self._copies_per_patch, self.num_patches
      proj = self.query_skip_proj(x).reshape(b, p, k, self.width)
      queries = queries + proj.transpose(0, 2, 1, 3).reshape(b, k * p, self.width)
    elif self.query_patch_skip:
      reps = -(-self.num_latent_tokens // self.num_patches)
      queries = queries + jnp.tile(x, (1, reps, 1))[:, : self.num_latent_tokens]
    # Only the query outputs are kept: the last block computes just those rows.
    z = self.encoder(
      jnp.concatenate([x, queries], axis=1), out_slice=(-self.num_latent_tokens, None)
    )
    z = self.in_linear(z).astype(jnp.float32)
    if self.bottleneck_norm != 'none':
      z = self.norm_layer(z, train=train, step=step)
    return z

  def quantize(self, z, *, deterministic: bool = True, step: Any = None):
    """[B, N, code_dim] -> (straight-through codes [B, N, code_dim] float32, aux dict).

    ``step`` (optimizer step from 1) drives the temperature ramp, if configured."""
    return self.quantizer(z, deterministic=deterministic, step=step)

  def decode_latents(self, z_q):
    """Quantized (normalised) codes [B, N, code_dim] -> reconstruction [B, T, H, W, 3], not clamped."""
    z = self.out_linear(z_q.astype(self.dtype))
    skip = z
    z = z + jnp.asarray(
      embeddings.sincos_1d_table(self.width, self.num_latent_tokens, self.pe_base)
    ).astype(z.dtype)
    b = z.shape[0]
    queries = self._patch_pe()[None] + self.query_type_embed.astype(jnp.float32)
    queries = jnp.broadcast_to(queries.astype(z.dtype), (b, self.num_patches, self.width))
    if self.latent_patch_skip:
      n, p = self.num_latent_tokens, self.num_patches
      if self.patch_skip_proj:  # sum_c V_c z_{c p + j}: one projection per copy
        k = n // p
        skip = skip.reshape(b, k, p, self.width).transpose(0, 2, 1, 3)
        skip = self.latent_skip_proj(skip.reshape(b, p, k * self.width))
      elif n >= p:  # latents j, j + p, ... all feed patch query j (the remainder is dropped)
        skip = skip[:, : (n // p) * p].reshape(b, n // p, p, self.width).sum(1)
      else:
        skip = jnp.tile(skip, (1, -(-p // n), 1))[:, :p]
      queries = queries + skip
    h = self.decoder(jnp.concatenate([z, queries], axis=1), out_slice=(-self.num_patches, None))
    h = self.final_norm(h)
    return self.unpatchify(self.final_linear(h).astype(jnp.float32))

  # ---------------------------------------------------------------- public API
  def encode(self, video):
    """video [B, T, H, W, 3] in [0, 1] -> int32 tokens [B, N] (argmax quantization)."""
    _, aux = self.quantize(self.encode_latents(video), deterministic=True)
    return aux['indices']

  def decode(self, tokens):
    """int tokens [B, N] -> video [B, T, H, W, 3] float32, clamped to [0, 1]."""
    if tokens.ndim != 2 or tokens.shape[1] != self.num_latent_tokens:
      raise ValueError(
        f'tokens must have shape [B, {self.num_latent_tokens}], got {tuple(tokens.shape)}'
      )
    return jnp.clip(self.decode_latents(self.quantizer.lookup(tokens)), 0.0, 1.0)

  def __call__(
    self,
    video,
    *,
    train: bool = True,
    vq_deterministic: Optional[bool] = None,
    mix_ratio: Any = 0.0,
    with_prior: Optional[bool] = None,
    step: Any = None,
  ):
    """The training / evaluation forward pass.

    Args:
      video: [B, T, H, W, 3] in [0, 1].
      train: enables dropout and (by default) code sampling.
      vq_deterministic: argmax quantization; defaults to ``not train``. (The official eval
        without ``set_vq_eval_deterministic`` samples: pass False to reproduce it.)
      mix_ratio: scheduled-sampling ratio for the prior (see ``prior.mix_ratio``).
      with_prior: compute the prior loss (defaults to ``use_prior``).
      step: optimizer step (from 1) for ``vq_temperature_ramp_steps`` and
        ``bottleneck_norm_freeze_step``; without it the temperature is ``vq_temperature`` and a
        batch-norm bottleneck uses the batch statistics.
    Returns:
      (recon, aux): recon [B, T, H, W, 3] float32 (not clamped); aux holds 'tokens' int32 [B, N]
      and float32 scalars 'vq_loss', 'commitment_loss', 'codebook_loss', 'codebook_usage',
      'codebook_perplexity' and, with the prior, 'prior_loss', 'prior_top1', 'prior_top5',
      'prior_ce_round1' (plus the quantizer's optional entropy and temperature entries).
    """
    deterministic = (not train) if vq_deterministic is None else vq_deterministic
    with_prior = self.use_prior if with_prior is None else with_prior
    if with_prior and not self.use_prior:
      raise ValueError('with_prior=True but the tokenizer was built with use_prior=False')
    z = self.encode_latents(video, train=train, step=step)
    z_q, vq_aux = self.quantize(z, deterministic=deterministic, step=step)
    recon = self.decode_latents(z_q)
    aux = {k: v for k, v in vq_aux.items() if k != 'indices'}
    aux['tokens'] = vq_aux['indices']
    if with_prior:
      predict = lambda x: self.prior(x, deterministic=not train)
      aux.update(
        prior_lib.scheduled_sampling_loss(
          predict,
          z_q,
          vq_aux['indices'],
          self.quantizer.normalized_codebook(),
          rng=self.make_rng('vq'),
          mix_ratio=mix_ratio if train else 0.0,
          n_rounds=self.prior_n_rounds if train else 1,
          ce_temperature=self.prior_ce_temperature,
        )
      )
    return recon, aux


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
