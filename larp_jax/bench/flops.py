"""FLOP accounting of the benchmark: XLA's cost analysis of a compiled program (``xla_flops``,
and when it undercounts: ``needs_cost_twin``) and the analytic matmul count of the tokenizer,
the prior, the discriminator and LPIPS (``analytic_flops``)."""

from __future__ import annotations

import math
from typing import Optional

from larp_jax.models import attention


def xla_flops(compiled_or_lowered) -> Optional[float]:
  """'flops' of XLA's cost analysis (``Compiled`` or ``Lowered``); None if unavailable.

  ``cost_analysis()`` is a dict in recent jax and a list of per-module dicts in older ones.
  For a compiled SPMD program the count is that of one device's program. A ``lax.cond`` counts
  as its most expensive branch."""
  try:
    ca = compiled_or_lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
    return None
  if ca is None:
    return None
  if isinstance(ca, dict):
    ca = [ca]
  flops = [float(d['flops']) for d in ca if d and 'flops' in d]
  return sum(flops) if flops else None


def vit_layer_flops(
  batch: int, length: int, width: int, mlp_ratio: float = 4.0, queries: Optional[int] = None
) -> int:
  """Forward matmul FLOPs of one transformer block: qkv + proj + MLP (2*B*L*(4d^2 + 2*d*hidden),
  i.e. 2*B*L*12*d^2 at mlp_ratio 4) plus attention scores and values (4*B*L^2*d). Norms,
  biases, softmax and GELU are not counted; causal attention counts the full L^2 (model
  FLOPs: 'xla' computes them all, 'chunked' skips the masked blocks).

  ``queries``: a block that computes only that many output rows (``ViTBlock(out_slice=...)``):
  qkv still runs on all ``length`` tokens, attention has ``queries`` queries, and proj and MLP
  run on ``queries`` rows."""
  q = length if queries is None else queries
  hidden = int(width * mlp_ratio)
  return (
    2 * batch * length * 3 * width * width
    + 4 * batch * q * length * width
    + 2 * batch * q * (width * width + 2 * width * hidden)
  )


def vit_stack_flops(
  depth: int,
  batch: int,
  length: int,
  width: int,
  mlp_ratio: float = 4.0,
  kept: Optional[int] = None,
) -> int:
  """Forward matmul FLOPs of ``depth`` blocks whose last block computes only ``kept`` output
  tokens (``ViTStack(out_slice=...)``)."""
  if depth == 0:
    return 0
  return (depth - 1) * vit_layer_flops(batch, length, width, mlp_ratio) + vit_layer_flops(
    batch, length, width, mlp_ratio, queries=kept
  )


def _taps(size: int, k: int, stride: int, pad: int) -> tuple:
  """(output size, number of kernel taps that fall inside the input, summed over the outputs)
  along one axis of a convolution; taps on the zero padding are not counted (as in XLA)."""
  out = (size + 2 * pad - k) // stride + 1
  taps = sum(sum(1 for i in range(k) if 0 <= o * stride - pad + i < size) for o in range(out))
  return out, taps


def _conv_flops(n, h, w, k, cin, cout, stride=1, pad=None):
  """(FLOPs of a k x k convolution on n images of h x w, output h, output w). Stride-1 convs
  on maps under 4 pixels run as an im2col matmul in ``larp_jax.losses.perceptual`` and multiply
  the padding too."""
  pad = (k - 1) // 2 if pad is None else pad
  oh, th = _taps(h, k, stride, pad)
  ow, tw = _taps(w, k, stride, pad)
  if stride == 1 and min(h, w) < 4:
    th, tw = oh * k, ow * k
  return 2 * n * th * tw * cin * cout, oh, ow


