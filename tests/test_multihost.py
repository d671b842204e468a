"""Multi-host training on this machine: README's two-process command (2 processes x 2 simulated
CPU devices, one job on a 4-device mesh, collectives over gloo) against one process x 4 devices.

The single-process reference (``tests/multihost_worker.py reference``) is the same command
without the multi-host flags whose training batches are the two hosts' batches concatenated in
process order: a two-process job shuffles each host's part of the data on its own, so that is
the stream its global batches hold. Each job's processes run with different umasks (process 0:
0o022, process 1: 0o077), so a file's mode says which process created it. The generator's
test runs the same commands with the generator's config on tokens a two-process ``tokenize``
wrote, and SIGKILLs both processes after a checkpoint.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.test_cli import _env, _user_dir, readme_command_block

WORKER = os.path.join(ROOT, 'tests', 'multihost_worker.py')
TOTAL = 4
# The tiny demo run, shortened: 4 steps of a global batch of 8 (4 per host, 1 per device), no
# LPIPS in the loss (its compile is not what this file tests), a checkpoint every 2 steps.
SHORT = [
  f'--config.total_steps={TOTAL}',
  '--config.checkpoint_every=2',
  '--config.batch_size=8',
  '--config.data.synthetic_num_train=16',
  '--config.data.synthetic_num_eval=4',
  '--config.loss.lpips_weight=0',
]
# The evaluation at the end (4 clips, 2 per host): PSNR/SSIM, codebook statistics, the
# baselines and the videos; no I3D or LPIPS network (their compile costs a minute here).
EVAL = [
  f'--config.eval_every={TOTAL}',
  '--config.eval.num_clips=4',
  '--config.eval.batch_size=4',
  '--config.eval.fvd=false',
  '--config.eval.lpips=false',
  '--config.eval.num_videos_to_show=2',
]
FSDP = ['--config.mesh.data=2', '--config.mesh.fsdp=2']
UMASKS = (0o022, 0o077)
MULTIHOST_FLAGS = ('--coordinator_address', '--num_processes', '--process_id', '--multihost')
TIMEOUT = 600  # per job; a hang fails the test instead of the suite


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _readme_argv(workdir: str, port: int, process_id: int) -> list:
  """README's two-process command for ``process_id`` (its ``&`` dropped), on ``port``, in
  ``workdir``."""
  argv = [a for a in readme_command_block('--process_id=0') if a != '&']
  assert argv[:3] == ['python', '-m', 'larp_jax.main'], argv
  out = []
  for a in argv[1:]:
    if a.startswith('--coordinator_address='):
      a = f'--coordinator_address=localhost:{port}'
    elif a.startswith('--process_id='):
      a = f'--process_id={process_id}'
    elif a.startswith('--workdir='):
      a = f'--workdir={workdir}'
    out.append(a)
  return out


def _readme_env() -> dict:
  """_env() plus README's ``export`` line for the two-process command."""
  text = open(os.path.join(ROOT, 'README.md')).read()
  line = next(l for l in text.splitlines() if l.startswith('export XLA_FLAGS='))
  return dict(_env(), XLA_FLAGS=line.split('=', 1)[1])


class _Job:
  """Processes started together; every one is killed on the way out (no orphans)."""

  def __init__(self, argvs, cwd, logs, env, umasks=UMASKS):
    self.logs = logs
    self.procs = []
    for argv, log, umask in zip(argvs, logs, umasks):
      with open(log, 'w') as f:
        self.procs.append(
          subprocess.Popen(
            [sys.executable, *argv],
            cwd=cwd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            umask=umask,
          )
        )

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    for p in self.procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:  # pragma: no cover
        pass

  def log(self, i: int) -> str:
    with open(self.logs[i], errors='replace') as f:
      return f.read()

  def tails(self) -> str:
    return '\n'.join(f'--- process {i}:\n{self.log(i)[-3000:]}' for i in range(len(self.procs)))

  def wait_for(self, i: int, text: str, timeout: float = TIMEOUT) -> None:
    deadline = time.time() + timeout
    while text not in self.log(i):
      if self.procs[i].poll() is not None or time.time() > deadline:
        raise AssertionError(f'process {i} never logged {text!r}\n{self.tails()}')
      time.sleep(0.2)

  def wait(self, timeout: float = TIMEOUT) -> list:
    deadline = time.time() + timeout
    codes = []
    for p in self.procs:
      try:
        codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
      except subprocess.TimeoutExpired:
        raise AssertionError(f'job still running after {timeout} s\n{self.tails()}') from None
    return codes


