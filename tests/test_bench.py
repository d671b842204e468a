"""The benchmark command: FLOP counting, the bench presets, and one tiny end-to-end run."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from larp_jax import config_lib
from larp_jax.bench import flops, runners, timing
from tests.conftest import ROOT


def _bench_config(arg):
  return config_lib.load_config(os.path.join(ROOT, 'configs', 'bench.py') + ':' + arg)


def test_vit_layer_flops_by_hand():
  # B=1, L=2, d=4, mlp 4: qkv 2*2*4*12 + proj 2*2*4*4 + fc1 2*2*4*16 + fc2 2*2*16*4
  # = 192 + 64 + 256 + 256 = 768; scores 2*2*2*4 = 32 and values 32.
  assert flops.vit_layer_flops(1, 2, 4, 4.0) == 768 + 64
  assert flops.vit_layer_flops(3, 5, 8, 2.0) == 2 * 3 * 5 * 8 * 8 * 8 + 4 * 3 * 25 * 8


def test_tokenizer_flops_by_hand():
  class M:  # 1 frame of 8x8 in 4x4x... patches: P = 4 patches of 1*4*4*3 = 48 values
    video_shape, patch_size = (1, 8, 8), (1, 4, 4)
    num_latent_tokens, width, mlp_ratio = 2, 4, 4.0
    encoder_depth, decoder_depth = 1, 2
    codebook_size, code_dim = 10, 3
    use_prior, prior_width, prior_depth, prior_n_rounds = True, 4, 1, 2

  f = flops.tokenizer_forward_flops(M, batch=1)
  layer6 = 2 * 6 * 12 * 16 + 4 * 36 * 4  # L = P + N = 6, d = 4: 2304 + 576
  assert layer6 == 2880
  # A last block keeping k of the 6 tokens: qkv on all 6 (576), attention with k queries
  # (4*k*6*4), proj + MLP on k rows (2*k*(16 + 128)). Encoder keeps N = 2, decoder P = 4.
  last = lambda k: 576 + 4 * k * 6 * 4 + 2 * k * 144
  assert last(6) == layer6 and flops.vit_stack_flops(2, 1, 6, 4, 4.0, kept=2) == 2880 + 1344
  assert f['encoder'] == last(2) == 1344 and f['decoder'] == 2880 + last(4) == 4992
  assert f['patch_embed'] == f['final_linear'] == 2 * 4 * 48 * 4 == 1536
  assert f['in_linear'] == f['out_linear'] == 2 * 2 * 4 * 3 == 48
  assert f['vq_logits'] == 2 * 2 * 10 * 3 == 120
  # Prior on L = N - 1 = 1: proj 2*1*3*4 + block (2*1*12*16 + 4*1*1*4) + head 2*1*4*3.
  assert f['prior'] == 24 + 384 + 16 + 24 == 448 and f['prior_logits'] == 2 * 1 * 10 * 3 == 60
  assert flops.analytic_flops('encode', M, None, None, 1)['total'] == 1536 + 1344 + 48 + 120
  assert flops.analytic_flops('decode', M, None, None, 1)['total'] == 48 + 4992 + 1536
  assert flops.analytic_flops('forward', M, None, None, 1)['total'] == 3048 + 6576

  class Loss:
    gan_weight = lpips_weight = 0.0

  # Generator step: 3x the trained pieces, 1x the VQ logits (codes are sampled), per prior
  # round 3x the prior and 2x its logits against the detached codebook.
  gen = flops.analytic_flops('gen', M, None, Loss, 1)
  assert gen['total'] == 3 * (9624 - 120) + 120 + 2 * (3 * 448 + 2 * 60) == 31560
  assert gen['lpips'] == 0


def test_xla_cost_analysis_of_a_matmul():
  m, k, n = 64, 48, 80
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert flops.xla_flops(compiled) == 2 * m * n * k


def test_cost_twin_for_loops_and_custom_calls():
  class M:
    scan_layers, attention_impl = False, 'xla'

  assert not flops.needs_cost_twin(M)
  M.attention_impl = 'chunked'
  assert flops.needs_cost_twin(M)
  M.attention_impl, M.scan_layers = 'xla', True
  assert flops.needs_cost_twin(M)
  # Why: XLA's cost analysis counts a loop body once, not once per iteration.
  x = jnp.ones((32, 32))
  looped = jax.jit(lambda x: jax.lax.fori_loop(0, 4, lambda i, y: y @ x, x)).lower(x)
  assert flops.xla_flops(looped) < 4 * 2 * 32**3


def test_datasheet_peaks():
  assert timing.datasheet_peak('NVIDIA H100 80GB HBM3') == 989e12
  assert timing.datasheet_peak('NVIDIA H100 PCIe') == 756e12
  assert timing.datasheet_peak('NVIDIA A100-SXM4-40GB') == 312e12
  assert timing.datasheet_peak('TPU v5 lite') == 197e12
  assert timing.datasheet_peak('TPU v5') == 459e12
  assert timing.datasheet_peak('cpu') is None


def test_tiny_preset_matches_the_reference():
  c = _bench_config('tiny')
  m = c.model
  assert tuple(m.video_shape) == (16, 64, 64) and tuple(m.patch_size) == (4, 8, 8)
  assert (m.num_latent_tokens, m.width, m.encoder_depth, m.decoder_depth, m.num_heads) == (
    256,
    256,
    4,
    4,
    4,
  )
  assert (m.codebook_size, m.code_dim) == (1024, 16)
  assert m.use_prior and (m.prior_depth, m.prior_width, m.prior_heads) == (2, 128, 2)
  assert m.mlp_ratio == 4.0 and m.dtype == 'float32' and m.param_dtype == 'float32'
  assert (c.disc.width, c.disc.depth, c.disc.num_heads, tuple(c.disc.patch_size)) == (
    512,
    2,
    8,
    (4, 8, 8),
  )
  assert c.batch_size == 4
  # 'train' is the full recipe (LPIPS-VGG + GAN); 'gen' has neither.
  assert c.loss.lpips_weight > 0 and c.loss.lpips_net == 'vgg' and c.loss.gan_weight > 0
  assert dict(c.bench.train_overrides) == {}
  assert dict(c.bench.gen_overrides) == {'gan_weight': 0.0, 'lpips_weight': 0.0}
  assert (c.bench.warmup, c.bench.runs) == (2, 5)
  assert _bench_config('tiny,dtype=bfloat16').model.dtype == 'bfloat16'
  assert _bench_config('tiny,dtype=bfloat16').model.param_dtype == 'float32'


def test_larp_l_preset_is_the_released_recipe_at_batch_1():
  c = _bench_config('larp_l')
  ref = config_lib.load_config(os.path.join(ROOT, 'configs', 'ucf101.py'))
  assert c.batch_size == 1
  assert dict(c.model) == dict(ref.model)
  per_epoch = 'vq_warmup_steps_per_epoch'  # derived from the batch size, like total_steps
  assert dict(c.disc) == dict(ref.disc)
  assert {k: v for k, v in c.loss.items() if k != per_epoch} == {
    k: v for k, v in ref.loss.items() if k != per_epoch
  }
  assert tuple(c.model.video_shape) == (16, 128, 128) and c.model.num_latent_tokens == 1024
  assert (c.model.width, c.model.encoder_depth, c.model.decoder_depth) == (768, 12, 12)
  assert c.model.dtype == 'float32'
  assert dict(c.bench.gen_overrides) == {'gan_weight': 0.0, 'lpips_weight': 0.0}


def test_bench_main_on_micro(tmp_path):
  out = tmp_path / 'micro.json'
  batch = 2 * jax.device_count()
  record = runners.main(
    [
      'bench',
      f'--config={ROOT}/configs/bench.py:micro',
      '--what=gen,encode,decode',
      '--runs=1',
      '--warmup=1',
      f'--batch={batch}',
      '--peak_size=256',
      f'--out={out}',
    ]
  )
  on_disk = json.loads(out.read_text())
  assert on_disk['measurements'].keys() == {'gen', 'encode', 'decode'}
  assert on_disk['batch'] == batch and on_disk['dtype'] == 'float32'
  for key in ('config', 'config_name', 'device', 'versions', 'peak', 'input', 'seed'):
    assert key in on_disk, key
  assert on_disk['device']['count'] == jax.device_count()
  assert on_disk['versions']['jax'] == jax.__version__
  assert on_disk['peak']['measured']['float32']['flops_per_s'] > 0
  assert len(on_disk['peak']['rechecks_flops_per_s']['float32']) == 2  # after gen, after decode
  assert on_disk['peak']['used_for_mfu']['flops_per_s_per_device'] == max(
    on_disk['peak']['rechecks_flops_per_s']['float32']
    + [on_disk['peak']['measured']['float32']['flops_per_s']]
  )
  assert on_disk['input']['clips_per_s'] > 0
  for what, r in on_disk['measurements'].items():
    assert r['what'] == what
    for stat in ('median', 'min', 'max'):
      assert r['seconds_per_step'][stat] > 0 and r['clips_per_s'][stat] > 0
    assert r['flops_per_clip']['xla'] > 0 and r['flops_per_clip']['analytic_total'] > 0
    assert r['achieved_flops_per_s'] > 0 and r['mfu'] > 0
    assert r['compile']['total_s'] > 0
    # The analytic matmul count is most of XLA's count (which adds norms, softmax, ...).
    assert 0.5 < r['xla_over_analytic'] < 3.0, (what, r['xla_over_analytic'])
  gen = on_disk['measurements']['gen']
  assert gen['loss_overrides'] == {'gan_weight': 0.0, 'lpips_weight': 0.0}
  assert gen['steps_per_run'] == 1 and gen['final_loss'] > 0
  assert record['measurements']['gen']['final_loss'] == gen['final_loss']


def test_bad_measurement_name():
  with pytest.raises(ValueError, match='unknown measurement'):
    runners.run(_bench_config('micro'), what=['fwd'])


def test_generator_presets():
  b = _bench_config('gen_b')
  assert b.task == 'generator' and b.batch_size == 1
  assert (b.model.dim, b.model.depth, b.model.num_heads) == (768, 12, 12)
  assert (b.model.seq_len, b.model.vocab_size, b.model.num_classes) == (1024, 8192, 101)
  assert b.model.dtype == 'float32' and not b.model.frame_prediction
  assert tuple(b.bench.sample_batches) == (1, 16) and not b.bench.recompute_full
  assert _bench_config('gen_tiny').bench.recompute_full


def test_generator_flops_by_hand():
  class M:  # dim 4, SwiGLU hidden 256 (int(2*4*4/3) = 10 rounded up to 256), 1 layer
    dim, depth, ffn_multiple, vocab_size, seq_len, prefix_len = 4, 1, 256, 10, 3, 1

  per_pos = 2 * (4 * 16 + 3 * 4 * 256)  # qkv + wo + w1, w3, w2
  assert flops.larp_ar_layer_flops(M, 1, 1, 5) == per_pos + 4 * 5 * 4
  # Forward: 3 positions (class + 2 tokens), attention over all 3; the head on 3 positions.
  assert flops.larp_ar_forward_flops(M, 2) == 2 * (3 * per_pos + 4 * 9 * 4) + 2 * 2 * 3 * 4 * 10
  # Sampling: the prefix (1 position), then positions 1 and 2 attending to 2 and 3 positions.
  assert flops.larp_ar_sample_flops(M, 1) == 3 * per_pos + 4 * 4 * (1 + 2 + 3) + 2 * 3 * 4 * 10


def test_bench_generator_rows(tmp_path):
  out = tmp_path / 'gen.json'
  runners.main(
    [
      'bench',
      f'--config={ROOT}/configs/bench.py:gen_tiny',
      '--config.model.depth=1',
      '--config.model.seq_len=16',
      '--config.bench.sample_batches=(1,2)',
      '--runs=1',
      '--warmup=0',
      '--peak_size=128',
      f'--out={out}',
    ]
  )
  rec = json.loads(out.read_text())
  assert rec['task'] == 'generator'
  assert list(rec['measurements']) == ['train', 'sample_b1', 'sample_b2', 'recompute_b1']
  for name, r in rec['measurements'].items():
    assert r['tokens_per_s']['median'] > 0 and r['clips_per_s']['median'] > 0, name
    assert r['tokens_per_run'] == r['batch'] * 16 and r['analytic_flops_per_s'] > 0, name
    assert r['mfu_analytic'] > 0, name
  train = rec['measurements']['train']
  assert train['flops_per_step']['xla'] > 0 and train['mfu'] > 0 and train['final_loss'] > 0
  assert 0.5 < train['xla_over_analytic'] < 3.0
  assert not rec['measurements']['recompute_b1']['extrapolated']
  assert rec['cached_over_recompute']['batch'] == 1 and rec['cached_over_recompute']['ratio'] > 0
