"""Learning curves of a tokenizer run: PSNR and codebook usage against step, baselines as lines.

The points are the evaluation records ``<eval_dir>/<step>.json`` the training loop writes
(``evaluation/evaluator.py``); the baselines (``evaluation/baselines.py``: dataset-mean video,
clip-mean and patch-mean colour, per-patch PCA) are taken from the newest record that has them,
since every evaluation scores them on the same clips. The training L1 from ``metrics.jsonl`` is
drawn too when the run directory has it. Behind ``python -m larp_jax.plot``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from larp_jax import errors
from larp_jax.evaluation import baselines as baselines_lib

_RECORD = re.compile(r'^(\d+)\.json$')
# The trivial codes drawn as lines; the PCA oracles only as far as they fit the PSNR axis.
TRIVIAL = ('dataset_mean', 'clip_mean', 'patch_mean')


def load_curve(run_dir: str, eval_dir: Optional[str] = None) -> dict:
  """The curve of a run: {'step', 'psnr', 'codebook_usage', 'baselines', 'train_step', 'train_l1'}.

  ``baselines`` maps a baseline's name to its PSNR (newest record that has them; {} if none).
  Raises ``errors.UserError`` when there is no evaluation record to draw.
  """
  eval_dir = eval_dir or os.path.join(run_dir, 'eval')
  names = sorted(
    (int(m.group(1)), f)
    for f in (os.listdir(eval_dir) if os.path.isdir(eval_dir) else [])
    if (m := _RECORD.match(f))
  )
  if not names:
    raise errors.UserError(
      f'no evaluation records (<step>.json) in {eval_dir}: train with eval_every > 0, or run '
      '--mode=eval, or point --eval_dir at config.eval.output_dir'
    )
  curve = dict(step=[], psnr=[], codebook_usage=[], baselines={}, train_step=[], train_l1=[])
  for step, f in names:
    with open(os.path.join(eval_dir, f)) as fh:
      rec = json.load(fh)
    if rec.get('psnr') is None:
      continue
    curve['step'].append(step)
    curve['psnr'].append(float(rec['psnr']))
    usage = rec.get('codebook_usage')
    curve['codebook_usage'].append(None if usage is None else float(usage))
    table = rec.get('baselines') or {}
    if table:
      curve['baselines'] = {
        n: float(table[n]['psnr']) for n in baselines_lib.names() if table.get(n, {}).get('psnr')
      }
  if not curve['step']:
    raise errors.UserError(f'no evaluation record in {eval_dir} has a PSNR')
  metrics = os.path.join(run_dir, 'metrics.jsonl')
  if os.path.exists(metrics):
    with open(metrics) as fh:
      for line in fh:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
          continue
        l1 = row.get('l1_loss', row.get('l1'))
        if l1 is not None and 'step' in row:
          curve['train_step'].append(int(row['step']))
          curve['train_l1'].append(float(l1))
  return curve


def plot_curve(curve: dict, path: str, title: str = '') -> str:
  """Writes the curve as a PNG (two or three panels) to ``path``; returns ``path``."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  panels = 3 if curve['train_l1'] else 2
  fig, axes = plt.subplots(
    1, panels, figsize=(5.4 * panels, 4.6), dpi=110, gridspec_kw=dict(wspace=0.3)
  )
  ax = axes[0]
  ax.plot(curve['step'], curve['psnr'], 'o-', color='black', label='tokenizer', zorder=3)
  lo, hi = min(curve['psnr']), max(curve['psnr'])
  styles = dict(
    dataset_mean=':', clip_mean='-.', patch_mean='--', pca1=(0, (1, 3)), pca4=(0, (5, 3))
  )
  for name, psnr in curve['baselines'].items():
    if name in TRIVIAL or psnr <= hi + 3.0:  # an oracle far above would flatten the curve
      ax.axhline(
        psnr,
        ls=styles.get(name, '-'),
        lw=1.2,
        color=_colour(name),
        label=f'{baselines_lib.label(name)} {psnr:.2f}',
      )
      lo, hi = min(lo, psnr), max(hi, psnr)
  ax.set_ylim(lo - 0.5, hi + 0.5)
  ax.set_xlabel('step')
  ax.set_ylabel('eval PSNR (dB)')
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(0.0, -0.16), ncol=2, frameon=False)
  ax.grid(alpha=0.3)
  ax = axes[1]
  usage = [(s, u) for s, u in zip(curve['step'], curve['codebook_usage']) if u is not None]
  if usage:
    ax.plot([s for s, _ in usage], [100 * u for _, u in usage], 'o-', color='tab:blue')
  ax.set_ylim(0, 100)
  ax.set_xlabel('step')
  ax.set_ylabel('codebook usage (%)')
  ax.grid(alpha=0.3)
  if panels == 3:
    ax = axes[2]
    ax.plot(curve['train_step'], curve['train_l1'], color='tab:red', lw=1)
    ax.set_xlabel('step')
    ax.set_ylabel('train L1')
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.subplots_adjust(left=0.07, right=0.98, bottom=0.33, top=0.88)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


def format_table(curve: dict) -> str:
  """The curve as text: one line per evaluation, then the baselines."""
  lines = ['step   PSNR (dB)  codebook usage']
  for s, p, u in zip(curve['step'], curve['psnr'], curve['codebook_usage']):
    lines.append(f'{s:<6d} {p:9.2f}  ' + ('-' if u is None else f'{100 * u:.1f}%'))
  for name, psnr in curve['baselines'].items():
    lines.append(f'baseline {baselines_lib.label(name)}: {psnr:.2f} dB')
  return '\n'.join(lines)


def _colour(name: str) -> str:
  return {'dataset_mean': 'tab:gray', 'clip_mean': 'tab:orange', 'patch_mean': 'tab:green'}.get(
    name, 'tab:purple'
  )
