"""Evaluation of an AR generator: held-out token NLL, sampled videos, gFVD.

The protocols follow the official `sample.py` (README's gFVD commands):

* class-conditional (UCF101): real clips drawn from the *train* split with a fixed seed (16
  frames, resized and centre-cropped, no flip); the generator is conditioned on those clips'
  labels, so the class histogram of the fakes matches the reals; CFG scale 1.25 on every token,
  temperature 1, no top-k/top-p; 10,000 samples. We draw the real clips from the shuffled train
  stream (a random clip of a random video per row) rather than from a list of non-overlapping
  chunks, which matches the official selection statistically (same split, same class mix).
* frame prediction (K600): the first ``num_cond_frames`` (5) frames of each real clip, the last
  repeated to 16, are encoded into the 1024-token prefix (plus the separator); the generator
  writes the whole clip; both sets are resized to 64x64 before I3D; CFG 1; 50,000 samples from
  the eval split (here its first clips in order, with ``config.data.eval_chunks``).

Reference I3D statistics are cached per protocol (``evaluation/fvd.py``). Every number goes to
``<workdir>/eval/<step>.json`` with the protocol, the number of samples, the sampling settings
and the seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from larp_jax import data as data_lib
from larp_jax import errors, sharding
from larp_jax.evaluation import class_probe, evaluator
from larp_jax.evaluation import fvd as fvd_lib
from larp_jax.evaluation import multihost
from larp_jax.generation import outputs


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How to sample: ``config.sample`` read once."""

  cfg_scale: float = 1.0
  cfg_interval: int = -1
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  batch_size: int = 16
  seed: int = 0

  @classmethod
  def from_config(cls, cfg, **overrides) -> 'SampleSettings':
    kw = {f.name: cfg.get(f.name, f.default) for f in dataclasses.fields(cls)}
    kw.update(overrides)
    return cls(
      cfg_scale=float(kw['cfg_scale']),
      cfg_interval=int(kw['cfg_interval']),
      temperature=float(kw['temperature']),
      top_k=int(kw['top_k']),
      top_p=float(kw['top_p']),
      batch_size=int(kw['batch_size']),
      seed=int(kw['seed']),
    )

  def sampler_kwargs(self) -> dict:
    return dict(
      cfg_scale=self.cfg_scale,
      cfg_interval=self.cfg_interval,
      temperature=self.temperature,
      top_k=self.top_k,
      top_p=self.top_p,
    )


def resize_videos(videos, size) -> jnp.ndarray:
  """[N, T, H, W, 3] -> [N, T, size, size, 3], bilinear with antialiasing, frame by frame (the
  frame-prediction protocol's 64x64)."""
  n, t = videos.shape[:2]
  out = jax.image.resize(
    jnp.asarray(videos, jnp.float32), (n, t, size, size, 3), 'bilinear', antialias=True
  )
  return jnp.clip(out, 0.0, 1.0)


