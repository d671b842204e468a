"""Token datasets: a frozen tokenizer's tokens of a video dataset, what the AR generator trains on.

Written by ``python -m larp_jax.tokenize`` (``larp_jax/tokenize.py``), read by
``get_token_dataset``. A token directory holds:

    manifest.json      format, the tokenizer (path, step, id), codebook_size, num_tokens,
                       video_shape, dtype, the label map, the encoding settings, and per split its
                       clip counts, label range and shards [{file, clips, sha256, pass, host}];
                       'complete' once every requested split is written
    <split>-p<pass>-h<host>-<k>.npz
                       one shard: 'tokens' [n, N] in the smallest unsigned type that holds the
                       codebook (uint8 up to 256 codes, uint16 up to 65536), 'label' int32 [n],
                       'clip_id' int32 [n]; uncompressed, written to a temporary file and renamed
    progress/host-<p>.json
                       each host's finished shards while the tokenizer runs (a shard is finished
                       when its file and its entry there exist and the file's sha256 matches)

The tokenizer's *id* (``tokenizer_id``) is a hash of its model config and of an exact integer
checksum of its variables: the same weights give the same id from a run directory, its params
export, or a copy elsewhere, on any mesh. Tokens of two tokenizers never share a directory.

A train split may hold several *passes*: pass p encodes every training video once with the clip
start, crop and flip that training epoch p of the input pipeline draws (the official AR trainer
encodes a fresh random clip of each video every epoch). Reading it, generator epoch e uses the
tokens of pass e % passes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from typing import Any, Optional

import numpy as np

from larp_jax import errors

FORMAT = 'larp_jax.tokens/1'
MANIFEST = 'manifest.json'
PROGRESS_DIR = 'progress'
SPLITS = ('train', 'eval')


def token_dtype(codebook_size: int) -> np.dtype:
  """The smallest unsigned integer type that holds the ids 0..codebook_size-1."""
  for dt in (np.uint8, np.uint16, np.uint32):
    if int(codebook_size) - 1 <= np.iinfo(dt).max:
      return np.dtype(dt)
  raise ValueError(f'codebook_size {codebook_size} does not fit in 32 bits')


def shard_name(split: str, train_pass: int, host: int, index: int) -> str:
  return f'{split}-p{int(train_pass):03d}-h{int(host):05d}-{int(index):05d}.npz'


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def file_sha256(path: str) -> Optional[str]:
  """The sha256 of a file, None when it cannot be read."""
  try:
    with open(path, 'rb') as f:
      return sha256_bytes(f.read())
  except OSError:
    return None


def write_json(path: str, obj) -> None:
  """Atomically (a temporary file renamed over ``path``)."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def write_shard(directory: str, name: str, tokens, labels, clip_ids, dtype) -> dict:
  """Writes one shard atomically; returns its entry {'file', 'clips', 'sha256'}."""
  tokens = np.asarray(tokens)
  if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
    raise ValueError(f'token ids [{tokens.min()}, {tokens.max()}] do not fit {np.dtype(dtype)}')
  buf = io.BytesIO()
  np.savez(
    buf,
    tokens=tokens.astype(dtype),
    label=np.asarray(labels, np.int32),
    clip_id=np.asarray(clip_ids, np.int32),
  )
  data = buf.getvalue()
  path = os.path.join(directory, name)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)
  return {'file': name, 'clips': int(len(tokens)), 'sha256': sha256_bytes(data)}


def read_shard(directory: str, entry: dict, *, num_tokens: int, dtype: str) -> dict:
  """The arrays of one shard, checked against its manifest entry; DataError (one line) when the
  file is missing, corrupt (sha256) or holds other shapes or types than the manifest says."""
  path = os.path.join(directory, entry['file'])
  fix = f'rerun python -m larp_jax.tokenize with --out={directory} to re-create it'
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise errors.DataError(
      f'token shard {path} cannot be read ({e.strerror or e}); {fix}'
    ) from None
  if sha256_bytes(data) != entry['sha256']:
    raise errors.DataError(
      f'token shard {path} is corrupt (its sha256 differs from {MANIFEST}); {fix}'
    )
  try:
    with np.load(io.BytesIO(data)) as z:
      out = {k: z[k] for k in ('tokens', 'label', 'clip_id')}
  except (OSError, KeyError, ValueError) as e:
    raise errors.DataError(f'token shard {path} cannot be loaded ({e}); {fix}') from None
  n = int(entry['clips'])
  if (
    out['tokens'].shape != (n, int(num_tokens))
    or str(out['tokens'].dtype) != dtype
    or out['label'].shape != (n,)
    or out['clip_id'].shape != (n,)
  ):
    raise errors.DataError(
      f'token shard {path} holds tokens {out["tokens"].dtype} {out["tokens"].shape}, not '
      f'{dtype} ({n}, {num_tokens}) as {MANIFEST} says; {fix}'
    )
  return out


