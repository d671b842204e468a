"""What every source's `build` shares: the `Built` it returns, `split_location` (where a split's
files are), `parallel_calls` (the `num_parallel_calls` of its maps), `resumed_epochs` (the
endless training stream, started any number of elements in) and `one_pass` (a single ordered
pass over the training videos with one epoch's augmentation, for `python -m larp_jax.tokenize`)."""

import dataclasses
import os
import threading

import numpy as np
import tensorflow as tf

from larp_jax.data import video_io

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Built:
  ds: tf.data.Dataset  # unbatched {'video', 'label', 'clip_id'}
  # eval, or a training `one_pass`: planned local element count (before bad files are dropped)
  num_eval: int | None
  skip_log: video_io.SkipLog
  # Set only by `DataIterator.close()`; the source's Python functions then return placeholders.
  cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
  upscale_log: video_io.UpscaleLog | None = None  # None: the source does not track upscaling


def split_location(cfg, split: str) -> str:
  """File location of a split: `eval_path` (eval) or `path`, or its `<split name>` subfolder."""
  base = cfg.eval_path if (split == 'eval' and cfg.eval_path) else cfg.path
  name = cfg.train_split if split == 'train' else cfg.eval_split
  sub = os.path.join(base, name)
  return sub if os.path.isdir(base) and os.path.exists(sub) else base


def parallel_calls(cfg, python_decode: bool = False):
  """Parallel map calls. Default (None): one per core where each call runs Python (it holds the
  GIL part of the time, and AUTOTUNE over-subscribes small machines), AUTOTUNE for pure TF maps."""
  n = cfg.num_parallel_calls
  if n is None:
    return (os.cpu_count() or 1) if python_decode else AUTOTUNE
  return AUTOTUNE if int(n) < 0 else max(1, int(n))


def resumed_epochs(epoch, epoch_size: int, skip: int) -> tf.data.Dataset:
  """Epochs ``epoch(e)`` for e = 0, 1, ... concatenated, starting ``skip`` elements in.

  ``epoch(e)`` (e an int64 scalar tensor) is one epoch of ``epoch_size`` elements, in an order
  that depends only on e, so a resumed run (``skip = start_step * batch_size``) continues the
  uninterrupted stream exactly. Only the partial epoch is skipped element by element; the whole
  epochs before it are never built.
  """
  e0, r = divmod(int(skip), int(epoch_size))
  rest = tf.data.Dataset.range(e0 + 1, np.iinfo(np.int64).max).flat_map(epoch)
  return epoch(tf.constant(e0, tf.int64)).skip(r).concatenate(rest)


def one_pass(ds: tf.data.Dataset, train_pass: int, skip: int) -> tf.data.Dataset:
  """The host's training elements ``ds`` in their stored order, each with the epoch number
  ``train_pass`` appended (what its clip's start, crop and flip are drawn from: the same clips as
  epoch ``train_pass`` of the training stream, unshuffled), the first ``skip`` dropped before any
  decoding."""
  e = tf.constant(int(train_pass), tf.int64)
  return ds.skip(int(skip)).map(lambda *x: (*x, e))
