"""The LARP tokenizer task: the tokenizer with its prior, the GAN discriminator, two Adams.

    task = tokenizer.build(config)        # validates, builds the mesh, the models, the optimisers
    loop.run(tokenizer.TokenizerTask, config, workdir)

What it gives the loop (``tasks/base.py``): the ``TokenizerTrainState`` init, the pure
``train.steps.tokenizer_train_step`` (LPIPS weights as its replicated extra argument), the
``{'video'}`` batches of ``larp_jax.data``, the progress line, the evaluator
(``evaluation/evaluator.py``, built once per task) and the params-only export (``{'params',
'batch_stats'}``, EMA weights when the run keeps an EMA).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from clu import parameter_overview

from larp_jax import config_lib, errors, sharding
from larp_jax import data as data_lib
from larp_jax.data import config as data_config
from larp_jax.models.discriminator import TransformerDiscriminator
from larp_jax.models.tokenizer import LARPTokenizer
from larp_jax.tasks import base
from larp_jax.train import optim, state as state_lib, steps


def model_kwargs(model_cfg) -> dict:
  """config.model -> LARPTokenizer kwargs (dtype names -> jnp dtypes, lists -> tuples)."""
  kw = config_lib.as_kwargs(model_cfg)
  for k in ('dtype', 'param_dtype'):
    if isinstance(kw.get(k), str):
      kw[k] = jnp.dtype(kw[k])
  return kw


def make_model(model_cfg) -> LARPTokenizer:
  """``LARPTokenizer(**config.model)``; ConfigError naming a wrong or missing argument."""
  try:
    return LARPTokenizer(**model_kwargs(model_cfg))
  except TypeError as e:
    raise errors.ConfigError(
      f'config.model has an unknown or missing tokenizer argument: {e}'
    ) from None
  except ValueError as e:  # models.tokenizer.check_tokenizer_kwargs: inconsistent values
    raise errors.ConfigError(f'config.model: {e}') from None


def model_variables(params, batch_stats=None) -> dict:
  """The variables the tokenizer is applied with: its parameters, and the running statistics
  of a batch-norm bottleneck when it has one."""
  return (
    {'params': params} if batch_stats is None else {'params': params, 'batch_stats': batch_stats}
  )


def boxed_variables(model: LARPTokenizer, seed: int = 0) -> dict:
  """The model's freshly initialised variables, parameters in ``nn.Partitioned`` boxes (the
  same values as the tokenizer part of ``TokenizerTask.boxed_init(seed)``)."""
  k_params, k_vq, k_drop, _ = jax.random.split(jax.random.key(seed), 4)
  video = jnp.zeros((1, *model.video_shape, 3), jnp.float32)
  return model.init({'params': k_params, 'vq': k_vq, 'dropout': k_drop}, video, train=True)


def state_fields(model: LARPTokenizer, *, ema: bool) -> dict:
  """The TokenizerTrainState field that holds each collection of the model's variables."""
  fields = {'params': 'ema_params' if ema else 'params'}
  if model.uses_batch_stats:
    fields['batch_stats'] = 'batch_stats'
  return fields


def variable_shardings(model: LARPTokenizer, mesh, rules):
  """(abstract variables, their NamedShardings) of the model alone: no optimiser, no
  discriminator. What loading parameters for inference needs."""
  return sharding.state_shardings(functools.partial(boxed_variables, model), mesh, rules)