def _two_processes(user, workdir, extra, name, env=None, argv_fn=_readme_argv):
  port = _free_port()
  argvs = [[*argv_fn(workdir, port, i), *extra] for i in range(2)]
  logs = [str(user / f'{name}.{i}.log') for i in range(2)]
  return _Job(argvs, user, logs, env or _readme_env())


def _reference(user, workdir, extra, name) -> str:
  """The single-process run of README's two-process command (see the module docstring)."""
  argv = _readme_argv(workdir, 0, 0)
  assert argv[:2] == ['-m', 'larp_jax.main'], argv
  argv = [a for a in argv[2:] if not a.startswith(MULTIHOST_FLAGS)]
  env = dict(_env(), XLA_FLAGS='--xla_force_host_platform_device_count=4')
  log = str(user / f'{name}.log')
  with _Job([[WORKER, 'reference', '2', *argv, *extra]], user, [log], env, (0o022,)) as job:
    assert job.wait() == [0], job.tails()
  return str(user / workdir)


def _metrics(run) -> list:
  with open(os.path.join(run, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _assert_same_losses(got, ref, *, steps=None):
  steps = steps or [r['step'] for r in ref]
  assert [g['step'] for g in got] == steps, [g['step'] for g in got]
  by_step = {r['step']: r for r in ref}
  for g in got:
    r = by_step[g['step']]
    assert set(g) == set(r)
    for k in r:
      np.testing.assert_allclose(g[k], r[k], rtol=1e-4, atol=1e-5, err_msg=f'{k} step {g["step"]}')


def _variables(params_dir) -> dict:
  """{name: numpy array} of a params directory, read onto one device."""
  import jax
  import orbax.checkpoint as ocp
  from etils import epath

  path = epath.Path(params_dir) / 'variables'
  handler = ocp.StandardCheckpointHandler()
  try:
    meta = handler.metadata(path).tree
  finally:
    handler.close()
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta
  )
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(path, target)
  return {
    jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _assert_same_params(run, ref):
  got, want = _variables(os.path.join(run, 'params')), _variables(os.path.join(ref, 'params'))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)


def _created_by(path) -> int:
  """The process (by its umask) that created ``path``."""
  return 0 if os.stat(path).st_mode & 0o044 else 1


def _files(run):
  for d, _, names in os.walk(run):
    for n in names:
      yield os.path.relpath(os.path.join(d, n), run)


@pytest.fixture(scope='module')
def user(tmp_path_factory):
  return _user_dir(tmp_path_factory.mktemp('multihost'))


@pytest.fixture(scope='module')
def reference(user):
  """The uninterrupted single-process run (4 steps, the evaluation at the end)."""
  return _reference(user, 'runs/reference', [*SHORT, *EVAL], 'reference')


def test_sigterm_to_one_process_stops_the_job_restart_matches_one_process(user, reference):
  """Two processes on an FSDP mesh (data 2 x fsdp 2): SIGTERM to process 1 alone stops both at
  the same step with a checkpoint both wrote, exit 0 (no hang). The same command again on a
  data-parallel mesh (data 4 over the processes) restores it on both and finishes: the losses
  of every step (FSDP before the stop, data-parallel after it), the evaluation (reduced over the
  hosts) and the final parameters are those of the uninterrupted single-process run. Process 0
  alone writes the logs, metrics.jsonl, TensorBoard events, config and videos."""
  run = str(user / 'runs' / 'job')
  with _two_processes(user, 'runs/job', [*SHORT, *EVAL, *FSDP], 'stop') as job:
    # Process 1 has its signal handler from here on, and the first step is still compiling.
    job.wait_for(1, 'starting at step 0')
    job.procs[1].send_signal(signal.SIGTERM)
    assert job.wait() == [0, 0], job.tails()
    logs = [job.log(0), job.log(1)]
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in logs[0]
  assert 'Received signal 15' in logs[1] and 'Received signal' not in logs[0]
  stopped = [
    int(line.split('Stopping at step ')[1].split(':')[0])
    for line in logs[0].splitlines()
    if 'Stopping at step ' in line
  ]
  assert len(stopped) == 1 and 1 <= stopped[0] < TOTAL, stopped
  step = stopped[0]
  assert f'Stopping at step {step}:' in logs[1]
  ckpt = os.path.join(run, 'checkpoints', str(step))
  assert {_created_by(os.path.join(ckpt, f)) for f in _files(ckpt)} == {0, 1}  # both wrote it
  assert [m['step'] for m in _metrics(run)] == list(range(1, step + 1))

  with _two_processes(user, 'runs/job', [*SHORT, *EVAL], 'resume') as job:
    assert job.wait() == [0, 0], job.tails()
    logs = [job.log(0), job.log(1)]
  for log in logs:
    assert (
      f"mesh {{'data': 4, 'fsdp': 1, 'tensor': 1}} on 4 devices; starting at step {step}" in log
    )
  assert f'step {TOTAL}/{TOTAL} |' in logs[0] and f'step {TOTAL}/{TOTAL} |' not in logs[1]

  _assert_same_losses(_metrics(run), _metrics(reference))
  _assert_same_params(run, reference)
  got = json.load(open(os.path.join(run, 'eval', f'{TOTAL}.json')))
  want = json.load(open(os.path.join(reference, 'eval', f'{TOTAL}.json')))
  assert got['num_clips'] == want['num_clips'] == 4
  # Not compared: the time, and the prior's statistics: the released recipe keeps the prior's
  # attention dropout on in eval, its mask drawn per row of the global batch, and the job's
  # rows hold the clips in another order (host 0's, then host 1's).
  scalars = [
    k for k, v in want.items() if isinstance(v, float) and not k.startswith(('seconds', 'prior_'))
  ]
  assert {'psnr', 'ssim', 'mse', 'codebook_usage', 'codebook_perplexity'} <= set(scalars)
  for k in scalars:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
  assert want['baselines'] and set(got['baselines']) == set(want['baselines'])
  for name, b in want['baselines'].items():
    for k, v in b.items():
      np.testing.assert_allclose(got['baselines'][name][k], v, rtol=1e-4, err_msg=f'{name} {k}')

  shared = ('checkpoints', 'params')  # Orbax: every process writes its shards
  mine = [f for f in _files(run) if not f.startswith(shared)]
  assert any(f.startswith('events.out.tfevents') for f in mine), mine
  assert any(f.endswith('.mp4') for f in mine) and 'metrics.jsonl' in mine, mine
  assert [f for f in mine if _created_by(os.path.join(run, f)) != 0] == []


def test_a_run_directory_process_0_cannot_claim_stops_both_processes(user):
  """Another trainer holds the run directory: process 0 refuses it in one line, and process 1,
  which never touches the directory, stops with it (exit 2 both) instead of waiting for process
  0 at the first collective."""
  from larp_jax import workdir as workdir_lib

  run = user / 'runs' / 'taken'
  run.mkdir(parents=True)
  with workdir_lib.Lock(str(run)):
    with _two_processes(user, 'runs/taken', SHORT, 'taken') as job:
      assert job.wait(timeout=300) == [2, 2], job.tails()
      logs = [job.log(0), job.log(1)]
  assert 'is in use by another trainer' in logs[0], logs[0][-2000:]
  assert 'process 0 could not claim the run directory' in logs[1], logs[1][-2000:]
  assert sorted(os.listdir(run)) == ['lock']  # nothing written


def test_each_host_reads_its_own_part_of_the_data(user):
  """The pipeline in a real two-process job: no clip is in both hosts' batches of a step, the
  hosts' clips of an epoch are the epoch of one process (each video once), and the evaluation
  split is covered once with as many batches on both hosts (the shorter one padded)."""
  sys.path.insert(0, os.path.dirname(WORKER))
  import multihost_worker as w

  port = _free_port()
  outs = [str(user / f'data.{i}.json') for i in range(2)]
  argvs = [[WORKER, 'data', str(port), str(i), '2', outs[i]] for i in range(2)]
  logs = [str(user / f'data.{i}.log') for i in range(2)]
  with _Job(argvs, user, logs, _readme_env()) as job:
    assert job.wait() == [0, 0], job.tails()
  hosts = [json.load(open(o)) for o in outs]
  assert [(h['process_index'], h['process_count']) for h in hosts] == [(0, 2), (1, 2)]
  one = w.read_streams(w.data_config())  # this process alone: 4 batches of 4, one epoch
  n = w.DATA_OVERRIDES['synthetic_num_train']
  assert sorted(c for b in one['train'] for c in b) == list(range(n))
  for s in range(w.DATA_STEPS):
    a, b = hosts[0]['train'][s], hosts[1]['train'][s]
    assert len(a) == len(b) == w.DATA_BATCH and not set(a) & set(b), (s, a, b)
    assert all(c % 2 == 0 for c in a) and all(c % 2 == 1 for c in b)  # host p: videos p::2
  steps_per_epoch = n // (2 * w.DATA_BATCH)  # 2: the job reads 2 epochs in its 4 steps
  for e in range(w.DATA_STEPS // steps_per_epoch):
    steps = range(e * steps_per_epoch, (e + 1) * steps_per_epoch)
    assert sorted(c for h in hosts for s in steps for c in h['train'][s]) == list(range(n)), e
  assert len(hosts[0]['eval']) == len(hosts[1]['eval']) == 2
  got = sorted(c for h in hosts for b in h['eval'] for c in b if c >= 0)
  assert got == sorted(c for b in one['eval'] for c in b if c >= 0) == list(range(5))


# ---------------------------------------------------------------- the generator
# The tiny generator (configs/demo_ar.py:tiny) over the reference run's tokenizer, from a token
# directory the two-process `tokenize` wrote. GEN_TOTAL steps of a global batch of 8, a
# checkpoint every GEN_CKPT steps; the evaluation at the end: the held-out NLL of every eval clip
# and 4 samples (classes in turn over the global batch), no gFVD. Float32 compute: the config's
# bf16 rounds the two meshes' reductions apart (measured: grad_norm 3e-4 relative by step 22).
GEN_TOTAL, GEN_CKPT = 120, 20
DATA = ['--config.data.synthetic_num_train=16', '--config.data.synthetic_num_eval=4']
GEN = [
  *DATA,
  '--config.model.dtype=float32',
  f'--config.total_steps={GEN_TOTAL}',
  f'--config.checkpoint_every={GEN_CKPT}',
  '--config.log_every=1',
  '--config.batch_size=8',
  f'--config.eval_every={GEN_TOTAL}',
  '--config.eval.batch_size=4',
  '--config.eval.nll_clips=0',
  '--config.eval.fvd_samples=0',
  '--config.eval.num_videos_to_show=4',
  '--config.sample.batch_size=4',
]


def _tokenize_argv(tokenizer, out, port, process_id):
  return [
    '-m',
    'larp_jax.tokenize',
    f'--tokenizer={tokenizer}',
    '--config=configs/demo.py:tiny',
    *DATA,
    f'--out={out}',
    '--batch_size=8',
    '--shard_size=4',
    f'--coordinator_address=localhost:{port}',
    '--num_processes=2',
    f'--process_id={process_id}',
  ]


def _split_tokens(directory, split, batches):
  from larp_jax.data import tokens as tokens_lib

  with tokens_lib.get_token_dataset(directory, split, batch_size=4, seed=0) as it:
    out = [next(it) for _ in range(batches)]
  return {k: np.concatenate([b[k] for b in out]) for k in ('tokens', 'label', 'clip_id')}


@pytest.fixture(scope='module')
def gen_tokens(user, reference):
  """The token directory a two-process `tokenize` of the reference tokenizer wrote, checked
  against the same command in this one process (the tokens of every clip, whatever host count
  wrote them)."""
  from larp_jax import tokenize
  from larp_jax.configs import demo

  out = str(user / 'tokens')
  port = _free_port()
  argvs = [_tokenize_argv(reference, out, port, i) for i in range(2)]
  logs = [str(user / f'tokenize.{i}.log') for i in range(2)]
  with _Job(argvs, user, logs, _readme_env()) as job:
    assert job.wait() == [0, 0], job.tails()
  manifest = json.load(open(os.path.join(out, 'manifest.json')))
  assert manifest['splits']['train']['num_clips'] == 16, manifest['splits']
  assert manifest['splits']['eval']['num_clips'] == 4, manifest['splits']

  one = str(user / 'tokens_one')
  c = demo.get_config('tiny')
  c.data.update(synthetic_num_train=16, synthetic_num_eval=4)
  tokenize.tokenize(reference, c, one, batch_size=8, shard_size=4)
  for split, batches in (('train', 8), ('eval', 1)):
    got, want = _split_tokens(out, split, batches), _split_tokens(one, split, batches)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'{split} {k}')
  return out


def _gen_argv_fn(reference, tokens):
  spec = f'--config=configs/demo_ar.py:tiny,tokenizer={reference},tokens={tokens}'

  def argv_fn(workdir, port, process_id):
    argv = _readme_argv(workdir, port, process_id)
    return [spec if a.startswith('--config=') else a for a in argv]

  return argv_fn


def _checkpoint_steps(run) -> list:
  d = os.path.join(run, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_generator_two_processes_sigkill_restart_matches_one_process(user, reference, gen_tokens):
  """The generator in a two-process job on the token directory both hosts wrote: SIGKILL to
  both processes once a checkpoint is on disk, the same command again restores it on both and
  finishes. Every step's losses, the final parameters, the held-out NLL (reduced over the
  hosts) and the samples (process 0 writes all of them, both hosts' rows) are those of one
  process on 4 devices fed the same batches."""
  argv_fn = _gen_argv_fn(reference, gen_tokens)
  ref_argv = [
    a for a in argv_fn('runs/gen_reference', 0, 0)[2:] if not a.startswith(MULTIHOST_FLAGS)
  ]
  env = dict(_env(), XLA_FLAGS='--xla_force_host_platform_device_count=4')
  log = str(user / 'gen_reference.log')
  with _Job([[WORKER, 'reference', '2', *ref_argv, *GEN]], user, [log], env, (0o022,)) as job:
    assert job.wait() == [0], job.tails()
  ref = str(user / 'runs' / 'gen_reference')

  run = str(user / 'runs' / 'gen_job')
  with _two_processes(user, 'runs/gen_job', GEN, 'gen_kill', argv_fn=argv_fn) as job:
    deadline = time.time() + TIMEOUT
    while not _checkpoint_steps(run):
      assert all(p.poll() is None for p in job.procs), job.tails()
      assert time.time() < deadline, job.tails()
      time.sleep(0.05)
    for p in job.procs:
      p.send_signal(signal.SIGKILL)
    assert job.wait() == [-signal.SIGKILL] * 2, job.tails()
  killed_at = _checkpoint_steps(run)[-1]
  assert killed_at < GEN_TOTAL and not os.path.exists(os.path.join(run, 'params'))

  with _two_processes(user, 'runs/gen_job', GEN, 'gen_resume', argv_fn=argv_fn) as job:
    assert job.wait() == [0, 0], job.tails()
    logs = [job.log(0), job.log(1)]
  for log in logs:
    assert f'starting at step {killed_at}' in log, log[-3000:]

  _assert_same_losses(_metrics(run), _metrics(ref))
  _assert_same_params(run, ref)
  got = json.load(open(os.path.join(run, 'eval', f'{GEN_TOTAL}.json')))
  want = json.load(open(os.path.join(ref, 'eval', f'{GEN_TOTAL}.json')))
  assert got['nll_clips'] == want['nll_clips'] == 4  # every eval clip
  for k in ('token_nll', 'token_top1'):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
  samples = [
    np.load(os.path.join(r, 'eval', f'{GEN_TOTAL}_samples_tokens.npz')) for r in (run, ref)
  ]
  assert samples[0]['labels'].tolist() == samples[1]['labels'].tolist() == [0, 1, 2, 3]
  np.testing.assert_array_equal(samples[0]['tokens'], samples[1]['tokens'])
  np.testing.assert_allclose(samples[0]['logprobs'], samples[1]['logprobs'], rtol=1e-4, atol=1e-5)
  shared = ('checkpoints', 'params')
  mine = [f for f in _files(run) if not f.startswith(shared)]
  assert 'metrics.jsonl' in mine and any(f.endswith('.png') for f in mine), mine
  assert [f for f in mine if _created_by(os.path.join(run, f)) != 0] == []
