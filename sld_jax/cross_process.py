"""Reductions of small host values over every JAX process.

Each process passes its own array of the same shape; every process gets the
same answer. With one process these return the input (as NumPy) without a
collective, so single-host code pays nothing.

  process 0: lengths = [3, 9]     process 1: lengths = [5, 2]
  all_max(lengths) -> [5, 9] on both;  all_sum(lengths) -> [8, 11] on both
  any_process(flag) -> True on both when either flag is True

The arrays must have the same shape in every process (``process_allgather``
stacks them); pad or agree on a length first when they may not.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def gather(value: Any) -> np.ndarray:
  """``[num_processes, *shape]``: every process's ``value``, in process order."""
  value = np.asarray(value)
  if jax.process_count() == 1:
    return value[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(value))


def all_sum(value: Any) -> np.ndarray:
  """Elementwise sum over processes."""
  return gather(value).sum(axis=0)


def all_max(value: Any) -> np.ndarray:
  """Elementwise maximum over processes."""
  return gather(value).max(axis=0)


def any_process(flag: bool) -> bool:
  """True in every process when ``flag`` is True in any of them."""
  return bool(np.any(gather(np.asarray(flag, np.int32))))
