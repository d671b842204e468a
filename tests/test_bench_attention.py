"""The attention kernel benchmark: FLOP count, agreement of the kernels, CLI and errors."""

import json

import pytest

from larp_jax import bench_attention


def test_flops_by_hand():
  f = bench_attention.attention_flops(2, 8, 16, 3, 4, causal=False)
  assert f['forward'] == 2 * (2 * 2 * 3 * 8 * 16 * 4)        # QK^T and PV, 2 FLOPs per MAC
  assert f['forward_backward'] == 3 * f['forward']
  assert bench_attention.attention_flops(2, 8, 8, 3, 4, causal=True)['forward'] == (
      bench_attention.attention_flops(2, 8, 8, 3, 4, causal=False)['forward'] / 2)


@pytest.mark.parametrize('causal,dropout', [(False, 0.0), (True, 0.1)])
def test_kernels_agree_and_are_timed(causal, dropout):
  rec = bench_attention.run(shape=(1, 64, 2, 16), causal=causal, dropout=dropout,
                            impls=('chunked', 'xla'), runs=2, warmup=0, peak=False)
  assert set(rec['impls']) == {'chunked', 'xla'}
  for r in rec['impls'].values():
    assert max(r['max_abs_diff_vs_xla_f32'].values()) < 1e-4
    for what in ('forward', 'forward_backward'):
      assert len(r[what]['seconds']['all']) == 2 and r[what]['flops_per_s'] > 0
      assert r[what]['fraction_of_peak'] is None
  assert 'chunked' in bench_attention.format_table(rec)


def test_main_writes_json(tmp_path, capsys):
  out = tmp_path / 'a.json'
  bench_attention.main(['prog', '--shape=1,32,2,8', '--q_len=16', '--runs=1', '--warmup=0',
                        '--impls=chunked', f'--out={out}'])
  rec = json.loads(out.read_text())
  assert rec['shape'] == {'batch': 1, 'q_len': 16, 'k_len': 32, 'heads': 2, 'head_dim': 8}
  assert rec['peak']['flops_per_s'] > 0
  assert rec['impls']['chunked']['forward']['fraction_of_peak'] > 0
  assert 'of peak' in capsys.readouterr().out


@pytest.mark.parametrize('kwargs,match', [
    (dict(shape=(1, 64, 2)), 'four positive sizes'),
    (dict(impls=('flash',)), 'not one of'),
    (dict(causal=True, q_len=32), 'q_len == L'),
    (dict(dropout=1.0), 'dropout'),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bench_attention.run(**{'shape': (1, 64, 2, 16), 'runs': 1, 'warmup': 0, 'peak': False,
                           **kwargs})
