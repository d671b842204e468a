r"""A tiny LARP that trains on a 2-core CPU in minutes, on the built-in synthetic videos.

Run:
  python -m larp_jax.main --config=configs/demo.py --workdir=runs/demo

It is configs/ucf101.py (every loss, the prior with scheduled sampling, both optimisers, the
discriminator) with small sizes: 16x32x32 clips, 4x8x8 patches, N=64 tokens, a 2+2-layer
128-wide ViT, a 512-entry codebook, a 2-layer prior and a 2-layer discriminator.
Arguments after ':' (comma separated): steps (default 600), batch (default 8),
lpips (default true; the demo uses LPIPS-AlexNet, the paper VGG16, which costs ~7 s a step here),
tiny (the test-size model and a 4-step run, ``larp_jax/configs/common.py``).
"""

from larp_jax import config_lib
from larp_jax.configs import common, ucf101


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=600, batch=8, lpips=True, tiny=False)
  c = ucf101.get_config('source=synthetic')
  c.model.update(
    video_shape=(16, 32, 32),
    patch_size=(4, 8, 8),
    num_latent_tokens=64,
    width=128,
    encoder_depth=2,
    decoder_depth=2,
    num_heads=4,
    codebook_size=512,
    prior_depth=2,
    prior_width=64,
    prior_heads=2,
  )
  c.disc.update(width=64, depth=2, num_heads=2, patch_size=(4, 8, 8))
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.seed = 0
  c.loss.lpips_weight = 1.0 if arg.lpips else 0.0
  c.loss.lpips_net = 'alex'  # VGG16 costs ~7 s per step on 2 CPU cores at this size
  c.optim.lr = 1e-3
  c.optim.disc_lr = 3e-4
  c.optim.warmup_steps = max(1, arg.steps // 20)
  c.log_every = 25
  c.checkpoint_every = 200
  c.eval_every = arg.steps  # evaluate once, at the end (I3D costs ~3 s per clip here)
  c.eval.update(num_clips=32, batch_size=16, num_videos_to_show=4)
  if arg.tiny:
    common.apply_tiny(c)
  return c
