r"""LARP AR frame prediction on Kinetics-600: the released `LARP-L-Long-AR-FP` recipe (the
official `cfgs/larp_ar_fp.yaml`, `trainers/larp_ar_fp_trainer.py`): the first 5 frames, the last
repeated to 16, are encoded into 1024 conditioning tokens plus a separator; the generator writes
the 1024 tokens of the whole clip. Trains on videos (tokens encoded inside the step).

Run:
  python -m larp_jax.main --config=configs/k600_fp.py:tokenizer=runs/larp_l \
      --config.data.source=folder --config.data.path=/data/k600/train --workdir=runs/larp_fp

Arguments after ':' as configs/ucf101_ar.py, with epochs (default 75) and epoch_size (default
392,000 clips, K600 train).
"""

from larp_jax import config_lib
from larp_jax.configs import ucf101, ucf101_ar


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg, preset='LP', tokenizer='', epochs=75, epoch_size=392_000, batch=64, tiny=False
  )
  tok = ucf101.get_config('tiny' if arg.tiny else None)
  tok.data.tfds_name = 'kinetics600'  # not in TFDS's catalogue: use source=folder or records
  tok.data.eval_split = 'validation'
  tok.data.eval_chunks = 'all'
  return ucf101_ar.generator_config(
    tok,
    preset=arg.preset,
    num_classes=600,
    tokenizer=arg.tokenizer,
    tokens='',
    epochs=arg.epochs,
    epoch_size=arg.epoch_size,
    batch=arg.batch,
    warmup_epochs=1,
    frame_prediction=True,
    tiny=arg.tiny,
  )
