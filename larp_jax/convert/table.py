"""The tensor mapping as data: rules from official state-dict names to our parameter paths.

A ``Rule`` pairs an official name pattern (``'encoder.blocks.{i}.attn.qkv.weight'``) with our
path pattern (``'params/encoder/blocks_{i}/attn/qkv/kernel'``) and a transform (``TRANSFORMS``:
how the array changes on the way, with its inverse). ``map_tensors`` applies a table to an
official state dict, checking that every source tensor is used exactly once, that every
parameter of ours is filled and that the shapes agree; ``unmap_tensors`` runs the table
backwards (our variables -> an official state dict), which is what the round-trip tests use.

Arrays may be numpy arrays or ``jax.ShapeDtypeStruct`` (shapes only: the transforms then run
under ``jax.eval_shape``, so a LARP-L-sized mapping is checked without allocating it).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np

from larp_jax import errors

Array = Any


def _identity(x, ctx):
  del ctx
  return x


def _linear(w, ctx):
  """torch Linear weight [out, in] <-> Dense kernel [in, out] (its own inverse)."""
  del ctx
  return w.T


def _conv3d_patch(w, ctx):
  """Conv3d weight [D, 3, kt, kh, kw] -> Dense kernel over patches flattened (kt, kh, kw, c)."""
  del ctx
  return w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0])


def _conv3d_patch_inv(k, ctx):
  kt, kh, kw = ctx['patch_size']
  return k.reshape(kt, kh, kw, 3, k.shape[-1]).transpose(4, 3, 0, 1, 2)


# name -> (official -> ours, ours -> official).
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
  'identity': (_identity, _identity),
  'linear': (_linear, _linear),
  'conv3d_patch': (_conv3d_patch, _conv3d_patch_inv),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One official name pattern -> one path of ours. ``{i}`` stands for a layer index."""

  official: str
  ours: str
  transform: str = 'identity'

  def __post_init__(self):
    if self.transform not in TRANSFORMS:
      raise ValueError(f'unknown transform {self.transform!r}')


def linear(official: str, ours: str, *, bias: bool = True) -> list[Rule]:
  """The rules of a torch Linear ``official`` (weight [, bias]) -> a Dense ``ours``."""
  rules = [Rule(f'{official}.weight', f'{ours}/kernel', 'linear')]
  return rules + ([Rule(f'{official}.bias', f'{ours}/bias')] if bias else [])


def layer_norm(official: str, ours: str) -> list[Rule]:
  """A torch LayerNorm (weight, bias) -> our LayerNorm (scale, bias)."""
  return [Rule(f'{official}.weight', f'{ours}/scale'), Rule(f'{official}.bias', f'{ours}/bias')]


def _regex(pattern: str) -> re.Pattern:
  parts = re.split(r'(\{i\})', pattern)
  return re.compile(
    '^' + ''.join(r'(?P<i>\d+)' if p == '{i}' else re.escape(p) for p in parts) + '$'
  )


def _fill(pattern: str, match: re.Match) -> str:
  return pattern.replace('{i}', match.group('i')) if '{i}' in pattern else pattern


def _find(compiled, name):
  """(rule, match) of the first rule whose pattern matches ``name``, or (None, None)."""
  for rule, rx in compiled:
    if m := rx.match(name):
      return rule, m
  return None, None


def _shape(x) -> tuple:
  return tuple(int(s) for s in x.shape)


def _apply(fn: Callable, x, ctx):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.eval_shape(lambda a: fn(a, ctx), x)
  return fn(x, ctx)


@dataclasses.dataclass
class Mapped:
  """What ``map_tensors`` returns: our flat variables and what it saw on the way."""

  variables: dict  # {'params/encoder/...': array}
  used: dict  # official name -> our path
  buffers: dict  # official buffer name -> {'max_abs_diff': float | None, 'status': str}
  ignored: dict  # official name -> why it is not loaded
  dtypes: dict  # source dtype -> number of tensors


