"""Library entry point: a trained tokenizer, ready to use, from a run directory.

    tok = larp_jax.load_tokenizer('runs/demo')
    tokens = tok.encode(video)        # [B, T, H, W, 3] in [0, 1] -> int32 [B, N]
    video = tok.decode(tokens)        # -> float32 [B, T, H, W, 3] in [0, 1]
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from larp_jax import checkpoint
from larp_jax.models.tokenizer import LARPTokenizer


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir!r} is not a larp_jax run directory')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class Tokenizer:
  """A tokenizer with its parameters; ``encode``/``decode`` are jitted and deterministic."""
  model: LARPTokenizer
  params: Any
  config: ml_collections.ConfigDict
  step: int

  def __post_init__(self):
    self._encode = jax.jit(lambda p, v: self.model.apply({'params': p}, v,
                                                         method=LARPTokenizer.encode))
    self._decode = jax.jit(lambda p, t: self.model.apply({'params': p}, t,
                                                         method=LARPTokenizer.decode))

  @property
  def video_shape(self):
    return tuple(self.model.video_shape)

  @property
  def num_tokens(self) -> int:
    return self.model.num_latent_tokens

  def encode(self, video):
    """[B, T, H, W, 3] float in [0, 1] (or uint8) -> int32 tokens [B, N]."""
    return self._encode(self.params, jnp.asarray(video))

  def decode(self, tokens):
    """int tokens [B, N] -> float32 video [B, T, H, W, 3] in [0, 1]."""
    return self._decode(self.params, jnp.asarray(tokens, jnp.int32))

  def reconstruct(self, video):
    return self.decode(self.encode(video))


def load_tokenizer(workdir: str, *, use_ema: bool = True) -> Tokenizer:
  """The tokenizer of the latest checkpoint in ``workdir`` (EMA weights when trained with EMA)."""
  from larp_jax.train import loop   # local: keeps `import larp_jax` light
  config = load_config(workdir)
  exp = loop.build(config, devices=jax.devices()[:1])
  mngr = checkpoint.manager(workdir, async_save=False)
  abstract, shardings = exp.abstract_state()
  step, state = checkpoint.restore_latest(mngr, abstract, shardings)
  mngr.close()
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}: '
                            f'train first (python -m larp_jax.main --workdir={workdir} ...)')
  params = state.ema_params if (use_ema and state.ema_params is not None) else state.params
  return Tokenizer(model=exp.model, params=params, config=config, step=int(step))
