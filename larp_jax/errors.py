"""Exception types that are the user's mistakes, not bugs.

``python -m larp_jax.main`` prints a ``UserError`` as one line (``error: ...``, exit 2) and any
other exception with its traceback (exit 1). They subclass ``ValueError``, so callers that catch
``ValueError`` keep working.
"""


class UserError(ValueError):
  """A mistake the user can fix: a config, a path, data, a run directory."""


class ConfigError(UserError):
  """A config value that cannot work (the message names the field)."""


class DataError(UserError):
  """Input data that cannot be used (the message names the file or the split)."""
