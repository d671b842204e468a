"""The run directory: one config per run, one trainer at a time, metrics that match checkpoints."""

import json
import os
import subprocess
import sys
import time

import pytest

import larp_jax
from larp_jax import workdir as workdir_lib
from larp_jax.evaluation import evaluator
from larp_jax.tasks.tokenizer import TokenizerTask
from larp_jax.train import loop
from tests.test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kw):
  c = tiny_config(**kw)
  c.loss.lpips_weight = 0.0
  return c


def _steps(wd):
  return [json.loads(l)['step'] for l in open(os.path.join(wd, 'metrics.jsonl'))]


def test_a_restart_with_another_model_is_refused_and_the_run_is_kept(tmp_path):
  wd = str(tmp_path)
  loop.run(TokenizerTask, _cfg(total_steps=2), wd)
  config_json = open(os.path.join(wd, 'config.json')).read()
  other = _cfg(total_steps=4)
  other.model.width = 64
  with pytest.raises(workdir_lib.WorkdirError, match=r'model.width 32 -> 64.*another --workdir'):
    loop.run(TokenizerTask, other, wd)
  assert open(os.path.join(wd, 'config.json')).read() == config_json
  assert _steps(wd) == [1, 2]
  assert larp_jax.load_tokenizer(wd).step == 2  # the checkpoints still load


def test_allowed_changes_are_kept_beside_config_json(tmp_path, caplog):
  wd = str(tmp_path)
  loop.run(TokenizerTask, _cfg(total_steps=2), wd)
  config_json = open(os.path.join(wd, 'config.json')).read()
  with caplog.at_level('WARNING'):
    loop.run(TokenizerTask, _cfg(total_steps=3), wd)
  assert open(os.path.join(wd, 'config.json')).read() == config_json
  restart = json.load(open(os.path.join(wd, 'config.restart-2.json')))
  assert restart['total_steps'] == 3
  assert 'total_steps 2 -> 3' in caplog.text
  assert _steps(wd) == [1, 2, 3]


def test_resume_drops_metrics_past_the_restored_step(tmp_path):
  """A run killed after logging steps it never checkpointed: on resume each step is there once,
  in order."""
  wd = str(tmp_path)
  loop.run(TokenizerTask, _cfg(total_steps=4), wd, stop_at=2)
  with open(os.path.join(wd, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 3, "loss": 9.0}\n{"step": 4, "loss": 9.0}\n{"step": 3, "lo')  # torn
  loop.run(TokenizerTask, _cfg(total_steps=4), wd)
  lines = [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))]
  assert [l['step'] for l in lines] == [1, 2, 3, 4]
  assert all(l['loss'] != 9.0 for l in lines)


def test_truncate_metrics_by_hand(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1}\n{"step": 2}\n{"step": 5}\n{"step": 2}\n{"step": 3}\nnot json\n')
  assert workdir_lib.truncate_metrics(str(tmp_path), 3) == 3
  assert [json.loads(l)['step'] for l in open(path)] == [1, 2, 3]
  assert workdir_lib.truncate_metrics(str(tmp_path), 3) == 0


_HOLD = r"""
import sys, time
sys.path.insert(0, {root!r})
from larp_jax import workdir
workdir.Lock({wd!r}).acquire()
print('locked', flush=True)
time.sleep(120)
"""


def test_the_lock_names_its_holder_and_a_dead_holder_never_blocks(tmp_path):
  wd = str(tmp_path)
  p = subprocess.Popen(
    [sys.executable, '-c', _HOLD.format(root=ROOT, wd=wd)], stdout=subprocess.PIPE, text=True
  )
  try:
    assert p.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lib.WorkdirError, match=f'in use by another trainer .*pid {p.pid}'):
      loop.run(TokenizerTask, _cfg(total_steps=2), wd)
    assert not os.path.exists(os.path.join(wd, 'config.json'))  # nothing written
  finally:
    p.kill()
    p.wait()
  assert json.load(open(os.path.join(wd, 'lock')))['pid'] == p.pid  # a stale file is left...
  loop.run(TokenizerTask, _cfg(total_steps=2), wd)  # ...and taken over
  assert _steps(wd) == [1, 2]
  with workdir_lib.Lock(wd):  # released at the end of the run
    pass


def test_eta_leaves_out_the_first_step():
  eta = loop._Eta(first_step=11)
  assert eta.line(11, 60) == 'compiling'
  eta.t_first = time.time() - 10.0  # 10 s for steps 12..21 after the first
  line = eta.line(21, 60)
  assert line.startswith('1.0') and ('ETA 0m39s' in line or 'ETA 0m38s' in line), line


def test_fvd_cache_goes_to_the_user_cache_when_the_workdir_is_read_only(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  assert evaluator.default_cache_dir(str(tmp_path)) == str(tmp_path / 'fvd_cache')
  monkeypatch.setattr(workdir_lib, 'is_writable', lambda path: False)
  assert evaluator.default_cache_dir(str(tmp_path)) == str(
    tmp_path / 'cache' / 'larp_jax' / 'fvd_cache'
  )


def test_eval_output_dir_that_cannot_be_written_is_one_line(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  c = _cfg()
  c.eval.output_dir = str(blocker / 'eval')
  with pytest.raises(workdir_lib.WorkdirError, match='evaluation output directory.*output_dir'):
    evaluator.output_dir(c, str(tmp_path))


def test_a_field_added_to_the_code_after_the_run_started_is_not_a_model_change(tmp_path):
  """config.json of an older version lacks a new model field: its default is what ran."""
  c = _cfg()
  old = workdir_lib.config_dict(c)
  del old['model']['norm_eps']  # as if norm_eps did not exist when the run started
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(old, f)
  assert workdir_lib.check_config(str(tmp_path), c) == {'model.norm_eps': ('<absent>', 1e-5)}
  c.model.norm_eps = 1e-6  # not the default: the network changed
  with pytest.raises(workdir_lib.WorkdirError, match='model.norm_eps'):
    workdir_lib.check_config(str(tmp_path), c)
