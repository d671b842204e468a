"""python -m larp_jax.plot: the learning-curve PNG from a run's evaluation records."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from larp_jax.evaluation import curve as curve_lib


def _write_run(root, records, metrics=()):
  os.makedirs(os.path.join(root, 'eval'))
  for step, rec in records.items():
    with open(os.path.join(root, 'eval', f'{step}.json'), 'w') as f:
      json.dump(rec, f)
  with open(os.path.join(root, 'eval', '500_recon.json.txt'), 'w') as f:
    f.write('not a record')
  with open(os.path.join(root, 'metrics.jsonl'), 'w') as f:
    for row in metrics:
      f.write(json.dumps(row) + '\n')
    f.write('{"step": 9, "l1"')  # a line cut by a crash


def _record(psnr, usage, patch_mean=19.2):
  return dict(
    psnr=psnr,
    codebook_usage=usage,
    baselines=dict(
      dataset_mean=dict(psnr=15.0, mse=0.03),
      clip_mean=dict(psnr=18.0, mse=0.016),
      patch_mean=dict(psnr=patch_mean, mse=0.012),
      pca16=dict(psnr=30.0, mse=0.001),
    ),
  )


def test_the_curve_reads_records_in_step_order_with_the_newest_baselines(tmp_path):
  root = str(tmp_path / 'run')
  _write_run(
    root,
    {1000: _record(18.5, 0.5, patch_mean=19.3), 500: _record(16.8, 0.3)},
    metrics=[{'step': 25, 'l1_loss': 0.2, 'loss': 1.0}, {'step': 50, 'l1_loss': 0.1}, {'step': 60}],
  )
  c = curve_lib.load_curve(root)
  assert c['step'] == [500, 1000]
  assert c['psnr'] == [16.8, 18.5]
  assert c['codebook_usage'] == [0.3, 0.5]
  assert c['baselines']['patch_mean'] == 19.3  # from step 1000
  assert list(c['baselines']) == ['dataset_mean', 'clip_mean', 'patch_mean', 'pca16']
  assert c['train_step'] == [25, 50] and c['train_l1'] == [0.2, 0.1]


def test_the_command_writes_a_png_and_prints_the_table(tmp_path):
  root = str(tmp_path / 'run')
  _write_run(
    root, {500: _record(16.8, 0.3), 1000: _record(19.5, 0.6)}, [{'step': 5, 'l1_loss': 0.3}]
  )
  out = str(tmp_path / 'figs' / 'c.png')
  r = subprocess.run(
    [sys.executable, '-m', 'larp_jax.plot', root, f'--out={out}'],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 0, r.stderr
  assert '1000       19.50  60.0%' in r.stdout
  assert 'baseline patch-mean colour: 19.20 dB' in r.stdout
  img = np.asarray(Image.open(out))
  assert img.ndim == 3 and img.shape[1] > 2 * img.shape[0]  # three panels side by side
  assert img.std() > 0


def test_a_run_without_evaluations_is_one_error_line(tmp_path):
  r = subprocess.run(
    [sys.executable, '-m', 'larp_jax.plot', str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: no evaluation records'), r.stderr


def test_readme_long_run_and_its_curve(tmp_path):
  """README's `configs/demo.py:long` command and the plot command after it, as written, shortened
  by --config overrides (the test-size networks without LPIPS in the loss, 4 steps, an evaluation
  every 2)."""
  from tests.test_cli import TINY, _env, _user_dir, readme_command_block

  user = _user_dir(tmp_path)
  train = readme_command_block('configs/demo.py:long')
  r = subprocess.run(
    [
      sys.executable,
      *train[1:],
      *TINY,
      '--config.loss.lpips_weight=0',
      '--config.model.patch_skip_proj=False',  # TINY's 16 tokens are not a multiple of 32 patches
      '--config.total_steps=4',
      '--config.eval_every=2',
      '--config.eval.num_clips=2',
      '--config.eval.batch_size=2',
      '--config.eval.num_videos_to_show=1',
    ],
    cwd=user,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  plot = readme_command_block('larp_jax.plot', command='python -m larp_jax.plot')
  r = subprocess.run(
    [sys.executable, *plot[1:]], cwd=user, env=_env(), capture_output=True, text=True, timeout=120
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.splitlines()[1].startswith('2 ') and r.stdout.splitlines()[2].startswith('4 ')
  assert (user / 'runs' / 'demo_long' / 'curve.png').stat().st_size > 0
