"""Procedural videos with labelled motion: the built-in source that needs nothing on disk.

Each video is a pure function of (content seed, split, index): a textured background seen by a
slowly panning camera, one large "hero" object whose motion (and, above 10 classes, shape)
defines the class, and 1-3 small distractor objects drifting slowly, in a random depth order so
that they occlude the hero or are occluded by it. Objects are two-tone striped so rotation shows.
Motion is analytic in time, so a clip can start at any frame without simulating the frames
before it. Everything is vectorised numpy over (T, H, W).

Classes (label % 10 = hero motion; label // 10 = hero shape when num_classes > 10):
  0 bounce left-right   1 bounce up-down     2 bounce diagonally   3 circular orbit
  4 spin in place       5 pulse (scale)      6 wave path           7 fall and bounce (gravity)
  8 blink (on/off)      9 figure-eight
Shapes: 0 disk, 1 square, 2 triangle, 3 cross, 4 ring.
"""

import numpy as np

MOTIONS = (
  'bounce_h',
  'bounce_v',
  'bounce_diag',
  'orbit',
  'spin',
  'pulse',
  'wave',
  'gravity',
  'blink',
  'figure8',
)
SHAPES = ('disk', 'square', 'triangle', 'cross', 'ring')
_SPLIT_IDS = {'train': 0, 'eval': 1}


def class_name(label: int, num_classes: int) -> str:
  m = MOTIONS[label % len(MOTIONS)]
  return m if num_classes <= len(MOTIONS) else f'{SHAPES[label // len(MOTIONS)]}_{m}'


def _reflect(p, lo, hi):
  """Position of a point moving freely along p, bouncing between lo and hi (triangle wave)."""
  span = np.maximum(hi - lo, 1e-6)
  q = np.mod(p - lo, 2 * span)
  return lo + span - np.abs(q - span)


def _pastel(rng, n):
  return (0.35 + 0.45 * rng.random((n, 3))).astype(np.float32)


def _vivid(rng, n):
  """Saturated colours: one channel high, one low, one random, in a random order."""
  c = np.stack([np.full(n, 0.95), np.full(n, 0.08), rng.random(n)], -1)
  return rng.permuted(c, axis=1).astype(np.float32)


def _shape_dist(kind, u, v):
  """A distance-like field that is < 1 inside the unit-size shape (u, v in object units)."""
  if kind == 0:  # disk
    return np.sqrt(u * u + v * v)
  if kind == 1:  # square
    return np.maximum(np.abs(u), np.abs(v)) * 1.25
  if kind == 2:  # triangle, pointing up in object coordinates
    return np.maximum(np.abs(u) * 1.732 - v * 1.0, v * 2.0) * 0.62 + 0.38
  if kind == 3:  # cross
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au * 3.0, av), np.maximum(av * 3.0, au)) * 1.1
  r = np.sqrt(u * u + v * v)  # ring
  return np.abs(r - 0.72) * 3.5


def _hero_track(rng, motion, t, r, wn, hn):
  """(cx, cy, angle, scale, alpha), each [T], for the class-defining object."""
  nt = t.shape[0]
  one = np.ones(nt, np.float32)
  lo_x, hi_x, lo_y, hi_y = r, wn - r, r, hn - r
  x0, y0 = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
  sgn = rng.choice([-1.0, 1.0], size=2)
  speed = rng.uniform(0.03, 0.06)
  phase = rng.uniform(0, 2 * np.pi)
  angle = np.full(nt, rng.uniform(0, 2 * np.pi), np.float32)
  cx, cy, scale, alpha = np.full(nt, x0), np.full(nt, y0), one, one
  mx, my = 0.5 * wn, 0.5 * hn
  if motion == 0:
    cx = _reflect(x0 + sgn[0] * speed * t, lo_x, hi_x)
  elif motion == 1:
    cy = _reflect(y0 + sgn[1] * speed * t, lo_y, hi_y)
  elif motion == 2:
    cx = _reflect(x0 + sgn[0] * speed * 0.8 * t, lo_x, hi_x)
    cy = _reflect(y0 + sgn[1] * speed * 0.8 * t, lo_y, hi_y)
  elif motion == 3:
    rad = rng.uniform(0.16, 0.24) * min(wn, hn)
    w = sgn[0] * rng.uniform(0.15, 0.3)
    cx, cy = mx + rad * np.cos(w * t + phase), my + rad * np.sin(w * t + phase)
  elif motion == 4:
    angle = angle + sgn[0] * rng.uniform(0.25, 0.45) * t
  elif motion == 5:
    scale = 1.0 + 0.45 * np.sin(rng.uniform(0.3, 0.6) * t + phase)
  elif motion == 6:
    cx = _reflect(x0 + sgn[0] * speed * t, lo_x, hi_x)
    amp = rng.uniform(0.1, 0.18) * hn
    yc = np.clip(y0, lo_y + amp, hi_y - amp)
    cy = yc + amp * np.sin(rng.uniform(0.3, 0.5) * t + phase)
  elif motion == 7:
    period = rng.uniform(14, 24)
    u = np.mod(t + phase * period, period) / period
    height = rng.uniform(0.4, 0.7) * (hi_y - lo_y)
    cy = hi_y - 4.0 * height * u * (1.0 - u)
    cx = _reflect(x0 + sgn[0] * 0.008 * t, lo_x, hi_x)
  elif motion == 8:
    alpha = (np.sin(rng.uniform(0.6, 1.0) * t + phase) > 0).astype(np.float32)
  elif motion == 9:
    w = sgn[0] * rng.uniform(0.12, 0.2)
    rad = rng.uniform(0.22, 0.3) * min(wn, hn)
    cx, cy = mx + rad * np.sin(w * t + phase), my + 0.5 * rad * np.sin(2 * (w * t + phase))
  return cx, cy, angle, scale, alpha


