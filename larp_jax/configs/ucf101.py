r"""LARP tokenizer on UCF101: the released LARP-L-Long recipe (the official LARP-L-Long config).

Run:
  python -m larp_jax.main --config=configs/ucf101.py --workdir=runs/larp_l
  python -m larp_jax.main --config=configs/ucf101.py:size=B,source=folder \
      --config.data.path=/data/UCF-101 --workdir=runs/larp_b

Arguments after ':' (comma separated):
  size      S | B | L (default L: the released 172M tokenizer; S and B are our own presets)
  tokens    number of holistic queries N (default 1024)
  source    tfds | folder | records | synthetic (default tfds, dataset 'ucf101')
  epochs    training epochs (default 150); epoch_size: clips per epoch (default 9537, UCF101
            split-1 train; the released run used K600+UCF101, about 435k clips per epoch)
  paper     use the paper's values where the released code differs (prior lr x50 really applied,
            LeCam weight applied once, prior attention dropout off in eval). Default: released code.
  tiny      the test-size model and a 4-step run (``larp_jax/configs/common.py``).
"""

from larp_jax import config_lib
from larp_jax import data as data_lib
from larp_jax.configs import common
import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg,
    size='L',
    tokens=1024,
    source='tfds',
    epochs=150,
    epoch_size=9537,
    batch=128,
    paper=False,
    tiny=False,
  )
  c = ml_collections.ConfigDict()
  c.task = 'tokenizer'  # larp_jax/tasks/: what the training loop trains

  # ---- the tokenizer: exactly LARPTokenizer's keyword arguments.
  c.model = dict(
    video_shape=(16, 128, 128),
    patch_size=(4, 8, 8),
    num_latent_tokens=arg.tokens,
    **config_lib.tokenizer_preset(arg.size),
    mlp_ratio=4.0,
    norm_eps=1e-5,
    pe_base=10000.0,
    codebook_size=8192,
    code_dim=16,
    vq_type='svq',
    vq_temperature=0.03,
    vq_l2_normalized=True,
    vq_commit_weight=0.25,
    vq_codebook_weight=1.0,
    # Official bottleneck options, all at the released values (off). bottleneck_norm: 'none' |
    # 'bn_bn' | 'bn_b' (batch norms: running stats in eval) | 'ln_d' | 'ln_nd' | 'ln_d_na'.
    bottleneck_norm='none',
    bottleneck_norm_freeze_step=0,  # not LARP: batch norms train on frozen running stats after it
    # Official stochastic_temperature < 0 (learned) = learnable with vq_temperature=0.1.
    vq_temperature_learnable=False,
    # Official sqt_start_end_epoch 'S_E_n': vq_temperature_start=S, vq_temperature=E,
    # vq_temperature_ramp_steps=n * steps_per_epoch (0 = fixed vq_temperature).
    vq_temperature_start=0.03,
    vq_temperature_ramp_steps=0,
    vq_entropy_weight=0.0,
    vq_entropy_temperature=0.01,  # entropy loss inside vq_loss
    query_init='normal',  # 'normal' (released) | 'sincos'
    query_patch_skip=False,  # not LARP: query i also gets patch token i (locality bias)
    latent_patch_skip=False,  # not LARP: decoder patch query j also gets latent j
    patch_skip_proj=False,  # not LARP: a learned projection per copy on those skips (N = k x P)
    vq_bypass=False,  # diagnostic only: continuous latents reach the decoder
    use_prior=True,
    **config_lib.PRIOR_GPTC_S,
    prior_max_len=placeholder(int),
    prior_dropout=0.1,
    # Released code: the prior's attention dropout stays on in eval (SDPA quirk).
    prior_attn_dropout_in_eval=not arg.paper,
    prior_n_rounds=2,
    prior_ce_temperature=1.0,
    attention_impl='auto',
    remat='none',
    scan_layers=False,  # GPU bf16: 'dot_product_attention'
    dtype='float32',
    param_dtype='float32',
  )

  # ---- data (larp_jax.data.default_config documents every field).
  c.data = data_lib.default_config()
  c.data.source = arg.source
  c.data.tfds_name = 'ucf101'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'

  # ---- run length. The official schedule is per epoch; we count steps.
  c.batch_size = arg.batch  # global batch (8 GPUs x 16 in the paper)
  steps_per_epoch = max(1, arg.epoch_size // arg.batch)
  c.total_steps = arg.epochs * steps_per_epoch
  c.seed = 66667

  # ---- losses (official models/loss.py, cfgs/larp_tokenizer.yaml).
  c.loss = ml_collections.ConfigDict(
    dict(
      l1_weight=1.0,
      l2_weight=0.0,  # not LARP: + weight x mean squared error (0 = off, released)
      lpips_weight=1.0,
      lpips_net='vgg',
      gan_weight=0.3,  # non-saturating generator loss, fixed weight
      disc_start=0,  # GAN terms active from this step
      vq_weight=0.1,
      # Official loss_q_warmup 'R_E' (released '1.0_1' = off): vq_weight x R in epoch 1, rising
      # linearly per epoch to x1 at epoch E.
      vq_warmup_start_ratio=1.0,
      vq_warmup_epochs=1,
      vq_warmup_steps_per_epoch=steps_per_epoch,
      prior_weight=0.06,  # alpha
      disc_every=5,  # discriminator step every N generator steps
      disc_label_noise=0.15,  # 'ns_smooth' noisy targets: real max(1-0.15|n|, 0.7) ...
      disc_label_clip=0.3,  # ... fake min(0.15|n|, 0.3)
      lecam_weight=0.001,
      # Released code applies the LeCam weight twice (effective 1e-6); paper: once (1e-3).
      lecam_weight_applied_twice=not arg.paper,
      lecam_ema_decay=0.999,
      mix_max_ratio=0.5,
      mix_ramp_fraction=0.3,  # scheduled sampling (official models/gptc.py)
    )
  )

  # ---- the transformer discriminator (38.2M parameters at this size).
  c.disc = ml_collections.ConfigDict(
    dict(width=512, depth=12, num_heads=8, patch_size=(4, 8, 8), mlp_ratio=4.0, norm_eps=1e-5)
  )

  # ---- optimisers and schedule (official trainers/base_trainer.py).
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      b1=0.5,
      b2=0.9,
      eps=1e-8,  # generator Adam
      disc_lr=3e-5,
      disc_b1=0.5,
      disc_b2=0.9,  # discriminator Adam
      warmup_steps=8 * steps_per_epoch,
      start_lr_mult=0.01,
      min_lr_mult=0.01,
      prior_lr_mult=50.0,
      # Released code: the cosine scheduler overwrites the prior's x50 group back to x1.
      apply_prior_lr_mult=arg.paper,
      grad_clip_norm=0.0,  # 0 = off (the official run does not clip)
      ema_decay=0.0,  # 0 = off (the official run has no EMA)
    )
  )

  # ---- fine-tuning: a fresh run starts from the model variables of this params directory (e.g.
  # a converted release: python -m larp_jax.convert) or run directory; None: random init.
  c.init_from = placeholder(str)

  # ---- parallelism (global batch split over data*fsdp).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES

  # ---- reporting, checkpoints, evaluation.
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.eval_every = 5000
  c.eval = ml_collections.ConfigDict(
    dict(num_clips=512, fvd=True, lpips=True, batch_size=32, num_videos_to_show=8)
  )
  # Where eval/<step>.json and the videos go (None: <workdir>/eval), and the cache of the real
  # clips' I3D statistics (None: <workdir>/fvd_cache, or ~/.cache/larp_jax/fvd_cache when the
  # run directory cannot be written).
  c.eval.output_dir = placeholder(str)
  c.eval.fvd_cache_dir = placeholder(str)
  # Trivial codes scored on the same clips (larp_jax/evaluation/baselines.py); 0 turns them off.
  c.eval.baseline_max_clips = 512
  config_lib.add_plan_fields(c)  # --mode=plan: memory limit per device, compile or not
  if arg.tiny:
    common.apply_tiny(c)
  return c
