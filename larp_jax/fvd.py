"""FVD between two sets of videos (command line).

    python -m larp_jax.fvd REAL FAKE [--batch=8] [--max_clips=N] [--num_frames=16] [--resolution=128]
                           [--save_stats=PREFIX]

REAL and FAKE are each one of
* a folder of video files (searched recursively, so class subfolders are fine; decoded with PyAV):
  each file gives one clip, its first `num_frames` frames; files that cannot be decoded or are too
  short are skipped with a warning on stderr;
* a `.npy` / `.npz` array of clips [N,T,H,W,3], uint8 in 0..255 or float in [0, 1] (e.g. the
  float32 output of `Tokenizer.decode`), fed to I3D the way the library takes them (uint8 / 255 or
  the float values as they are: uint8 u and float u / 255 give the same FVD up to float32 rounding);
  the first `num_frames` frames are used; for `.npz` the array named `videos`, else the only / first
  array;
* a `.npz` of statistics written by `FeatureStats.save` (keys n, sum, sum_outer).

With `--resolution R` every clip is resized (short side to R, bilinear with antialiasing, as
torchvision's Resize) and center-cropped to RxR before I3D; without it clips go in at their own size
(I3D resizes to 224 internally). Prints ONE JSON object on stdout:
{"fvd": ..., "n_real": ..., "n_fake": ..., "protocol": {...}}. Progress goes to stderr.
Bad input (or a bad flag) exits with code 2 and one `error: ...` line on stderr; so do fewer than
2 clips on either side (the FVD needs a feature covariance). Fewer clips than the 400 feature
dimensions give a rank-deficient covariance and an FVD biased upward: the number is printed with a
warning on stderr. The standard protocol (StyleGAN-V, TF-GAN) uses 2048 clips per side.
The work is done by `larp_jax.evaluation.fvd_files.fvd_between`.
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from absl import flags

from larp_jax import cli_env
from larp_jax.evaluation import fvd_files


def _command(args: list) -> None:
  fv = flags.FlagValues()
  flags.DEFINE_integer('batch', 8, 'I3D mini-batch size.', flag_values=fv)
  flags.DEFINE_integer('max_clips', None, 'Use at most N clips from each side.', flag_values=fv)
  flags.DEFINE_integer('num_frames', 16, 'Frames per clip (at least 9).', flag_values=fv)
  flags.DEFINE_integer(
    'resolution',
    None,
    "Resize the short side and center-crop to RxR before I3D (default: keep the clips' size).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    'save_stats',
    None,
    'Prefix: also write <prefix>_real.npz and <prefix>_fake.npz (FeatureStats).',
    flag_values=fv,
  )
  real, fake = cli_env.parse_flags(fv, args, __doc__, positional=('REAL', 'FAKE'))
  result = fvd_files.fvd_between(
    real,
    fake,
    batch=fv.batch,
    max_clips=fv.max_clips,
    num_frames=fv.num_frames,
    resolution=fv.resolution,
    save_stats=fv.save_stats,
  )
  print(json.dumps(result))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command on ``argv`` (the arguments after the program name; default
  ``sys.argv[1:]``); returns the exit code (2 after one ``error:`` line on stderr)."""
  return cli_env.run_command(_command, argv)


if __name__ == '__main__':
  sys.exit(main())
