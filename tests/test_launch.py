"""The launch scripts (`launch/`): their dry runs, the commands they run, their refusals.

No gcloud, srun or GPU is needed: a dry run prints every command ('+ ...', one per line, in
shell quoting) and runs none, and the real runs here go to fake `gcloud` / `git` / `srun` /
python executables on PATH that record their arguments, so what a script prints is checked
against what it runs.
"""

import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = ('tpu_pod.sh', 'slurm.sbatch', 'gpu.sh')
README = os.path.join(ROOT, 'README.md')
TPU_FLAGS = [
  '--name=larp-v4',
  '--zone=us-central2-b',
  '--accelerator-type=v4-32',
  '--config=configs/ucf101.py:source=records',
  '--workdir=gs://my-bucket/runs/larp_l',
]


def jax_pin() -> str:
  for line in open(os.path.join(ROOT, 'requirements.txt')):
    if line.startswith('jax=='):
      return line.strip().split('==', 1)[1]
  raise AssertionError('requirements.txt has no jax== line')


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'LARP_'))}
  env.update(extra)
  return env


@pytest.fixture(autouse=True)
def _no_real_tools(tmp_path, monkeypatch):
  """Every test's scripts find fake gcloud / git / srun / pip-running pythons first on PATH, so a
  dry run that wrongly runs a command records it instead of installing or creating anything."""
  env, log = fake_bin(tmp_path / 'guard', 'gcloud', 'git', 'srun', 'sbatch', 'python', 'python3')
  monkeypatch.setenv('PATH', env['PATH'])
  yield
  assert calls(log) == [], 'a command ran that the test did not fake on purpose'


def launch(script, *args, env=None, cwd=None):
  """Runs launch/<script> with bash; returns (exit code, commands printed as argv lists,
  stdout, stderr)."""
  proc = subprocess.run(
    ['bash', os.path.join(LAUNCH, script), *args],
    capture_output=True,
    text=True,
    env=env or _env(),
    cwd=cwd or ROOT,
    timeout=60,
  )
  commands = [shlex.split(l[2:]) for l in proc.stdout.splitlines() if l.startswith('+ ')]
  return proc.returncode, commands, proc.stdout, proc.stderr


def remote(cmd) -> str:
  """The shell command line of a `gcloud ... ssh --worker=all --command=...`."""
  assert cmd[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], cmd
  assert '--worker=all' in cmd, cmd
  (line,) = [a[len('--command=') :] for a in cmd if a.startswith('--command=')]
  return line


def main_argv(line: str) -> list:
  """The `python -m larp_jax.main ...` words inside a shell command line."""
  words = shlex.split(line)
  i = words.index('larp_jax.main')
  end = next((j for j in range(i, len(words)) if words[j] in ('2>&1', '|', '&&', ';')), None)
  return words[i - 2 : end]


def fake_bin(tmp_path, *names, describe='NONE'):
  """Executables that append their argv to calls.log; a fake gcloud answers `describe`."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(parents=True, exist_ok=True)
  log = tmp_path / 'calls.log'
  script = f"""#!/usr/bin/env bash
{{ printf %s "${{0##*/}}"; printf '\\x1f%s' "$@"; echo; }} >>{shlex.quote(str(log))}
if [[ "$*" == 'compute tpus tpu-vm describe '* ]]; then
  [[ {describe} != NONE ]] || exit 1
  printf '%s\\tv4-32\\n' {describe}
