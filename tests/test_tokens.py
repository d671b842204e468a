"""Token datasets (larp_jax/data/tokens.py) and `python -m larp_jax.tokenize` (larp_jax/tokenize.py):
format, dtype, the tokens against `load_tokenizer(...).encode`, resume after a kill, refusals, the
reader's resume and host split, the generator's compatibility checks, and the command as README
shows it. Tiny tokenizers with random weights, a few synthetic clips."""

import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import larp_jax
from larp_jax import data, errors
from larp_jax import tokenize as tokenize_lib
from larp_jax.configs import demo
from larp_jax.data import tokens
from larp_jax.models.tokenizer import LARPTokenizer
from larp_jax.tasks import tokenizer as tokenizer_task
from tests.conftest import ROOT

NUM_TRAIN, NUM_EVAL = 10, 5
BATCH = 4  # one batch per shard (shard_size=BATCH): train shards 4, 4, 2; eval 4, 1


def _config():
  c = demo.get_config('tiny,lpips=false')
  c.model.video_shape = (4, 16, 16)
  c.data.update(
    synthetic_num_train=NUM_TRAIN,
    synthetic_num_eval=NUM_EVAL,
    synthetic_num_frames=8,
    num_parallel_calls=1,
  )
  return c


def _save_tokenizers(path_a, path_b, seed):
  """Params directories of two tiny tokenizers: A with the encoding path initialised by the model
  (only that is compiled, which is fast), the decoder and prior random (they do not encode); B
  the same with a perturbed codebook."""
  c = _config()
  model = tokenizer_task.make_model(c.model)
  abstract = jax.eval_shape(lambda: nn.unbox(tokenizer_task.boxed_variables(model, 0)))
  video = jnp.zeros((1, *model.video_shape, 3))
  enc = nn.unbox(model.init(jax.random.key(seed), video, method=LARPTokenizer.encode))['params']
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.1, s.dtype), abstract)
  params = dict(params['params'], **enc)
  larp_jax.Tokenizer(model=model, params=params, config=c, step=2).save(path_a)
  cb = params['quantizer']['codebook']
  params['quantizer'] = {'codebook': cb + 0.01 * jnp.asarray(rng.normal(size=cb.shape), cb.dtype)}
  larp_jax.Tokenizer(model=model, params=params, config=c, step=2).save(path_b)
  return path_a, path_b


def _run(tok, out, **kw):
  kw.setdefault('batch_size', BATCH)
  kw.setdefault('shard_size', BATCH)
  config = kw.pop('config', None) or tokenize_lib.config_from_tokenizer(tok)
  return tokenize_lib.tokenize(tok, config, out, **kw)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp('tokens')
  tok_a, tok_b = _save_tokenizers(str(d / 'tok_a'), str(d / 'tok_b'), 1)  # codes vary over clips
  full = str(d / 'full')
  manifest = _run(tok_a, full)
  return {'dir': d, 'a': tok_a, 'b': tok_b, 'full': full, 'manifest': manifest}


def _shas(m):
  return {s: [(e['file'], e['sha256']) for e in v['shards']] for s, v in m['splits'].items()}


# ------------------------------------------------------------------------ format


def test_token_dtype_is_the_smallest_unsigned_type():
  assert tokens.token_dtype(2) == np.uint8 and tokens.token_dtype(256) == np.uint8
  assert tokens.token_dtype(257) == np.uint16 and tokens.token_dtype(65536) == np.uint16
  assert tokens.token_dtype(65537) == np.uint32


def test_shard_round_trip_and_corruption(tmp_path):
  ids = np.array([[0, 299, 7], [256, 1, 2]])
  e = tokens.write_shard(str(tmp_path), 's.npz', ids, [3, 4], [10, 11], tokens.token_dtype(300))
  assert e['clips'] == 2 and not [p for p in os.listdir(tmp_path) if 'tmp' in p]
  got = tokens.read_shard(str(tmp_path), e, num_tokens=3, dtype='uint16')
  assert got['tokens'].dtype == np.uint16
  np.testing.assert_array_equal(got['tokens'], ids)
  np.testing.assert_array_equal(got['label'], [3, 4])
  np.testing.assert_array_equal(got['clip_id'], [10, 11])
  with pytest.raises(errors.DataError, match='uint16 \\(2, 4\\)'):
    tokens.read_shard(str(tmp_path), e, num_tokens=4, dtype='uint16')
  raw = bytearray((tmp_path / 's.npz').read_bytes())
  raw[-5] ^= 1
  (tmp_path / 's.npz').write_bytes(bytes(raw))
  with pytest.raises(errors.DataError, match='s.npz is corrupt'):
    tokens.read_shard(str(tmp_path), e, num_tokens=3, dtype='uint16')


