"""The learning curve of a tokenizer run as a PNG (command line).

    python -m larp_jax.plot RUN_DIR [--out=PATH] [--eval_dir=DIR] [--title=TEXT]

Reads the run's evaluation records (``RUN_DIR/eval/<step>.json``, or ``--eval_dir`` when the run
set ``config.eval.output_dir``) and its ``metrics.jsonl``, and writes PSNR and codebook usage
against step, with the trivial-code baselines of the same eval clips as horizontal lines, and the
training L1 (default ``RUN_DIR/curve.png``). Prints the points as a table and the PNG's path.
No record to draw: one ``error:`` line, exit 2. The work is ``larp_jax.evaluation.curve``.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from absl import flags

from larp_jax import cli_env
from larp_jax.evaluation import curve as curve_lib


def _command(args: list) -> None:
  fv = flags.FlagValues()
  flags.DEFINE_string('out', None, 'PNG path (default RUN_DIR/curve.png).', flag_values=fv)
  flags.DEFINE_string(
    'eval_dir', None, 'Evaluation records (default RUN_DIR/eval).', flag_values=fv
  )
  flags.DEFINE_string('title', None, 'Figure title (default: the run directory).', flag_values=fv)
  (run_dir,) = cli_env.parse_flags(fv, args, __doc__, positional=('RUN_DIR',))
  curve = curve_lib.load_curve(run_dir, fv.eval_dir)
  out = fv.out or os.path.join(run_dir, 'curve.png')
  title = fv.title if fv.title is not None else os.path.basename(os.path.abspath(run_dir))
  curve_lib.plot_curve(curve, out, title)
  print(curve_lib.format_table(curve))
  print(f'written to {out}')


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
  return cli_env.run_command(_command, argv)


if __name__ == '__main__':
  sys.exit(main())