# ------------------------------------------------------------------------ the tokenizer's id


def variables_checksum(variables) -> dict:
  """{'path/of/leaf': int} exact checksums of a pytree of (possibly sharded) arrays.

  The raw bits of each leaf, weighted by a hash of their flat position, summed in uint32: integer
  wrap-around sums are exact in any order, so the value does not depend on the mesh or the
  device count (float sums would)."""
  import jax
  import jax.numpy as jnp

  def leaf_sum(x):
    width = jnp.dtype(x.dtype).itemsize * 8
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{width}')).astype(jnp.uint32)
    pos = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
    weights = pos * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])

  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(variables)[0])
  sums = jax.jit(lambda xs: [leaf_sum(x) for x in xs])(list(leaves))
  out = {}
  if jax.process_count() > 1:  # the sums of sharded inputs may be sharded: gather them whole
    from jax.experimental import multihost_utils

    sums = multihost_utils.process_allgather(sums, tiled=True)
  for p, s in zip(paths, sums):
    v = np.asarray(s)
    out[jax.tree_util.keystr(p)] = [int(v[0]), int(v[1])]
  return out


def tokenizer_id(model_config, variables) -> str:
  """A short hash of the model config and the variables' exact checksum."""
  model = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  blob = json.dumps(
    {'model': model, 'variables': variables_checksum(variables)}, sort_keys=True, default=str
  )
  return sha256_bytes(blob.encode())[:16]


def describe_tokenizer(info: dict) -> str:
  return f'{info.get("path")} (step {info.get("step")}, id {info.get("id")})'


# ------------------------------------------------------------------------ manifest


def manifest_path(directory: str) -> str:
  return os.path.join(directory, MANIFEST)


def read_manifest(directory: str, *, complete: bool = True) -> dict:
  """The manifest of a token directory; DataError (one line) when there is none, it is of
  another format, or (``complete=True``) the tokenizer run that writes it has not finished."""
  path = manifest_path(directory)
  try:
    with open(path) as f:
      m = json.load(f)
  except FileNotFoundError:
    raise errors.DataError(
      f'{directory} holds no {MANIFEST}: not a token directory; create it with '
      f'python -m larp_jax.tokenize --tokenizer=... --out={directory}'
    ) from None
  except (OSError, ValueError) as e:
    raise errors.DataError(f'{path} cannot be read: {e}') from None
  if m.get('format') != FORMAT:
    raise errors.DataError(
      f'{path}: format {m.get("format")!r} is not {FORMAT!r} (written by another larp_jax?)'
    )
  if complete and not m.get('complete'):
    raise errors.DataError(
      f'{directory} is incomplete (python -m larp_jax.tokenize did not finish); rerun it with '
      f'--out={directory} to resume'
    )
  return m


def check_compatible(
  manifest,
  *,
  vocab_size: Optional[int] = None,
  num_classes: Optional[int] = None,
  num_tokens: Optional[int] = None,
) -> None:
  """What a generator checks before compiling: ConfigError / DataError (one line each).

  Args:
    manifest: a token directory or its manifest (``read_manifest``).
    vocab_size: the generator's token vocabulary: must equal the tokenizer's codebook size.
    num_classes: the generator's class count: every stored label must lie in [0, num_classes).
    num_tokens: the generator's sequence length: must equal the tokens per clip.
  """
  where = manifest if isinstance(manifest, str) else 'the token data'
  m = read_manifest(manifest) if isinstance(manifest, str) else manifest
  k, n = int(m['codebook_size']), int(m['num_tokens'])
  tok = describe_tokenizer(m['tokenizer'])
  if vocab_size is not None and int(vocab_size) != k:
    raise errors.ConfigError(
      f'{where} holds tokens of a {k}-code codebook (tokenizer {tok}) but the generator has '
      f'vocab_size {vocab_size}; set it to {k}, or tokenize with a matching tokenizer'
    )
  if num_tokens is not None and int(num_tokens) != n:
    raise errors.ConfigError(
      f'{where} holds {n} tokens per clip (tokenizer {tok}) but the generator expects '
      f'{num_tokens}; set its sequence length to {n}'
    )
  if num_classes is not None:
    for split, s in sorted(m['splits'].items()):
      lo, hi = (int(v) for v in s['label_range'])
      if lo < 0 or hi >= int(num_classes):
        bad = lo if lo < 0 else hi
        raise errors.DataError(
          f"{where} ({split}) has class id {bad}, out of range for the generator's "
          f'num_classes={num_classes} (ids 0..{int(num_classes) - 1}); the data has '
          f'{m["label_map"].get("num_classes")} classes'
        )


