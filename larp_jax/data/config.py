"""Data config: defaults and up-front validation (one clear `DataError` line per problem)."""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from larp_jax.errors import DataError

SOURCES = ('synthetic', 'tfds', 'folder', 'records')
SPLITS = ('train', 'eval')


def default_config() -> ml_collections.ConfigDict:
  """Every field the input pipeline reads, with defaults that need nothing on disk.

  Optional fields are typed placeholders (None until set) so `--config.data.path=...` works.
  """
  c = ml_collections.ConfigDict()
  c.source = 'synthetic'  # one of SOURCES
  c.path = placeholder(
    str
  )  # folder/records: a directory or CSV (folder), or a `prepare` output dir (records)
  c.eval_path = placeholder(
    str
  )  # eval split location; None = `path` (or `path/<eval_split>` if that exists)
  c.csv_root = placeholder(str)  # base for relative paths in a CSV; None = the CSV file's directory
  c.tfds_name = 'ucf101'
  c.tfds_data_dir = placeholder(str)  # None unless set
  c.tfds_video_key = 'video'
  c.tfds_label_key = 'label'
  c.train_split = 'train'
  c.eval_split = 'test'
  # Clip sampling and augmentation (as the official datasets/video_dataset.py).
  c.frame_stride = 1  # temporal stride between the T frames (1 = native fps)
  c.short_side = placeholder(
    int
  )  # resize the short side to this (antialiased); None = smallest cover of (H, W)
  c.train_crop = 'center'  # 'center' | 'random'
  c.flip = True  # random horizontal flip (training only)
  c.eval_chunks = 'first'  # 'first': one clip per video from frame 0; 'all': non-overlapping chunks
  # tf.data knobs.
  c.shuffle_buffer = 256  # records/tfds: whole videos are buffered (index sources permute fully)
  c.num_parallel_calls = (
    None  # None = cores (synthetic/folder) or AUTOTUNE (records/tfds); -1 = AUTOTUNE
  )
  c.prefetch = 2  # batches
  # Synthetic source.
  c.synthetic_num_train = 50_000
  c.synthetic_num_eval = 1_000
  c.synthetic_num_classes = 10  # 10 motion classes; up to 50 (motion x hero shape)
  c.synthetic_num_frames = 64  # length of each synthetic video; train clips start at random in it
  c.synthetic_style = 'textured'  # 'textured' | 'simple' (smooth backgrounds, solid objects)
  c.synthetic_seed = 0  # content seed (the `seed` argument of get_dataset only orders/augments)
  return c


def validate(cfg, split: str, video_shape) -> None:
  """Raises DataError (one line) on a config that cannot work; cheap, touches no data."""

  def bad(msg):
    raise DataError(f'data config: {msg}')

  if cfg.source not in SOURCES:
    bad(f'unknown source {cfg.source!r}; expected one of {SOURCES}')
  if split not in SPLITS:
    bad(f'unknown split {split!r}; expected one of {SPLITS}')
  if len(tuple(video_shape)) != 3 or any(int(d) < 1 for d in video_shape):
    bad(f'video_shape must be (T, H, W) of positive ints, got {video_shape!r}')
  if cfg.source in ('folder', 'records'):
    p = cfg.eval_path if (split == 'eval' and cfg.eval_path) else cfg.path
    if not p:
      bad(f'source {cfg.source!r} needs config.data.path')
    if not os.path.exists(p):
      bad(f'path does not exist: {p!r}')
  if cfg.source == 'tfds' and not cfg.tfds_name:
    bad('source "tfds" needs config.data.tfds_name')
  if cfg.train_crop not in ('center', 'random'):
    bad(f'train_crop must be "center" or "random", got {cfg.train_crop!r}')
  if cfg.eval_chunks not in ('first', 'all'):
    bad(f'eval_chunks must be "first" or "all", got {cfg.eval_chunks!r}')
  if int(cfg.frame_stride) < 1:
    bad(f'frame_stride must be >= 1, got {cfg.frame_stride}')
  if cfg.short_side is not None and int(cfg.short_side) < 1:
    bad(f'short_side must be None or >= 1, got {cfg.short_side}')
  if not 2 <= int(cfg.synthetic_num_classes) <= 50:
    bad(f'synthetic_num_classes must be in [2, 50], got {cfg.synthetic_num_classes}')
  if cfg.synthetic_style not in ('textured', 'simple'):
    bad(f'synthetic_style must be "textured" or "simple", got {cfg.synthetic_style!r}')
  if cfg.source == 'synthetic' and int(cfg.synthetic_num_frames) < 1:
    bad('synthetic_num_frames must be >= 1')
  if int(cfg.shuffle_buffer) < 1 or int(cfg.prefetch) < 0:
    bad('shuffle_buffer must be >= 1 and prefetch >= 0')