def test_manifest_describes_tokenizer_splits_and_labels(setup):
  m = tokens.read_manifest(setup['full'])
  assert m['complete'] and m['format'] == tokens.FORMAT
  assert (m['codebook_size'], m['num_tokens'], m['dtype']) == (64, 8, 'uint8')
  assert m['video_shape'] == [4, 16, 16]
  t = m['tokenizer']
  assert t['path'] == setup['a'] and t['step'] == 2 and t['kind'] == 'params' and len(t['id']) == 16
  assert [e['clips'] for e in m['splits']['train']['shards']] == [4, 4, 2]
  assert [e['clips'] for e in m['splits']['eval']['shards']] == [4, 1]
  assert m['splits']['train']['num_clips'] == NUM_TRAIN and m['splits']['eval']['num_clips'] == 5
  assert m['label_map']['num_classes'] == 10 and m['label_map']['classes'][0] == 'bounce_h'
  assert m['splits']['train']['label_range'] == [0, 9]
  assert m['splits']['eval']['label_range'] == [0, 4]
  shard = np.load(os.path.join(setup['full'], m['splits']['train']['shards'][0]['file']))
  assert shard['tokens'].dtype == np.uint8 and shard['label'].dtype == np.int32


def test_tokens_equal_load_tokenizer_encode_of_the_same_clips(setup):
  tok = larp_jax.load_tokenizer(setup['a'])
  cfg = _config().data
  for split, kw in (('eval', {}), ('train', {'train_pass': 0})):
    with data.get_dataset(cfg, split, (4, 16, 16), 16, seed=0, **kw) as it:
      b = next(it)
    keep = b['mask']
    want = np.asarray(tok.encode(b['video'][keep]))
    order = np.argsort(b['clip_id'][keep])
    with tokens.get_token_dataset(setup['full'], split, 16) as r:
      got = next(r)  # eval: in clip_id order; train: one epoch (10 clips) shuffled, then more
    n = len(want)
    got_order = np.argsort(got['clip_id'][:n])
    np.testing.assert_array_equal(got['clip_id'][:n][got_order], np.sort(b['clip_id'][keep]))
    np.testing.assert_array_equal(got['tokens'][:n][got_order], want[order])
    np.testing.assert_array_equal(got['label'][:n][got_order], b['label'][keep][order])
    assert len(np.unique(want, axis=0)) >= 3  # the clips' codes differ: the order is tested
    assert r.closed


def test_resume_after_a_kill_redoes_no_finished_shard(setup, tmp_path):
  out = str(tmp_path / 'killed')
  written = []

  def kill_after_two(entry):
    written.append(entry['file'])
    if len(written) == 2:
      raise KeyboardInterrupt  # as a kill: nothing after this shard runs

  with pytest.raises(KeyboardInterrupt):
    _run(setup['a'], out, on_shard=kill_after_two)
  with pytest.raises(errors.DataError, match='incomplete'):
    tokens.get_token_dataset(out, 'train', 2)
  mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in written}
  # The crash window: a shard renamed into place whose progress entry was not yet written.
  tokens.write_shard(out, tokens.shard_name('train', 0, 0, 2), np.ones((1, 8)), [0], [0], np.uint8)
  m = _run(setup['a'], out)
  # 3 train + 2 eval shards of one batch each; the first two were finished before the kill.
  assert m['stats'] == {'encoded_batches': 3, 'written_shards': 3, 'kept_shards': 0}
  assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in written} == mtimes
  assert _shas(m) == _shas(setup['manifest'])  # identical to the uninterrupted run
  again = _run(setup['a'], out)  # a finished directory: nothing to do
  assert again['stats']['encoded_batches'] == 0


