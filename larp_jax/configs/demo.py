r"""A tiny LARP that trains on a 2-core CPU in minutes, on the built-in synthetic videos.

Run:
  python -m larp_jax.main --config=configs/demo.py --workdir=runs/demo

It is configs/ucf101.py (every loss, the prior with scheduled sampling, both optimisers, the
discriminator) with small sizes: 16x32x32 clips, 4x8x8 patches, N=128 tokens, a 2+2-layer
128-wide ViT, a 2048-entry codebook of 8-dim codes, a 2-layer prior and a 2-layer discriminator,
and the switches that make a tokenizer this small learn in minutes (README, "The demo"; issue #19):
  * bottleneck_norm='bn_b' (an official option, off in the release): each latent is standardised
    over the batch before the l2 norm, so the latents do not collapse into one cone of the sphere
    (without it every clip decodes to the same mean video);
  * the official quantizer entropy loss (weight 0.01): low per-token, high batch-average entropy
    of the code distribution, so a clip is not written as one code repeated;
  * query_patch_skip / latent_patch_skip (not LARP): query i also receives patch token i and decoder
    patch query j latent j, a locality bias that breaks the symmetry of the uniform-at-init cross
    attention;
  * SVQ temperature 0.01 (released 0.03), LPIPS weight 0.3 (released 1.0).
Arguments after ':' (comma separated): steps (default 1500; 0 = the default), batch (default 8),
lpips (default true; the demo uses LPIPS-AlexNet, the paper VGG16, which costs ~7 s a step here),
long (N=512 tokens with model.patch_skip_proj, the bottleneck's batch statistics frozen after step
1000 (model.bottleneck_norm_freeze_step), an MSE term of weight 5 next to L1 (loss.l2_weight),
5000 steps, an evaluation every 500 steps without FVD: the learning curve of README, about 54
minutes on both cores here, 89 on one core with the other busy; otherwise the demo's settings),
tiny (the test-size model and a 4-step run, ``larp_jax/configs/common.py``, with the released
bottleneck and quantizer switches).
"""

from larp_jax import config_lib
from larp_jax.configs import common, ucf101


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=0, batch=8, lpips=True, long=False, tiny=False)
  steps = arg.steps or (5000 if arg.long else 1500)
  c = ucf101.get_config('source=synthetic')
  c.model.update(
    video_shape=(16, 32, 32),
    patch_size=(4, 8, 8),
    num_latent_tokens=512 if arg.long else 128,
    width=128,
    encoder_depth=2,
    decoder_depth=2,
    num_heads=4,
    codebook_size=2048,
    code_dim=8,
    bottleneck_norm='bn_b',
    vq_entropy_weight=0.01,
    vq_temperature=0.01,
    vq_temperature_start=0.01,
    query_patch_skip=True,
    latent_patch_skip=True,
    # 8 tokens per patch at N=512: one projection per copy, else the 8 write one code (issue #19)
    patch_skip_proj=arg.long,
    # the long run: the batch statistics of 8 clips jitter every code until frozen (issue #19)
    bottleneck_norm_freeze_step=1000 if arg.long else 0,
    prior_depth=2,
    prior_width=64,
    prior_heads=2,
  )
  c.disc.update(width=64, depth=2, num_heads=2, patch_size=(4, 8, 8))
  c.batch_size = arg.batch
  c.total_steps = steps
  c.seed = 0
  c.loss.lpips_weight = 0.3 if arg.lpips else 0.0
  c.loss.lpips_net = 'alex'  # VGG16 costs ~7 s per step on 2 CPU cores at this size
  c.optim.lr = 1e-3
  c.optim.disc_lr = 3e-4
  c.optim.warmup_steps = max(1, steps // 20)
  c.log_every = 25
  c.checkpoint_every = 500
  c.eval_every = steps  # evaluate once, at the end (I3D costs ~3 s per clip here)
  c.eval.update(num_clips=32, batch_size=16, num_videos_to_show=4)
  if arg.long:  # the learning curve: PSNR and usage every 500 steps (python -m larp_jax.plot)
    c.eval_every = 500
    c.eval.update(fvd=False, lpips=False)
    # + 5 x MSE, the error PSNR measures (20.59 -> 21.24 dB at the run's end; issue #19)
    c.loss.l2_weight = 5.0
  if arg.tiny:
    common.apply_tiny(c)
    # The tests of every other feature build on `tiny`: it keeps the released bottleneck and
    # quantizer (the demo's switches are tested with the demo's own shapes in test_cli and by name
    # in test_configs, test_bottleneck, test_tokenizer).
    c.model.update(
      bottleneck_norm='none',
      vq_entropy_weight=0.0,
      query_patch_skip=False,
      latent_patch_skip=False,
      patch_skip_proj=False,
    )
  return c
