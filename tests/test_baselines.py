"""Trivial-code baselines (larp_jax/evaluation/baselines.py) against hand-computed values."""

import math

import numpy as np
import pytest

from larp_jax.evaluation import baselines as bl
from larp_jax.evaluation import recon_metrics
from larp_jax.models import patches

EXACT = 100.0  # -10 log10(MSE_FLOOR)


def metrics(clips, patch_size=(2, 4, 4), **kw):
  return bl.baseline_metrics(clips, patch_size, **kw)['baselines']


def assert_same(a, b, rel=1e-10):
  assert list(a) == list(b)
  for name in a:
    assert a[name] == pytest.approx(b[name], rel=rel), name


def test_names_floor_and_patch_order():
  assert bl.names() == ('dataset_mean', 'clip_mean', 'patch_mean', 'pca1', 'pca4', 'pca16')
  assert bl.MSE_FLOOR == recon_metrics.MSE_FLOOR
  assert bl.psnr_from_mse([0.0, 0.01, 1.0]).tolist() == pytest.approx([EXACT, 20.0, 0.0])
  x = np.random.default_rng(0).random((2, 4, 8, 12, 3))
  p = bl.patchify(x, (2, 4, 4))
  np.testing.assert_array_equal(p, np.asarray(patches.patchify(x, (2, 4, 4))))
  with pytest.raises(ValueError, match='does not divide'):
    bl.patchify(x, (3, 4, 4))


def test_constant_clips_hand_values():
  # Two constant clips, 0.2 and 0.6: the clip and patch means are exact; the dataset-mean video
  # is 0.4 everywhere, MSE 0.04 for both, PSNR -10 log10(0.04).
  clips = np.stack([np.full((4, 8, 8, 3), 0.2), np.full((4, 8, 8, 3), 0.6)])
  m = metrics(clips)
  assert m['clip_mean'] == {
    'psnr': pytest.approx(EXACT),
    'mse': pytest.approx(0, abs=1e-20),
    'values_per_clip': 3,
  }
  assert m['patch_mean']['psnr'] == pytest.approx(EXACT)
  assert m['patch_mean']['values_per_clip'] == 3 * 2 * 2 * 2
  assert m['dataset_mean']['mse'] == pytest.approx(0.04)
  assert m['dataset_mean']['psnr'] == pytest.approx(-10 * math.log10(0.04))
  assert m['dataset_mean']['values_per_clip'] == 0


def test_psnr_is_mean_of_per_clip_psnr():
  # Clip 0: a red left half and a black right half -> clip mean (0.5, 0, 0), MSE 0.25 / 3
  # (only the red channel errs, by 0.5 everywhere). Clip 1: constant, exact (100 dB).
  a = np.zeros((2, 4, 8, 3))
  a[:, :, :4, 0] = 1.0
  clips = np.stack([a, np.full_like(a, 0.3)])
  m = metrics(clips, (1, 4, 4))
  mse0 = 0.25 / 3
  assert m['clip_mean']['mse'] == pytest.approx(mse0 / 2)
  assert m['clip_mean']['psnr'] == pytest.approx((-10 * math.log10(mse0) + EXACT) / 2)
  # Every 4x4 patch is one colour: the patch-mean baseline is exact on both clips.
  assert m['patch_mean']['psnr'] == pytest.approx(EXACT)


def test_patch_constant_video_is_exact_for_patch_mean_only():
  rng = np.random.default_rng(1)
  colours = rng.random((3, 2, 2, 3, 3))  # [B, gt, gh, gw, 3]
  video = colours.repeat(2, 1).repeat(4, 2).repeat(4, 3)  # patches (2, 4, 4) of one colour
  m = metrics(video)
  assert m['patch_mean']['psnr'] == pytest.approx(EXACT)
  assert m['clip_mean']['psnr'] < 40
  # With a patch size that straddles the colour blocks the patch mean is no longer exact.
  assert metrics(video, (1, 8, 6))['patch_mean']['psnr'] < 40