def test_unfinished_shards_become_runs_each_encoded_from_its_own_start():
  assert tokenize_lib._runs([1, 2, 5], 7) == [(1, 3), (5, 6), (7, None)]
  assert tokenize_lib._runs([1, 2], 3) == [(1, None)]
  assert tokenize_lib._runs([], 0) == [(0, None)] and tokenize_lib._runs([4], None) == [(4, 5)]


def test_another_tokenizer_or_other_settings_are_refused_in_one_line(setup):
  with pytest.raises(errors.UserError) as e:
    _run(setup['b'], setup['full'])
  msg = str(e.value)
  assert setup['a'] in msg and setup['b'] in msg and 'another tokenizer' in msg
  assert '\n' not in msg
  cfg = tokenize_lib.config_from_tokenizer(setup['a'])
  cfg.data.synthetic_num_train = 12
  with pytest.raises(errors.UserError, match='synthetic_num_train: 10 there, 12 now'):
    _run(setup['a'], setup['full'], config=cfg)
  # --overwrite replaces them (checked on a copy).
  copy = str(setup['dir'] / 'overwritten')
  shutil.copytree(setup['full'], copy)
  m = _run(setup['b'], copy, overwrite=True, split='eval')
  assert m['tokenizer']['path'] == setup['b'] and set(m['splits']) == {'eval'}
  assert not [f for f in os.listdir(copy) if f.startswith('train-')]


def test_a_corrupt_or_missing_shard_is_a_data_error_and_a_rerun_repairs_it(setup, tmp_path):
  out = str(tmp_path / 'copy')
  shutil.copytree(setup['full'], out)
  bad = setup['manifest']['splits']['train']['shards'][1]['file']
  with open(os.path.join(out, bad), 'r+b') as f:
    f.seek(-3, 2)
    f.write(b'xyz')
  with pytest.raises(errors.DataError, match=f'{bad} is corrupt'):
    tokens.get_token_dataset(out, 'train', 2)
  m = _run(setup['a'], out)
  assert m['stats'] == {'encoded_batches': 1, 'written_shards': 1, 'kept_shards': 0}
  assert _shas(m) == _shas(setup['manifest'])
  os.remove(os.path.join(out, bad))
  with pytest.raises(errors.DataError, match='cannot be read'):
    tokens.get_token_dataset(out, 'train', 2)


def test_more_train_passes_keep_the_first_and_differ_from_it(setup, tmp_path):
  out = str(tmp_path / 'passes')
  shutil.copytree(setup['full'], out)
  m = _run(setup['a'], out, split='train', passes=2)
  assert m['stats']['encoded_batches'] == 3  # pass 0 kept, pass 1 encoded
  s = m['splits']['train']
  assert s['passes'] == 2 and s['clips_per_pass'] == [NUM_TRAIN, NUM_TRAIN]
  assert set(m['splits']) == {'train', 'eval'}  # eval kept from the first run
  p0, p1 = tokens._load_split(out, m, 'train')
  np.testing.assert_array_equal(p0[2], p1[2])  # the same clips, other starts and flips
  assert (p0[0] != p1[0]).any(axis=1).sum() >= 3
  # Reader: epoch e reads pass e % 2, every clip once per epoch.
  with tokens.get_token_dataset(out, 'train', NUM_TRAIN, seed=3) as it:
    e0, e1 = next(it), next(it)
  for got, (tok, _, cid) in ((e0, p0), (e1, p1)):
    order = np.argsort(got['clip_id'])
    np.testing.assert_array_equal(got['clip_id'][order], cid)
    np.testing.assert_array_equal(got['tokens'][order], tok)


# ------------------------------------------------------------------------ reader


def test_reader_resumes_exactly_and_shuffles_per_epoch(setup):
  def take(n, **kw):
    with tokens.get_token_dataset(setup['full'], 'train', 3, seed=5, **kw) as it:
      return [next(it) for _ in range(n)]

  full, resumed = take(9), take(4, start_step=5)
  for a, b in zip(full[5:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  b0 = full[0]
  assert b0['tokens'].dtype == np.int32 and b0['tokens'].shape == (3, 8)
  ids = np.concatenate([b['clip_id'] for b in full])  # 27 = 2 epochs of 10 + 7
  assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:20]) == list(range(10))
  assert list(ids[:10]) != list(ids[10:20])  # another order each epoch


