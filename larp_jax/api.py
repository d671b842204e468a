"""Library entry point: a trained tokenizer, ready to use, from a run directory.

tok = larp_jax.load_tokenizer('runs/demo')   # a run directory, or a params directory
tok.save('runs/demo_params')      # parameters only (larp_jax/params_io.py)
tokens = tok.encode(video)        # [B, T, H, W, 3] in [0, 1] (or uint8) -> int32 [B, N]
video = tok.decode(tokens)        # -> float32 [B, T, H, W, 3] in [0, 1]
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from larp_jax import errors
from larp_jax import workdir as workdir_lib
from larp_jax.models.tokenizer import LARPTokenizer


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of a run or params directory."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(path):
    raise errors.UserError(
      f'{path} not found: {workdir!r} is not a larp_jax run or params directory'
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class Tokenizer:
  """A tokenizer with its parameters; ``encode``/``decode`` are jitted and deterministic."""

  model: LARPTokenizer
  params: Any
  config: ml_collections.ConfigDict
  step: int
  batch_stats: Any = None  # running statistics of a batch-norm bottleneck, if any

  def save(self, directory: str) -> str:
    """Writes this tokenizer as a params directory (``larp_jax/params_io.py``), loadable by
    ``load_tokenizer(directory)``; returns its path."""
    from larp_jax import params_io

    return params_io.save(
      directory, self._variables, config=self.config, step=self.step, task='tokenizer'
    )

  def __post_init__(self):
    variables = {'params': self.params}
    if self.batch_stats is not None:
      variables['batch_stats'] = self.batch_stats
    self._variables = variables
    self._encode = jax.jit(lambda v, x: self.model.apply(v, x, method=LARPTokenizer.encode))
    self._decode = jax.jit(lambda v, t: self.model.apply(v, t, method=LARPTokenizer.decode))

  @property
  def video_shape(self):
    return tuple(self.model.video_shape)

  @property
  def num_tokens(self) -> int:
    return self.model.num_latent_tokens

  def encode(self, video):
    """Tokens of a batch of videos.

    Args:
      video: [B, *video_shape, 3], numpy or jax; uint8 in 0..255 (scaled to [0, 1] by the model)
        or float in [0, 1] (values within ``_RANGE_TOL`` of it are accepted as round-off).

    Returns:
      int32 tokens [B, N], N = ``num_tokens``.

    Raises:
      ValueError: wrong shape or dtype, or float values outside [0, 1].
    """
    if not isinstance(video, jax.Array):
      video = np.asarray(video)
    _check_video(video, self.video_shape)
    return self._encode(self._variables, jnp.asarray(video))

  def decode(self, tokens):
    """Videos of a batch of token sequences.

    Args:
      tokens: integer ids [B, N], numpy or jax, N = ``num_tokens``, each id in
        [0, codebook_size). Float arrays are rejected, even with integral values.

    Returns:
      float32 video [B, *video_shape, 3] in [0, 1].

    Raises:
      ValueError: non-integer dtype, wrong shape, or an id outside [0, codebook_size).
    """
    tokens = np.asarray(tokens)
    _check_tokens(tokens, self.num_tokens, self.model.codebook_size)
    return self._decode(self._variables, jnp.asarray(tokens, jnp.int32))


# Float videos may overshoot [0, 1] by this much (resampling / codec round-off).
_RANGE_TOL = 1e-3


def _check_video(video, video_shape) -> None:
  """Raises ValueError unless ``video`` is [B, *video_shape, 3], uint8 or float in [0, 1]."""
  expected = (*video_shape, 3)
  shape = tuple(video.shape)
  if len(shape) != len(expected) + 1 or shape[1:] != expected:
    raise errors.UserError(
      f'video must have shape [B, {", ".join(map(str, expected))}] (channels last), got {shape}'
    )
  if video.dtype == np.uint8:
    return
  if not jnp.issubdtype(video.dtype, jnp.floating):
    raise errors.UserError(
      f'video must be uint8 (0..255) or float in [0, 1], got dtype {video.dtype}'
    )
  if video.size == 0:
    return
  lo, hi = float(video.min()), float(video.max())  # numpy, or two scalars from the device
  if not (lo >= -_RANGE_TOL and hi <= 1.0 + _RANGE_TOL):  # also rejects NaN
    hint = '; if this is 0..255 data, divide it by 255' if hi > 1.0 + _RANGE_TOL else ''
    raise errors.UserError(f'float video values must lie in [0, 1], found [{lo:g}, {hi:g}]{hint}')


def _check_tokens(tokens: np.ndarray, num_tokens: int, codebook_size: int) -> None:
  """Raises ValueError unless ``tokens`` are integer ids [B, num_tokens] in [0, codebook_size)."""
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise errors.UserError(f'tokens must be an integer array, got dtype {tokens.dtype}')
  if tokens.ndim != 2 or tokens.shape[1] != num_tokens:
    raise errors.UserError(f'tokens must have shape [B, {num_tokens}], got {tuple(tokens.shape)}')
  if tokens.size == 0:
    return
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= codebook_size:
    raise errors.UserError(
      f'token ids must lie in [0, {codebook_size}) (0..{codebook_size - 1}), got min {lo}, max {hi}'
    )


def load_tokenizer(path: str, *, use_ema: bool = True) -> Tokenizer:
  """The tokenizer of a run directory (its latest checkpoint) or of a params directory.

  Reads only the model's variables (not the optimiser state, not the discriminator) and places
  them on one device, whatever mesh wrote them (an FSDP run on many devices loads on a laptop).
  ``use_ema``: a run trained with an EMA gives its EMA weights (False: the raw weights).

  Raises:
    UserError: ``path`` holds no config.json, no checkpoint, or another model.
  """
  from larp_jax import params_io, sharding
  from larp_jax.tasks import tokenizer as tokenizer_task  # local: keeps `import larp_jax` light

  config = load_config(path)
  model = tokenizer_task.make_model(config.model)
  mesh = sharding.make_mesh({'data': 1}, jax.devices()[:1])
  abstract, shardings = tokenizer_task.variable_shardings(model, mesh, sharding.rules(config))
  fields = tokenizer_task.state_fields(model, ema=use_ema and float(config.optim.ema_decay) > 0)
  variables, step, _ = params_io.load_variables(path, abstract, shardings, fields)
  return Tokenizer(
    model=model,
    params=variables['params'],
    config=config,
    step=step,
    batch_stats=variables.get('batch_stats'),
  )
