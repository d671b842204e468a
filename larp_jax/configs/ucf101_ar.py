r"""LARP AR generator on UCF101, class-conditional: the released `LARP-L-Long-AR` recipe (the
official `cfgs/larp_ar.yaml`, `scripts/train_larp_ar_reproduce.sh`).

Run (tokens first, then the generator):
  python -m larp_jax.tokenize --tokenizer=runs/larp_l --config=configs/ucf101.py \
      --out=runs/ucf101_tokens
  python -m larp_jax.main --config=configs/ucf101_ar.py:tokenizer=runs/larp_l,tokens=runs/ucf101_tokens \
      --workdir=runs/larp_ar

Arguments after ':' (comma separated):
  preset     S | B | L | XL | LP (default LP: the released 632M generator)
  tokenizer  the tokenizer's run or params directory (a converted release included)
  tokens     a token dataset (``python -m larp_jax.tokenize``); empty: encode the videos on the
             fly with the frozen tokenizer
  tokenizer_config  the tokenizer config spec embedded here (default configs/ucf101.py)
  epochs (3000), epoch_size (9537 clips, UCF101 split-1 train), batch (64)
  tiny       the test-size generator over the tiny tokenizer, a 4-step run
"""

from larp_jax import config_lib
import ml_collections
from ml_collections.config_dict import placeholder

# dim, layers, heads (the official `models/larp_ar.py` LLAMA_ABS_* constructors)
AR_PRESETS = {
  'S': dict(dim=384, depth=12, num_heads=6),
  'B': dict(dim=768, depth=12, num_heads=12),
  'L': dict(dim=1024, depth=24, num_heads=16),
  'XL': dict(dim=1280, depth=36, num_heads=20),
  'LP': dict(dim=1280, depth=30, num_heads=20),
}
TINY_AR = dict(dim=32, depth=1, num_heads=2)
# The released generator's regularisation and norm (official LARP-L-Long-AR config).
AR_DROPOUT_AND_NORM = dict(
  class_dropout=0.1, token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1, norm_eps=1e-5
)


def ar_preset(name: str) -> dict:
  if name not in AR_PRESETS:
    raise config_lib.ConfigError(
      f'unknown generator preset {name!r}; choose one of {sorted(AR_PRESETS)}'
    )
  return dict(AR_PRESETS[name])


def generator_config(
  tokenizer_cfg,
  *,
  preset: str,
  num_classes: int,
  tokenizer: str,
  tokens: str,
  epochs: int,
  epoch_size: int,
  batch: int,
  warmup_epochs: int,
  frame_prediction: bool = False,
  tiny: bool = False,
):
  """A generator config over ``tokenizer_cfg`` (embedded as ``config.tokenizer``)."""
  c = ml_collections.ConfigDict()
  c.task = 'generator'
  c.tokenizer = tokenizer_cfg
  c.tokenizer_path = tokenizer  # run or params directory of the frozen tokenizer
  c.tokens_dir = tokens  # token dataset; '' = encode the videos inside the step
  # A params or run directory to start the generator from (e.g. a converted release).
  c.init_from = placeholder(str)
  c.data = tokenizer_cfg.data.copy_and_resolve_references()  # videos: on-the-fly tokens, gFVD reals
  tm = tokenizer_cfg.model
  # ---- the generator: exactly LARPAR's keyword arguments.
  c.model = dict(
    vocab_size=tm.codebook_size,
    num_classes=num_classes,
    seq_len=tm.num_latent_tokens,
    frame_prediction=frame_prediction,
    **(TINY_AR if tiny else ar_preset(preset)),
    **AR_DROPOUT_AND_NORM,
    attention_impl='auto',
    dtype='bfloat16',  # bf16 compute, float32 master weights (the released run: bf16 AMP)
    param_dtype='float32',
  )
  c.num_cond_frames = 5  # frame prediction: conditioning frames, the last repeated to T
  c.batch_size = batch
  steps_per_epoch = max(1, epoch_size // batch)
  c.total_steps = epochs * steps_per_epoch
  c.seed = 0
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=6e-4,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.05,  # Dense kernels only
      warmup_steps=warmup_epochs * steps_per_epoch,
      start_lr_mult=0.01,
      min_lr_mult=0.01,
      grad_clip_norm=0.0,
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = config_lib.DEFAULT_SHARDING_RULES
  c.log_every = 50
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.eval_every = 20000
  # Sampling (official `sample.py` defaults of the README commands).
  c.sample = ml_collections.ConfigDict(
    dict(
      cfg_scale=1.0 if frame_prediction else 1.25,
      cfg_interval=-1,
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      batch_size=64,
      seed=0,
      num_samples=64,  # --mode=sample
    )
  )
  c.sample.output_dir = placeholder(str)
  c.eval = ml_collections.ConfigDict(
    dict(
      batch_size=64,
      nll_clips=1024,  # held-out clips for the token NLL (0: all)
      num_videos_to_show=16,
      fvd_samples=0,  # gFVD during training (0: off)
      num_samples=50_000 if frame_prediction else 10_000,  # gFVD of --mode=eval
      fvd_seed=42,
      fvd_resize=64 if frame_prediction else 0,
      # Synthetic data only: accuracy of a small classifier of the synthetic classes on this
      # many eval clips, their reconstructions and samples of their labels (0: off;
      # larp_jax/evaluation/class_probe.py). class_probe: how that classifier is trained.
      class_accuracy_clips=0,
      class_probe=dict(steps=1500, batch_size=32, lr=2e-3, seed=0),
    )
  )
  c.eval.fvd_cache_dir = placeholder(str)
  config_lib.add_plan_fields(c)  # --mode=plan: memory limit per device, compile or not
  if tiny:
    c.batch_size = 2
    c.total_steps = 4
    c.optim.warmup_steps = 1
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval_every = 0
    c.eval.update(batch_size=2, nll_clips=4, num_videos_to_show=2, num_samples=4)
    c.sample.update(batch_size=2, num_samples=2)
  return c


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg,
    preset='LP',
    tokenizer='',
    tokens='',
    tokenizer_config='configs/ucf101.py',
    epochs=3000,
    epoch_size=9537,
    batch=64,
    tiny=False,
  )
  from larp_jax.configs import ucf101

  if arg.tokenizer_config == 'configs/ucf101.py':
    tok = ucf101.get_config('tiny' if arg.tiny else None)
  else:
    tok = config_lib.load_config(arg.tokenizer_config)
  return generator_config(
    tok,
    preset=arg.preset,
    num_classes=101,
    tokenizer=arg.tokenizer,
    tokens=arg.tokens,
    epochs=arg.epochs,
    epoch_size=arg.epoch_size,
    batch=arg.batch,
    warmup_epochs=4,
    tiny=arg.tiny,
  )
