"""The attention kernel benchmark: FLOP count, agreement of the kernels, CLI and errors."""

import json

import pytest

from larp_jax import bench_attention


def test_flops_by_hand():
  f = bench_attention.attention_flops(2, 8, 16, 3, 4, causal=False)
  assert f['forward'] == 2 * (2 * 2 * 3 * 8 * 16 * 4)  # QK^T and PV, 2 FLOPs per MAC
  assert f['forward_backward'] == 3 * f['forward']
  assert bench_attention.attention_flops(2, 8, 8, 3, 4, causal=True)['forward'] == (
    bench_attention.attention_flops(2, 8, 8, 3, 4, causal=False)['forward'] / 2
  )


@pytest.mark.parametrize('causal,dropout', [(False, 0.0), (True, 0.1)])
def test_kernels_agree_and_are_timed(causal, dropout):
  rec = bench_attention.run(
    shape=(1, 64, 2, 16),
    causal=causal,
    dropout=dropout,
    impls=('chunked', 'xla'),
    runs=2,
    warmup=0,
    peak=False,
  )
  assert set(rec['impls']) == {'chunked', 'xla'}
  flops = bench_attention.attention_flops(1, 64, 64, 2, 16, causal)
  for r in rec['impls'].values():
    assert max(r['max_abs_diff_vs_xla_f32'].values()) < 1e-4
    for what in ('forward', 'forward_backward'):
      assert len(r[what]['seconds']['all']) == 2 and r[what]['flops_per_s'] > 0
      assert r[what]['flops'] == flops[what]
      assert r[what]['fraction_of_peak'] is None
  assert 'chunked' in bench_attention.format_table(rec)


def test_dropout_reaches_the_kernels():
  """The programs it times really drop (else the agreement above would prove nothing)."""
  import jax

  q, k, v, _ = bench_attention._inputs((1, 64, 2, 16), 64, jax.numpy.float32, 0)
  rng = jax.random.key(1)
  for impl in ('chunked', 'xla'):
    on = bench_attention._programs(impl, causal=True, rate=0.5, rng=rng)[0](q, k, v)
    off = bench_attention._programs(impl, causal=True, rate=0.0, rng=rng)[0](q, k, v)
    assert float(jax.numpy.max(jax.numpy.abs(on - off))) > 1e-2


def test_bfloat16_inputs_and_the_dpa_fallback_label():
  rec = bench_attention.run(
    shape=(1, 64, 2, 16),
    dropout=0.1,
    dtype='bfloat16',
    impls=('chunked', 'dot_product_attention'),
    runs=1,
    warmup=0,
    peak=False,
  )
  assert rec['dtype'] == 'bfloat16'
  assert rec['impls']['dot_product_attention']['ran_as'] == 'xla'
  assert 'dot_product_attention (ran xla)' in bench_attention.format_table(rec)
  diff = max(rec['impls']['chunked']['max_abs_diff_vs_xla_f32'].values())
  assert 0 < diff < 0.1  # bf16 rounding against the float32 reference, nothing worse


def test_default_impls_take_cpu_flash_only_where_it_runs():
  """float32 with a head dim of 16: the C++ kernel first (where it builds);
  bfloat16 or a head dim of 8: only the pure-JAX kernels, and the default run does not fail."""
  from larp_jax.native import flash_attention as native

  expect = ['cpu_flash'] if native.available() else []
  assert bench_attention.default_impls((1, 32, 2, 16), 'float32')[:1] == expect
  assert bench_attention.default_impls((1, 32, 2, 16), 'bfloat16') == ['chunked', 'xla']
  assert bench_attention.default_impls((1, 32, 2, 8), 'float32') == ['chunked', 'xla']
  rec = bench_attention.run(shape=(1, 32, 2, 16), dtype='bfloat16', runs=1, warmup=0, peak=False)
  assert list(rec['impls']) == ['chunked', 'xla']


def test_main_writes_json(tmp_path, capsys):
  out = tmp_path / 'a.json'
  bench_attention.main(
    [
      'prog',
      '--shape=1,32,2,8',
      '--q_len=16',
      '--runs=1',
      '--warmup=0',
      '--impls=chunked',
      f'--out={out}',
    ]
  )
  rec = json.loads(out.read_text())
  assert rec['shape'] == {'batch': 1, 'q_len': 16, 'k_len': 32, 'heads': 2, 'head_dim': 8}
  assert rec['peak']['flops_per_s'] > 0
  assert rec['impls']['chunked']['forward']['fraction_of_peak'] > 0
  assert 'of peak' in capsys.readouterr().out


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(shape=(1, 64, 2)), 'four positive sizes'),
    (dict(impls=('flash',)), 'not one of'),
    (dict(causal=True, q_len=32), 'q_len == L'),
    (dict(q_len=0), 'q_len=0'),
    (dict(dropout=1.0), 'dropout'),
    (dict(impls=('cpu_flash',), dtype='bfloat16'), 'float32|cannot run'),
  ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bench_attention.run(
      **{'shape': (1, 64, 2, 16), 'runs': 1, 'warmup': 0, 'peak': False, **kwargs}
    )
