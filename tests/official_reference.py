"""Reference outputs of the official PyTorch LARP code, for the conversion parity test.

Run by a Python that has torch (not larp_jax's environment; see README, "Converting the released
checkpoints"), with the official repository importable from ``--official_dir``:

    $LARP_TORCH_PYTHON tests/official_reference.py --official_dir=$LARP_OFFICIAL_DIR --out=DIR

It builds small official models with random weights, writes each with its own
``save_pretrained`` to ``DIR/<name>/`` and runs it (``model.eval()``), writing ``DIR/<name>.npz``:
for the tokenizers ('plain', 'bn_learned_temperature') on fixed random videos with deterministic
quantization, the videos [B, T, H, W, 3], the tokens, the reconstruction [B, T, H, W, 3] (not
clamped), the prior's logits (when it has one) and the LayerNorm eps of the installed timm's ViT
blocks; for the generators ('ar_class', 'ar_fp') the teacher-forced logits of random tokens and
greedy samples ('greedy_cfg1', and 'greedy_cfg1.5' with guidance). Nothing of the official code is copied here:
it is imported from ``--official_dir``.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np


def _import_official(official_dir: str):
  """The official ``models`` package. Two environment fixes, neither touching the models:
  a torchvision built for another torch (e.g. a CUDA wheel beside a CPU torch) cannot load its
  C++ ops, whose fake-kernel registrations then fail at import; timm only needs torchvision's
  Python parts, so those registrations are skipped. The training-only LPIPS package is stubbed
  if absent (the official ``models/loss.py`` imports it; the tokenizer does not use it)."""
  import torch.library

  register_fake = torch.library.register_fake

  def tolerant(op, *args, **kwargs):
    if not (isinstance(op, str) and op.startswith('torchvision::')):
      return register_fake(op, *args, **kwargs)

    def decorate(fn):
      try:
        return register_fake(op, *args, **kwargs)(fn)
      except RuntimeError:  # the op's C++ kernel is not loaded
        return fn

    return decorate

  torch.library.register_fake = tolerant
  try:
    import lpips  # noqa: F401
  except ImportError:
    sys.modules['lpips'] = types.ModuleType('lpips')
  sys.path.insert(0, os.path.abspath(official_dir))
  import models  # noqa: F401  (registers every official model)

  return models


def _randomize(model, seed: int) -> None:
  """Random weights of a useful scale: the official init zeroes the output layer, which would
  make every reconstruction equal."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim >= 2:
        fan_in = int(np.prod(p.shape[1:])) if 'weight' in name else p.shape[-1]
        p.copy_(noise / np.sqrt(fan_in))
      elif name.endswith('weight'):  # LayerNorm / BatchNorm scales
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 0:  # the learned inverse temperature
        p.copy_(torch.tensor(12.5))
      else:
        p.copy_(0.1 * noise)
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(0.3 * torch.randn(b.shape, generator=g))
      elif name.endswith('running_var'):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _tokenizer_args(variant: str) -> dict:
  vq = dict(
    codebook_size=64,
    commitment_loss_weight=0.25,
    codebook_loss_weight=1.0,
    entropy_loss_weight=0.0,
    entropy_loss_temperature=0.01,
    l2_normalized=True,
    stochastic=True,
    stochastic_temperature=0.03 if variant == 'plain' else -1.0,
  )
  prior = dict(
    name='gptc-XXS',
    use_mix_ss=True,
    mix_ss_max_ratio=0.5,
    mix_ss_peak_steps_ratio=0.3,
    n_rounds=2,
    avg_loss_over_rounds=True,
    no_grad_before_last_round=False,
    no_dropout=False,
    latent_ce_temperature=1.0,
    args=dict(l2_normalized=True, max_seq_len=16),
  )
  return dict(
    bottleneck=dict(
      name='bottleneck',
      args=dict(
        bottleneck_dim=8,
        norm='none' if variant == 'plain' else 'bn_bn',
        regularizer=dict(name='vq', args=vq),
      ),
    ),
    prior_model=prior if variant == 'plain' else dict(name='none'),
    bottleneck_token_num=8,
    input_size=32,
    frame_num=4,
    temporal_patch_size=2,
    patch_size=8,
    decoder_temporal_patch_size=2,
    decoder_patch_size=8,
    encoder_hidden_size=32,
    decoder_hidden_size=32,
    encoder_num_heads=2,
    decoder_num_heads=2,
    encoder_depth=2,
    decoder_depth=2,
    use_decoder_patch_query_token_type_embed=True,
  )


