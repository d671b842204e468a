"""The user's mistakes, as exception types: what a command reports in one line.

A command (``python -m larp_jax.main``, ``larp_jax.fvd``, ``larp_jax.data.prepare``, ...) prints
a ``UserError`` (or an ``OSError``: a full disk, a permission) as one line ``error: ...`` and exits
with code 2. Every other exception, a plain ``ValueError`` or ``TypeError`` included, is a bug
and shows its traceback (exit code 1). So raise these for what the user can fix (a config
field, a data path, a run directory, an input array), never for an internal inconsistency.

``UserError`` subclasses ``ValueError``: library callers that catch ``ValueError`` keep working.
"""


class UserError(ValueError):
  """A mistake the user can fix; its message is one line that says what to change."""


class ConfigError(UserError):
  """A config file, ``:args``, ``--config.X`` override or config value that cannot work."""


class DataError(UserError):
  """Input data that is missing or cannot be used as configured (paths, files, splits)."""
