"""A small video classifier of the synthetic motion classes: the class-accuracy figure of a
generator evaluated on the built-in synthetic data.

The synthetic source's classes differ by the motion of one "hero" object
(``larp_jax/data/synthetic.py``). ``ClassProbe``, a small block-merging network (below), is
trained on clips of the same source (same style, size, classes and content seed) and then
classifies three sets of clips of a generator evaluation:

* real eval clips: the probe's own accuracy, the ceiling of the other two;
* the frozen tokenizer's reconstructions of those clips: how much of the class the tokens keep;
* the generator's samples, each scored against the class it was conditioned on: whether the
  generator draws the class it is asked for.

Chance is 1 / num_classes. The probe is trained once per data setting and cached
(``probe_<hash>.msgpack`` next to the FVD statistics, the key stored inside and checked on load),
so evaluations of one run, and runs on the same data, share it. Training is deterministic for a
seed; every process of a multi-host job trains on the same batches (``process_count=1``) and so
holds the same probe. It is a diagnostic of this repository, not part of LARP.
"""

import dataclasses
import json
import os
import time

from absl import logging
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from larp_jax import errors
from larp_jax.data import pipeline as data_lib
from larp_jax.evaluation import fvd as fvd_lib
from larp_jax.models import patches

VERSION = 1  # bump when the network or its training changes: old cached probes are not reused


def _merge_patches(x, patch):
  """[B, T, H, W, C] -> [B, T/pt, H/ph, W/pw, pt*ph*pw*C]: ``models/patches.patchify`` kept on
  its grid (each patch side capped at the clip's, a remainder cropped)."""
  b, t, h, w, _ = x.shape
  pt, ph, pw = (min(p, d) for p, d in zip(patch, (t, h, w), strict=True))
  grid = (t // pt, h // ph, w // pw)
  x = x[:, : grid[0] * pt, : grid[1] * ph, : grid[2] * pw]
  return patches.patchify(x, (pt, ph, pw)).reshape(b, *grid, -1)


class ClassProbe(nn.Module):
  """Logits [B, num_classes] of videos [B, T, H, W, 3] in [0, 1].

  The input and its frame-to-frame difference are stacked as channels (so the first layer sees
  motion directly), then two stages of non-overlapping block merging ((2, 4, 4), then
  (2, 2, 2)), each a Dense layer, LayerNorm and GELU (convolutions with kernel = stride, as
  matrix products: cheap on a CPU); the mean and max over space and time; one Dense layer.
  (Keeping the time axis in the head, or flattening every block into it, learned slower here.)
  """

  num_classes: int
  widths: tuple = (64, 128)
  patches: tuple = ((2, 4, 4), (2, 2, 2))

  @nn.compact
  def __call__(self, video):
    x = 2.0 * jnp.asarray(video, jnp.float32) - 1.0
    diff = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], axis=1)
    x = jnp.concatenate([x, diff], axis=-1)
    for width, patch in zip(self.widths, self.patches, strict=True):
      x = nn.gelu(nn.LayerNorm()(nn.Dense(width)(_merge_patches(x, patch))))
    x = jnp.concatenate([x.mean(axis=(1, 2, 3)), x.max(axis=(1, 2, 3))], axis=-1)
    return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """How the probe is trained (``config.eval.class_probe``)."""

  steps: int = 1500
  batch_size: int = 32
  lr: float = 2e-3
  seed: int = 0

  @classmethod
  def from_config(cls, cfg) -> 'ProbeSettings':
    fields = {f.name for f in dataclasses.fields(cls)}
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg or {})
    unknown = sorted(set(cfg) - fields)
    if unknown:
      raise errors.ConfigError(
        f'config.eval.class_probe: unknown fields {unknown}; known: {sorted(fields)}'
      )
    return cls(**cfg)


def probe_key(data_cfg, video_shape, settings: ProbeSettings) -> dict:
  """Everything that changes the trained probe."""
  data = {
    k: data_cfg.get(k)
    for k in (
      'source',
      'synthetic_style',
      'synthetic_num_classes',
      'synthetic_num_frames',
      'synthetic_num_train',
      'synthetic_seed',
    )
  }
  return json.loads(
    json.dumps(
      {
        'version': VERSION,
        'data': data,
        'video_shape': [int(s) for s in video_shape],
        'settings': dataclasses.asdict(settings),
      },
      sort_keys=True,
    )
  )