class GeneratorEvaluator:
  """Sampling and evaluation for one ``GeneratorTask`` (built once per task: the jitted sampler
  and decoder compile once per run)."""

  def __init__(self, task):
    self.task = task
    self.config = task.config
    self.mesh = task.mesh
    self._extractor = None
    self._decode = None

  # ------------------------------------------------------------------ pieces

  def extractor(self):
    if self._extractor is None:
      self._extractor = fvd_lib.I3DFeatureExtractor(batch_size=8)
    return self._extractor

  def _host_rows(self, batch_size: int) -> tuple[int, int]:
    """(rows this process contributes, rows after padding to its share of the devices)."""
    nproc = jax.process_count()
    host = max(1, int(batch_size) // nproc)
    dp = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    return host, evaluator.round_up(host, max(1, dp // nproc))

  def _global(self, arrays: dict) -> dict:
    return data_lib.make_global_batch(arrays, self.mesh, sharding.batch_sharding(self.mesh))

  def decode(self, tokens) -> jnp.ndarray:
    """Videos of global token arrays, by the frozen tokenizer (batch-sharded)."""
    if self._decode is None:
      tok = self.task.tokenizer
      self._decode = jax.jit(
        lambda v, t: jnp.clip(tok.apply(v, t, method=type(tok).decode), 0.0, 1.0)
      )
    return self._decode(self.task.tokenizer_variables(), tokens)

  def generate(self, params, labels: np.ndarray, key, settings: SampleSettings, prefix=None):
    """Samples for this process's ``labels`` [n] (and FP ``prefix`` tokens [n, N]): host-local
    numpy (videos [n, T, H, W, 3], tokens [n, N], logprobs [n, N])."""
    n = len(labels)
    _, padded = self._host_rows(n * jax.process_count())
    pad = padded - n
    labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)]).astype(np.int32)
    arrays = {'label': labels}
    if prefix is not None:
      prefix = np.asarray(prefix, np.int32)
      arrays['prefix'] = np.concatenate([prefix, np.zeros((pad,) + prefix.shape[1:], np.int32)])
    g = self._global(arrays)
    with sharding.logical_context(self.mesh, self.task.rules):
      out = self.task.sample(params, g['label'], key, settings, prefix=g.get('prefix'))
      videos = self.decode(out['tokens'])
    local = lambda x: multihost.host_local(x, self.mesh)[:n]
    return local(videos), local(out['tokens']), local(out['logprobs'])

  # ------------------------------------------------------------------ held-out NLL

  def token_nll(self, params, max_clips: int) -> dict:
    """Mean per-token NLL (nats) and top-1 accuracy of the generator on held-out clips (the eval
    split of the token dataset, or of the videos when training encodes on the fly)."""
    sums = {'nll_sum': 0.0, 'top1_sum': 0.0, 'n': 0.0}
    bs = int(self.config.eval.batch_size)
    host, padded = self._host_rows(bs)
    seen = 0
    with (
      self.task.held_out_batches(host) as it,
      sharding.logical_context(self.mesh, self.task.rules),
    ):
      for batch in it:
        if max_clips > 0 and seen >= max_clips:
          break
        pad = padded - host
        batch = {
          k: np.concatenate(
            [np.asarray(v), np.zeros((pad,) + np.shape(v)[1:], np.asarray(v).dtype)]
          )
          for k, v in batch.items()
        }
        mask = batch.pop('mask')
        if max_clips > 0:
          pos = seen + np.arange(len(mask)) * jax.process_count()
          mask = mask & (pos < max_clips)
        seen += bs
        g = self._global(dict(batch, mask=mask))
        out = self.task.nll_batch(params, g)
        for k in sums:
          sums[k] += float(out[k])  # already summed over the global batch
    n = max(sums['n'], 1.0)
    return {
      'token_nll': sums['nll_sum'] / n,
      'token_top1': sums['top1_sum'] / n,
      'nll_clips': int(sums['n']),
    }

  # ------------------------------------------------------------------ gFVD

  def gfvd(self, params, *, num_samples: int, settings: SampleSettings, workdir: str) -> dict:
    """gFVD of ``num_samples`` samples against as many real clips (module docstring), plus the
    mean NLL of the sampled tokens under the distribution sampled from."""
    cfg = self.config
    fp = self.task.frame_prediction
    t, h, w = (int(s) for s in self.task.tokenizer.video_shape)
    if t < fvd_lib.MIN_FRAMES:
      logging.warning('gFVD skipped: I3D needs >= %d frames, clips have %d', fvd_lib.MIN_FRAMES, t)
      return {'gfvd': None}
    size = int(cfg.eval.get('fvd_resize', 64 if fp else 0) or 0)
    data_cfg, split = self.task.real_clip_data()
    protocol = fvd_lib.make_protocol(
      dataset=f'{data_cfg.source}:{data_cfg.get("tfds_name", "")}',
      split=data_cfg.train_split if split == 'train' else data_cfg.eval_split,
      n_clips=int(num_samples),
      num_frames=t,
      resolution=[size, size] if size else [h, w],
      seed=int(cfg.eval.fvd_seed),
      selection='shuffled train stream, centre crop, no flip' if split == 'train' else 'eval pass',
      generator='frame prediction' if fp else 'class-conditional',
    )
    cache_dir = cfg.eval.get('fvd_cache_dir') or evaluator.default_cache_dir(workdir)
    real = evaluator.cached_real_stats(protocol, cache_dir)
    stream_real = real is None
    real = real if real is not None else fvd_lib.FeatureStats()
    fake = fvd_lib.FeatureStats()
    host, _ = self._host_rows(settings.batch_size)
    key = jax.random.key(settings.seed)
    logp_sum, tok_n, done, t0 = 0.0, 0, 0, time.time()
    it = data_lib.get_dataset(
      data_cfg, split, video_shape=(t, h, w), batch_size=host, seed=int(cfg.eval.fvd_seed)
    )
    with it:
      for b, batch in enumerate(it):
        if done >= num_samples:
          break
        video = np.asarray(batch['video'], np.float32)
        labels = np.asarray(batch['label'], np.int32)
        keep = np.asarray(batch.get('mask', np.ones(len(labels), bool)), bool)
        pos = done + np.arange(len(labels)) * jax.process_count() + jax.process_index()
        keep &= pos < num_samples
        prefix = self.task.prefix_tokens(video) if fp else None
        fake_v, _, logp = self.generate(
          params, labels, jax.random.fold_in(key, b), settings, prefix
        )
        real_v = video[keep]
        fake_v = np.asarray(fake_v)[keep]
        if size:
          real_v, fake_v = (
            np.asarray(resize_videos(real_v, size)),
            np.asarray(resize_videos(fake_v, size)),
          )
        if len(fake_v):
          fake.update(self.extractor()(fake_v))
          if stream_real:
            real.update(self.extractor()(real_v))
        logp_sum += float(np.asarray(logp)[keep].sum())
        tok_n += int(keep.sum()) * int(logp.shape[1])
        done += host * jax.process_count()
        rate = done / max(time.time() - t0, 1e-9)
        logging.info(
          'gFVD: %d/%d samples | %.2f samples/s | ETA %.0f s',
          min(done, num_samples),
          num_samples,
          rate,
          (num_samples - done) / max(rate, 1e-9),
        )
    fake = multihost.all_sum_stats(fake)
    if stream_real:
      real = multihost.all_sum_stats(real)
      if jax.process_index() == 0:
        fvd_lib.cached_stats(protocol, lambda: real, cache_dir)
    logp_sum, tok_n = multihost.all_sum((np.float64(logp_sum), np.int64(tok_n)))
    if fake.n < 2:
      raise errors.DataError(f'gFVD: only {fake.n} samples were made; need at least 2')
    return {
      'gfvd': fvd_lib.fvd_from_stats(real, fake),
      'gfvd_samples': int(fake.n),
      'sample_nll': float(-logp_sum / max(int(tok_n), 1)),
      'gfvd_protocol': dict(protocol, sampling=dataclasses.asdict(settings)),
    }

  # ------------------------------------------------------------------ class accuracy

  def reconstruct(self, video: np.ndarray) -> np.ndarray:
    """The frozen tokenizer's reconstructions of this host's clips (host-local numpy)."""
    tokens = self.task.encode_host(np.asarray(video, np.float32)).astype(np.int32)
    n = len(tokens)
    _, padded = self._host_rows(n * jax.process_count())
    tokens = np.concatenate([tokens, np.zeros((padded - n,) + tokens.shape[1:], np.int32)])
    with sharding.logical_context(self.mesh, self.task.rules):
      videos = self.decode(self._global({'tokens': tokens})['tokens'])
    return multihost.host_local(videos, self.mesh)[:n]

  def class_accuracy(self, params, *, num_clips: int, settings: SampleSettings, workdir: str):
    """Accuracy of the synthetic-class probe (``evaluation/class_probe.py``) on ``num_clips``
    eval clips, on the tokenizer's reconstructions of them and on as many samples conditioned
    on their labels; chance is 1 / num_classes. Class-conditional generators on the synthetic
    source only."""
    cfg = self.config
    task = self.task
    video_shape = tuple(int(s) for s in task.tokenizer.video_shape)
    probe_settings = class_probe.ProbeSettings.from_config(cfg.eval.get('class_probe'))
    cache_dir = cfg.eval.get('fvd_cache_dir') or evaluator.default_cache_dir(workdir)
    model, variables = class_probe.cached_probe(cfg.data, video_shape, probe_settings, cache_dir)
    counter = class_probe.ProbeCounter(model, variables)
    host, _ = self._host_rows(settings.batch_size)
    per_host = -(-int(num_clips) // jax.process_count())
    key = jax.random.fold_in(jax.random.key(settings.seed), 1)
    seen = 0
    it = data_lib.get_dataset(cfg.data, 'eval', video_shape=video_shape, batch_size=host, seed=0)
    with it:
      for b, batch in enumerate(it):
        if seen >= per_host:
          break
        video = np.asarray(batch['video'], np.float32)
        labels = np.asarray(batch['label'], np.int32)
        keep = np.asarray(batch['mask'], bool) & (seen + np.arange(len(labels)) < per_host)
        seen += len(labels)
        recon = self.reconstruct(video)
        fake, _, _ = self.generate(params, labels, jax.random.fold_in(key, b), settings)
        for name, videos in (('real', video), ('recon', recon), ('samples', fake)):
          counter.add(name, np.asarray(videos)[keep], labels[keep])
    correct, total = multihost.all_sum(
      (
        {k: np.int64(v) for k, v in counter.correct.items()},
        {k: np.int64(v) for k, v in counter.total.items()},
      )
    )
    acc = class_probe.accuracies(correct, total)
    return {
      'class_accuracy_real': acc.get('real'),
      'class_accuracy_recon': acc.get('recon'),
      'class_accuracy_samples': acc.get('samples'),
      'class_accuracy_chance': 1.0 / task.num_classes,
      'class_accuracy_clips': int(total.get('real', 0)),
      'class_probe': dict(
        class_probe.probe_key(cfg.data, video_shape, probe_settings), model='ClassProbe'
      ),
    }

  # ------------------------------------------------------------------ the whole evaluation

  def evaluate(
    self,
    params,
    workdir: str,
    step: int,
    *,
    num_fvd_samples: Optional[int] = None,
    params_source=None,
  ):
    """Held-out NLL, a grid of samples (``config.eval.num_videos_to_show``, classes in turn) and,
    when ``num_fvd_samples`` (default ``config.eval.fvd_samples``) > 0, gFVD. Writes
    ``eval/<step>.json`` and ``eval/<step>_samples*.{mp4,png}``; returns the metrics."""
    t0 = time.time()
    cfg = self.config
    settings = SampleSettings.from_config(cfg.sample)
    out_dir = os.path.join(workdir, 'eval')
    metrics = self.token_nll(params, int(cfg.eval.get('nll_clips', 0) or 0))
    n_show = int(cfg.eval.get('num_videos_to_show', 0) or 0)
    record = dict(metrics, step=int(step))
    if n_show > 0:
      files = self.write_samples(params, out_dir, f'{int(step)}_samples', n_show, settings)
      record['samples'] = files
    n_fvd = int(cfg.eval.get('fvd_samples', 0) if num_fvd_samples is None else num_fvd_samples)
    if n_fvd > 0:
      record.update(self.gfvd(params, num_samples=n_fvd, settings=settings, workdir=workdir))
    n_acc = int(cfg.eval.get('class_accuracy_clips', 0) or 0)
    if n_acc > 0 and not self.task.frame_prediction:
      record.update(
        self.class_accuracy(params, num_clips=n_acc, settings=settings, workdir=workdir)
      )
    record['seconds'] = time.time() - t0
    record['sampling'] = dataclasses.asdict(settings)
    record['params_source'] = params_source
    if jax.process_index() == 0:
      write_json(os.path.join(out_dir, f'{int(step)}.json'), record)
    logging.info('eval step %d: %s', step, format_summary(record))
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}

  def write_samples(self, params, out_dir: str, prefix: str, num: int, settings) -> dict:
    """``num`` class-conditional samples, classes in turn (frame prediction: conditioned on
    the first held-out clips); writes the mp4 and the per-class PNGs; returns their paths and
    the tokens file."""
    task = self.task
    host = -(-int(num) // jax.process_count())  # this host's rows; the last rows are dropped
    valid = np.ones((host,), bool)
    if task.frame_prediction:
      video = task.first_eval_videos(host)
      valid[len(video) :] = False  # a host with fewer eval clips repeats its last one
      if len(video):
        video = video[np.minimum(np.arange(host), len(video) - 1)]
      else:
        video = np.zeros((host,) + video.shape[1:], video.dtype)
      labels = np.zeros((host,), np.int32)
      prefix_tokens = task.prefix_tokens(video)
    else:
      start = jax.process_index() * host
      labels = ((start + np.arange(host)) % task.num_classes).astype(np.int32)
      prefix_tokens = None
    videos, tokens, logp = self.generate(
      params, labels, jax.random.key(settings.seed), settings, prefix_tokens
    )
    # Process 0 writes every host's samples (each host holds ``host`` rows; classes in turn
    # over the global batch).
    *gathered, valid = multihost.gather_rows((videos, tokens, logp, labels, valid))
    videos, tokens, logp, labels = (np.asarray(x)[valid][:num] for x in gathered)
    files = {}
    if jax.process_index() == 0:
      header = (
        f'cfg {settings.cfg_scale:g}, temperature {settings.temperature:g}, top-k '
        f'{settings.top_k}, top-p {settings.top_p:g}, seed {settings.seed}'
      )
      files = outputs.write_samples(
        out_dir, prefix, videos, labels, class_names=task.class_names, header=header
      )
      np.savez(
        os.path.join(out_dir, f'{prefix}_tokens.npz'),
        tokens=np.asarray(tokens),
        labels=labels,
        logprobs=np.asarray(logp),
      )
      files['tokens'] = os.path.join(out_dir, f'{prefix}_tokens.npz')
    return files


def write_json(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def format_summary(record: dict) -> str:
  parts = []
  for key, fmt in (
    ('token_nll', '.4f'),
    ('token_top1', '.3f'),
    ('gfvd', '.1f'),
    ('sample_nll', '.4f'),
    ('class_accuracy_real', '.3f'),
    ('class_accuracy_recon', '.3f'),
    ('class_accuracy_samples', '.3f'),
  ):
    v = record.get(key)
    if v is not None:
      parts.append(f'{key} {v:{fmt}}')
  return ' | '.join(parts) or 'no metrics'