def lpips_flops(frames: int, height: int, width: int, net: str = 'vgg') -> int:
  """Forward FLOPs of LPIPS on ``frames`` image pairs: the backbone on 2*frames images (one
  pass on each side of the pair) plus the 1x1 linear heads; convolutions only, multiply-adds on
  the zero padding not counted (XLA's convention)."""
  n = 2 * frames
  total, heads = 0, 0
  h, w = height, width
  if net.lower() in ('vgg', 'vgg16'):
    cin = 3
    cfg = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512]
    taps = (1, 4, 8, 12, 16)
    for i, v in enumerate(cfg):
      if v == 'M':
        h, w = h // 2, w // 2
        continue
      flops, h, w = _conv_flops(n, h, w, 3, cin, v)
      total += flops
      cin = v
      if i in taps:
        heads += 2 * frames * h * w * v
  elif net.lower() in ('alex', 'alexnet'):
    cin = 3
    for i, (cout, k, stride, pad) in enumerate(
      ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
    ):
      if i in (1, 2):  # 3x3 max pool, stride 2, VALID
        h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1
      flops, h, w = _conv_flops(n, h, w, k, cin, cout, stride, pad)
      total += flops
      heads += 2 * frames * h * w * cout
      cin = cout
  else:
    raise ValueError(f'unknown LPIPS net {net!r}')
  return total + heads