def tokenizer_reference(official_dir: str, out: str, variant: str, seed: int) -> str:
  import torch

  _import_official(official_dir)
  from models.larp_tokenizer import LARPTokenizer

  torch.manual_seed(seed)
  model = LARPTokenizer(**_tokenizer_args(variant))
  _randomize(model, seed)
  model.eval()
  model.set_vq_eval_deterministic(True)
  model.save_pretrained(os.path.join(out, variant))
  rng = np.random.default_rng(seed)
  videos = rng.uniform(size=(3, 4, 32, 32, 3)).astype(np.float32)  # [B, T, H, W, 3]
  result = dict(videos=videos, norm_eps=np.float64(model.encoder.blocks[0].norm1.eps))
  with torch.no_grad():
    x = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).contiguous()  # [B, 3, T, H, W]
    enc = model.encode(x)
    recon = model.decode(enc['encoded'])
    result['tokens'] = enc['bottleneck_rep'].numpy().astype(np.int32)
    result['recon'] = recon.permute(0, 2, 3, 4, 1).numpy()
    if model.prior_model is not None:
      # The official prior passes its attention dropout to SDPA even in eval(); off here, so
      # that the logits are deterministic.
      for block in model.prior_model.blocks:
        block.attn.p_attn_drop = 0.0
      pred = model.prior_model.ar_predict(enc['regularized_z'])
      result['prior_logits'] = model.calculate_logits_and_ar_pred_cont(pred)[0].numpy()
  path = os.path.join(out, f'{variant}.npz')
  np.savez(path, **result)
  return path


def ar_reference(official_dir: str, out: str, variant: str, seed: int) -> str:
  """A small official LARP_AR (class-conditional or frame prediction) with random weights:
  teacher-forced logits of random tokens and greedy samples (with and without guidance)."""
  import torch

  _import_official(official_dir)
  import ar as official_ar
  from models.larp_ar import LARP_AR, ModelArgs

  fp = variant == 'ar_fp'
  seq_len, vocab = 8, 64
  args = ModelArgs(
    dim=32,
    n_layer=2,
    n_head=2,
    vocab_size=vocab,
    num_classes=5,
    max_seq_len=seq_len,
    frame_prediction=fp,
    cls_token_num=seq_len + 1 if fp else 1,
  )
  torch.manual_seed(seed)
  model = LARP_AR(args)
  _randomize(model, seed)
  model.eval()
  model.save_pretrained(os.path.join(out, variant))
  rng = np.random.default_rng(seed)
  batch = 3
  tokens = rng.integers(0, vocab, size=(batch, seq_len)).astype(np.int64)
  result = dict(tokens=tokens.astype(np.int32))
  if fp:
    prefix = rng.integers(0, vocab, size=(batch, seq_len)).astype(np.int64)
    cond = np.concatenate([prefix, np.full((batch, 1), vocab)], axis=1)  # + the separator
    result['prefix'] = prefix.astype(np.int32)
  else:
    cond = np.arange(batch, dtype=np.int64) % args.num_classes
    result['labels'] = cond.astype(np.int32)
  cond = torch.from_numpy(cond)
  with torch.no_grad():
    logits, _ = model(torch.from_numpy(tokens[:, :-1]), cond)
    result['logits'] = logits.numpy()
    scales = (1.0,) if fp else (1.0, 1.5)
    for scale in scales:
      with model.sampling():
        seq = official_ar.generate(model, cond, seq_len, cfg_scale=scale, sample_logits=False)
      model.reset_caches()
      result[f'greedy_cfg{scale:g}'] = seq.numpy().astype(np.int32)
  path = os.path.join(out, f'{variant}.npz')
  np.savez(path, **result)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--official_dir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  for variant in ('plain', 'bn_learned_temperature'):
    print(tokenizer_reference(args.official_dir, args.out, variant, args.seed))
  for variant in ('ar_class', 'ar_fp'):
    print(ar_reference(args.official_dir, args.out, variant, args.seed))


if __name__ == '__main__':
  main()
