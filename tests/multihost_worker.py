"""Processes that ``test_multihost.py`` starts (not collected by pytest).

python tests/multihost_worker.py reference HOSTS MAIN_FLAGS...
    ``python -m larp_jax.main MAIN_FLAGS...`` in this one process, except that the training
    stream is read as a job of HOSTS processes reads it: host p's batches (``get_dataset``, or
    the generator's ``get_token_dataset``, with ``process_index=p, process_count=HOSTS``, each
    host's share of the global batch), concatenated in process order. A HOSTS-process job shuffles each host's part of the data
    on its own, so this is the single-process run whose losses it must match.
python tests/multihost_worker.py data PORT PROCESS_ID NUM_PROCESSES OUT_JSON
    joins a job on localhost:PORT and writes the clip ids this process's training batches
    (4 steps) and evaluation batches hold, with the pipeline's own process index and count.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The data check's pipeline: the tiny demo config's data section, 16 train and 5 eval videos.
DATA_OVERRIDES = dict(synthetic_num_train=16, synthetic_num_eval=5)
DATA_BATCH = 4  # per host, train
DATA_EVAL_BATCH = 2  # per host, eval (5 clips: host 0 has 3, host 1 2; both yield 2 batches)
DATA_STEPS = 4


class _Hosts:
  """The concatenated batches of several per-host iterators (a DataIterator's interface)."""

  def __init__(self, iterators):
    self.iterators = iterators

  def __next__(self):
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def __iter__(self):
    return self

  @property
  def num_skipped(self):
    return sum(it.num_skipped for it in self.iterators)

  def close(self):
    for it in self.iterators:
      it.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def reference(hosts: int, argv: list) -> None:
  from larp_jax import data as data_lib
  from larp_jax import main
  from larp_jax.data import pipeline

  def get_dataset(cfg, split, video_shape, batch_size, **kw):
    if split != 'train' or kw.get('train_pass') is not None:
      return pipeline.get_dataset(cfg, split, video_shape, batch_size, **kw)
    return _Hosts(
      [
        pipeline.get_dataset(
          cfg, split, video_shape, batch_size // hosts, process_index=p, process_count=hosts, **kw
        )
        for p in range(hosts)
      ]
    )

  from larp_jax.data import tokens as tokens_lib

  get_token_dataset_ = tokens_lib.get_token_dataset

  def get_token_dataset(directory, split, batch_size, **kw):
    if split != 'train':
      return get_token_dataset_(directory, split, batch_size, **kw)
    return _Hosts(
      [
        get_token_dataset_(
          directory, split, batch_size // hosts, process_index=p, process_count=hosts, **kw
        )
        for p in range(hosts)
      ]
    )

  data_lib.get_dataset = get_dataset  # what the tasks call (``data_lib.get_dataset``)
  tokens_lib.get_token_dataset = get_token_dataset  # the generator's token directory
  sys.argv = ['larp_jax.main', *argv]
  main._run()


def data_config():
  from larp_jax.configs import demo

  cfg = demo.get_config('tiny').data
  cfg.update(DATA_OVERRIDES)
  return cfg


def video_shape():
  from larp_jax.configs import common

  return common.TINY_VIDEO_SHAPE


def read_streams(cfg, **host) -> dict:
  """{'train': [clip ids of each step], 'eval': [clip ids of each batch, -1 = padding]}."""
  from larp_jax.data import pipeline

  out = {'train': [], 'eval': []}
  with pipeline.get_dataset(cfg, 'train', video_shape(), DATA_BATCH, seed=0, **host) as it:
    for _ in range(DATA_STEPS):
      out['train'].append(next(it)['clip_id'].tolist())
  with pipeline.get_dataset(cfg, 'eval', video_shape(), DATA_EVAL_BATCH, **host) as it:
    for b in it:
      out['eval'].append(np.where(b['mask'], b['clip_id'], -1).tolist())
  return out


def data(port: int, process_id: int, num_processes: int, out_json: str) -> None:
  from larp_jax import cli_env

  cli_env.quiet_tensorflow()
  cli_env.init_distributed(
    coordinator_address=f'localhost:{port}', num_processes=num_processes, process_id=process_id
  )
  import jax

  streams = read_streams(data_config())
  streams.update(process_index=jax.process_index(), process_count=jax.process_count())
  with open(out_json, 'w') as f:
    json.dump(streams, f)
  sys.stdout.flush()
  jax.distributed.shutdown()
  os._exit(0)  # skip the teardown of tf.data's threads (as larp_jax.main does)


if __name__ == '__main__':
  mode, *args = sys.argv[1:]
  if mode == 'reference':
    reference(int(args[0]), args[1:])
  elif mode == 'data':
    data(int(args[0]), int(args[1]), int(args[2]), args[3])
  else:
    raise SystemExit(f'unknown mode {mode!r}')
