r"""Benchmark configs for ``python -m larp_jax.bench`` (see BENCHMARKS.md).

Run:
  python -m larp_jax.bench --config=configs/bench.py:tiny
  python -m larp_jax.bench --config=configs/bench.py:larp_l --what=gen,forward --runs=3
  python -m larp_jax.bench --config=configs/bench.py:micro,dtype=bfloat16 --what=gen

Arguments after ':' (comma separated): one preset word
  tiny    (default) the reference "tiny" model: 16x64x64 clips, 4x8x8 patches, N=256 latent
          tokens, width 256, 4 + 4 layers, 4 heads, codebook 1024 (code_dim 16), a 2-layer
          128-wide prior with 2 heads; a 2-layer discriminator of the official width (512, 8
          heads, 4x8x8 patches); LPIPS-VGG; batch 4.
  larp_l  configs/ucf101.py as released (size L, N=1024, 16x128x128), batch 1.
  micro   the tests' tiny model (``larp_jax/configs/common.py``) on 8x32x32 clips.
  gen_tiny  the AR generator (``LARPAR``) at test size: dim 64, 2 layers, 2 heads, 64 tokens
          from 256 codes, 10 classes; batch 2; cached sampling at batch 1 and 2, recompute
          at batch 1 (all tokens).
  gen_b   the AR generator's B preset (dim 768, 12 layers, 12 heads), 1024 tokens from 8192
          codes, 101 classes, class-conditional, float32; batch 1; cached sampling at batch 1
          and 16; recompute at batch 1 timed as one loop step x 1024 (BENCHMARKS.md).
and
  dtype   float32 (default) | bfloat16: the compute dtype of the tokenizer and discriminator
          (parameters stay float32; LPIPS always runs in float32).
  batch   the bench batch (default: 4 tiny, 1 larp_l, 2 micro); ``--batch`` overrides it.
  source  the data source of the input-pipeline measurement (default synthetic; the UCF101 data
          is not needed to time the model, which runs on random input).

What each measurement runs (``config.bench.<what>_overrides`` are applied to ``config.loss``):
  train   the full training step of the config (generator + discriminator every
          ``loss.disc_every`` steps, LPIPS, GAN, LeCam, VQ, prior): no overrides.
  gen     the same train step with ``gan_weight=0`` (no discriminator) and, in these presets,
          ``lpips_weight=0``: L1 + VQ + prior losses and Adam, like the reference generator step.
  encode / decode / forward: deterministic encode, decode, and both in one program.
"""

from larp_jax import config_lib
from larp_jax.configs import common, ucf101
import ml_collections

PRESETS = ('tiny', 'larp_l', 'micro', 'gen_tiny', 'gen_b')
GENERATOR_PRESETS = ('gen_tiny', 'gen_b')


def _ucf101(batch, source):
  return ucf101.get_config(f'batch={batch},source={source}')


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg,
    tiny=False,
    larp_l=False,
    micro=False,
    gen_tiny=False,
    gen_b=False,
    dtype='float32',
    batch=0,
    source='synthetic',
  )
  chosen = [p for p in PRESETS if arg[p]]
  if len(chosen) > 1:
    raise config_lib.ConfigError(f'choose one bench preset of {PRESETS}, got {chosen}')
  preset = chosen[0] if chosen else 'tiny'
  if arg.dtype not in ('float32', 'bfloat16'):
    raise config_lib.ConfigError(f'config argument dtype={arg.dtype!r} must be float32 or bfloat16')
  if preset in GENERATOR_PRESETS:
    return _generator(preset, arg.dtype, arg.batch)
  batch = arg.batch or {'tiny': 4, 'larp_l': 1, 'micro': 2}[preset]
  c = _ucf101(batch, arg.source)

  if preset == 'tiny':
    c.model.update(
      video_shape=(16, 64, 64),
      patch_size=(4, 8, 8),
      num_latent_tokens=256,
      width=256,
      encoder_depth=4,
      decoder_depth=4,
      num_heads=4,
      codebook_size=1024,
      code_dim=16,
      prior_depth=2,
      prior_width=128,
      prior_heads=2,
    )
    c.disc.update(width=512, depth=2, num_heads=8, patch_size=(4, 8, 8))
    c.loss.update(lpips_weight=1.0, lpips_net='vgg')
  elif preset == 'micro':
    # The test-size model every test uses (larp_jax/configs/common.py), on 8x32x32 clips.
    c.model.update(video_shape=(8, 32, 32), **common.TINY_MODEL)
    c.disc.update(common.TINY_DISC)
    c.loss.update(lpips_weight=1.0, lpips_net='alex')
  # larp_l: configs/ucf101.py unchanged (LPIPS-VGG, the 12-layer 512-wide discriminator).

  c.model.dtype = arg.dtype
  c.model.param_dtype = 'float32'
  c.mesh.update(data=-1, fsdp=1, tensor=1)

  c.bench = ml_collections.ConfigDict(
    dict(
      warmup=2,  # untimed runs after compilation (--warmup overrides)
      runs=5,  # timed runs; median / min / max are reported (--runs overrides)
      # Loss overrides per measurement. The reference generator step has neither LPIPS nor a GAN.
      train_overrides=dict(),
      gen_overrides=dict(gan_weight=0.0, lpips_weight=0.0),
      peak_size=0,  # matmul size of the peak measurement; 0 = 2048 CPU, 8192 GPU/TPU
      input_steps=10,  # batches timed for the input-pipeline clips/s
    )
  )
  return c


def _generator(preset: str, dtype: str, batch: int):
  """A generator bench config: the model (LARPAR kwargs), its optimiser, the bench settings."""
  from larp_jax.configs import ucf101_ar
  from larp_jax.models import larp_ar

  c = ml_collections.ConfigDict()
  c.task = 'generator'
  tiny = preset == 'gen_tiny'
  size = dict(dim=64, depth=2, num_heads=2) if tiny else larp_ar.preset_kwargs('B')
  c.model = dict(
    vocab_size=256 if tiny else 8192,
    num_classes=10 if tiny else 101,
    seq_len=64 if tiny else 1024,
    frame_prediction=False,
    **size,
    **ucf101_ar.AR_DROPOUT_AND_NORM,
    attention_impl='auto',
    dtype=dtype,
    param_dtype='float32',
  )
  c.batch_size = batch or (2 if tiny else 1)
  c.seed = 0
  c.total_steps = 1000
  ref = ucf101_ar.get_config('tiny')  # the generator recipe's optimiser (AdamW, b2 0.95)
  c.optim = ref.optim.copy_and_resolve_references()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.bench = ml_collections.ConfigDict(
    dict(
      warmup=1 if tiny else 1,
      runs=3 if tiny else 2,
      sample_batches=(1, 2) if tiny else (1, 16),
      recompute_batch=1,
      recompute_full=tiny,  # B: one loop step (a full forward) x seq_len
      recompute_runs=2 if tiny else 3,
      peak_size=0,
    )
  )
  return c