def tokenizer_forward_flops(model, batch: int) -> dict:
  """Forward matmul FLOPs of the tokenizer's pieces for ``batch`` clips (``model``: a
  ``LARPTokenizer`` or anything with its attributes)."""
  b, d, n = batch, model.width, model.num_latent_tokens
  p = math.prod(s // q for s, q in zip(model.video_shape, model.patch_size))
  pd = math.prod(model.patch_size) * 3
  k, cd, r = model.codebook_size, model.code_dim, model.mlp_ratio
  out = {
    'patch_embed': 2 * b * p * pd * d,
    'encoder': vit_stack_flops(model.encoder_depth, b, p + n, d, r, kept=n),
    'in_linear': 2 * b * n * d * cd,
    'vq_logits': 2 * b * n * k * cd,
    'out_linear': 2 * b * n * cd * d,
    'decoder': vit_stack_flops(model.decoder_depth, b, n + p, d, r, kept=p),
    'final_linear': 2 * b * p * d * pd,
  }
  if model.use_prior:
    pw, ln = model.prior_width, n - 1
    out['prior'] = (
      2 * b * ln * cd * pw
      + model.prior_depth * vit_layer_flops(b, ln, pw, r)
      + 2 * b * ln * pw * cd
    )  # one round: input proj, blocks, head
    out['prior_logits'] = 2 * b * ln * k * cd  # one round: cosine against the codebook
  return out


def discriminator_forward_flops(disc, batch: int) -> int:
  p = math.prod(s // q for s, q in zip(disc.video_shape, disc.patch_size))
  pd = math.prod(disc.patch_size) * 3
  return (
    2 * batch * p * pd * disc.width
    + vit_stack_flops(disc.depth, batch, p + 1, disc.width, disc.mlp_ratio, kept=1)
    + 2 * batch * disc.width
  )


def analytic_flops(what: str, model, disc, loss_cfg, batch: int) -> dict:
  """Analytic matmul FLOPs of one ``what`` program for ``batch`` clips.

  Returns {'transformer': matmul FLOPs of the tokenizer, prior and discriminator,
  'lpips': the LPIPS estimate (0 without LPIPS), 'total': their sum}. For training steps:
  backward = 2x forward for the trained networks (input and weight gradients); 1x where only
  input gradients flow (the frozen discriminator in the generator's GAN loss, the prior's
  cosine logits against the detached codebook); LPIPS 1.5x (input gradients of the
  reconstructions' backbone pass only); none for the VQ logits (codes are sampled). The
  discriminator update (real and fake forward + backward) is amortised over ``disc_every``."""
  f = tokenizer_forward_flops(model, batch)
  enc = f['patch_embed'] + f['encoder'] + f['in_linear'] + f['vq_logits']
  dec = f['out_linear'] + f['decoder'] + f['final_linear']
  if what == 'encode':
    return {'transformer': enc, 'lpips': 0, 'total': enc}
  if what == 'decode':
    return {'transformer': dec, 'lpips': 0, 'total': dec}
  if what == 'forward':
    return {'transformer': enc + dec, 'lpips': 0, 'total': enc + dec}
  if what not in ('train', 'gen'):
    raise ValueError(f'unknown measurement {what!r}')
  trained = enc - f['vq_logits'] + dec
  total = 3 * trained + f['vq_logits']
  if model.use_prior:
    rounds = int(model.prior_n_rounds)
    total += rounds * (3 * f['prior'] + 2 * f['prior_logits'])
  if loss_cfg.gan_weight > 0:
    d = discriminator_forward_flops(disc, batch)
    total += 2 * d  # G loss: forward + input gradients
    total += 6 * d / max(int(loss_cfg.disc_every), 1)  # D update on real + fake, amortised
  lp = 0
  if loss_cfg.lpips_weight > 0:
    t, h, w = model.video_shape
    # Forward on reconstructions and targets; input gradients for the reconstructions only
    # (their own backbone pass), i.e. half the forward (the 1x1 heads, <0.1%, counted at half).
    lp = 3 * lpips_flops(batch * t, h, w, loss_cfg.lpips_net) // 2
  return {'transformer': int(total), 'lpips': int(lp), 'total': int(total + lp)}


TWIN_NOTE = (
  "XLA's cost analysis counts a loop body once (scan_layers, 'chunked' attention) and "
  "custom calls (cuDNN attention, 'cpu_flash') as 0, so these FLOPs are those of the "
  "same program with scan_layers=False and attention_impl='xla' (compiled for cost "
  'analysis only)'
)


def needs_cost_twin(model) -> bool:
  """True if XLA's FLOP count of ``model``'s programs would miss work (loops, custom calls)."""
  return bool(model.scan_layers) or attention.resolve_attention_impl(model.attention_impl) != 'xla'


def larp_ar_layer_flops(model, batch: int, queries: int, keys: int) -> int:
  """Forward matmul FLOPs of one ``LARPAR`` block for ``queries`` new positions attending to
  ``keys`` positions: fused qkv (3d^2) + wo (d^2) + SwiGLU (3 d*hidden) per position, scores
  and values 4*q*k*d (causal attention counted in full, as for the ViT blocks)."""
  from larp_jax.models.larp_ar import ffn_hidden

  d = int(model.dim)
  h = ffn_hidden(d, int(model.ffn_multiple))
  return 2 * batch * queries * (4 * d * d + 3 * d * h) + 4 * batch * queries * keys * d


def larp_ar_forward_flops(model, batch: int) -> int:
  """Forward matmul FLOPs of ``LARPAR`` over a whole sequence (prefix + seq_len - 1 inputs, the
  head on the seq_len predicting positions); embeddings are gathers (0)."""
  length = int(model.prefix_len) + int(model.seq_len) - 1
  head = 2 * batch * int(model.seq_len) * int(model.dim) * int(model.vocab_size)
  return int(model.depth) * larp_ar_layer_flops(model, batch, length, length) + head


def larp_ar_sample_flops(model, batch: int) -> int:
  """Matmul FLOPs of drawing one batch of ``seq_len`` tokens with the KV cache: the prefix, then
  one position per token attending to the positions written so far (the program attends over
  the whole cache with a mask; the model FLOPs count the visible positions only), the head
  once per token. Guidance (batch doubling) is the caller's factor."""
  p, n, d = int(model.prefix_len), int(model.seq_len), int(model.dim)
  layers = larp_ar_layer_flops(model, batch, p, p)  # prefill (causal, counted in full)
  for pos in range(p, p + n - 1):
    layers += larp_ar_layer_flops(model, batch, 1, pos + 1)
  return int(model.depth) * layers + 2 * batch * n * d * int(model.vocab_size)