def map_tensors(
  names: Iterable[str],
  get: Callable[[str], Array],
  rules: list[Rule],
  expected: Mapping[str, tuple],
  *,
  ctx: Mapping[str, Any],
  buffers: Optional[Mapping[str, Callable[[], np.ndarray]]] = None,
  ignore: Optional[Mapping[str, str]] = None,
  dtype=np.float32,
  buffer_atol: float = 1e-6,
) -> Mapped:
  """Maps the official tensors ``names`` (read one at a time by ``get``) onto our flat paths.

  Args:
    names: every name in the official state dict.
    get: name -> array (numpy, or ``jax.ShapeDtypeStruct`` for a shapes-only mapping); called
      once per tensor, so a lazy reader keeps only our tree and one source tensor alive.
    rules: the table.
    expected: our flat variable paths ('params/...', 'batch_stats/...') -> shapes.
    ctx: what the transforms need (e.g. 'patch_size').
    buffers: official buffer name -> a function giving our value of it (compared, not loaded).
    ignore: official name regex -> why that tensor is not loaded.
    dtype: our parameter dtype; source tensors of another dtype are cast to it.
  Raises:
    ConfigError: a source tensor no rule maps, or one mapping to no parameter of ours
      (leftovers); a parameter no tensor fills (missing); two tensors for one parameter;
      shapes that disagree. The one-line message lists every name concerned.
  """
  compiled = [(r, _regex(r.official)) for r in rules]
  ignore_rx = [(re.compile(p), why) for p, why in (ignore or {}).items()]
  buffers = dict(buffers or {})
  out, used, seen_buf, ignored, dtypes = {}, {}, {}, {}, {}
  leftover, unexpected, twice, bad_shape, bad_paths = [], [], [], [], set()
  for name in sorted(names):
    if name in buffers:
      seen_buf[name] = _compare_buffer(get(name), buffers[name](), buffer_atol)
      continue
    why = next((w for rx, w in ignore_rx if rx.match(name)), None)
    if why is not None:
      ignored[name] = why
      continue
    rule, match = _find(compiled, name)
    if rule is None:
      leftover.append(name)
      continue
    path = _fill(rule.ours, match)
    if path not in expected:
      unexpected.append(f'{name} -> {path}')
      continue
    if path in used.values() or path in bad_paths:
      twice.append(f'{name} -> {path}')
      continue
    x = get(name)
    dtypes[str(x.dtype)] = dtypes.get(str(x.dtype), 0) + 1
    y = _apply(TRANSFORMS[rule.transform][0], x, ctx)
    del x
    if _shape(y) != tuple(expected[path]):
      bad_shape.append(f'{name} {_shape(y)} -> {path} {tuple(expected[path])}')
      bad_paths.add(path)
      continue
    out[path] = _cast(y, dtype)
    used[name] = path
  missing = sorted(set(expected) - set(out) - bad_paths)
  problems = []
  if leftover:
    problems.append(f'{len(leftover)} official tensor(s) that no rule maps: {", ".join(leftover)}')
  if unexpected:
    problems.append(
      f'{len(unexpected)} official tensor(s) for parameters this model does not have: '
      f'{", ".join(unexpected)}'
    )
  if twice:
    problems.append(f'parameters filled twice: {", ".join(twice)}')
  if bad_shape:
    problems.append(f'shape mismatch: {"; ".join(bad_shape)}')
  if missing:
    problems.append(
      f'{len(missing)} parameter(s) of ours that no official tensor fills: {", ".join(missing)}'
    )
  if problems:
    raise errors.ConfigError('cannot convert: ' + ' | '.join(problems))
  for name in sorted(set(buffers) - set(seen_buf)):
    seen_buf[name] = {'max_abs_diff': None, 'status': 'absent from the checkpoint'}
  return Mapped(out, used, seen_buf, ignored, dtypes)


def _cast(y, dtype):
  if isinstance(y, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(y.shape, dtype)
  y = np.asarray(y)
  return y if y.dtype == dtype else y.astype(dtype)


def _compare_buffer(value, ours: np.ndarray, atol: float) -> dict:
  """The official buffer ``value`` against our table ``ours`` (same number of entries)."""
  if isinstance(value, jax.ShapeDtypeStruct):
    same = math.prod(value.shape) == ours.size
    return {'max_abs_diff': None, 'status': 'shape only' if same else 'differs: shape'}
  value = np.asarray(value, np.float64)
  if value.size != ours.size:
    return {
      'max_abs_diff': None,
      'status': f'differs: shape {tuple(value.shape)}, ours {tuple(ours.shape)}; ours is used',
    }
  diff = float(np.max(np.abs(value.reshape(ours.shape) - ours))) if ours.size else 0.0
  status = 'same' if diff <= atol else f'differs (max |diff| {diff:.3g} > {atol:g}); ours is used'
  return {'max_abs_diff': diff, 'status': status}


def unmap_tensors(
  variables: Mapping[str, Array], rules: list[Rule], *, ctx: Mapping[str, Any]
) -> dict:
  """Our flat variables -> the official state dict, by the inverse transforms of ``rules``.

  Raises ConfigError naming every path of ours that no rule covers."""
  compiled = [(r, _regex(r.ours)) for r in rules]
  out, uncovered = {}, []
  for path, x in variables.items():
    rule, match = _find(compiled, path)
    if rule is None:
      uncovered.append(path)
      continue
    out[_fill(rule.official, match)] = _apply(TRANSFORMS[rule.transform][1], x, ctx)
  if uncovered:
    raise errors.ConfigError(
      f'no official name for {len(uncovered)} parameter(s): {", ".join(sorted(uncovered))}'
    )
  return out