@pytest.mark.parametrize('axis', [1, 2, 3])
def test_patch_mean_averages_each_patch_axis(axis):
  # 0/1 stripes along T, H or W: a (2, 2, 2) patch holds one 0 and one 1 along that axis, so its
  # mean is 0.5 and the MSE 0.25 (6.02 dB); stripes two wide are patch-constant (exact).
  shape = [1, 4, 4, 4, 3]
  idx = np.arange(4).reshape([4 if a == axis else 1 for a in range(5)])
  thin = np.broadcast_to((idx % 2).astype(np.float64), shape)
  wide = np.broadcast_to((idx // 2 % 2).astype(np.float64), shape)
  m = metrics(thin, (2, 2, 2))['patch_mean']
  assert m['mse'] == pytest.approx(0.25)
  assert m['psnr'] == pytest.approx(-10 * math.log10(0.25))
  assert metrics(wide, (2, 2, 2))['patch_mean']['psnr'] == pytest.approx(EXACT)


def test_pca_full_rank_reproduces_and_k_is_capped():
  # D = 1*2*2*3 = 12: k = 12 spans everything, k = 16 is capped to 12; k = 1 is not exact.
  rng = np.random.default_rng(2)
  clips = rng.random((3, 2, 4, 4, 3))
  m = metrics(clips, (1, 2, 2), pca_components=(1, 12, 16))
  for k in ('pca12', 'pca16'):
    assert m[k]['psnr'] == pytest.approx(EXACT) and m[k]['components'] == 12
  assert m['pca16']['values_per_clip'] == 12 * 2 * 2 * 2
  assert m['pca1']['components'] == 1 and m['pca1']['psnr'] < 30


def test_pca1_exact_on_a_line_and_pca_beats_means():
  # Every patch vector is a + s * d: one component reconstructs it exactly (PCA-1 = 100 dB).
  rng = np.random.default_rng(3)
  d = rng.standard_normal(12)
  d *= 0.3 / np.abs(d).max()
  s = rng.uniform(-1, 1, (4, 8, 1))  # [B, P, 1]
  p = 0.5 + s * d  # in [0.2, 0.8]
  clips = np.asarray(patches.unpatchify(p, (2, 2, 2), (1, 2, 2)))  # grid of (2, 4, 4) clips
  m = metrics(clips, (1, 2, 2), pca_components=(1, 4))
  assert m['pca1']['psnr'] == pytest.approx(EXACT)
  assert m['pca1']['mse'] < 1e-20
  assert m['patch_mean']['psnr'] < 60
  # Off the line, PCA-1 is not exact any more.
  noisy = clips + 0.05 * rng.standard_normal(clips.shape)
  assert metrics(np.clip(noisy, 0, 1), (1, 2, 2), pca_components=(1,))['pca1']['psnr'] < 40


def _pca_reference(clips, patch_size, k):
  """Per-clip MSE of top-k PCA by an SVD of the centred patch matrix (not the covariance)."""
  p = bl.patchify(clips, patch_size)
  flat = p.reshape(-1, p.shape[-1])
  mu = flat.mean(axis=0)
  _, _, vt = np.linalg.svd(flat - mu, full_matrices=False)
  v = vt[:k].T
  r = np.clip((p - mu) @ v @ v.T + mu, 0, 1)
  return ((r - p) ** 2).mean(axis=(1, 2)), ((p - mu) @ v @ v.T + mu)


def test_pca_against_svd_reference_with_clamping():
  rng = np.random.default_rng(4)
  clips = rng.random((5, 2, 4, 4, 3)) ** 2
  mse_ref, unclamped = _pca_reference(clips, (1, 2, 2), 2)
  assert unclamped.min() < 0 or unclamped.max() > 1  # the clamp matters here
  m = metrics(clips, (1, 2, 2), pca_components=(2,))['pca2']
  assert m['mse'] == pytest.approx(mse_ref.mean(), rel=1e-9)
  assert m['psnr'] == pytest.approx(np.mean(-10 * np.log10(mse_ref)), rel=1e-9)
  # dataset mean by hand
  dm = ((clips - clips.mean(axis=0)) ** 2).mean(axis=(1, 2, 3, 4))
  d = metrics(clips, (1, 2, 2))['dataset_mean']
  assert d['mse'] == pytest.approx(dm.mean(), rel=1e-12)
  assert d['psnr'] == pytest.approx(np.mean(-10 * np.log10(dm)), rel=1e-12)


def test_uint8_chunks_lists_and_sharded_stats_agree(monkeypatch):
  rng = np.random.default_rng(5)
  u8 = rng.integers(0, 256, (7, 2, 4, 4, 3), dtype=np.uint8)
  ref = bl.baseline_metrics(u8.astype(np.float64) / 255, (1, 2, 2))
  assert_same(metrics(u8, (1, 2, 2)), ref['baselines'])
  monkeypatch.setattr(bl, 'CHUNK_VALUES', 100)  # one clip (96 values) per chunk
  out = bl.baseline_metrics([u8[:3], u8[3:3], u8[3:]], (1, 2, 2))
  assert out['clips'] == 7
  assert_same(out['baselines'], ref['baselines'])
  # Two "processes": summed statistics and summed errors give the same numbers as one.
  add = lambda a, b: {k: a[k] + b[k] for k in a}
  stats = add(bl.sufficient_stats(u8[:2], (1, 2, 2)), bl.sufficient_stats(u8[2:], (1, 2, 2)))
  fitted = bl.fit(stats)
  sums = add(bl.error_sums(u8[:2], fitted, (1, 2, 2)), bl.error_sums(u8[2:], fitted, (1, 2, 2)))
  for name, v in ref['baselines'].items():
    assert sums[name][0] / 7 == pytest.approx(v['mse'], rel=1e-10), name
    assert sums[name][1] / 7 == pytest.approx(v['psnr'], rel=1e-10), name


def test_all_sum_hook_and_no_clips():
  seen = []

  def fake_all_sum(tree):  # a second process holding the same clips: everything doubles
    seen.append(sorted(tree))
    return {k: 2 * np.asarray(v) for k, v in tree.items()}

  clips = np.random.default_rng(6).random((2, 2, 4, 4, 3))
  out = bl.baseline_metrics(clips, (1, 2, 2), all_sum=fake_all_sum)
  assert out['clips'] == 4 and len(seen) == 2
  assert_same(out['baselines'], metrics(clips, (1, 2, 2)))
  empty = np.zeros((0, 2, 4, 4, 3), np.uint8)
  assert bl.baseline_metrics([], (1, 2, 2), video_shape=(2, 4, 4)) is None
  assert bl.baseline_metrics(empty, (1, 2, 2)) is None
  with pytest.raises(ValueError, match='no clips'):
    bl.fit(bl.sufficient_stats(empty, (1, 2, 2)))
