"""The training state: step, parameters and optimizer state, as one pytree.

The optimizer (an ``optax.GradientTransformation``) is not part of the state:
the state holds only arrays, so it can be abstracted with ``jax.eval_shape``,
given shardings leaf by leaf, donated to the jitted step and written by
orbax as is.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything a training step reads and writes.

  Attributes:
    step: int32 scalar, the number of optimizer updates applied so far; the
      data position and the per-step random keys are functions of it.
    params: the model parameters (flax ``params`` collection).
    opt_state: the optimizer state for ``params``.
  """

  step: jax.Array
  params: Any
  opt_state: Any

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  def apply_gradients(self, grads: Any, tx: optax.GradientTransformation) -> "TrainState":
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)


def param_count(params: Any) -> int:
  """Number of scalars in a (possibly abstract) parameter tree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
