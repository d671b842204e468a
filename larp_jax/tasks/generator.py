"""The LARP AR generator task: a Llama-style model over a frozen tokenizer's tokens.

    python -m larp_jax.main --config=configs/ucf101_ar.py:tokenizer=RUN,tokens=TOKENS_DIR ...

What it gives the loop (``tasks/base.py``): the ``GeneratorTrainState`` init, the pure
``train.generator_step.generator_train_step`` (AdamW, next-token cross-entropy), the batches
(``{'tokens', 'label'}`` from a token dataset written by ``python -m larp_jax.tokenize``, or
``{'video', 'label'}`` encoded inside the step by the frozen tokenizer, whose variables are the
step's sharded extra argument), the progress line, the evaluation (held-out NLL, samples,
gFVD: ``generation/evaluate.py``), ``--mode=sample``, and the params-only export.

The tokenizer is built from its own directory's ``config.json`` (``config.tokenizer_path``: a
run or params directory, a converted release included); ``config.tokenizer`` (the embedded
tokenizer config) is what the generator config was written against, and the two must agree on
the codebook size, the number of tokens and the clip shape.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from clu import parameter_overview

from larp_jax import config_lib, errors, params_io, sharding
from larp_jax import data as data_lib
from larp_jax.data import config as data_config
from larp_jax.tasks import base
from larp_jax.tasks import tokenizer as tokenizer_task
from larp_jax.train import generator_step, optim


def make_model(model_cfg):
  """``LARPAR(**config.model)``; ConfigError naming a wrong or missing argument."""
  from larp_jax.models.larp_ar import LARPAR

  try:
    return LARPAR(**tokenizer_task.model_kwargs(model_cfg))
  except TypeError as e:
    raise errors.ConfigError(
      f'config.model has an unknown or missing generator argument: {e}'
    ) from None
  except ValueError as e:
    raise errors.ConfigError(f'config.model: {e}') from None


def tokenizer_config(config, notes: Optional[list] = None):
  """The tokenizer's config: its directory's ``config.json`` when ``config.tokenizer_path`` is
  set, else the embedded ``config.tokenizer``. With ``notes`` (a plan), an unreadable path falls
  back to the embedded config and says so in ``notes``."""
  path = config.get('tokenizer_path') or ''
  if not path:
    return config.tokenizer
  from larp_jax import api

  try:
    return api.load_config(path)
  except errors.UserError as e:
    if notes is None:
      raise errors.ConfigError(f'config.tokenizer_path={path!r}: {e}') from None
    notes.append(f'config.tokenizer_path={path!r} not readable here: planned with config.tokenizer')
    return config.tokenizer


def check_tokenizer_matches(model, tok_model, where: str) -> None:
  """The generator's vocabulary and length against the tokenizer's codebook and tokens."""
  problems = []
  if int(model.vocab_size) != int(tok_model.codebook_size):
    problems.append(
      f'config.model.vocab_size={model.vocab_size} but the tokenizer has '
      f'{tok_model.codebook_size} codes'
    )
  if int(model.seq_len) != int(tok_model.num_latent_tokens):
    problems.append(
      f'config.model.seq_len={model.seq_len} but the tokenizer writes '
      f'{tok_model.num_latent_tokens} tokens per clip'
    )
  if problems:
    raise errors.ConfigError(f'{"; ".join(problems)} ({where})')


class GeneratorTask(base.Task):
  """Class-conditional generation or frame prediction (``configs/ucf101_ar.py``,
  ``configs/k600_fp.py``, ``configs/demo_ar.py``)."""

  name = 'generator'

  def __init__(self, config, mesh, *, plan: bool = False):
    """``plan``: built for ``--mode=plan`` (``for_plan``): neither a token dataset nor a
    tokenizer directory is needed; what the plan assumed instead is in ``plan_notes``."""
    super().__init__(config, mesh)
    self.plan_notes = [] if plan else None
    self.model = make_model(config.model)
    self.tokenizer_cfg = tokenizer_config(config, self.plan_notes)
    self.tokenizer = tokenizer_task.make_model(self.tokenizer_cfg.model)
    where = config.get('tokenizer_path') or 'config.tokenizer'
    check_tokenizer_matches(self.model, self.tokenizer, where)
    self.frame_prediction = bool(getattr(self.model, 'frame_prediction', False))
    self.num_classes = int(self.model.num_classes)
    if int(config.eval.get('class_accuracy_clips', 0) or 0) > 0:
      if self.frame_prediction:
        raise errors.ConfigError(
          'config.eval.class_accuracy_clips is for class-conditional generators (frame '
          'prediction samples are scored by gFVD); set it to 0'
        )
      from larp_jax.evaluation import class_probe

      class_probe.check_supported(config.data)
    self.tokens_dir = config.get('tokens_dir') or ''
    self.manifest = None
    if self.tokens_dir:
      self.manifest = self._read_manifest()
      if self.frame_prediction:
        raise errors.ConfigError(
          'frame prediction trains on videos (its conditioning tokens come from each clip): '
          'leave config.tokens_dir empty'
        )
      self.batch_keys = ('tokens', 'label')
    elif plan and not self.frame_prediction and not config.get('tokenizer_path'):
      self.plan_notes.append(
        'config.tokens_dir and config.tokenizer_path unset: planned for token batches '
        '(set config.tokenizer_path to plan encoding the videos in the step)'
      )
      self.batch_keys = ('tokens', 'label')
    else:
      if not config.get('tokenizer_path') and not plan:
        raise errors.ConfigError(
          'the generator needs its tokens: set config.tokens_dir (python -m larp_jax.tokenize) '
          'or config.tokenizer_path (encode the videos on the fly)'
        )
      self.batch_keys = ('video', 'label')
      data_config.validate(config.data, 'train', self.tokenizer.video_shape)
    if float(config.sample.cfg_scale) != 1.0 and float(self.model.class_dropout) <= 0:
      raise errors.ConfigError(
        f'config.sample.cfg_scale={config.sample.cfg_scale} needs a model trained with class '
        'dropout (config.model.class_dropout > 0): its null class was never trained'
      )
    self.total = int(config.total_steps)
    self.tx = optim.adamw_optimizer(config.optim, self.total)
    self.lr_fn = optim.schedule(float(config.optim.lr), config.optim, self.total)
    self._tok_vars = None
    self._evaluator = None
    self._nll = None
    self._encode = None
    self.class_names = None if plan else self._class_names()

  @classmethod
  def for_plan(cls, config, mesh):
    return cls(config, mesh, plan=True)

  def _read_manifest(self) -> Optional[dict]:
    """The token dataset's manifest, checked against the generator; a plan goes on without it
    (noted) when the directory is not readable here."""
    from larp_jax.data import tokens as tokens_lib

    try:
      manifest = tokens_lib.read_manifest(self.tokens_dir)
    except errors.UserError:
      if self.plan_notes is None:
        raise
      self.plan_notes.append(
        f'config.tokens_dir={self.tokens_dir!r} not readable here: planned from the config'
      )
      return None
    tokens_lib.check_compatible(
      manifest,
      vocab_size=int(self.model.vocab_size),
      num_classes=self.num_classes,
      num_tokens=int(self.model.seq_len),
    )
    return manifest

  # ------------------------------------------------------------------ model calls

  def apply_train(self, params, tokens, labels, prefix, key):
    """Logits in training mode (class, token, residual and FFN dropout from ``key``)."""
    labels = None if self.frame_prediction else labels
    return self.model.apply(
      {'params': params}, tokens, labels, prefix, train=True, rngs={'dropout': key}
    )

  def apply_eval(self, params, tokens, labels, prefix=None):
    labels = None if self.frame_prediction else labels
    return self.model.apply({'params': params}, tokens, labels, prefix, train=False)

  def sample(self, params, labels, key, settings, prefix=None) -> dict:
    """{'tokens', 'logprobs'} of global ``labels`` (batch-sharded), one jitted program."""

    from larp_jax.generation import sampling

    labels = None if self.frame_prediction else labels
    return sampling.sample(
      self.model, {'params': params}, labels, key, prefix=prefix, **settings.sampler_kwargs()
    )

  # ------------------------------------------------------------------ state and step

  def boxed_init(self, seed: int):
    params = self.boxed_params(seed)
    return generator_step.create(params, self.tx)

  def boxed_params(self, seed: int = 0):
    n = int(self.model.seq_len)
    tokens = jnp.zeros((1, n), jnp.int32)
    labels = jnp.zeros((1,), jnp.int32)
    prefix = jnp.zeros((1, n), jnp.int32) if self.frame_prediction else None
    labels = None if self.frame_prediction else labels
    k_params = jax.random.key(seed)
    return self.model.init({'params': k_params}, tokens, labels, prefix, train=False)['params']

  def train_step(self):
    return functools.partial(
      generator_step.generator_train_step,
      model=self.model,
      tx=self.tx,
      lr_fn=self.lr_fn,
      tokenizer=self.tokenizer,
      num_cond_frames=int(self.config.get('num_cond_frames', 5)),
      apply_fn=self.apply_train,
    )

  def abstract_batch(self, batch_size: int) -> dict:
    label = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    if 'tokens' in self.batch_keys:
      return {
        'tokens': jax.ShapeDtypeStruct((batch_size, int(self.model.seq_len)), jnp.int32),
        'label': label,
      }
    video = (batch_size, *self.tokenizer.video_shape, 3)
    return {'video': jax.ShapeDtypeStruct(video, jnp.float32), 'label': label}

  def extras(self):
    if self.tokens_dir:
      if self.config.get('tokenizer_path'):
        self.tokenizer_variables()  # checks, before compiling, that it wrote the tokens
      return {}
    return {'tokenizer': self.tokenizer_variables()}

  def extras_shardings(self):
    if 'tokens' in self.batch_keys:
      return {}
    return {'tokenizer': self._tokenizer_shardings()[1]}

  def abstract_extras(self):
    """The frozen tokenizer's variables as shapes (encoding in the step), read from nowhere."""
    if 'tokens' in self.batch_keys:
      return {}
    return {'tokenizer': self._tokenizer_shardings()[0]}

  # ------------------------------------------------------------------ the frozen tokenizer

  def _tokenizer_shardings(self):
    return tokenizer_task.variable_shardings(self.tokenizer, self.mesh, self.rules)

  def tokenizer_variables(self):
    """The frozen tokenizer's variables on this mesh (loaded once, from
    ``config.tokenizer_path``, else the path the token dataset records)."""
    if self._tok_vars is None:
      path = self.config.get('tokenizer_path') or (self.manifest or {}).get('tokenizer', {}).get(
        'path', ''
      )
      if not path:
        raise errors.ConfigError('config.tokenizer_path is needed to decode samples')
      abstract, shardings = self._tokenizer_shardings()
      ema = float(self.tokenizer_cfg.optim.get('ema_decay', 0.0) or 0.0) > 0
      fields = tokenizer_task.state_fields(self.tokenizer, ema=ema)
      self._tok_vars, step, _ = params_io.load_variables(path, abstract, shardings, fields)
      logging.info('Frozen tokenizer: %s (step %d)', path, step)
      if self.manifest is not None:
        self._check_same_tokenizer(path)
    return self._tok_vars

  def _check_same_tokenizer(self, path: str) -> None:
    """The tokenizer that decodes (``config.tokenizer_path``) must be the one that wrote the
    token dataset: same model config and exactly the same weights."""
    from larp_jax.data import tokens as tokens_lib

    wrote = self.manifest.get('tokenizer', {})
    mine = tokens_lib.tokenizer_id(self.tokenizer_cfg.model, self._tok_vars)
    if wrote.get('id') and wrote['id'] != mine:
      raise errors.ConfigError(
        f'config.tokens_dir={self.tokens_dir} was written by the tokenizer '
        f'{tokens_lib.describe_tokenizer(wrote)}, not by config.tokenizer_path={path} (id {mine}): '
        'tokens of one tokenizer decoded by another are noise; re-tokenize or point '
        'config.tokenizer_path at the tokenizer that wrote them'
      )

  def encode_host(self, video: np.ndarray) -> np.ndarray:
    """Deterministic tokens of this host's ``video`` rows (numpy), on the mesh."""
    from larp_jax.evaluation import multihost

    if self._encode is None:
      tok = self.tokenizer
      self._encode = jax.jit(lambda v, x: generator_step.encode_tokens(tok, v, x))
    n = len(video)
    dp = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    per = max(1, dp // jax.process_count())
    pad = -n % per
    video = np.concatenate([video, np.zeros((pad,) + video.shape[1:], video.dtype)])
    g = data_lib.make_global_batch({'video': video}, self.mesh, sharding.batch_sharding(self.mesh))
    with sharding.logical_context(self.mesh, self.rules):
      tokens = self._encode(self.tokenizer_variables(), g['video'])
    return multihost.host_local(tokens, self.mesh)[:n]

  def prefix_tokens(self, video: np.ndarray) -> np.ndarray:
    """Frame prediction's conditioning tokens of this host's clips."""
    n_cond = int(self.config.get('num_cond_frames', 5))
    idx = np.minimum(np.arange(video.shape[1]), n_cond - 1)
    return self.encode_host(np.asarray(video)[:, idx])

  # ------------------------------------------------------------------ data and reporting

  def _class_names(self) -> Optional[list]:
    if self.manifest is not None:
      names = (self.manifest.get('label_map') or {}).get('classes')
      if names:
        return list(names)
    from larp_jax import tokenize

    return tokenize.label_map(self.config.data).get('classes')

  def train_data(self, *, batch_size: int, start_step: int):
    if self.tokens_dir:
      from larp_jax.data import tokens as tokens_lib

      return tokens_lib.get_token_dataset(
        self.tokens_dir,
        'train',
        batch_size=batch_size,
        seed=int(self.config.seed),
        start_step=start_step,
      )
    return data_lib.get_dataset(
      self.config.data,
      'train',
      video_shape=self.tokenizer.video_shape,
      batch_size=batch_size,
      seed=int(self.config.seed),
      start_step=start_step,
    )

  def held_out_batches(self, batch_size: int):
    """Held-out {'tokens', 'label', 'mask'(, 'cond_tokens')} batches of this host."""
    if self.tokens_dir:
      from larp_jax.data import tokens as tokens_lib

      return tokens_lib.get_token_dataset(self.tokens_dir, 'eval', batch_size=batch_size, seed=0)
    return _EncodedBatches(self, batch_size)

  def first_eval_videos(self, n: int) -> np.ndarray:
    with data_lib.get_dataset(
      self.config.data, 'eval', video_shape=self.tokenizer.video_shape, batch_size=n, seed=0
    ) as it:
      batch = next(it)
    return np.asarray(batch['video'], np.float32)[np.asarray(batch['mask'], bool)]

  def real_clip_data(self):
    """(data config, split) of gFVD's real clips: class-conditional from the train split (the
    official protocol), centre crop, no flip; frame prediction from the eval split."""
    cfg = self.config.data.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.train_crop = 'center'
      cfg.flip = False
    return cfg, ('eval' if self.frame_prediction else 'train')

  def log_line(self, m: dict) -> str:
    return f'loss {m["loss"]:.4f} | top1 {m["top1"]:.3f} | lr {m["lr"]:.2e}'

  def log_overview(self, state) -> None:
    parameter_overview.log_parameter_overview(state.params, msg='generator')

  # ------------------------------------------------------------------ evaluation and export

  def nll_batch(self, params, batch) -> dict:
    if self._nll is None:
      self._nll = jax.jit(
        lambda p, b: generator_step.nll_sums(
          p,
          b,
          apply_fn=lambda pp, t, lab, pre: self.apply_eval(pp, t, lab, pre),
          mask=b['mask'],
        )
      )
    return jax.device_get(self._nll(params, batch))

  def export(self, state) -> dict:
    return {'params': state.params}

  def with_variables(self, state, variables):
    """``config.init_from``: a fresh state with the generator's parameters of a params or run
    directory (e.g. a converted release), the AdamW state fresh."""
    return state.replace(params=variables['params'])

  def state_fields(self) -> dict:
    return {'params': 'params'}

  def variable_shardings(self):
    return sharding.state_shardings(lambda: {'params': self.boxed_params(0)}, self.mesh, self.rules)

  def evaluator(self):
    if self._evaluator is None:
      from larp_jax.generation import evaluate as evaluate_lib

      self._evaluator = evaluate_lib.GeneratorEvaluator(self)
    return self._evaluator

  def evaluate(self, state, workdir: str, step: int) -> Optional[dict]:
    return self.evaluator().evaluate(state.params, workdir, int(step))

  def evaluate_variables(self, variables, workdir: str, step: int, *, params_source=None) -> dict:
    from larp_jax.generation import evaluate as evaluate_lib

    n = int(self.config.eval.get('num_samples', 0) or 0)
    metrics = self.evaluator().evaluate(
      variables['params'], workdir, int(step), num_fvd_samples=n, params_source=params_source
    )
    path = os.path.join(workdir, 'eval', f'{int(step)}.json')
    return dict(
      metrics, json=path, summary=f'{evaluate_lib.format_summary(metrics)}\nwritten to {path}'
    )

  def sample_variables(self, variables, workdir: str, step: int) -> dict:
    from larp_jax.generation import evaluate as evaluate_lib

    settings = evaluate_lib.SampleSettings.from_config(self.config.sample)
    n = int(self.config.sample.num_samples)
    out_dir = self.config.sample.get('output_dir') or os.path.join(workdir, 'samples')
    files = self.evaluator().write_samples(
      variables['params'], out_dir, f'{int(step)}', n, settings
    )
    record = {
      'step': int(step),
      'num_samples': n,
      'sampling': dataclasses.asdict(settings),
      'files': files,
    }
    if jax.process_index() == 0:
      evaluate_lib.write_json(os.path.join(out_dir, f'{int(step)}.json'), record)
    return dict(record, summary=f'{n} samples written to {out_dir}')


class _EncodedBatches:
  """Held-out batches encoded on the fly from the eval split's videos."""

  def __init__(self, task: GeneratorTask, batch_size: int):
    self.task = task
    self.it = data_lib.get_dataset(
      task.config.data,
      'eval',
      video_shape=task.tokenizer.video_shape,
      batch_size=batch_size,
      seed=0,
    )

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.it.close()

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    video = np.asarray(batch['video'], np.float32)
    out = {
      'tokens': self.task.encode_host(video).astype(np.int32),
      'label': np.asarray(batch['label'], np.int32),
      'mask': np.asarray(batch['mask'], bool),
    }
    if self.task.frame_prediction:
      out['cond_tokens'] = self.task.prefix_tokens(video).astype(np.int32)
    return out


def build(config, devices=None) -> GeneratorTask:
  devices = jax.devices() if devices is None else devices
  config_lib.validate(config, num_devices=len(devices))
  return GeneratorTask(config, sharding.make_mesh(config.mesh, devices))
