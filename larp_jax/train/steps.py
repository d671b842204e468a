"""Pure train and eval step functions of the tokenizer.

``tokenizer_train_step(state, batch, key, lpips_params, *, ...) -> (state, metrics)`` is bound
with ``functools.partial`` and jitted with in/out shardings and a donated state by the loop.

One step (in the order of the official `trainers/larp_tokenizer_trainer.py`):
  1. the tokenizer forward pass, kept as a VJP (one forward, one backward);
  2. every ``disc_every`` steps, a discriminator update on the detached reconstruction, with
     noisy labels and the LeCam regulariser (EMAs updated after the regulariser);
  3. the generator loss on the reconstruction with the (updated, frozen) discriminator:
     L1 + LPIPS + GAN, plus the VQ and prior losses, then one Adam step.

A batch-norm bottleneck (``model.uses_batch_stats``) needs the state to carry the model's
'batch_stats' collection as ``state.batch_stats``: the forward pass reads it, updates it
(``mutable=['batch_stats']``) and the new statistics go into the returned state.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from larp_jax.losses import gan, perceptual
from larp_jax.models import prior as prior_lib
from larp_jax.models import quantizer as quantizer_lib
from larp_jax.train import optim
from larp_jax.train.state import DISC_STATS, TokenizerTrainState


def _mix_ratio(step, loss_cfg, total_steps):
  return prior_lib.mix_ratio(step, total_steps, loss_cfg.mix_max_ratio, loss_cfg.mix_ramp_fraction)


def _vq_weight(step, loss_cfg):
  """``loss_cfg.vq_weight`` times the official epoch-wise warm-up (``vq_warmup_epochs`` <= 1:
  off, the released '1.0_1'); see ``quantizer.vq_warmup_ratio``."""
  epochs = int(loss_cfg.get('vq_warmup_epochs', 1))
  if epochs <= 1:
    return loss_cfg.vq_weight
  return loss_cfg.vq_weight * quantizer_lib.vq_warmup_ratio(
    step, loss_cfg.vq_warmup_start_ratio, epochs, loss_cfg.vq_warmup_steps_per_epoch
  )


def reconstruction_losses(recon, video, lpips_params, fake_logits_fn, *, loss_cfg, gan_on):
  """L1 (+ MSE) + LPIPS + GAN on a reconstruction; returns (weighted sum, dict of unweighted
  terms). ``loss_cfg.l2_weight`` (not LARP; 0 = off, the released loss) adds the mean squared
  error, the loss PSNR measures."""
  recon = recon.astype(jnp.float32)
  err = recon - video
  l1 = jnp.mean(jnp.abs(err))
  terms = {'l1_loss': l1}
  total = loss_cfg.l1_weight * l1
  l2_weight = loss_cfg.get('l2_weight', 0.0)
  if l2_weight > 0:
    mse = jnp.mean(jnp.square(err))
    terms['l2_loss'] = mse
    total = total + l2_weight * mse
  if loss_cfg.lpips_weight > 0:
    lp = jnp.mean(perceptual.lpips_video(lpips_params, recon, video, net=loss_cfg.lpips_net))
    terms['lpips_loss'] = lp
    total = total + loss_cfg.lpips_weight * lp
  if loss_cfg.gan_weight > 0:
    g = gan.generator_loss(fake_logits_fn(recon))
    terms['gan_loss'] = g
    total = total + loss_cfg.gan_weight * g * gan_on
  return total, terms


def discriminator_update(
  state: TokenizerTrainState, real, fake, rng, *, disc, disc_tx, loss_cfg, optim_cfg, total_steps
):
  """One discriminator Adam step on real vs (detached) fake videos. Returns the new
  (disc_params, disc_opt_state, lecam_ema, disc_stats)."""
  fake = jax.lax.stop_gradient(fake)
  ema = state.lecam_ema

  def loss_fn(dp):
    real_logits = disc.apply({'params': dp}, real)
    fake_logits = disc.apply({'params': dp}, fake)
    bce = gan.discriminator_loss(
      real_logits, fake_logits, rng, loss_cfg.disc_label_noise, loss_cfg.disc_label_clip
    )
    lecam = gan.lecam_regularizer(real_logits, fake_logits, ema['real'], ema['fake'])
    weight = loss_cfg.lecam_weight
    if loss_cfg.lecam_weight_applied_twice:  # released-code quirk: effective weight w^2
      weight = weight * weight
    loss = bce + weight * lecam
    return loss, (bce, lecam, jnp.mean(real_logits), jnp.mean(fake_logits))

  (loss, (bce, lecam, real_mean, fake_mean)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.disc_params
  )
  updates, disc_opt_state = disc_tx.update(grads, state.disc_opt_state, state.disc_params)
  lr = optim_cfg.disc_lr * optim.lr_multiplier(
    state.step + 1,
    total_steps=total_steps,
    warmup_steps=optim_cfg.warmup_steps,
    start_mult=optim_cfg.start_lr_mult,
    min_mult=optim_cfg.min_lr_mult,
  )
  updates = jax.tree_util.tree_map(lambda u: u * lr, updates)
  disc_params = optax.apply_updates(state.disc_params, updates)
  new_ema = {
    'real': gan.update_ema(ema['real'], real_mean, loss_cfg.lecam_ema_decay),
    'fake': gan.update_ema(ema['fake'], fake_mean, loss_cfg.lecam_ema_decay),
  }
  stats = dict(zip(DISC_STATS, (loss, bce, lecam, real_mean, fake_mean)))
  return disc_params, disc_opt_state, new_ema, stats


def tokenizer_train_step(
  state: TokenizerTrainState,
  batch,
  key,
  lpips_params,
  *,
  model,
  disc,
  gen_tx,
  disc_tx,
  loss_cfg,
  optim_cfg,
  total_steps: int,
):
  """One tokenizer training step. ``batch['video']``: [B, T, H, W, 3] float in [0, 1].

  Returns the new state and a flat dict of float32 scalar metrics ('loss' is the total
  generator loss).
  """
  video = batch['video'].astype(jnp.float32)
  step = state.step + 1  # official steps count from 1
  key = jax.random.fold_in(key, state.step)
  k_vq, k_drop, k_disc = jax.random.split(key, 3)
  mix = _mix_ratio(step, loss_cfg, total_steps)
  vq_weight = _vq_weight(step, loss_cfg)
  use_stats = model.uses_batch_stats

  def forward(params):
    variables = {'params': params}
    if use_stats:
      variables['batch_stats'] = state.batch_stats
    out = model.apply(
      variables,
      video,
      train=True,
      mix_ratio=mix,
      step=step,
      rngs={'vq': k_vq, 'dropout': k_drop},
      mutable=['batch_stats'] if use_stats else False,
    )
    (recon, aux), new_vars = out if use_stats else (out, {})
    latent_loss = vq_weight * aux['vq_loss']
    if 'prior_loss' in aux:
      latent_loss = latent_loss + loss_cfg.prior_weight * aux['prior_loss']
    aux = {k: v for k, v in aux.items() if k != 'tokens'}
    return (recon, latent_loss), (aux, new_vars.get('batch_stats'))

  (recon, latent_loss), pullback, (aux, batch_stats) = jax.vjp(forward, state.params, has_aux=True)

  use_gan = loss_cfg.gan_weight > 0
  if use_gan:
    # As the official disc_factor (models/loss.py): before disc_start the discriminator neither
    # trains nor shapes the generator.
    disc_on = ((state.step % loss_cfg.disc_every) == 0) & (state.step >= loss_cfg.disc_start)
    d_args = dict(
      disc=disc, disc_tx=disc_tx, loss_cfg=loss_cfg, optim_cfg=optim_cfg, total_steps=total_steps
    )
    disc_params, disc_opt_state, lecam_ema, disc_stats = jax.lax.cond(
      disc_on,
      lambda: discriminator_update(state, video, recon, k_disc, **d_args),
      lambda: (state.disc_params, state.disc_opt_state, state.lecam_ema, state.disc_stats),
    )
    fake_logits_fn = lambda r: disc.apply({'params': jax.lax.stop_gradient(disc_params)}, r)
  else:
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    lecam_ema, disc_stats = state.lecam_ema, state.disc_stats
    fake_logits_fn = None
  gan_on = (state.step >= loss_cfg.disc_start).astype(jnp.float32)

  (recon_total, terms), g_recon = jax.value_and_grad(
    lambda r: reconstruction_losses(
      r, video, lpips_params, fake_logits_fn, loss_cfg=loss_cfg, gan_on=gan_on
    ),
    has_aux=True,
  )(recon)
  (grads,) = pullback((g_recon, jnp.ones_like(latent_loss)))

  updates, opt_state = gen_tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    d = optim_cfg.ema_decay
    ema_params = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema_params, params)

  lr = optim_cfg.lr * optim.lr_multiplier(
    step,
    total_steps=total_steps,
    warmup_steps=optim_cfg.warmup_steps,
    start_mult=optim_cfg.start_lr_mult,
    min_mult=optim_cfg.min_lr_mult,
  )
  metrics = {
    'loss': recon_total + latent_loss,
    **terms,
    **aux,
    **disc_stats,
    'grad_norm': optax.tree.norm(grads),
    'lr': lr,
    'mix_ratio': mix,
  }
  if int(loss_cfg.get('vq_warmup_epochs', 1)) > 1:
    metrics['vq_weight'] = vq_weight
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  new_state = state.replace(
    step=step,
    params=params,
    opt_state=opt_state,
    disc_params=disc_params,
    disc_opt_state=disc_opt_state,
    lecam_ema=lecam_ema,
    disc_stats=disc_stats,
    ema_params=ema_params,
  )
  if use_stats:
    new_state = new_state.replace(batch_stats=batch_stats)
  return new_state, metrics
