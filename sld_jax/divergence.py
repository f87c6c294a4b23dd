"""Stopping training that diverges, before a diverged state is saved.

``DivergenceMonitor`` sees every step's host-side metrics (the trainer fetches
them at log and checkpoint steps, before any save) and names the first step
whose loss or gradient norm runs far above its running median; NaN/Inf is
``NonFiniteLossError``, checked by the trainer itself. The errors say which
checkpoint is the last good one.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Optional

import gin
import numpy as np


class TrainingDivergedError(FloatingPointError):
  """Training stopped because it diverged; nothing after the last good step was saved."""


class NonFiniteLossError(TrainingDivergedError):
  """The loss, gradient norm or parameter norm became NaN/Inf; training stopped."""


class DivergenceError(TrainingDivergedError):
  """The loss or gradient norm ran far above its running median; training stopped."""


@gin.configurable
class DivergenceMonitor:
  """Stops training that diverges while its numbers stay finite.

  Every step's loss and gradient norm are compared with their medians over
  the previous ``window`` steps (once ``min_history`` steps are known)::

    loss      4.1 3.9 3.8 3.7 3.7 ... 3.5 | 9e4     median 3.7: 9e4 > 10 x 3.7
    grad_norm 1.2 1.1 0.9 1.0 1.1 ... 0.8 | 3e3     median 1.0: 3e3 > 100 x 1.0

  A step beyond either limit raises ``DivergenceError`` before its state (or
  any later one) is saved. ``loss_factor`` / ``grad_norm_factor`` = 0
  disables that check. The loss median is also the metric by which the
  best-known-good checkpoint is kept (``checkpointing.BEST_METRIC``).

  Gin: ``DivergenceMonitor.loss_factor = 10.0`` etc.
  """

  def __init__(self, loss_factor: float = 10.0, grad_norm_factor: float = 100.0,
               window: int = 50, min_history: int = 10):
    if window < 1 or min_history < 1 or min_history > window:
      raise ValueError(f"DivergenceMonitor: need 1 <= min_history ({min_history}) <= window "
                       f"({window})")
    self.factors = {"loss": loss_factor, "grad_norm": grad_norm_factor}
    self.min_history = min_history
    self.history = {name: collections.deque(maxlen=window) for name in self.factors}
    self.last_step = -1

  def check(self, step: int, metrics: Mapping[str, Any]) -> Optional[str]:
    """Records a step's metrics; returns what diverged, or None (steps seen are skipped)."""
    if step <= self.last_step:
      return None
    self.last_step = step
    problem = None
    for name, factor in self.factors.items():
      value, history = float(metrics[name]), self.history[name]
      if factor and len(history) >= self.min_history and problem is None:
        median = float(np.median(history))
        if value > factor * median:
          problem = (f"{name} {value:.4g} at step {step} is more than {factor:g} times its "
                     f"median {median:.4g} over the previous {len(history)} steps")
      history.append(value)
    return problem

  def loss_median(self) -> Optional[float]:
    return float(np.median(self.history["loss"])) if self.history["loss"] else None