def test_reader_hosts_are_disjoint_and_cover_the_split(setup):
  for split in ('train', 'eval'):
    seen, batches = [], []
    for h in range(3):
      it = tokens.get_token_dataset(setup['full'], split, 2, process_index=h, process_count=3)
      if split == 'eval':
        got = list(it)
        batches.append(len(got))
        seen.append([int(i) for b in got for i in b['clip_id'][b['mask']]])
      else:
        seen.append([int(i) for _ in range(2) for i in next(it)['clip_id']][: it.num_clips])
    n = NUM_TRAIN if split == 'train' else NUM_EVAL
    assert sorted(sum(seen, [])) == list(range(n)), seen
    if split == 'eval':
      assert batches == [1, 1, 1]  # ceil(ceil(5 / 3) / 2): every host in step
  with pytest.raises(errors.DataError, match='fewer than the 6 hosts'):
    tokens.get_token_dataset(setup['full'], 'eval', 2, process_index=0, process_count=6)


def test_check_compatible_gives_one_line_before_compiling(setup):
  full = setup['full']
  tokens.check_compatible(full, vocab_size=64, num_classes=10, num_tokens=8)
  with pytest.raises(errors.ConfigError, match='64-code codebook .* vocab_size 8192; set it to 64'):
    tokens.check_compatible(full, vocab_size=8192)
  with pytest.raises(errors.ConfigError, match='8 tokens per clip .* expects 1024'):
    tokens.check_compatible(full, num_tokens=1024)
  with pytest.raises(errors.DataError, match='class id 9, out of range .* num_classes=5'):
    tokens.check_compatible(tokens.read_manifest(full), num_classes=5)


# ------------------------------------------------------------------------ the command


def test_cli_command_as_readme_shows_it(setup, tmp_path):
  """On 2 (simulated) devices with the variables split over 'fsdp': the same tokens as the
  one-device run for the same clips."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONUNBUFFERED='1',
    JAX_DISABLE_MOST_OPTIMIZATIONS='1',
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
  )
  out = str(tmp_path / 'tokens')
  cmd = [sys.executable, '-m', 'larp_jax.tokenize', f'--tokenizer={setup["a"]}', f'--out={out}']
  small = [
    '--config.data.synthetic_num_train=6',
    '--config.data.synthetic_num_eval=3',
    '--batch_size=2',
    '--config.mesh.data=1',
    '--config.mesh.fsdp=2',
  ]
  r = subprocess.run(cmd + small, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'wrote eval 3 clips, train 6 clips (uint8 tokens, 8 per clip)' in r.stdout
  assert 'clips/s, ETA' in r.stderr and 'orbax' not in r.stderr.lower()
  for split in ('train', 'eval'):  # synthetic video i does not depend on the split's size
    (got,) = tokens._load_split(out, tokens.read_manifest(out), split)
    (ref,) = tokens._load_split(setup['full'], setup['manifest'], split)
    n = len(got[2])
    assert n == (6 if split == 'train' else 3)
    np.testing.assert_array_equal(got[2], ref[2][:n])
    np.testing.assert_array_equal(got[0], ref[0][:n])
  cmd_b = [c.replace(setup['a'], setup['b']) for c in cmd]
  r = subprocess.run(cmd_b + small, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), r.stderr
  assert setup['a'] in lines[0] and setup['b'] in lines[0]


@pytest.mark.parametrize(
  'args, foreign_out, needle',
  [
    (['--tokenizer='], False, '--tokenizer is required'),
    (['--config.data.synthetic_num_trai=3'], False, 'did you mean data.synthetic_num_train'),
    (['--split=val'], False, 'value should be one of <train|eval|both>'),
    ([], True, "holds no manifest.json (e.g. 'notes.txt'); choose a new or empty directory"),
  ],
)
def test_command_mistakes_are_one_error_line(setup, tmp_path, capsys, args, foreign_out, needle):
  out = tmp_path / 'out'
  if foreign_out:  # a directory that holds other things is never written into
    out.mkdir()
    (out / 'notes.txt').write_text('')
  assert tokenize_lib.main([f'--tokenizer={setup["a"]}', f'--out={out}', *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and needle in err[0], err
  assert foreign_out or not out.exists()
