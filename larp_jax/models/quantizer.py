"""The bottleneck: optional normalisation and the stochastic vector quantizer (SVQ).

The codebook is stored raw (K x d, kaiming-uniform init like torch's ``nn.Embedding`` under
``kaiming_uniform_``) and used l2-normalised along d everywhere. In training a code is *sampled*
from ``softmax(cos(z, c) / temperature)`` with the 'vq' PRNG stream; deterministic mode takes the
argmax, i.e. the nearest normalised codeword. Everything here runs in float32.

The options of the official ``models/bottleneck.py`` and ``trainers/larp_tokenizer_trainer.py``
beyond the released recipe are here too, each off by default: the normalisation between the
bottleneck's input linear layer and the quantizer (``BottleneckNorm``), the entropy loss
(``entropy_loss``), a linear temperature ramp (``scheduled_temperature``), a learnable inverse
temperature, and the epoch-wise VQ-loss warm-up (``vq_warmup_ratio``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from larp_jax import errors

VQ_TYPES = ('svq', 'nearest')
# Official Bottleneck(norm=...): what lies between in_linear and the quantizer.
BOTTLENECK_NORMS = ('none', 'bn_bn', 'bn_b', 'ln_d', 'ln_nd', 'ln_d_na')
BATCH_STAT_NORMS = ('bn_bn', 'bn_b')


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(||x||, eps), like torch.nn.functional.normalize.

  Written as x * rsqrt(max(||x||^2, eps^2)) so that the gradient stays finite at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def sample_categorical(key, logits):
  """One sample per row of ``logits`` [..., K] from softmax(logits), as int32 [...].

  Inverse-CDF sampling: one uniform per row against the cumulative softmax, instead of the K
  Gumbel variates per row that ``jax.random.categorical`` draws (16 ms vs ~1 ms for
  4x256x1024 logits on a 2-core CPU). Same distribution, different random stream.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  cdf = jnp.cumsum(probs, axis=-1)
  u = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
  index = jnp.sum((cdf <= u).astype(jnp.int32), axis=-1)
  return jnp.minimum(index, logits.shape[-1] - 1)


def codebook_stats(indices, codebook_size: int):
  """Fraction of codes used and perplexity of the code histogram of ``indices`` (any shape)."""
  counts = jnp.zeros((codebook_size,), jnp.float32).at[indices.reshape(-1)].add(1.0)
  probs = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
  return {
    'codebook_usage': jnp.mean((counts > 0).astype(jnp.float32)),
    'codebook_perplexity': jnp.exp(entropy),
  }


def entropy_loss(logits):
  """The official entropy regulariser (``entropy_loss`` of official models/bottleneck.py).

  Rows of ``logits`` [..., K] are the code distributions softmax(logits) of every token of the
  batch. Low per-token entropy (confident assignments) and high entropy of their batch average
  (many codes in use) are both rewarded.

  Returns:
    (loss, per_sample_entropy, codebook_entropy), float32 scalars, with
    loss = per_sample_entropy - codebook_entropy,
    per_sample_entropy = mean over rows of -sum_k p_k log p_k,
    codebook_entropy = -sum_k pbar_k log(pbar_k + 1e-5), pbar = mean of the rows' p
    (the 1e-5 is the official one; its ``log_softmax(x + 1e-5)`` equals ``log_softmax(x)``).
  """
  flat = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
  probs = jax.nn.softmax(flat, axis=-1)
  log_probs = jax.nn.log_softmax(flat, axis=-1)
  avg_probs = jnp.mean(probs, axis=0)
  codebook_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
  per_sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  return per_sample_entropy - codebook_entropy, per_sample_entropy, codebook_entropy


def scheduled_temperature(step, start: float, end: float, ramp_steps: int):
  """SVQ temperature at optimizer ``step`` (counted from 1) of a linear ramp.

  Official trainers/larp_tokenizer_trainer.py ``get_sqt_weight`` (config ``sqt_start_end_epoch
  'start_end_E'``, with ramp_steps = E x steps per epoch): start + (end - start) * step /
  ramp_steps before ``ramp_steps``, ``end`` from then on. Returns a float32 scalar.
  """
  step = jnp.asarray(step, jnp.float32)
  ramp = start + (end - start) * step / ramp_steps
  return jnp.where(step < ramp_steps, ramp, jnp.float32(end)).astype(jnp.float32)


