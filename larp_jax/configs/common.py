"""Pieces the config files share: the tiny test model (the ``tiny`` config argument)."""

from __future__ import annotations

# The test-size tokenizer: compiles in seconds on a 2-core CPU. Video shape apart (tests pick
# their own), these are the sizes every test and smoke run uses.
TINY_VIDEO_SHAPE = (4, 32, 32)
TINY_MODEL = dict(
  patch_size=(2, 8, 8),
  num_latent_tokens=8,
  width=32,
  encoder_depth=1,
  decoder_depth=1,
  num_heads=2,
  codebook_size=64,
  code_dim=8,
  prior_depth=1,
  prior_width=16,
  prior_heads=2,
)
TINY_DISC = dict(width=16, depth=1, num_heads=2, patch_size=(2, 8, 8))


def apply_tiny(c) -> None:
  """Makes config ``c`` the tiny smoke run: tiny networks, batch 2, 4 steps, no evaluation
  during training (``--config=...:tiny``). Data settings are left as they are."""
  c.model.update(video_shape=TINY_VIDEO_SHAPE, **TINY_MODEL)
  c.disc.update(TINY_DISC)
  c.batch_size = 2
  c.total_steps = 4
  c.loss.disc_every = 2
  c.log_every = 1
  c.checkpoint_every = 2
  c.eval_every = 0