# ------------------------------------------------------------------------ the reader


def _load_split(directory: str, m: dict, split: str) -> list:
  """[(tokens, label, clip_id) of pass p sorted by clip_id for p in passes], shards checked."""
  if split not in m['splits']:
    raise errors.DataError(
      f'{directory} holds no {split!r} split (it has {sorted(m["splits"])}); tokenize it with '
      f'python -m larp_jax.tokenize ... --out={directory} --split={split}'
    )
  s = m['splits'][split]
  passes = []
  for p in range(int(s['passes'])):
    parts = [
      read_shard(directory, e, num_tokens=m['num_tokens'], dtype=m['dtype'])
      for e in s['shards']
      if int(e['pass']) == p
    ]
    if not parts:
      raise errors.DataError(f'{directory}: {MANIFEST} lists no shard of {split} pass {p}')
    cat = {k: np.concatenate([x[k] for x in parts]) for k in ('tokens', 'label', 'clip_id')}
    order = np.argsort(cat['clip_id'], kind='stable')
    ids = cat['clip_id'][order]
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
      dup = int(ids[1:][ids[1:] == ids[:-1]][0])
      raise errors.DataError(f'{directory}: clip_id {dup} appears twice in {split} pass {p}')
    passes.append(tuple(cat[k][order] for k in ('tokens', 'label', 'clip_id')))
  return passes


class TokenIterator:
  """Iterator of numpy batch dicts {'tokens': int32 [b, N], 'label': int32 [b], 'clip_id': int32
  [b]} (+ 'mask': bool [b] for eval); a context manager like ``data.DataIterator``.

  Attributes: ``manifest``, ``train``, ``batch_size``, ``num_batches`` (eval: batches of the pass,
  equal on every host; train: None), ``num_clips`` (this host's clips per epoch or pass).
  """

  def __init__(self, passes, *, manifest, train, batch_size, seed, start_step, num_batches):
    self.manifest = manifest
    self.train = train
    self.batch_size = int(batch_size)
    self.num_batches = num_batches
    self.num_clips = len(passes[0][0])
    self._passes = passes
    self._seed = int(seed)
    self._closed = False
    skip = int(start_step) * self.batch_size
    if train:
      cycle = sum(len(p[0]) for p in passes)  # the elements of one round over all passes
      epoch = (skip // cycle) * len(passes)
      skip %= cycle
      while skip >= self._epoch_len(epoch):
        skip -= self._epoch_len(epoch)
        epoch += 1
      self._epoch, self._pos, self._order = epoch, skip, self._epoch_order(epoch)
    else:
      self._emitted = int(start_step)

  def _epoch_len(self, e: int) -> int:
    return len(self._passes[e % len(self._passes)][0])

  def _epoch_order(self, e: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed % 2**32, int(e)])
    return rng.permutation(self._epoch_len(e))

  @property
  def closed(self) -> bool:
    return self._closed

  def close(self) -> None:
    """Drops the arrays; idempotent. Later ``next()`` calls raise RuntimeError."""
    self._closed, self._passes = True, None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __iter__(self):
    return self

  def __next__(self):
    if self._closed:
      raise RuntimeError('tokens: this TokenIterator is closed')
    return self._next_train() if self.train else self._next_eval()

  def _next_train(self) -> dict:
    chunks, need = [], self.batch_size
    while need:
      take = min(need, len(self._order) - self._pos)
      tokens, label, cid = self._passes[self._epoch % len(self._passes)]
      idx = self._order[self._pos : self._pos + take]
      chunks.append((tokens[idx], label[idx], cid[idx]))
      self._pos += take
      need -= take
      if self._pos == len(self._order):
        self._epoch += 1
        self._pos, self._order = 0, self._epoch_order(self._epoch)
    t, l, c = (np.concatenate([ch[i] for ch in chunks]) for i in range(3))
    return {'tokens': t.astype(np.int32), 'label': l.astype(np.int32), 'clip_id': c}

  def _next_eval(self) -> dict:
    if self._emitted >= self.num_batches:
      raise StopIteration
    tokens, label, cid = self._passes[0]
    b, lo = self.batch_size, self._emitted * self.batch_size
    n = max(min(len(cid) - lo, b), 0)
    pad = lambda x, fill: np.concatenate(
      [x[lo : lo + n], np.full((b - n,) + x.shape[1:], fill, x.dtype)]
    )
    self._emitted += 1
    return {
      'tokens': pad(tokens, 0).astype(np.int32),
      'label': pad(label, 0).astype(np.int32),
      'clip_id': pad(cid, -1).astype(np.int32),
      'mask': np.arange(b) < n,
    }