def check_supported(data_cfg) -> None:
  if data_cfg.get('source') != 'synthetic':
    raise errors.ConfigError(
      'config.eval.class_accuracy_clips needs the synthetic data source (the probe learns its '
      f'classes), got data.source={data_cfg.get("source")!r}; set '
      '--config.eval.class_accuracy_clips=0'
    )


def train_probe(data_cfg, video_shape, settings: ProbeSettings):
  """(model, variables, train accuracy over the last 50 steps): ``settings.steps`` batches of
  the train split's stream (random clips of the 50,000 train videos: the probe sees each clip
  about once, so it does not memorise them)."""
  check_supported(data_cfg)
  num_classes = int(data_cfg.synthetic_num_classes)
  model = ClassProbe(num_classes=num_classes)
  t, h, w = (int(s) for s in video_shape)
  params = model.init(jax.random.key(settings.seed), jnp.zeros((1, t, h, w, 3)))['params']
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, settings.lr, max(1, settings.steps // 20), max(2, settings.steps)
  )
  opt = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, video, label):
    def loss_fn(p):
      logits = model.apply({'params': p}, video)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
      return loss, (logits.argmax(-1) == label).mean()

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  accs, t0 = [], time.time()
  it = data_lib.get_dataset(
    data_cfg,
    'train',
    video_shape=(t, h, w),
    batch_size=settings.batch_size,
    seed=settings.seed + 1,
    process_index=0,  # every process trains on the same batches, so holds the same probe
    process_count=1,
  )
  with it:
    for i, batch in zip(range(settings.steps), it):
      params, opt_state, loss, acc = step(
        params, opt_state, np.asarray(batch['video']), np.asarray(batch['label'], np.int32)
      )
      accs.append(float(acc))
      if (i + 1) % 100 == 0 or i + 1 == settings.steps:
        logging.info(
          'class probe: step %d/%d | loss %.3f | train accuracy %.3f | %.0f s',
          i + 1,
          settings.steps,
          float(loss),
          float(np.mean(accs[-50:])),
          time.time() - t0,
        )
  return model, {'params': params}, float(np.mean(accs[-50:])) if accs else 0.0


def cached_probe(data_cfg, video_shape, settings: ProbeSettings, cache_dir: str):
  """(model, variables): ``<cache_dir>/probe_<hash>.msgpack`` if present, else trained and
  saved (by process 0)."""
  check_supported(data_cfg)
  key = probe_key(data_cfg, video_shape, settings)
  path = os.path.join(cache_dir, f'probe_{fvd_lib.protocol_hash(key)}.msgpack')
  model = ClassProbe(num_classes=int(data_cfg.synthetic_num_classes))
  if os.path.exists(path):
    with open(path, 'rb') as f:
      stored = flax.serialization.msgpack_restore(f.read())
    if stored.get('key') != key:
      raise RuntimeError(f'cached class probe {path} was trained for {stored.get("key")}')
    return model, {'params': stored['params']}
  model, variables, acc = train_probe(data_cfg, video_shape, settings)
  if jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    blob = flax.serialization.msgpack_serialize(
      {'key': key, 'params': jax.device_get(variables['params']), 'train_accuracy': acc}
    )
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
      f.write(blob)
    os.replace(tmp, path)
  return model, variables


class ProbeCounter:
  """Counts of correct predictions per set (``add(name, videos, labels)``), host-local numpy."""

  def __init__(self, model, variables, batch_size: int = 32):
    self._apply = jax.jit(lambda v, x: model.apply(v, x).argmax(-1))
    self._variables = variables
    self._batch = int(batch_size)
    self.correct, self.total = {}, {}

  def predict(self, videos) -> np.ndarray:
    videos = np.asarray(videos, np.float32)
    out = [
      np.asarray(self._apply(self._variables, videos[i : i + self._batch]))
      for i in range(0, len(videos), self._batch)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.int32)

  def add(self, name: str, videos, labels) -> None:
    labels = np.asarray(labels)
    hits = int((self.predict(videos) == labels).sum()) if len(labels) else 0
    self.correct[name] = self.correct.get(name, 0) + hits
    self.total[name] = self.total.get(name, 0) + len(labels)


def accuracies(correct: dict, total: dict) -> dict:
  """{set name: correct / total} (``ProbeCounter`` counts, summed over processes)."""
  return {name: correct[name] / max(total[name], 1) for name in sorted(total)}
