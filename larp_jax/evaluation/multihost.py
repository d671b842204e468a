"""Reductions over the processes of a multi-host job (identities with one process)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from larp_jax.evaluation import fvd as fvd_lib


def host_local(x, mesh) -> np.ndarray:
  """A batch-sharded global array -> this host's rows, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P(('data', 'fsdp'))))


def gather_rows(tree):
  """Every process's numpy rows (the same count on each), concatenated in process order, on
  every process (identity with one process)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  gathered = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree_util.tree_map(np.asarray, gathered)


def all_sum(tree):
  """Sums numpy leaves over processes (identity with one process)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  gathered = multihost_utils.process_allgather(tree)
  return jax.tree_util.tree_map(lambda a: np.asarray(a).sum(axis=0), gathered)


def any_true(flag: bool) -> bool:
  """Whether ``flag`` is true on any process."""
  if jax.process_count() == 1:
    return bool(flag)
  return int(all_sum(np.int64(bool(flag)))) > 0


def all_sum_stats(stats: fvd_lib.FeatureStats) -> fvd_lib.FeatureStats:
  """FVD feature statistics summed over processes."""
  if jax.process_count() == 1:
    return stats
  n, s, so = all_sum((np.int64(stats.n), stats.sum, stats.sum_outer))
  out = fvd_lib.FeatureStats(stats.dim)
  out.n, out.sum, out.sum_outer = int(n), np.asarray(s, np.float64), np.asarray(so, np.float64)
  return out
