r"""The AR generator side by side with the official PyTorch ``LARP_AR``, interleaved in rounds.

  taskset -c 1 python -m larp_jax.bench.official_ar --torch_python=/tmp/torchvenv/bin/python \
      --official_dir=/tmp/larp_official --seq_len=256 --rounds=3 --out=/tmp/ar_vs_official.json

Our side runs here (``configs/bench.py:gen_b``'s model, ``--seq_len`` / ``--batch`` on top);
the official side in ``$torch_python tests/official_ar_bench.py``, started once and asked for
one measurement at a time over a pipe, so the two alternate: each round times the train step
(forward + backward + AdamW, float32), then cached sampling at each ``--sample_batches``, first
the official code, then ours. Both processes inherit this one's CPU affinity (run it under
``taskset``); torch gets ``--threads`` threads. Speed ratios are ours / official throughput
(> 1: ours is faster), the median over rounds of each round's ratio. larp_jax never imports torch:
the official side is a separate program of the torch Python.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional, Sequence

import jax

from larp_jax.bench import generator as gbench
from larp_jax.bench.timing import log


def _official(args, model, batch):
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cmd = [
    args.torch_python,
    os.path.join(here, 'tests', 'official_ar_bench.py'),
    f'--official_dir={args.official_dir}',
    f'--dim={model.dim}',
    f'--depth={model.depth}',
    f'--heads={model.num_heads}',
    f'--vocab={model.vocab_size}',
    f'--classes={model.num_classes}',
    f'--seq_len={model.seq_len}',
    f'--batch={batch}',
    f'--threads={args.threads}',
  ]
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  return proc, _reply(proc)


def _reply(proc) -> dict:
  """The next JSON line of the official side (the official model prints plain lines too)."""
  for line in proc.stdout:
    if line.startswith('{'):
      return json.loads(line)
  raise RuntimeError(f'the official side exited with code {proc.wait()}')


def _ask(proc, line: str) -> list:
  proc.stdin.write(line + '\n')
  proc.stdin.flush()
  return _reply(proc)['seconds']


def _cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
    return next(ln.split(':', 1)[1].strip() for ln in out.splitlines() if 'Model name' in ln)
  except Exception:  # pylint: disable=broad-except
    return platform.processor()


def compare(args) -> dict:
  from larp_jax.configs import bench as bench_cfg
  from larp_jax.generation import sampling

  config = bench_cfg.get_config(args.preset)
  with config.unlocked():
    config.model.seq_len = int(args.seq_len)
  model = gbench.make_model(config.model)
  batch = int(args.batch)
  seed = 0
  log(f'official side: starting (seq_len {model.seq_len})')
  proc, ready = _official(args, model, batch)
  # Ours: compile everything before the rounds.
  step, init_state = gbench.train_step_fn(config, model)
  holder = {'state': init_state(gbench.init_params(model, seed))}  # donated by each step
  params = gbench.init_params(model, seed)  # the samplers' own copy
  data = gbench.random_batch(model, batch, seed)
  key = jax.random.key(seed)
  log('ours: compiling the train step and the samplers')
  compiled = step.lower(holder['state'], data, key).compile()

  def train_once():
    holder['state'], m = compiled(holder['state'], data, key)
    jax.block_until_ready(m)

  samplers = {}
  for b in args.sample_batches:
    labels = gbench.random_batch(model, int(b), seed + 1)['label']
    run = lambda labels=labels: jax.block_until_ready(
      sampling.sample(model, {'params': params}, labels, key)['tokens']
    )
    run()  # compile
    samplers[int(b)] = run
  train_once()
  _ask(proc, 'train 1')  # warm-up of both sides
  for b in samplers:
    _ask(proc, f'sample {b} 1')

  def ours(fn, runs):
    times = []
    for _ in range(runs):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return times

  rounds = {'train': [], **{f'sample_b{b}': [] for b in samplers}}
  for r in range(int(args.rounds)):
    log(f'round {r + 1} of {args.rounds}')
    off = _ask(proc, f'train {args.train_runs}')
    mine = ours(train_once, int(args.train_runs))
    rounds['train'].append({'official': off, 'ours': mine})
    for b, fn in samplers.items():
      off = _ask(proc, f'sample {b} {args.sample_runs}')
      mine = ours(fn, int(args.sample_runs))
      rounds[f'sample_b{b}'].append({'official': off, 'ours': mine})
  _ask_quit(proc)
  summary = {}
  for name, rs in rounds.items():
    ratio = [statistics.median(x['official']) / statistics.median(x['ours']) for x in rs]
    units = batch * model.seq_len if name == 'train' else int(name.split('_b')[1]) * model.seq_len
    off = statistics.median([t for x in rs for t in x['official']])
    mine = statistics.median([t for x in rs for t in x['ours']])
    summary[name] = {
      'tokens_per_s_ours': units / mine,
      'tokens_per_s_official': units / off,
      'seconds_ours': mine,
      'seconds_official': off,
      'speed_ratio_ours_over_official': statistics.median(ratio),
      'per_round_ratio': ratio,
    }
  return {
    'model': dict(config.model),
    'batch': batch,
    'rounds': rounds,
    'summary': summary,
    'cpu': _cpu_model(),
    'affinity': sorted(os.sched_getaffinity(0)),
    'torch': ready,
    'jax': jax.__version__,
    'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
  }


def _ask_quit(proc):
  proc.stdin.write('quit\n')
  proc.stdin.flush()
  proc.wait(timeout=60)


def format_summary(record: dict) -> str:
  m = record['model']
  lines = [
    f'LARPAR dim {m["dim"]} depth {m["depth"]} heads {m["num_heads"]}, {m["seq_len"]} tokens, '
    f'{m["dtype"]}; train batch {record["batch"]}; {record["cpu"]}, cores {record["affinity"]}, '
    f'torch threads {record["torch"]["threads"]}; {record["time"]}',
    f'{"what":12s} {"ours tok/s":>11s} {"official":>9s} {"ours/official":>13s}  per round',
  ]
  for name, s in record['summary'].items():
    lines.append(
      f'{name:12s} {s["tokens_per_s_ours"]:11.1f} {s["tokens_per_s_official"]:9.1f} '
      f'{s["speed_ratio_ours_over_official"]:13.2f}  '
      + ', '.join(f'{x:.2f}' for x in s['per_round_ratio'])
    )
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  import argparse

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--torch_python', required=True)
  p.add_argument('--official_dir', required=True)
  p.add_argument('--preset', default='gen_b', choices=['gen_b', 'gen_tiny'])
  p.add_argument('--seq_len', type=int, default=1024)
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--sample_batches', type=int, nargs='+', default=[1, 16])
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--train_runs', type=int, default=2)
  p.add_argument('--sample_runs', type=int, default=1)
  p.add_argument('--threads', type=int, default=1)
  p.add_argument('--out', default='')
  args = p.parse_args(argv)
  record = compare(args)
  print(format_summary(record))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(record, f, indent=2)
  return record


if __name__ == '__main__':
  from larp_jax import host_malloc

  host_malloc.reexec_if_needed()
  main(sys.argv[1:])
