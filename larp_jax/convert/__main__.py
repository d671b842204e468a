"""Converts a released PyTorch LARP checkpoint into a larp_jax params directory.

    python -m larp_jax.convert --from=DIR --to=OUT [--overwrite] [--norm_eps=EPS]

DIR: a directory written by the official ``save_pretrained`` (``config.json`` and
``model.safetensors``), e.g. ``huggingface-cli download hywang66/LARP-L-long-tokenizer
--local-dir DIR``. OUT: the params directory to write, loadable by ``larp_jax.load_tokenizer``
and usable as ``--workdir`` of ``--mode=eval``. Prints the report (every argument and what it
became, the LayerNorm eps chosen, the buffers compared, the counts). A checkpoint that cannot be
converted exits with code 2 and one ``error:`` line naming what is wrong.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from absl import flags

from larp_jax import cli_env


def _command(args: list) -> None:
  fv = flags.FlagValues()
  flags.DEFINE_string(
    'from', None, 'Official checkpoint directory (config.json, model.safetensors).', flag_values=fv
  )
  flags.DEFINE_string('to', None, 'Params directory to write.', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace OUT if it is a params directory.', flag_values=fv)
  flags.DEFINE_float(
    'norm_eps',
    None,
    'LayerNorm eps of the ViT blocks (default 1e-5, what the released checkpoints were trained '
    'with; 1e-6 for a model saved by the official code under timm >= 1.0.16).',
    flag_values=fv,
  )
  cli_env.parse_flags(fv, args, __doc__)
  from larp_jax import convert, errors

  missing = [f'--{n}' for n in ('from', 'to') if not fv[n].value]
  if missing:
    raise errors.UserError(f'{" and ".join(missing)} required: --from=DIR --to=OUT')
  report = convert.convert(fv['from'].value, fv.to, overwrite=fv.overwrite, norm_eps=fv.norm_eps)
  print(convert.format_report(report))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
  return cli_env.run_command(_command, argv)


if __name__ == '__main__':
  sys.exit(main())