fi
"""
  for name in names:
    path = bin_dir / name
    path.write_text(script)
    path.chmod(0o755)
  env = _env(PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  return env, log


def calls(log) -> list:
  return [l.rstrip('\n').split('\x1f') for l in open(log)] if os.path.exists(log) else []


# ------------------------------------------------------------------------------------ all
@pytest.mark.parametrize('script', SCRIPTS)
def test_help(script):
  rc, commands, out, err = launch(script, '--help')
  assert rc == 0 and out.startswith('Usage:') and '--dry-run' in out and not commands, err


@pytest.mark.parametrize(
  'script,args,message',
  [
    ('tpu_pod.sh', [a for a in TPU_FLAGS if not a.startswith('--zone')], '--zone is required'),
    ('tpu_pod.sh', TPU_FLAGS + ['--bogus'], 'unknown argument --bogus'),
    ('tpu_pod.sh', TPU_FLAGS + ['--spot=yes'], '--spot takes no value'),
    ('tpu_pod.sh', TPU_FLAGS + ['--spot', '--preemptible'], 'exclude each other'),
    ('tpu_pod.sh', TPU_FLAGS + ['--accelerator-type=v4'], 'not a slice type'),
    ('tpu_pod.sh', TPU_FLAGS + ['--workdir=runs/x'], 'absolute path that every worker'),
    ('tpu_pod.sh', TPU_FLAGS + ['--config=configs/nope.py'], 'there is no file configs/nope.py'),
    ('tpu_pod.sh', TPU_FLAGS + ['--accelerator-type=v9-8'], 'no default --version'),
    ('tpu_pod.sh', TPU_FLAGS + ['--retries'], '--retries needs a value'),
    ('slurm.sbatch', ['--workdir=/w'], '--config is required'),
    (
      'slurm.sbatch',
      ['--config=configs/ucf101.py', '--workdir=/w', '--gpus-per-node=0'],
      'not a positive',
    ),
    ('gpu.sh', ['--config=configs/ucf101.py'], '--workdir is required'),
    ('gpu.sh', ['--config=configs/ucf101.py', '--workdir=w', '--gpus=a'], '--gpus=a'),
  ],
)
def test_bad_flags_are_one_line(script, args, message):
  rc, commands, out, err = launch(script, '--dry-run', *args)
  assert rc == 2 and not commands, (out, err)
  assert err.startswith('error: ') and message in err and err.count('\n') == 1, err


@pytest.mark.skipif(not shutil.which('shellcheck'), reason='shellcheck not installed')
def test_shellcheck():
  proc = subprocess.run(
    ['shellcheck', *(os.path.join(LAUNCH, s) for s in SCRIPTS)], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_runs_run_nothing(tmp_path):
  env, log = fake_bin(tmp_path, 'gcloud', 'git', 'srun', 'python3')
  for script, args in [
    ('tpu_pod.sh', TPU_FLAGS + ['--spot', '--assume-state=PREEMPTED']),
    ('slurm.sbatch', ['--config=configs/ucf101.py', '--workdir=/w']),
    ('gpu.sh', ['--install', '--config=configs/ucf101.py', '--workdir=runs/x']),
  ]:
    rc, commands, out, err = launch(script, '--dry-run', *args, env=env)
    assert rc == 0 and commands, (script, out, err)
  assert calls(log) == []


# ------------------------------------------------------------------------------------ TPU
def test_tpu_dry_run_creates_installs_and_trains_on_every_worker():
  rc, commands, out, err = launch(
    'tpu_pod.sh',
    '--dry-run',
    *TPU_FLAGS,
    '--extra=--config.model.dtype=bfloat16 --config.model.remat=full',
    '--',
    '--config.data.path=/gcs/my data',
  )
  assert rc == 0, err
  gcloud = [c[4] for c in commands if c[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm']]
  assert gcloud[:3] == ['describe', 'create', 'scp'], gcloud
  create = commands[1]
  assert '--accelerator-type=v4-32' in create and '--version=tpu-ubuntu2204-base' in create
  assert '--spot' not in create and '--zone=us-central2-b' in create
  assert any(c[:2] == ['git', '-C'] and 'archive' in c for c in commands)
  ssh = [remote(c) for c in commands if c[4:5] == ['ssh']]
  install = [l for l in ssh if 'pip install' in l]
  assert len(install) == 1 and f"'jax[tpu]=={jax_pin()}'" in install[0], install
  assert '-r larp_jax/requirements.txt' in install[0]
  (train,) = [l for l in ssh if 'larp_jax.main' in l]
  assert main_argv(train) == [
    '../larp_jax_venv/bin/python',
    '-m',
    'larp_jax.main',
    '--config=configs/ucf101.py:source=records',
    '--workdir=/gcs/my-bucket/runs/larp_l',  # gs:// -> the bucket's gcsfuse mount
    '--multihost',
    '--config.model.dtype=bfloat16',
    '--config.model.remat=full',
    '--config.data.path=/gcs/my data',
  ]
  assert 'tee -a ../larp_logs/larp-v4/$(hostname).log' in train  # one log per worker
  mount = [l for l in ssh if 'gcsfuse ' in l and 'mountpoint' in l]
  assert len(mount) == 1 and 'my-bucket /gcs/my-bucket' in mount[0]
  assert ssh.index(mount[0]) < ssh.index(train)
  assert commands[-1][4] == 'scp' and commands[-1][5] == 'larp-v4:larp_logs/larp-v4/*'


@pytest.mark.parametrize('flag', ['--spot', '--preemptible'])
def test_tpu_preempted_slice_is_recreated_with_spot(flag):
  rc, commands, out, err = launch(
    'tpu_pod.sh', '--dry-run', *TPU_FLAGS, flag, '--assume-state=PREEMPTED'
  )
  assert rc == 0, err
  verbs = [c[4] for c in commands[:3]]
  assert verbs == ['describe', 'delete', 'create'], commands[:3]
  assert commands[1][5] == 'larp-v4' and '--quiet' in commands[1]
  assert flag in commands[2]
  rc, commands, out, err = launch('tpu_pod.sh', '--dry-run', *TPU_FLAGS, '--assume-state=PREEMPTED')
  assert rc == 2 and [c[4] for c in commands] == ['describe'], out
  assert 'is PREEMPTED; pass --spot' in err


def test_tpu_ready_slice_is_reused_and_skip_install():
  rc, commands, out, err = launch(
    'tpu_pod.sh', '--dry-run', *TPU_FLAGS, '--spot', '--assume-state=READY', '--skip-install'
  )
  assert rc == 0, err
  verbs = [c[4] for c in commands if c[0] == 'gcloud']
  assert 'create' not in verbs and 'delete' not in verbs
  assert not any('pip install' in ' '.join(c) or 'archive' in c for c in commands)
  assert any('larp_jax.main' in ' '.join(c) for c in commands)


def test_tpu_defaults_version_per_generation_and_clone():
  rc, commands, out, err = launch(
    'tpu_pod.sh',
    '--dry-run',
    *TPU_FLAGS,
    '--accelerator-type=v5litepod-64',
    '--workdir=/mnt/nfs/runs/x',
    '--repo=https://example.org/larp_jax.git',
    '--ref=v1',
    '--project=my-proj',
  )
  assert rc == 0, err
  assert '--version=v2-alpha-tpuv5-lite' in commands[1]
  assert all('--project=my-proj' in c for c in commands if c[0] == 'gcloud')
  ssh = [remote(c) for c in commands if c[4:5] == ['ssh']]
  assert 'git clone --quiet https://example.org/larp_jax.git larp_jax' in ssh[0]
  assert 'checkout --quiet v1' in ssh[0]
  assert not any('gcsfuse' in l for l in ssh)  # an NFS path needs no mount
  assert '--workdir=/mnt/nfs/runs/x' in main_argv(ssh[-1])


def test_tpu_real_run_runs_what_it_prints(tmp_path):
  env, log = fake_bin(tmp_path, 'gcloud', 'git', describe='PREEMPTED')
  rc, commands, out, err = launch(
    'tpu_pod.sh', *TPU_FLAGS, '--spot', f'--logs={tmp_path}/logs', env=env
  )
  assert rc == 0, err
  printed = [c for c in commands if c[0] in ('gcloud', 'git')]
  ran = [c for c in calls(log) if c[:1] != ['git'] or 'status' not in c]  # the dirty-tree check
  assert ran == printed and [c[4] for c in ran[:3]] == ['describe', 'delete', 'create']
  assert (tmp_path / 'logs').is_dir()  # mkdir is not faked: it ran


# ---------------------------------------------------------------------------------- SLURM
def test_slurm_dry_run_one_process_per_gpu():
  rc, commands, out, err = launch(
    'slurm.sbatch',
    '--dry-run',
    '--config=configs/ucf101.py',
    '--workdir=/shared/runs/larp_l',
    '--extra=--config.model.dtype=bfloat16',
    env=_env(SLURM_JOB_NUM_NODES='2'),
  )
  assert rc == 0, err
  (srun,) = [c for c in commands if c[0] == 'srun']
  assert srun[: srun.index('python3')] == [
    'srun',
    '--nodes=2',
    '--ntasks-per-node=8',
    '--gpus-per-node=8',
    '--gpu-bind=none',
    '--kill-on-bad-exit=1',
    '--label',
  ]
  assert srun[srun.index('python3') :] == [
    'python3',
    '-m',
    'larp_jax.main',
    '--config=configs/ucf101.py',
    '--workdir=/shared/runs/larp_l',
    '--multihost',
    '--config.model.dtype=bfloat16',
  ]
  assert commands[0] == ['cd', ROOT]


def test_slurm_per_node_hands_each_process_all_gpus():
  rc, commands, out, err = launch(
    'slurm.sbatch',
    '--per-node',
    '--gpus-per-node=4',
    '--config=configs/ucf101.py',
    '--workdir=/w',
    '--',
    '--config.mesh.fsdp=4',
    env=_env(LARP_DRY_RUN='1'),
  )
  assert rc == 0, err
  (srun,) = [c for c in commands if c[0] == 'srun']
  assert '--ntasks-per-node=1' in srun and '--gpus-per-node=4' in srun
  i = srun.index('env')
  assert srun[i + 1] == 'JAX_LOCAL_DEVICE_IDS=0,1,2,3'
  assert srun[-2:] == ['--multihost', '--config.mesh.fsdp=4']


def test_slurm_outside_a_job_refuses_and_inside_runs_srun(tmp_path):
  rc, commands, out, err = launch('slurm.sbatch', '--config=configs/ucf101.py', '--workdir=/w')
  assert rc == 2 and 'not inside a SLURM job' in err and not commands
  env, log = fake_bin(tmp_path, 'srun')
  env.update(
    SLURM_JOB_ID='42', SLURM_JOB_NUM_NODES='3', SLURM_GPUS_ON_NODE='h100:4', SLURM_SUBMIT_DIR=ROOT
  )
  rc, commands, out, err = launch(
    'slurm.sbatch', '--config=configs/ucf101.py', '--workdir=/w', env=env, cwd=tmp_path
  )
  assert rc == 0, err
  assert calls(log) == [c for c in commands if c[0] == 'srun']
  assert '--nodes=3' in calls(log)[0] and '--ntasks-per-node=4' in calls(log)[0]


# ------------------------------------------------------------------------------------ GPU
def test_gpu_install_and_run():
  rc, commands, out, err = launch(
    'gpu.sh',
    '--dry-run',
    '--install',
    '--gpus=0,1',
    '--config=configs/ucf101.py',
    '--workdir=runs/larp_l',
  )
  assert rc == 0, err
  assert commands[1] == ['python3', '-m', 'pip', 'install', '-r', 'requirements.txt', '-e', '.']
  assert commands[2] == ['python3', '-m', 'pip', 'install', f'jax[cuda12]=={jax_pin()}']
  assert commands[3] == [
    'env',
    'CUDA_VISIBLE_DEVICES=0,1',
    'python3',
    '-m',
    'larp_jax.main',
    '--config=configs/ucf101.py',
    '--workdir=runs/larp_l',
  ]  # one process for all local GPUs: no --multihost


def test_gpu_real_run_runs_what_it_prints(tmp_path):
  env, log = fake_bin(tmp_path, 'python')
  python = str(tmp_path / 'bin' / 'python')
  rc, commands, out, err = launch(
    'gpu.sh', f'--python={python}', '--config=configs/demo.py', '--workdir=w', '--', '--mode=eval'
  )
  assert rc == 0, err
  assert [['python', *c[1:]] for c in commands[1:]] == calls(log)
  assert calls(log)[0][-1] == '--mode=eval'


# --------------------------------------------------------------------------------- README
def readme_launch_commands() -> list:
  """Every launch command of README's "Scaling out" code blocks (continuations joined,
  comments dropped), as argv."""
  text = open(README).read()
  section = text.split('\n## Scaling out', 1)[1].split('\n## ', 1)[0]
  lines = []
  for block in re.findall(r'```bash\n(.*?)```', section, flags=re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      line = line.split(' #', 1)[0].strip()
      if line.startswith(('launch/', 'sbatch ', 'bash launch/')):
        lines.append(shlex.split(line))
  return lines


def test_readme_commands_dry_run():
  """README's launch commands as written, with --dry-run added (sbatch's own options dropped):
  each prints its training command with README's config and workdir."""
  lines = readme_launch_commands()
  assert {os.path.basename(next(w for w in l if w.startswith(('launch/')))) for l in lines} == set(
    SCRIPTS
  )
  for argv in lines:
    i = next(j for j, w in enumerate(argv) if w.startswith('launch/'))
    script, args = os.path.basename(argv[i]), argv[i + 1 :]
    if '--dry-run' not in args:
      args = ['--dry-run', *args]
    rc, commands, out, err = launch(script, *args)
    assert rc == 0, (argv, err)
    main = [c for c in commands if 'larp_jax.main' in ' '.join(c)]
    assert main, (argv, out)
    text = ' '.join(main[-1])
    for arg in args:
      if arg.startswith('--config='):
        assert arg in text, (arg, text)
      if arg.startswith('--workdir=') and not arg.startswith('--workdir=gs://'):
        assert arg in text, (arg, text)
