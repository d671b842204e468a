"""The official PyTorch ``LARP_AR``'s side of ``larp_jax.bench.official_ar`` (the speed comparison).

Run by a Python that has torch (never by larp_jax's), with the official repository at
``--official_dir``; ``larp_jax.bench.official_ar`` starts it and talks to it over stdin/stdout:

    $LARP_TORCH_PYTHON tests/official_ar_bench.py --official_dir=DIR --dim=768 --depth=12 \
        --heads=12 --vocab=8192 --classes=101 --seq_len=1024 --threads=1

Each stdin line is one timed measurement, answered by one JSON line on stdout:
  ``train RUNS``          the official training step (``model.train()``, forward with targets as
                          its trainer calls it, backward, AdamW step; float32, no AMP on CPU);
  ``sample BATCH RUNS``   ``ar.generate`` (the official KV-cache sampler; cfg_scale 1, full
                          distribution), ``BATCH`` class labels, ``seq_len`` tokens each.
Only the AR model's modules are imported; the packages its siblings need (timm, einops,
huggingface_hub) are stubbed when absent. Nothing of the official code is copied here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types


def _import_official(official_dir: str):
  """(LARP_AR, ModelArgs, ar) without running ``models/__init__.py`` (the tokenizer's imports)."""
  for name in (
    'huggingface_hub',
    'timm',
    'timm.models',
    'timm.models.vision_transformer',
    'einops',
  ):
    try:
      __import__(name)
    except ImportError:
      mod = types.ModuleType(name)
      mod.PyTorchModelHubMixin = type('PyTorchModelHubMixin', (), {})
      mod.PatchEmbed = type('PatchEmbed', (), {})
      sys.modules[name] = mod
  root = os.path.abspath(official_dir)
  sys.path.insert(0, root)
  pkg = types.ModuleType('models')
  pkg.__path__ = [os.path.join(root, 'models')]
  pkg.models = {}
  pkg.register = lambda name: lambda cls: cls
  sys.modules['models'] = pkg
  import ar
  from models.larp_ar import LARP_AR, ModelArgs

  return LARP_AR, ModelArgs, ar


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--official_dir', required=True)
  for name, default in (
    ('dim', 768),
    ('depth', 12),
    ('heads', 12),
    ('vocab', 8192),
    ('classes', 101),
    ('seq_len', 1024),
    ('batch', 1),
    ('threads', 1),
    ('seed', 0),
  ):
    p.add_argument(f'--{name}', type=int, default=default)
  a = p.parse_args(argv)
  import torch

  torch.set_num_threads(a.threads)
  torch.manual_seed(a.seed)
  LARP_AR, ModelArgs, ar = _import_official(a.official_dir)
  args = ModelArgs(
    dim=a.dim,
    n_layer=a.depth,
    n_head=a.heads,
    vocab_size=a.vocab,
    num_classes=a.classes,
    max_seq_len=a.seq_len,
    class_dropout_prob=0.1,
  )
  model = LARP_AR(args)
  with torch.no_grad():  # the official init zeroes the head: random weights make real samples
    model.output.weight.normal_(0.0, 0.02)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  g = torch.Generator().manual_seed(a.seed)
  tokens = torch.randint(0, a.vocab, (a.batch, a.seq_len), generator=g)
  labels = torch.randint(0, a.classes, (a.batch,), generator=g)

  def train_once():
    model.train()
    _, loss = model(cond_idx=labels, idx=tokens[:, :-1], targets=tokens)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss)

  def sample_once(batch):
    model.eval()
    cond = torch.randint(0, a.classes, (batch,), generator=g)
    with torch.inference_mode(), model.sampling():
      seq = ar.generate(model, cond, a.seq_len, cfg_scale=1.0, sample_logits=True)
    model.reset_caches()  # generate leaves them set up; a cached model cannot train
    assert seq.shape == (batch, a.seq_len)

  print(json.dumps({'ready': True, 'torch': torch.__version__, 'threads': torch.get_num_threads()}))
  sys.stdout.flush()
  for line in sys.stdin:
    parts = line.split()
    if not parts:
      continue
    if parts[0] == 'quit':
      break
    runs = int(parts[-1])
    times = []
    for _ in range(runs):
      t = time.perf_counter()
      if parts[0] == 'train':
        train_once()
      else:
        sample_once(int(parts[1]))
      times.append(time.perf_counter() - t)
    print(json.dumps({'what': ' '.join(parts[:-1]), 'seconds': times}))
    sys.stdout.flush()


if __name__ == '__main__':
  main()
