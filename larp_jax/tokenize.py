r"""Encode a video dataset with a frozen tokenizer into a token directory, for the AR generator.

  python -m larp_jax.tokenize --tokenizer=runs/demo --out=tokens/demo
  python -m larp_jax.tokenize --tokenizer=runs/l --config=configs/ucf101.py:size=L \
      --config.data.source=records --config.data.path=data/ucf101_rec --out=tokens/ucf101

--tokenizer is a run directory (its latest checkpoint; the EMA weights when the run keeps an EMA)
or a params directory. What is encoded is the ``data`` section of --config (``path[:args]``, with
``--config.X=...`` overrides), or its ``tokenizer_data`` section when it has one (a generator
config that names the videos its tokenizer reads); without --config, the tokenizer's own
config.json (overrides apply to it too). The config's ``seed`` fixes the training clips' start,
crop and flip, and its ``mesh`` lays out the devices (default: all of them along 'data').

Every clip is encoded with deterministic (argmax) quantization, the batch split over all devices of
all hosts and the variables placed by the tokenizer's sharding rules; each host writes its own
shards and process 0 the manifest (``larp_jax/data/tokens.py``). The train split is encoded
--passes times, pass p with the clip choice and flip of training epoch p (the official AR trainer
draws a fresh random clip and flip every epoch; the generator's epoch e reads pass e % passes).
Progress lines give clips/s and the ETA.

Rerunning the same command resumes: finished shards are kept (not encoded again) and the result
equals an uninterrupted run. A directory written by another tokenizer (other weights or model
config) or with other data settings is refused with one line; --overwrite replaces its tokens.
A multi-host run needs --out on a file system that every host sees.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Callable, Optional, Sequence

from absl import flags
import ml_collections
import numpy as np

from larp_jax import cli_env, errors
from larp_jax.data import tokens as tokens_lib

cli_env.quiet_tensorflow()  # before TensorFlow loads (the input pipeline imports it lazily)

_log = logging.getLogger('larp_jax.tokenize')  # also when run as __main__

SPLIT_CHOICES = ('train', 'eval', 'both')
# tf.data knobs that do not change what a pass holds: a resume may change them.
_NOT_CONTENT = ('num_parallel_calls', 'prefetch', 'shuffle_buffer')


# ----------------------------------------------------------------------------- config


def config_from_tokenizer(tokenizer_dir: str) -> ml_collections.ConfigDict:
  """The tokenizer's config.json, its ``data`` section typed by the pipeline's defaults (so that
  ``--config.data.path=...`` overrides a field that is None there)."""
  from larp_jax import api
  from larp_jax.data import config as data_config

  config = api.load_config(tokenizer_dir)
  data = data_config.default_config()
  data.update(config.get('data', {}))
  config.data = data
  return config


def data_section(config) -> tuple[str, ml_collections.ConfigDict]:
  """('tokenizer_data', ...) when the config has that section (a generator config), else
  ('data', config.data)."""
  for name in ('tokenizer_data', 'data'):
    if name in config and config[name] is not None:
      return name, config[name]
  raise errors.ConfigError('the config has no data section (config.data) saying what to encode')


def _data_settings(cfg) -> dict:
  d = json.loads(json.dumps(cfg.to_dict(), default=str))
  return {k: v for k, v in d.items() if k not in _NOT_CONTENT}


def label_map(cfg) -> dict:
  """{'num_classes', 'classes'} of a data source (None where it does not say)."""
  from larp_jax.data import source_api

  num, classes = None, None
  try:
    if cfg.source == 'synthetic':
      from larp_jax.data import synthetic

      num = int(cfg.synthetic_num_classes)
      classes = [synthetic.class_name(i, num) for i in range(num)]
    elif cfg.source == 'folder':
      from larp_jax.data import pipeline, video_io

      vl = video_io.list_videos(
        source_api.split_location(cfg, 'train'),
        classes=pipeline.folder_classes(cfg),
        csv_root=cfg.csv_root,
      )
      classes = list(vl.classes) or None
    elif cfg.source == 'records':
      from larp_jax.data import records

      classes = records.read_manifest(source_api.split_location(cfg, 'train')).get('classes')
    elif cfg.source == 'tfds':
      import tensorflow_datasets as tfds

      feature = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir).info.features[
        cfg.tfds_label_key
      ]
      classes = list(feature.names)
  except Exception as e:  # pylint: disable=broad-except  (the labels' range still counts them)
    _log.warning('tokenize: no class names from the %s source (%s)', cfg.source, e)
  if classes is not None and num is None:
    num = len(classes)
  return {'num_classes': num, 'classes': classes}


# ----------------------------------------------------------------------------- the directory


def _our_files(out: str) -> list:
  pattern = os.path.join(out, '*-p[0-9][0-9][0-9]-h[0-9][0-9][0-9][0-9][0-9]-*.npz*')
  return glob.glob(pattern) + glob.glob(os.path.join(out, tokens_lib.MANIFEST + '*'))


def _existing(out: str) -> Optional[dict]:
  """The manifest already in ``out`` (any state), None for a new or empty directory; refuses a
  directory that holds other things."""
  if os.path.exists(tokens_lib.manifest_path(out)):
    return tokens_lib.read_manifest(out, complete=False)
  if os.path.isdir(out):
    from larp_jax import workdir as workdir_lib

    known = {tokens_lib.PROGRESS_DIR, workdir_lib.LOCK_FILE}
    known |= {os.path.basename(f) for f in _our_files(out)}
    other = [n for n in os.listdir(out) if n not in known]
    if other:
      raise errors.UserError(
        f'--out={out} is not empty and holds no {tokens_lib.MANIFEST} (e.g. {sorted(other)[0]!r}); '
        f'choose a new or empty directory'
      )
  return None


def _refuse_other_tokenizer(out: str, old: dict, new: str) -> None:
  raise errors.UserError(
    f'{out} holds tokens of another tokenizer, {tokens_lib.describe_tokenizer(old)}; this one is '
    f'{new}: choose another --out, or --overwrite to replace them'
  )


def _check_settings(out: str, old: dict, settings: dict) -> None:
  from larp_jax import workdir as workdir_lib

  diff = workdir_lib.differences(old['settings'], settings)
  if diff:
    key, (a, b) = next(iter(diff.items()))
    raise errors.UserError(
      f'{out} was written with other settings ({key}: {a!r} there, {b!r} now); rerun with the '
      f'same ones to resume, or use another --out or --overwrite'
    )


def _remove_tokens(out: str) -> None:
  for path in _our_files(out):
    os.remove(path)
  shutil.rmtree(os.path.join(out, tokens_lib.PROGRESS_DIR), ignore_errors=True)


def _sync(name: str) -> None:
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _format_eta(seconds: float) -> str:
  s = int(round(seconds))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


# ----------------------------------------------------------------------------- the work


def tokenize(
  tokenizer: str,
  config,
  out: str,
  *,
  split: str = 'both',
  batch_size: int = 32,
  shard_size: int = 2048,
  passes: int = 1,
  overwrite: bool = False,
  ema: bool = True,
  log_every_s: float = 30.0,
  on_shard: Optional[Callable[[dict], None]] = None,
) -> dict:
  """Encodes the split(s) of ``config``'s data section into the token directory ``out``.

  Args:
    tokenizer: a run directory or a params directory.
    config: a ConfigDict with a ``data`` (or ``tokenizer_data``) section, optionally ``seed`` and
      ``mesh``; e.g. ``config_from_tokenizer(tokenizer)``.
    out: the token directory; an unfinished one of the same tokenizer and settings is resumed.
    split: 'train', 'eval' or 'both'.
    batch_size: the global batch (split over all devices; a multiple of the data-parallel size
      and of the process count).
    shard_size: clips per shard (rounded up to a multiple of the per-host batch).
    passes: passes over the train split, pass p with training epoch p's clips and flips.
    overwrite: replace the tokens already in ``out`` (whatever tokenizer wrote them).
    ema: a run with an EMA gives its EMA weights (False: the raw weights).
    log_every_s: seconds between progress lines.
    on_shard: called with each shard entry this host writes (tests; a raise stops the run).

  Returns:
    the manifest (also ``out/manifest.json``), with ``stats``: this host's encoded batches and
    written / kept shards (not stored).

  Raises:
    UserError (ConfigError, DataError): a mistake in the flags, config, data or directory, before
      anything is compiled.
  """
  import jax

  from larp_jax import params_io, sharding
  from larp_jax import data as data_lib
  from larp_jax import workdir as workdir_lib
  from larp_jax.data import config as data_config
  from larp_jax.evaluation import multihost
  from larp_jax.models.tokenizer import LARPTokenizer
  from larp_jax.tasks import tokenizer as tokenizer_task

  if split not in SPLIT_CHOICES:
    raise errors.UserError(f'--split must be one of {SPLIT_CHOICES}, got {split!r}')
  for name, v in (('batch_size', batch_size), ('shard_size', shard_size), ('passes', passes)):
    if int(v) < 1:
      raise errors.UserError(f'--{name} must be >= 1, got {v}')
  if not tokenizer:
    raise errors.UserError('--tokenizer is required (a run or params directory; see --help)')
  splits = ('train', 'eval') if split == 'both' else (split,)
  tok_dir, out = os.path.abspath(tokenizer), os.path.abspath(out)
  tok_config = config_from_tokenizer(tok_dir)
  model = tokenizer_task.make_model(tok_config.model)
  video_shape = tuple(int(d) for d in model.video_shape)
  _, data_cfg = data_section(config)
  for s in splits:
    data_config.validate(data_cfg, s, video_shape)
  seed = int(config.get('seed', 0) or 0)
  nproc, pi = jax.process_count(), jax.process_index()
  mesh = sharding.make_mesh(config.get('mesh') or {'data': -1}, jax.devices())
  dp = mesh.shape['data'] * mesh.shape['fsdp']
  if int(batch_size) % dp or int(batch_size) % nproc:
    raise errors.ConfigError(
      f'--batch_size={batch_size} must be a multiple of the data-parallel size data*fsdp={dp} '
      f'and of the {nproc} processes'
    )
  host_b = int(batch_size) // nproc
  shard_batches = max(1, math.ceil(int(shard_size) / host_b))
  rows = shard_batches * host_b
  if rows != int(shard_size):
    _log.info(
      'tokenize: shard_size %d rounded up to %d (a multiple of the per-host batch %d)',
      shard_size,
      rows,
      host_b,
    )
  settings = {
    'data': _data_settings(data_cfg),
    'seed': seed,
    'shard_size': rows,
    'process_count': nproc,
  }
  dtype = tokens_lib.token_dtype(model.codebook_size)
  model_json = json.dumps(tok_config.model.to_dict(), sort_keys=True, default=str)
  info = {
    'path': tok_dir,
    'model_sha256': hashlib.sha256(model_json.encode()).hexdigest(),
  }

  old = _existing(out)
  if old is not None and not overwrite:
    # Before loading anything: another model config, or other data settings.
    if old['tokenizer'].get('model_sha256') != info['model_sha256']:
      _refuse_other_tokenizer(out, old['tokenizer'], f'{tok_dir} (another model config)')
    _check_settings(out, old, settings)
  workdir_lib.writable_or_raise(out, 'the token directory')
  lock = workdir_lib.Lock(out)
  if pi == 0:
    try:
      lock.acquire()
    except workdir_lib.WorkdirError:
      raise errors.UserError(
        f'{out} is in use by another process ({workdir_lib._describe(lock.path)}); wait for it '
        f'or use another --out'
      ) from None
  try:
    abstract, var_shardings = tokenizer_task.variable_shardings(
      model, mesh, sharding.rules(tok_config)
    )
    keeps_ema = float(tok_config.get('optim', {}).get('ema_decay', 0) or 0) > 0
    fields = tokenizer_task.state_fields(model, ema=ema and keeps_ema)
    variables, step, kind = params_io.load_variables(tok_dir, abstract, var_shardings, fields)
    info.update(
      kind=kind,
      step=int(step),
      id=tokens_lib.tokenizer_id(tok_config.model, variables),
      ema=fields['params'] == 'ema_params',
    )
    if old is not None and not overwrite and old['tokenizer'].get('id') != info['id']:
      _refuse_other_tokenizer(out, old['tokenizer'], tokens_lib.describe_tokenizer(info))
    if overwrite and pi == 0:
      _remove_tokens(out)
    _sync('larp_tokenize_cleared')
    if overwrite:
      old = None
    header = {
      'format': tokens_lib.FORMAT,
      'complete': False,
      'tokenizer': info,
      'codebook_size': int(model.codebook_size),
      'num_tokens': int(model.num_latent_tokens),
      'video_shape': list(video_shape),
      'dtype': dtype.name,
      'settings': settings,
      'label_map': (old or {}).get('label_map'),
      'splits': (old or {}).get('splits', {}),
    }
    if pi == 0:
      tokens_lib.write_json(tokens_lib.manifest_path(out), header)
    _sync('larp_tokenize_header')

    batch_sharding = sharding.batch_sharding(mesh)
    encode = jax.jit(
      lambda v, x: model.apply(v, x, method=LARPTokenizer.encode),
      in_shardings=(var_shardings, batch_sharding),
      out_shardings=batch_sharding,
    )
    progress = tokens_lib.HostProgress(out, pi)
    stats = {'encoded_batches': 0, 'written_shards': 0, 'kept_shards': 0}
    job = _Job(
      out=out,
      data_cfg=data_cfg,
      video_shape=video_shape,
      seed=seed,
      host_b=host_b,
      shard_batches=shard_batches,
      global_batch=int(batch_size),
      dtype=dtype,
      progress=progress,
      stats=stats,
      on_shard=on_shard,
      log_every_s=log_every_s,
    )

    def encode_batch(video):
      gvideo = data_lib.make_global_batch({'video': video}, mesh, batch_sharding)['video']
      return multihost.host_local(encode(variables, gvideo), mesh)

    with sharding.logical_context(mesh, sharding.rules(tok_config)):
      for s in splits:
        for p in range(int(passes) if s == 'train' else 1):
          job.run(s, p, encode_batch)
    _sync('larp_tokenize_done')
    if pi == 0:
      manifest = _finalize(out, header, splits, int(passes), nproc, data_cfg)
    _sync('larp_tokenize_manifest')
    if pi != 0:
      manifest = tokens_lib.read_manifest(out)
  finally:
    lock.release()
  return dict(manifest, stats=stats)


class _Job:
  """The encoding of one (split, pass) on this host: what is left, shards, progress lines."""

  def __init__(self, **kw):
    self.__dict__.update(kw)

  def _left(self, split: str, p: int) -> tuple[list, Optional[int]]:
    """(holes, suffix): the shards of this host that are not finished: missing or corrupt ones
    (holes) and, unless the job was completed, every shard from ``suffix`` on."""
    entries = self.progress.job_entries(split, p)
    done = {e['index'] for e in entries if e['clips'] == 0 or self.progress.is_done(e['file'])}
    if f'{split}/{p}' in self.progress.state['complete']:
      return sorted({e['index'] for e in entries} - done), None
    suffix = max(done) + 1 if done else 0
    return sorted(set(range(suffix)) - done), suffix

  def run(self, split: str, p: int, encode_batch) -> None:
    name = f'{split} pass {p}' if split == 'train' else split
    holes, suffix = _global_left(*self._left(split, p))
    if not holes and suffix is None:
      _log.info('tokenize: %s already done', name)
      return
    holes_set = set(holes)
    wanted = lambda j: j in holes_set or (suffix is not None and j >= suffix)
    if holes or suffix:
      left = [str(j) for j in holes] + ([f'{suffix}-'] if suffix is not None else [])
      _log.info('tokenize: %s resumes: shards %s to encode', name, ', '.join(left))
    done_before = {
      e['index'] for e in self.progress.job_entries(split, p) if self.progress.is_done(e['file'])
    }
    if split == 'train':  # each run of unfinished shards from its own start: skipping is free
      for a, b in _runs(holes, suffix):
        self._encode(split, p, name, encode_batch, a, b, wanted, done_before)
    else:  # eval has no free skip: one pass, only the unfinished shards' batches encoded
      self._encode(split, p, name, encode_batch, 0, None, wanted, done_before)
    self.progress.mark_complete(f'{split}/{p}')
    _log.info('tokenize: %s done', name)

  def _encode(self, split, p, name, encode_batch, first, end, wanted, done_before) -> None:
    """Encodes shards [first, end) (end None: to the end of the pass) that are ``wanted``."""
    from larp_jax import data as data_lib

    sb, train = self.shard_batches, split == 'train'
    start = first * sb if train else 0
    it = data_lib.get_dataset(
      self.data_cfg,
      split,
      video_shape=self.video_shape,
      batch_size=self.host_b,
      seed=self.seed,
      start_step=start,
      train_pass=p if train else None,
    )
    stop = start + it.num_batches if end is None else min(end * sb, start + it.num_batches)
    todo = sum(1 for k in range(start, stop) if wanted(k // sb))
    buf, k, n_done = [], start, 0
    t0, t_last = None, time.time()
    with it:
      for batch in it if stop > start else ():
        j = k // sb
        if wanted(j):
          video = np.asarray(batch['video'])
          if np.issubdtype(video.dtype, np.integer):
            video = video.astype(np.float32) / 255.0
          codes = encode_batch(video)
          self.stats['encoded_batches'] += 1
          keep = np.asarray(batch['mask'], bool)
          buf.append((codes[keep], batch['label'][keep], batch['clip_id'][keep]))
          n_done += 1
          t0, t_last = self._report(name, n_done, todo, t0, t_last)
        k += 1
        if k % sb == 0 and wanted(j):
          self._flush(split, p, j, buf, done_before)
          buf = []
        if k >= stop:
          break
    if k % sb and wanted(k // sb):
      self._flush(split, p, k // sb, buf, done_before)

  def _report(self, name, n_done, todo, t0, t_last):
    """A progress line every ``log_every_s`` (and at the end); rates from the end of the first
    batch, which compiles."""
    now = time.time()
    if t0 is None:  # t_last: when the pass started
      _log.info('tokenize: %s: batch 1/%d in %.1f s (with compiling)', name, todo, now - t_last)
      return (now, 1), now
    if now - t_last >= self.log_every_s or n_done == todo:
      rate = (n_done - t0[1]) / max(now - t0[0], 1e-9)  # batches/s
      _log.info(
        'tokenize: %s: batch %d/%d (%.0f%%), %.1f clips/s, ETA %s',
        name,
        n_done,
        todo,
        100.0 * n_done / max(todo, 1),
        rate * self.global_batch,
        _format_eta((todo - n_done) / max(rate, 1e-9)),
      )
      t_last = now
    return t0, t_last

  def _flush(self, split: str, p: int, index: int, buf: list, done_before: set) -> None:
    import jax

    name = tokens_lib.shard_name(split, p, jax.process_index(), index)
    if index in done_before:  # finished here before; another host needed this batch again
      self.stats['kept_shards'] += 1
      return
    codes, labels, cids = (np.concatenate([x[i] for x in buf]) for i in range(3))
    where = {'split': split, 'pass': p, 'index': index, 'host': jax.process_index()}
    if len(codes) == 0:  # only padding or bad files: nothing to store
      entry = dict(where, file=name, clips=0, sha256=None, label_range=None)
    else:
      entry = tokens_lib.write_shard(self.out, name, codes, labels, cids, self.dtype)
      entry.update(where, label_range=[int(labels.min()), int(labels.max())])
    self.progress.add(entry)
    self.stats['written_shards'] += 1
    if self.on_shard is not None:
      self.on_shard(entry)


def _runs(holes: list, suffix: Optional[int]) -> list:
  """Sorted shard indices (+ an open suffix) as [first, end) runs; end None: to the end."""
  runs = []
  for j in holes:
    if runs and runs[-1][1] == j:
      runs[-1][1] = j + 1
    else:
      runs.append([j, j + 1])
  if suffix is not None:
    if runs and runs[-1][1] == suffix:
      runs[-1][1] = None
    else:
      runs.append([suffix, None])
  return [tuple(r) for r in runs]


def _global_left(holes: list, suffix: Optional[int]) -> tuple[list, Optional[int]]:
  """The union over processes of what each has left: every host encodes the same batches."""
  import jax

  if jax.process_count() == 1:
    return holes, suffix
  from jax.experimental import multihost_utils

  width = int(np.max(multihost_utils.process_allgather(np.int64(len(holes))))) + 1
  mine = np.full(width, -1, np.int64)
  mine[0] = -1 if suffix is None else suffix
  mine[1 : 1 + len(holes)] = holes
  every = np.asarray(multihost_utils.process_allgather(mine))
  suffixes = every[:, 0][every[:, 0] >= 0]
  suffix = int(suffixes.min()) if len(suffixes) else None
  rest = every[:, 1:]
  holes = sorted({int(j) for j in rest[rest >= 0] if suffix is None or j < suffix})
  return holes, suffix


def _finalize(out: str, header: dict, splits, passes: int, nproc: int, data_cfg) -> dict:
  """Process 0: the manifest from every host's progress file, marked complete."""
  entries = []
  for h in range(nproc):
    entries += tokens_lib.HostProgress(out, h).state['shards'].values()
  m = dict(header, splits=dict(header['splits']))
  for s in splits:
    n_pass = passes if s == 'train' else 1
    mine = sorted(
      (e for e in entries if e['split'] == s and e['pass'] < n_pass and e['clips'] > 0),
      key=lambda e: e['file'],
    )
    if not mine:
      raise errors.DataError(f'tokenize: the {s} split gave no clips')
    per_pass = [sum(e['clips'] for e in mine if e['pass'] == p) for p in range(n_pass)]
    m['splits'][s] = {
      'passes': n_pass,
      'num_clips': per_pass[0],
      'clips_per_pass': per_pass,
      'label_range': [
        min(e['label_range'][0] for e in mine),
        max(e['label_range'][1] for e in mine),
      ],
      'shards': [{k: e[k] for k in ('file', 'clips', 'sha256', 'pass', 'host')} for e in mine],
    }
  labels = label_map(data_cfg)
  if labels['num_classes'] is None:
    labels['num_classes'] = max(v['label_range'][1] for v in m['splits'].values()) + 1
  m.update(label_map=labels, complete=True)
  tokens_lib.write_json(tokens_lib.manifest_path(out), m)
  return m