def _distractor_track(rng, t, r, wn, hn):
  nt = t.shape[0]
  vx, vy = rng.uniform(-0.012, 0.012, size=2)
  cx = _reflect(rng.uniform(r, wn - r) + vx * t, r, wn - r)
  cy = _reflect(rng.uniform(r, hn - r) + vy * t, r, hn - r)
  angle = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.03, 0.03) * t
  return cx, cy, angle, np.ones(nt, np.float32), np.ones(nt, np.float32)


def _background(rng, t, h, w, unit, smooth=False):
  """[T, H, W, 3] float32: a two-colour texture under a camera panning by whole pixels per frame.

  ``smooth`` replaces the texture by a slow colour ramp (under a cycle across the frame).

  The texture is evaluated once on the world region the clip sees, then each frame is a shifted
  window of it (a single gather), which is much cheaper than evaluating it per frame.
  """
  py, px = rng.integers(-1, 2, size=2)
  oy, ox = (py * t).astype(np.int64), (px * t).astype(np.int64)  # [T] world offset of each frame
  y0, x0 = oy.min(), ox.min()
  ys = (np.arange(y0, oy.max() + h, dtype=np.float32) + 0.5)[:, None] / unit
  xs = (np.arange(x0, ox.max() + w, dtype=np.float32) + 0.5)[None, :] / unit
  kind = rng.integers(3)
  th = rng.uniform(0, np.pi)
  c, s = np.float32(np.cos(th)), np.float32(np.sin(th))
  if smooth:
    g = 0.5 + 0.5 * np.sin(
      np.float32(rng.uniform(1.5, 3.0)) * (c * xs + s * ys) + rng.uniform(0, 6)
    )
  elif kind == 0:  # stripes
    g = 0.5 + 0.5 * np.sin(np.float32(rng.uniform(10, 30)) * (c * xs + s * ys))
  elif kind == 1:  # rotated checkerboard
    f = np.float32(rng.uniform(4, 10))
    g = 0.25 + 0.5 * np.mod(np.floor(f * (c * xs + s * ys)) + np.floor(f * (c * ys - s * xs)), 2.0)
  else:  # plasma: three plane waves
    g = 0.0
    for _ in range(3):
      a = rng.uniform(0, 2 * np.pi)
      f = np.float32(rng.uniform(5, 15))
      g = g + np.sin(
        f * (np.float32(np.cos(a)) * xs + np.float32(np.sin(a)) * ys) + rng.uniform(0, 6)
      )
    g = 0.5 + g / 6.0
  c0, c1 = _pastel(rng, 2)
  tex = c0 + g[..., None].astype(np.float32) * (c1 - c0)  # [h', w', 3]
  # Per-frame slices: numpy's multi-axis fancy indexing is several times slower here.
  return np.stack([tex[a : a + h, b : b + w] for a, b in zip(oy - y0, ox - x0)])


STYLES = ('textured', 'simple')


