"""Fixed sin-cos position embeddings (the official `models/embed.py`).

All tables are built with numpy in float64 and returned as float32 numpy arrays, so that
they are compile-time constants and match the official buffers bit for bit.

Layout conventions (kept from the official code so converted weights line up):
  * 1D: for position p, ``[sin(p * w_0..w_{D/2-1}), cos(p * w_0..w_{D/2-1})]`` -- all sines,
    then all cosines; ``w_i = base ** (-i / (D/2))``.
  * 2D (MAE recipe): the first D/2 dims encode the column index w, the last D/2 the row h.
  * 3D: the 2D table (full width D) plus a full-width 1D table of the frame index t; the
    width is *not* split between t, h and w. Tokens are flattened t-major, then h, then w.
"""

from __future__ import annotations

import numpy as np


def sincos_1d(dim: int, positions, base: float = 10000.0) -> np.ndarray:
  """[len(positions), dim] table; ``dim`` must be even."""
  if dim % 2:
    raise ValueError(f'sin-cos embedding width must be even, got {dim}')
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / base**omega
  pos = np.asarray(positions, dtype=np.float32).reshape(-1).astype(np.float64)
  angles = np.einsum('p,d->pd', pos, omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, base: float = 10000.0) -> np.ndarray:
  """[grid_h * grid_w, dim]; row-major (h, w) order, dims [0, D/2) encode w, [D/2, D) encode h."""
  if dim % 4:
    raise ValueError(f'2D sin-cos embedding width must be divisible by 4, got {dim}')
  hh, ww = np.meshgrid(
    np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32), indexing='ij'
  )
  emb_w = sincos_1d(dim // 2, ww.reshape(-1), base)
  emb_h = sincos_1d(dim // 2, hh.reshape(-1), base)
  return np.concatenate([emb_w, emb_h], axis=1)


def sincos_3d(dim: int, grid_t: int, grid_h: int, grid_w: int, base: float = 10000.0) -> np.ndarray:
  """[grid_t * grid_h * grid_w, dim] float32: ``pe2d(h, w) + sincos_dim(t)``, t-major order."""
  pe2d = sincos_2d(dim, grid_h, grid_w, base)  # [h*w, D]
  pe_t = sincos_1d(dim, np.arange(grid_t), base)  # [t, D]
  pe = pe_t[:, None, :] + pe2d[None, :, :]  # [t, h*w, D]
  return pe.reshape(grid_t * grid_h * grid_w, dim).astype(np.float32)


def sincos_1d_table(dim: int, length: int, base: float = 10000.0) -> np.ndarray:
  """[length, dim] float32 table over positions 0..length-1 (the decoder's latent PE)."""
  return sincos_1d(dim, np.arange(length), base).astype(np.float32)