# ----------------------------------------------------------------------------- the command


def _split_config_args(args: list) -> tuple[Optional[str], list]:
  """(the --config spec or None, the other arguments)."""
  spec, rest, skip = None, [], False
  for i, a in enumerate(args):
    if skip:
      skip = False
    elif a.startswith('--config='):
      spec = a.split('=', 1)[1]
    elif a == '--config' and i + 1 < len(args):
      spec, skip = args[i + 1], True
    else:
      rest.append(a)
  return spec, rest


def _flag_value(args: list, name: str) -> Optional[str]:
  value = None
  for i, a in enumerate(args):
    if a.startswith(f'--{name}='):
      value = a.split('=', 1)[1]
    elif a == f'--{name}' and i + 1 < len(args):
      value = args[i + 1]
  return value


def _command(args: list) -> None:
  from ml_collections import config_flags

  from larp_jax import config_lib

  if any(a in cli_env.HELP_FLAGS for a in args):
    spec, rest, config = None, args, ml_collections.ConfigDict()
  else:
    spec, rest = _split_config_args(list(args))
    tok = _flag_value(rest, 'tokenizer')
    if spec:
      path = spec.split(':', 1)[0]
      if not os.path.isfile(path):
        raise errors.ConfigError(
          f'config file {path!r} not found (working directory {os.getcwd()})'
        )
      config = config_lib.load_config(spec)
    elif tok:
      config = config_from_tokenizer(tok)
    else:
      raise errors.UserError('--tokenizer is required (a run or params directory; see --help)')
    for a in rest:
      if a.startswith('--config.'):
        config_lib.check_field(config, a[len('--config.') :].split('=', 1)[0])
  fv = flags.FlagValues()
  flags.DEFINE_string('tokenizer', None, 'Run directory or params directory.', flag_values=fv)
  flags.DEFINE_string('out', None, 'Token directory to write (or resume).', flag_values=fv)
  flags.DEFINE_enum('split', 'both', list(SPLIT_CHOICES), 'Split(s) to encode.', flag_values=fv)
  flags.DEFINE_integer(
    'batch_size', 32, 'Global batch (split over all devices of all hosts).', flag_values=fv
  )
  flags.DEFINE_integer(
    'shard_size', 2048, 'Clips per shard (the unit of resuming).', flag_values=fv
  )
  flags.DEFINE_integer(
    'passes', 1, 'Passes over the train split, each with fresh clips and flips.', flag_values=fv
  )
  flags.DEFINE_bool(
    'overwrite', False, 'Replace the tokens in --out (default: resume them).', flag_values=fv
  )
  flags.DEFINE_bool('ema', True, "Use the run's EMA weights when it has them.", flag_values=fv)
  flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize().', flag_values=fv)
  flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 for multi-host runs.', flag_values=fv
  )
  flags.DEFINE_integer(
    'num_processes', None, 'Processes in the job, where jax cannot detect it.', flag_values=fv
  )
  flags.DEFINE_integer('process_id', None, 'This process in [0, --num_processes).', flag_values=fv)
  config_flags.DEFINE_config_dict(
    'config',
    config,
    "What to encode (path[:args], or the tokenizer's config.json), with --config.X overrides.",
    flag_values=fv,
    lock_config=True,
    sys_argv=['larp_jax', *rest],
  )
  cli_env.parse_flags(fv, rest, __doc__)
  if not fv.out:
    raise errors.UserError('--out is required (the token directory to write; see --help)')
  # Our progress lines at INFO; the libraries' (Orbax logs every restore) at WARNING.
  logging.basicConfig(level=logging.WARNING, format='%(message)s')
  logging.getLogger('larp_jax').setLevel(logging.INFO)
  cli_env.init_distributed(
    multihost=fv.multihost,
    coordinator_address=fv.coordinator_address,
    num_processes=fv.num_processes,
    process_id=fv.process_id,
  )
  import jax

  m = tokenize(
    fv.tokenizer,
    fv.config,
    fv.out,
    split=fv.split,
    batch_size=fv.batch_size,
    shard_size=fv.shard_size,
    passes=fv.passes,
    overwrite=fv.overwrite,
    ema=fv.ema,
  )
  if jax.process_index() == 0:
    counts = ', '.join(
      f'{s} {v["num_clips"]} clips' + (f' x {v["passes"]} passes' if v['passes'] > 1 else '')
      for s, v in sorted(m['splits'].items())
    )
    print(f'wrote {counts} ({m["dtype"]} tokens, {m["num_tokens"]} per clip) to {fv.out}')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command on ``argv`` (the arguments after the program name; default
  ``sys.argv[1:]``); returns the exit code (2 after one ``error:`` line on stderr)."""
  return cli_env.run_command(_command, argv)


if __name__ == '__main__':
  code = main()
  sys.stdout.flush()
  sys.stderr.flush()
  if code == 0 and 'jax' in sys.modules:  # a multi-host process leaves the job (main.py)
    import jax

    jax.distributed.shutdown()
  os._exit(code)  # skip the teardown of TensorFlow's threads (see larp_jax/main.py)