class TokenizerTask(base.Task):
  """LARP tokenizer training (``configs/ucf101.py``, ``configs/demo.py``)."""

  name = 'tokenizer'
  batch_keys = ('video',)
  state_roles = {
    'params': 'params',
    'opt_state': 'optimizer',
    'disc_params': 'discriminator',
    'disc_opt_state': 'discriminator',
    'ema_params': 'ema',
  }

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.model = make_model(config.model)
    data_config.validate(config.data, 'train', self.model.video_shape)
    if config.get('eval_every'):
      data_config.validate(config.data, 'eval', self.model.video_shape)
    try:
      self.disc = TransformerDiscriminator(
        video_shape=self.model.video_shape,
        dtype=self.model.dtype,
        param_dtype=self.model.param_dtype,
        attention_impl=self.model.attention_impl,
        **config_lib.as_kwargs(config.disc),
      )
    except ValueError as e:  # its own consistency checks (patch size, width / heads)
      raise errors.ConfigError(f'config.disc: {e}') from None
    total = int(config.total_steps)
    self.gen_tx = optim.generator_optimizer(config.optim, total)
    self.disc_tx = optim.discriminator_optimizer(config.optim, total)
    self._evaluator = None

  # ------------------------------------------------------------------ state and step

  def boxed_init(self, seed: int):
    """A fresh TokenizerTrainState whose parameters are nn.Partitioned boxes."""
    k_disc = jax.random.split(jax.random.key(seed), 4)[3]
    video = jnp.zeros((1, *self.model.video_shape, 3), jnp.float32)
    variables = boxed_variables(self.model, seed)
    disc_params = self.disc.init(k_disc, video)['params']
    return state_lib.create(
      variables['params'],
      disc_params,
      self.gen_tx,
      self.disc_tx,
      use_ema=self.uses_ema,
      batch_stats=variables.get('batch_stats'),
    )

  @property
  def uses_ema(self) -> bool:
    return float(self.config.optim.ema_decay) > 0

  def train_step(self):
    cfg = self.config
    return functools.partial(
      steps.tokenizer_train_step,
      model=self.model,
      disc=self.disc,
      gen_tx=self.gen_tx,
      disc_tx=self.disc_tx,
      loss_cfg=cfg.loss,
      optim_cfg=cfg.optim,
      total_steps=int(cfg.total_steps),
    )

  def abstract_batch(self, batch_size: int) -> dict:
    return {'video': jax.ShapeDtypeStruct((batch_size, *self.model.video_shape, 3), jnp.float32)}

  def extras(self):
    return load_lpips(self)

  # ------------------------------------------------------------------ data and reporting

  def train_data(self, *, batch_size: int, start_step: int):
    return data_lib.get_dataset(
      self.config.data,
      'train',
      video_shape=self.model.video_shape,
      batch_size=batch_size,
      seed=int(self.config.seed),
      start_step=start_step,
    )

  def data_counters(self, iterator) -> dict:
    return {'skipped_files': float(data_lib.num_skipped(iterator))}

  def log_line(self, m: dict) -> str:
    return f'loss {m["loss"]:.4f} | l1 {m["l1_loss"]:.4f} | prior {m.get("prior_loss", 0.0):.3f}'

  def log_overview(self, state) -> None:
    parameter_overview.log_parameter_overview(state.params, msg='tokenizer (with prior)')
    parameter_overview.log_parameter_overview(state.disc_params, msg='discriminator')

  # ------------------------------------------------------------------ evaluation and export

  def export(self, state) -> dict:
    """{'params' (EMA when the run keeps one), 'batch_stats' (with a batch-norm bottleneck)}."""
    params = state.ema_params if state.ema_params is not None else state.params
    return model_variables(params, state.batch_stats)

  def with_variables(self, state, variables):
    """``state`` with the tokenizer's variables (EMA copy too) from ``variables``; the
    optimiser moments, the discriminator and the LeCam EMAs stay as they are (fresh)."""
    params = variables['params']
    return state.replace(
      params=params,
      ema_params=params if state.ema_params is not None else None,
      batch_stats=variables.get('batch_stats', state.batch_stats),
    )

  def params_source(self):
    """What the evaluation record says about parameters trained here."""
    init = self.config.get('init_from')
    if not init:
      return 'larp_jax training'
    from larp_jax import params_io

    info = params_io.read_info(init) if params_io.is_params_dir(init) else {}
    return {'trained_by': 'larp_jax', 'init_from': init, 'init_source': info.get('source')}

  def state_fields(self) -> dict:
    """Which train-state field holds each exported collection (for reading only the model's
    variables out of a full training checkpoint)."""
    return state_fields(self.model, ema=self.uses_ema)

  def variable_shardings(self):
    """(abstract model variables, NamedShardings) on this task's mesh."""
    return variable_shardings(self.model, self.mesh, self.rules)

  def evaluator(self):
    """The evaluator of this task, built on first use (jitted batch function, LPIPS, I3D)."""
    if self._evaluator is None:
      from larp_jax.evaluation import evaluator as evaluator_lib  # local: heavy (I3D)

      self._evaluator = evaluator_lib.Evaluator(
        self.config, self.model, self.mesh, self.rules, self.variable_shardings()[1]
      )
    return self._evaluator

  def evaluate(self, state, workdir: str, step: int) -> Optional[dict]:
    return self.evaluator().evaluate(
      self.export(state), workdir, int(step), params_source=self.params_source()
    )

  def evaluate_variables(self, variables, workdir: str, step: int, *, params_source=None) -> dict:
    from larp_jax.evaluation import evaluator as evaluator_lib

    metrics = self.evaluator().evaluate(variables, workdir, int(step), params_source=params_source)
    path = os.path.join(evaluator_lib.output_dir(self.config, workdir), f'{int(step)}.json')
    return dict(
      metrics, json=path, summary=f'{evaluator_lib.format_summary(metrics)}\nwritten to {path}'
    )


def build(config, devices=None) -> TokenizerTask:
  """Validates ``config``, builds its mesh over ``devices`` (default all) and the task."""
  devices = jax.devices() if devices is None else devices
  config_lib.validate(config, num_devices=len(devices))
  return TokenizerTask(config, sharding.make_mesh(config.mesh, devices))


def load_lpips(task: TokenizerTask) -> Any:
  """The frozen LPIPS weights, replicated on the task's mesh ({} when the loss has no LPIPS)."""
  if task.config.loss.lpips_weight <= 0:
    return {}
  from larp_jax.losses import perceptual

  params = perceptual.load_lpips_params(task.config.loss.lpips_net)
  return jax.device_put(params, sharding.replicated(task.mesh))