def vq_warmup_ratio(step, start_ratio: float, warmup_epochs: int, steps_per_epoch: int):
  """Multiplier of the VQ-loss weight at optimizer ``step`` (counted from 1).

  Official trainers/larp_tokenizer_trainer.py ``get_loss_q_weight`` (config ``loss_q_warmup
  'R_E'``): in epoch e = (step - 1) // steps_per_epoch + 1 the ratio is
  R + (1 - R) (e - 1) / (E - 1) while e < E, then 1. It changes once per epoch, not per step.
  E <= 1 is off (the released '1.0_1'). Returns a float32 scalar.
  """
  if warmup_epochs <= 1:
    return jnp.float32(1.0)
  epoch = (jnp.asarray(step, jnp.int32) - 1) // steps_per_epoch + 1
  ratio = start_ratio + (1.0 - start_ratio) * (epoch - 1).astype(jnp.float32) / (warmup_epochs - 1)
  return jnp.where(epoch < warmup_epochs, ratio, 1.0).astype(jnp.float32)


def _moments(x, axes):
  """Mean and biased (1/n) variance over ``axes``, two-pass, float32, keepdims."""
  mean = jnp.mean(x, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
  return mean, var


class BottleneckNorm(nn.Module):
  """The official bottleneck normalisation of the projected latents z [B, N, d] (float32).

  ``kind`` (official models/bottleneck.py ``norm``; torch defaults eps 1e-5, affine, BN momentum
  0.1):
    'none'     identity (the released model).
    'bn_bn'    BatchNorm per channel d over batch and tokens (B x N values each);
               'scale'/'bias' and running 'mean'/'var' of shape [d].
    'bn_b'     BatchNorm per (token, channel) over the batch only (B values each); parameters
               and statistics of shape [N * d], flattened (n, d) as the official
               ``BatchNorm1d(N * d)``.
    'ln_d'     LayerNorm over d, affine [d].
    'ln_nd'    LayerNorm over tokens and d together, affine [N, d].
    'ln_d_na'  LayerNorm over d without affine parameters. The official ``project_in`` has no
               branch for it, so there it builds the layer but never applies it (a no-op); here
               it normalises, as its name and construction say.

  Batch norms follow torch: the batch's biased variance normalises in training, the running
  variance is updated with the unbiased one, ``running = 0.9 running + 0.1 batch``; eval
  (``train=False``) uses the running statistics of the 'batch_stats' collection, which training
  applies must mark mutable (``mutable=['batch_stats']``). Statistics are not updated by ``init``.

  ``freeze_step`` > 0 (not in the official code, off by default): from optimizer step
  ``freeze_step`` + 1 on, training normalises with the running statistics too and stops updating
  them (a frozen batch norm, as in fine-tuning with small batches): a small batch's statistics
  are noisy (8 values per channel for 'bn_b' at the demo's batch), so every clip's code moves
  with the other clips of its batch. Calls without a ``step`` use the batch statistics.

  Global batch: under ``jax.jit`` with the batch axis sharded over devices, ``jnp.mean`` over
  that axis is a reduction over the global array (the SPMD partitioner inserts the all-reduce),
  so the statistics are those of the whole global batch, as the official ``SyncBatchNorm``
  computes across GPUs. No ``axis_name`` is needed; that is only for ``pmap`` / ``shard_map``.
  """

  kind: str = 'none'
  epsilon: float = 1e-5
  momentum: float = 0.1
  freeze_step: int = 0
  param_dtype: Any = jnp.float32

  def _affine(self, y, shape, axes):
    scale = self.param(
      'scale', nn.with_logical_partitioning(nn.initializers.ones, axes), shape, self.param_dtype
    )
    bias = self.param(
      'bias', nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, self.param_dtype
    )
    return y * scale.astype(jnp.float32) + bias.astype(jnp.float32)

  @nn.compact
  def __call__(self, z, *, train: bool, step: Any = None):
    z = z.astype(jnp.float32)
    if self.kind == 'none':
      return z
    b, n, d = z.shape
    if self.kind in ('ln_d', 'ln_d_na', 'ln_nd'):
      axes = (-2, -1) if self.kind == 'ln_nd' else (-1,)
      mean, var = _moments(z, axes)
      y = (z - mean) * jax.lax.rsqrt(var + self.epsilon)
      if self.kind == 'ln_d_na':
        return y
      if self.kind == 'ln_nd':
        return self._affine(y, (n, d), ('latent', 'code'))
      return self._affine(y, (d,), ('code',))
    if self.kind not in BATCH_STAT_NORMS:
      raise errors.ConfigError(
        f'unknown bottleneck norm {self.kind!r}; choose from {BOTTLENECK_NORMS}'
      )
    # bn_bn: features d, reduced over (B, N); bn_b: features N*d, reduced over B.
    x = z if self.kind == 'bn_bn' else z.reshape(b, n * d)
    axes = tuple(range(x.ndim - 1))
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if train:
      mean, var = _moments(x, axes)
      if not self.is_initializing():
        count = math.prod(x.shape[:-1])
        if count < 2:
          raise errors.ConfigError(
            f'bottleneck_norm={self.kind!r} needs more than one value per '
            f'channel in training (got {count}): use a larger global batch'
          )
        m = self.momentum
        batch_mean, batch_var = jax.lax.stop_gradient((mean.reshape(-1), var.reshape(-1)))
        new_mean = (1 - m) * ra_mean.value + m * batch_mean
        new_var = (1 - m) * ra_var.value + m * batch_var * (count / (count - 1))
        if self.freeze_step > 0 and step is not None:
          frozen = jnp.asarray(step) > self.freeze_step
          mean = jnp.where(frozen, ra_mean.value.reshape(mean.shape), mean)
          var = jnp.where(frozen, ra_var.value.reshape(var.shape), var)
          new_mean = jnp.where(frozen, ra_mean.value, new_mean)
          new_var = jnp.where(frozen, ra_var.value, new_var)
        ra_mean.value, ra_var.value = new_mean, new_var
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = self._affine(y, (features,), ('code',) if self.kind == 'bn_bn' else (None,))
    return y.reshape(b, n, d)


class VectorQuantizer(nn.Module):
  """Quantizes [..., d] vectors to a K-entry codebook.

  Attributes:
    codebook_size: K.
    code_dim: d.
    vq_type: 'svq' samples codes in training (LARP); 'nearest' always takes the nearest code
      (the paper's deterministic-VQ ablation).
    temperature: SVQ softmax temperature over cosine similarities (0.03).
    l2_normalized: compare normalised vectors by cosine (LARP); if False, plain VQ with
      logits = -squared euclidean distance / temperature on raw vectors.
    commit_weight / codebook_weight: the two terms of ``vq_loss``.
    temperature_start / temperature_ramp_steps: with ``temperature_ramp_steps`` > 0 the
      temperature ramps linearly from ``temperature_start`` to ``temperature`` over that many
      optimizer steps (``scheduled_temperature``; the call's ``step``); calls without a step
      (eval, ``encode``) use ``temperature``. 0: fixed ``temperature`` (released).
    learnable_temperature: the inverse temperature is a trained scalar parameter
      'inv_temperature', initialised to 1 / ``temperature``, unconstrained and multiplied into
      the similarities, as the official ``stochastic_temperature < 0`` (there a
      ``nn.Parameter(10.0)``, i.e. ``temperature=0.1`` here). Note: the sampled index is not
      differentiable and the entropy loss has its own temperature, so no loss of LARP reaches
      this parameter (in the official code its ``.grad`` stays None); it keeps its init value.
    entropy_weight / entropy_temperature: ``entropy_weight`` x ``entropy_loss`` is added to
      ``vq_loss`` (0 = off, released), on logits = similarity / ``entropy_temperature`` (0.01,
      the official default). The similarity is the one the sampler uses: cosine when
      ``l2_normalized`` (minus the squared distance otherwise). The official code computes it
      from the squared distance d of its non-stochastic branch only, so with SVQ it cannot run
      (``d`` is undefined there); for unit vectors -d = 2 cos - 2, so its temperature T matches
      ``entropy_temperature = T / 2`` here.
    bypass: a diagnostic, not LARP: the output is the prepared continuous input itself (no
      quantization reaches the decoder); indices, losses and statistics are still computed.
  """

  codebook_size: int = 8192
  code_dim: int = 16
  vq_type: str = 'svq'
  temperature: float = 0.03
  l2_normalized: bool = True
  commit_weight: float = 0.25
  codebook_weight: float = 1.0
  temperature_start: float = 0.03
  temperature_ramp_steps: int = 0
  learnable_temperature: bool = False
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01
  bypass: bool = False
  param_dtype: Any = jnp.float32

  def setup(self):
    init = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform', in_axis=1, out_axis=0)
    self.codebook = self.param(
      'codebook',
      nn.with_logical_partitioning(init, ('vocab', 'code')),
      (self.codebook_size, self.code_dim),
      self.param_dtype,
    )
    if self.learnable_temperature:
      self.inv_temperature = self.param(
        'inv_temperature',
        nn.with_logical_partitioning(nn.initializers.constant(1.0 / self.temperature), ()),
        (),
        jnp.float32,
      )

  def current_temperature(self, step=None):
    """The sampling temperature: fixed, learned (1 / 'inv_temperature') or scheduled at ``step``."""
    if self.learnable_temperature:
      return 1.0 / self.inv_temperature
    if self.temperature_ramp_steps > 0 and step is not None:
      return scheduled_temperature(
        step, self.temperature_start, self.temperature, self.temperature_ramp_steps
      )
    return self.temperature

  def normalized_codebook(self):
    """[K, d] float32 codebook as used for lookup (l2-normalised when ``l2_normalized``)."""
    cb = self.codebook.astype(jnp.float32)
    return l2_normalize(cb) if self.l2_normalized else cb

  def _prepare(self, z):
    z = z.astype(jnp.float32)
    return l2_normalize(z) if self.l2_normalized else z

  def _similarity(self, zn):
    """[..., K] cosine of prepared ``zn`` to each code (or -squared distance, unnormalised)."""
    cb = self.normalized_codebook()
    if self.l2_normalized:
      return jnp.einsum('...d,kd->...k', zn, cb)
    return -(
      jnp.sum(zn * zn, -1, keepdims=True)
      - 2 * jnp.einsum('...d,kd->...k', zn, cb)
      + jnp.sum(cb * cb, -1)
    )

  def _scale(self, sim, step=None):
    if self.learnable_temperature:
      return sim * self.inv_temperature
    return sim / self.current_temperature(step)

  def logits(self, z, step: Optional[Any] = None):
    """[..., K] float32 logits over codes: cosine / temperature (or -distance / temperature)."""
    return self._scale(self._similarity(self._prepare(z)), step)

  def lookup(self, indices):
    """int [...] -> [..., d] float32 (normalised) codewords."""
    return jnp.take(self.normalized_codebook(), indices, axis=0)

  def __call__(self, z, *, deterministic: bool, step: Optional[Any] = None):
    """Quantizes ``z`` [..., d].

    Args:
      z: pre-quantization vectors [..., d] (any float dtype).
      deterministic: argmax instead of sampling (always argmax for vq_type='nearest').
        Sampling uses ``self.make_rng('vq')``.
      step: optimizer step (from 1) for the temperature ramp; ignored without one.
    Returns:
      (z_st, aux): ``z_st`` [..., d] float32 is the straight-through output
      ``z + stop_gradient(q - z)`` of the (normalised) inputs; ``aux`` holds 'indices'
      int32 [...], 'vq_loss', 'commitment_loss', 'codebook_loss', 'codebook_usage',
      'codebook_perplexity', with the entropy loss on also 'entropy_loss',
      'per_sample_entropy' and 'codebook_entropy', and with a scheduled or learned temperature
      'vq_temperature'.
    """
    zn = self._prepare(z)
    sim = self._similarity(zn)
    logits = self._scale(sim, step)
    if deterministic or self.vq_type == 'nearest':
      indices = jnp.argmax(logits, axis=-1)
    else:
      indices = sample_categorical(self.make_rng('vq'), logits)
    indices = indices.astype(jnp.int32)
    q = self.lookup(indices)
    commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(q) - zn))
    codebook = jnp.mean(jnp.square(q - jax.lax.stop_gradient(zn)))
    # bypass (a diagnostic, not LARP): the decoder sees the continuous (prepared) latents; the
    # codes, their losses and statistics are still computed.
    z_st = zn if self.bypass else zn + jax.lax.stop_gradient(q - zn)
    vq_loss = self.commit_weight * commitment + self.codebook_weight * codebook
    extra = {}
    if self.entropy_weight > 0:
      ent, per_sample, batch_ent = entropy_loss(sim / self.entropy_temperature)
      vq_loss = vq_loss + self.entropy_weight * ent
      extra.update(entropy_loss=ent, per_sample_entropy=per_sample, codebook_entropy=batch_ent)
    if self.learnable_temperature or self.temperature_ramp_steps > 0:
      extra['vq_temperature'] = jnp.asarray(self.current_temperature(step), jnp.float32)
    aux = {
      'indices': indices,
      'vq_loss': vq_loss,
      'commitment_loss': commitment,
      'codebook_loss': codebook,
      **codebook_stats(indices, self.codebook_size),
      **extra,
    }
    return z_st, aux
