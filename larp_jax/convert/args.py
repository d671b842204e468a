"""Constructor arguments as data: each official argument is mapped to our settings or refused.

A table maps every argument name of an official constructor to an ``Arg``: its official default
and a rule. A rule turns the value into our settings (``{'model.width': 768}``), checks it and
gives nothing, or refuses it (``Refused``). ``Mapper.run`` applies a table to the arguments of a
config.json: every argument the table does not know is refused by name, every one it knows is
reported (what it became, or why it has no effect here), and all refusals are raised together
as one ``ConfigError`` line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

from larp_jax import errors

REQUIRED = object()  # an argument without an official default


class Refused(Exception):
  """A value larp_jax cannot reproduce; the message says why."""


@dataclasses.dataclass(frozen=True)
class Arg:
  """An official argument: its default and ``rule(value, args, mapper) -> settings``."""

  default: Any
  rule: Callable[[Any, Mapping[str, Any], 'Mapper'], Optional[dict]]


class Mapper:
  """Collects our settings, one report line per official argument, and the refusals."""

  def __init__(self):
    self.settings: dict = {}
    self.lines: list = []  # (official name, value, what it became, given in config.json)
    self.problems: list = []
    self.context: dict = {}  # what one rule tells a later one (e.g. prior_model.no_dropout)

  def run(self, prefix: str, given: Mapping[str, Any], table: Mapping[str, Arg]) -> None:
    """Maps ``given`` (official arguments of one constructor) through ``table``."""
    if not isinstance(given, Mapping):
      self.problems.append(f'{prefix.rstrip(".")}: expected a dict, got {given!r}')
      return
    for name in given:
      if name not in table:
        self.problems.append(f'{prefix}{name}={given[name]!r}: unknown argument')
    args = {k: given.get(k, a.default) for k, a in table.items()}
    for name, arg in table.items():
      value = args[name]
      if value is REQUIRED and not getattr(arg.rule, 'accepts_missing', False):
        self.problems.append(f'{prefix}{name}: missing (the official constructor requires it)')
        continue
      try:
        out = arg.rule(value, args, self) or {}
      except Refused as e:
        self.problems.append(f'{prefix}{name}={value!r}: {e}')
        continue
      what = out if isinstance(out, str) else ', '.join(f'{k}={v!r}' for k, v in out.items())
      if not isinstance(out, str):
        self.settings.update(out)
      if what:  # a nested constructor (empty) reports its own entries
        self.lines.append((f'{prefix}{name}', value, what, name in given))

  def raise_problems(self, what: str) -> None:
    if self.problems:
      raise errors.ConfigError(
        f'{what}: {len(self.problems)} argument(s) cannot be converted: ' + '; '.join(self.problems)
      )


# ---------------------------------------------------------------- rule builders


def to(key: str, fn: Callable[[Any], Any] = lambda v: v) -> Callable:
  """The value (through ``fn``) becomes our setting ``key`` ('model.x' or 'loss.y')."""
  return lambda v, a, m: {key: fn(v)}


def only(*allowed, why: str) -> Callable:
  """Accepted (with no setting of its own) only when the value is one of ``allowed``."""

  def rule(v, a, m):
    if v not in allowed:
      raise Refused(why)
    return 'checked'

  return rule


def equals(other: str, why: str = '') -> Callable:
  """Accepted only when equal to the argument ``other`` of the same constructor."""

  def rule(v, a, m):
    if v != a[other]:
      raise Refused(f'must equal {other}={a[other]!r}' + (f' ({why})' if why else ''))
    return f'checked (== {other})'

  return rule


def injected(key: str, source: str) -> Callable:
  """An argument the parent constructor fills in itself (with our setting ``key``, already
  mapped): accepted when absent or equal to it."""

  def rule(v, a, m):
    want = m.settings.get(key)
    if v is None or v == want:
      return f'checked (set by {source})'
    raise Refused(f'{source} sets it to {want!r}')

  return rule


def no_effect(why: str) -> Callable:
  """An argument the official forward pass never reads: reported, nothing to map."""
  return lambda v, a, m: f'no effect: {why}'
