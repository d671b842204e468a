"""The interface between a model and the shared training loop.

``loop.run(task_cls, config, workdir)`` owns everything every model shares: the mesh, the
sharded init or restore, the jitted step with its shardings, checkpoints, preemption, the NaN
guard, progress and ETA, ``metrics.jsonl``, TensorBoard, periodic evaluation. A task provides
only what is particular to its model; see ``larp_jax/tasks/tokenizer.py`` for a full one and
``tests/test_tasks.py`` for the smallest.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax

from larp_jax import sharding


class Task:
  """Subclass and fill in the methods that raise ``NotImplementedError``.

  Attributes set by ``__init__``: ``config`` (the run's ConfigDict), ``mesh`` (the device mesh
  the loop built), ``rules`` (logical-axis -> mesh-axis rules).
  """

  name = 'task'
  batch_keys: tuple = ('video',)  # the fields of each input batch the step receives
  # What each top-level field of the train state holds, for ``--mode=plan``'s memory lines
  # (``train/plan.py``): 'params', 'optimizer', 'discriminator', 'ema'; unlisted: 'other'.
  state_roles: dict = {'params': 'params', 'opt_state': 'optimizer'}

  def __init__(self, config, mesh):
    self.config = config
    self.mesh = mesh
    self.rules = sharding.rules(config)

  @classmethod
  def for_plan(cls, config, mesh):
    """The task as ``--mode=plan`` builds it: only shapes are needed, so a task may skip what
    only training reads (files, datasets). Default: the task itself."""
    return cls(config, mesh)

  # ------------------------------------------------------------------ state and step

  def boxed_init(self, seed: int):
    """A fresh train state (a pytree) whose parameters are ``nn.Partitioned`` boxes."""
    raise NotImplementedError

  def state_layout(self):
    """(abstract unboxed state, its logical PartitionSpecs, its NamedShardings), allocating
    nothing."""
    return sharding.state_layout(functools.partial(self.boxed_init, 0), self.mesh, self.rules)

  def abstract_state(self):
    """(abstract unboxed state, its NamedShardings), allocating nothing."""
    abstract, _, shardings = self.state_layout()
    return abstract, shardings

  def abstract_batch(self, batch_size: int) -> dict:
    """{key: jax.ShapeDtypeStruct} of one global batch of ``batch_size`` rows, the fields of
    ``batch_keys`` as ``train_data`` yields them (``--mode=plan`` compiles the step on these)."""
    raise NotImplementedError

  def train_step(self) -> Callable:
    """The pure step ``(state, batch, key, extras) -> (state, metrics)``; metrics are scalars.

    ``key`` is the run's base key: fold in ``state.step`` for per-step randomness.
    """
    raise NotImplementedError

  def extras(self) -> Any:
    """A replicated, read-only pytree passed to the step after ``key`` (e.g. frozen LPIPS
    weights); loaded once per run."""
    return {}

  def extras_shardings(self) -> Any:
    """The shardings of ``extras()`` (a tree of NamedShardings, or None: replicated). A stage-2
    task passes its frozen stage-1 parameters sharded like their training (e.g. FSDP)."""
    return None

  def abstract_extras(self) -> Any:
    """``extras()`` as ``jax.ShapeDtypeStruct``s, reading and allocating nothing that
    ``jax.eval_shape`` would not (``--mode=plan``). Override where ``extras`` reads files."""
    return jax.eval_shape(self.extras)

  # ------------------------------------------------------------------ data and reporting

  def train_data(self, *, batch_size: int, start_step: int):
    """This process's training iterator (a context manager) of dicts with ``batch_keys``,
    ``batch_size`` rows each, resumed at ``start_step``."""
    raise NotImplementedError

  def log_line(self, metrics: dict) -> str:
    """The middle of the progress line, e.g. ``'loss 0.1234'``."""
    return f'loss {metrics.get("loss", float("nan")):.4f}'

  def log_overview(self, state) -> None:
    """Logs the parameter overview at the start of a fresh run."""

  def data_counters(self, iterator) -> dict:
    """Extra scalars about the input written with every log line (e.g. skipped files)."""
    del iterator
    return {}

  # ------------------------------------------------------------------ evaluation and export

  def evaluate(self, state, workdir: str, step: int) -> Optional[dict]:
    """Evaluates ``state`` (every ``config.eval_every`` steps and at the end); None: nothing."""
    del state, workdir, step
    return None

  def export(self, state) -> Any:
    """The model's variables (what inference needs) from a train state: a params-only tree.
    Written to ``<workdir>/params`` at the end of training (``params_io``)."""
    raise NotImplementedError

  def variable_shardings(self):
    """(abstract model variables, their NamedShardings): the tree ``export`` returns."""
    raise NotImplementedError

  def with_variables(self, state, variables):
    """``state`` with its model variables replaced by ``variables`` (the tree ``export``
    returns): how ``config.init_from`` starts a run from saved parameters."""
    raise NotImplementedError

  def state_fields(self) -> dict:
    """The train-state field that holds each top-level key of ``export``'s tree."""
    raise NotImplementedError

  def evaluate_variables(self, variables, workdir: str, step: int, *, params_source=None) -> dict:
    """``--mode=eval``: evaluates exported variables; the result has a 'summary' line.
    ``params_source``: where they came from (a params directory's recorded source), for the
    evaluation record."""
    raise NotImplementedError

  def sample_variables(self, variables, workdir: str, step: int) -> dict:
    """``--mode=sample``: writes samples of exported variables (videos a person can look at and
    a JSON record); the result has a 'summary' line. Only generative tasks have it."""
    del variables, workdir, step
    from larp_jax import errors

    raise errors.UserError(f'--mode=sample: the {self.name} task does not sample')