def render(
  seed: int,
  split: str,
  index: int,
  num_classes: int,
  t0: int,
  shape,
  stride: int = 1,
  style: str = 'textured',
) -> tuple[np.ndarray, int]:
  """Frames t0 + i * stride (i < T) of synthetic video `index`, as float32 [T, H, W, 3] in [0, 1].

  style: 'textured' (the default: fine background textures, striped objects, 1-3 distractors) or
  'simple' (a smooth colour-ramp background, solid objects, at most one distractor): the same
  motions and classes with little high-frequency detail, which a tiny tokenizer can learn to
  reconstruct in a few hundred steps (configs/demo.py).

  Deterministic in (seed, split, index, t0, stride, shape); label = index % num_classes.
  Returns (clip, label).
  """
  nt, h, w = shape
  label = int(index) % num_classes
  motion = label % len(MOTIONS)
  rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])
  hero_shape = (
    (label // len(MOTIONS)) if num_classes > len(MOTIONS) else int(rng.integers(len(SHAPES)))
  )
  unit = float(min(h, w))
  wn, hn = w / unit, h / unit
  t = (t0 + np.arange(nt) * stride).astype(np.float32)
  if style not in STYLES:
    raise ValueError(f'synthetic style must be one of {STYLES}, got {style!r}')
  simple = style == 'simple'
  frame = _background(rng, t, h, w, unit, smooth=simple)

  objects = []
  r = rng.uniform(0.17, 0.24)
  objects.append((hero_shape, r, _hero_track(rng, motion, t, r, wn, hn)))
  for _ in range(int(rng.integers(0, 2) if simple else rng.integers(1, 4))):
    rd = rng.uniform(0.07, 0.12)
    objects.append((int(rng.integers(len(SHAPES))), rd, _distractor_track(rng, t, rd, wn, hn)))
  order = rng.permutation(len(objects))  # back-to-front; the hero may be in front or behind
  colors = _vivid(rng, 2 * len(objects)).reshape(len(objects), 2, 3)
  stripe_freq = rng.uniform(0.75, 1.5, size=len(objects)).astype(np.float32)
  for k in order:
    kind, rad, (cx, cy, ang, sc, al) = objects[k]
    size = np.asarray(sc, np.float32) * np.float32(rad)  # [T] object radius, in units
    # Draw each frame's object inside a fixed-size window around it (clamped into the frame):
    # the window holds the object's visible part, and costs far less than the whole frame.
    box = int(np.ceil(2 * 1.2 * size.max() * unit)) + 4
    bh, bw = min(box, h), min(box, w)
    top = np.clip(np.round(cy * unit - bh / 2), 0, h - bh).astype(np.int64)
    left = np.clip(np.round(cx * unit - bw / 2), 0, w - bw).astype(np.int64)
    rows = top[:, None, None] + np.arange(bh)[None, :, None]  # [T, bh, 1]
    cols = left[:, None, None] + np.arange(bw)[None, None, :]  # [T, 1, bw]
    inv = (1.0 / size)[:, None, None]
    dy = ((rows + 0.5) / unit - np.asarray(cy, np.float32)[:, None, None]).astype(np.float32) * inv
    dx = ((cols + 0.5) / unit - np.asarray(cx, np.float32)[:, None, None]).astype(np.float32) * inv
    ca = np.cos(ang).astype(np.float32)[:, None, None]
    sa = np.sin(ang).astype(np.float32)[:, None, None]
    u = ca * dx + sa * dy
    v = ca * dy - sa * dx
    dist = _shape_dist(kind, u, v)
    # Soft edge about 1.5 px wide, and the blink on/off factor.
    a = np.clip((1.0 - dist) * (size * unit / 1.5)[:, None, None], 0.0, 1.0)
    a *= np.asarray(al, np.float32)[:, None, None]
    two_tone = (
      np.zeros_like(u)
      if simple
      else (np.floor(stripe_freq[k] * u + 8.0).astype(np.int32) & 1).astype(np.float32)
    )
    c0, diff = colors[k, 0], colors[k, 1] - colors[k, 0]
    a_hi = (a * two_tone)[..., None]
    a = a[..., None]
    for i in range(nt):
      win = frame[i, top[i] : top[i] + bh, left[i] : left[i] + bw]  # a view: updated in place
      win += a[i] * (c0 - win) + a_hi[i] * diff
  # Every pixel is a convex mix of colours in [0, 1], so no clipping is needed.
  return frame, label
