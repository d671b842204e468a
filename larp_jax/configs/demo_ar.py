r"""A small class-conditional generator on the demo tokenizer's tokens of the synthetic videos
(minutes on a 2-core CPU).

Run (after the demo tokenizer, ``configs/demo.py``, has trained in runs/demo):
  python -m larp_jax.tokenize --tokenizer=runs/demo --config=configs/demo.py --out=runs/demo_tokens
  python -m larp_jax.main --config=configs/demo_ar.py --workdir=runs/demo_ar
  python -m larp_jax.main --config=configs/demo_ar.py --workdir=runs/demo_ar --mode=sample

Its evaluation reports, besides the held-out token NLL and gFVD, the class accuracy of a small
classifier of the synthetic classes on 256 eval clips, on the tokenizer's reconstructions of
them and on samples of their labels (``config.eval.class_accuracy_clips``;
``larp_jax/evaluation/class_probe.py``).

Arguments after ':' (comma separated): tokenizer (default runs/demo), tokens (default
runs/demo_tokens; empty: encode the videos on the fly), steps (default 1500), batch (default 32),
tiny (the test-size generator over the tiny tokenizer, a 4-step run).
"""

from larp_jax import config_lib
from larp_jax.configs import demo, ucf101_ar


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg, tokenizer='runs/demo', tokens='runs/demo_tokens', steps=1500, batch=32, tiny=False
  )
  tok = demo.get_config('tiny' if arg.tiny else None)
  c = ucf101_ar.generator_config(
    tok,
    preset='S',
    num_classes=int(tok.data.synthetic_num_classes),
    tokenizer=arg.tokenizer,
    tokens=arg.tokens,
    epochs=1,
    epoch_size=arg.steps * arg.batch,
    batch=arg.batch,
    warmup_epochs=0,
    tiny=arg.tiny,
  )
  if not arg.tiny:
    c.model.update(dim=128, depth=4, num_heads=4, dtype='float32')
    c.total_steps = arg.steps
    c.optim.warmup_steps = max(1, arg.steps // 20)
    c.optim.lr = 1e-3
    c.log_every = 50
    c.checkpoint_every = 500
    c.eval_every = arg.steps
    c.eval.update(
      batch_size=32,
      nll_clips=256,
      num_videos_to_show=20,
      fvd_samples=32,
      num_samples=256,
      class_accuracy_clips=256,
    )
    c.sample.update(batch_size=32, num_samples=40, cfg_scale=1.5)
  return c