def get_token_dataset(
  directory: str,
  split: str,
  batch_size: int,
  seed: int = 0,
  start_step: int = 0,
  process_index: Optional[int] = None,
  process_count: Optional[int] = None,
) -> TokenIterator:
  """This host's batches of a token directory (every shard's sha256 checked on open).

  Host p of P takes the clips at positions p, p + P, ... of the split in clip_id order: disjoint
  parts that together cover it, whatever host count wrote the directory.
  split 'train': infinite; epoch e holds each of the host's clips of pass e % passes once, in an
    order fixed by (seed, e); batches are consecutive elements across epochs, so ``start_step=s``
    resumes exactly (the first batch equals batch s of the uninterrupted stream).
  split 'eval': one ordered pass; the last batch is padded (clip_id -1, 'mask' False), every host
    yields ``num_batches`` batches (a host with fewer clips pads), ``start_step`` skips batches.

  Raises:
    DataError: no or an incomplete manifest, a missing or corrupt shard, a split not written, a
      host with no clips.
  """
  import jax

  if split not in SPLITS:
    raise errors.UserError(f'tokens: split must be one of {SPLITS}, got {split!r}')
  if int(batch_size) < 1 or int(start_step) < 0:
    raise ValueError(f'tokens: batch_size must be >= 1 and start_step >= 0, got {batch_size}')
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f'tokens: process_index {pi} is not in [0, {pc})')
  directory = os.path.abspath(directory)
  m = read_manifest(directory)
  passes = _load_split(directory, m, split)
  total = len(passes[0][0])
  mine = [tuple(a[pi::pc] for a in p) for p in passes]
  if min(len(p[0]) for p in passes) < pc:  # on every host: none of them waits for the others
    raise errors.DataError(
      f'{directory} ({split}) has {total} clips, fewer than the {pc} hosts that read it'
    )
  num_batches = None
  if split == 'eval':
    num_batches = max(math.ceil(math.ceil(total / pc) / int(batch_size)) - int(start_step), 0)
  return TokenIterator(
    mine,
    manifest=m,
    train=split == 'train',
    batch_size=batch_size,
    seed=seed,
    start_step=start_step,
    num_batches=num_batches,
  )


# ------------------------------------------------------------------------ the writer's progress


class HostProgress:
  """One host's finished shards while a tokenizer run writes them (``progress/host-<p>.json``):
  {'shards': {file: entry}, 'complete': ['train/0', 'eval/0', ...]} (split/pass jobs)."""

  def __init__(self, directory: str, host: int):
    self.directory = directory
    self.path = os.path.join(directory, PROGRESS_DIR, f'host-{int(host):05d}.json')
    self.state: dict[str, Any] = {'shards': {}, 'complete': []}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.state = json.load(f)

  def save(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    write_json(self.path, self.state)

  def is_done(self, name: str) -> bool:
    """The shard's file exists, has an entry here, and its sha256 matches it."""
    e = self.state['shards'].get(name)
    return e is not None and file_sha256(os.path.join(self.directory, name)) == e['sha256']

  def add(self, entry: dict) -> None:
    self.state['shards'][entry['file']] = entry
    self.save()

  def mark_complete(self, job: str) -> None:
    if job not in self.state['complete']:
      self.state['complete'].append(job)
    self.save()

  def job_entries(self, split: str, train_pass: int) -> list:
    return sorted(
      (e for e in self.state['shards'].values() if e['split'] == split and e['pass'] == train_pass),
      key=lambda e: e['index'],
    )
