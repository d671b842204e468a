"""3D patch (un)flattening shared by the tokenizer and the discriminator.

Patches are flattened in (kt, kh, kw, c) order and tokens in t-major, then h, then w order, as in
the official Conv3d(kernel=stride=patch) + flatten(2).
"""

import einops


def patchify(video, patch_size):
  """[B, T, H, W, C] -> [B, (T/kt)(H/kh)(W/kw), kt*kh*kw*C]."""
  pt, ph, pw = patch_size
  return einops.rearrange(
    video, 'b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)', pt=pt, ph=ph, pw=pw
  )


def unpatchify(patches, grid, patch_size, channels: int = 3):
  """[B, gt*gh*gw, kt*kh*kw*C] -> [B, gt*kt, gh*kh, gw*kw, C]."""
  (gt, gh, gw), (pt, ph, pw) = grid, patch_size
  return einops.rearrange(
    patches,
    'b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c',
    t=gt,
    h=gh,
    w=gw,
    pt=pt,
    ph=ph,
    pw=pw,
    c=channels,
  )
