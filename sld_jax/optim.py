"""Learning-rate schedules and the AdamW optimizer, configured from gin.

The paper's recipe (released code, Hugging Face Trainer defaults): AdamW,
peak lr 3e-4, linear decay to 0 over the run, no warmup, no gradient
clipping. ``warmup + cosine`` and clipping are there for other runs.

Schedules are indexed by the optimizer step (0 for the first update), so
``schedule(0)`` is the lr of the first update, as in Hugging Face's
``get_linear_schedule_with_warmup``. Example with ``peak_value=1``,
``total_steps=4``::

  kind="linear", warmup_steps=0:  step 0 1 2 3 4  ->  1.00 0.75 0.50 0.25 0.00
  kind="linear", warmup_steps=2:  step 0 1 2 3 4  ->  0.00 0.50 1.00 0.50 0.00
  kind="cosine", warmup_steps=0:  step 0 1 2 3 4  ->  1.00 0.85 0.50 0.15 0.00

Weight decay follows the GPT-2 / Hugging Face convention
(``no_decay = ["bias", "LayerNorm.weight"]``): every parameter decays except
biases and norm scales; embeddings decay. The decoder names those leaves
``bias`` and ``scale`` (``sld_jax/model/layers.py``), which the mask reads,
so it also holds for stacked (scanned) layers where biases are 2-D.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import gin
import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]
SCHEDULES = ("constant", "linear", "cosine")
NO_DECAY_NAMES = ("bias", "scale")


@gin.configurable
def learning_rate_schedule(total_steps: int = gin.REQUIRED,
                           kind: str = "linear",
                           peak_value: float = 3e-4,
                           warmup_steps: int = 0,
                           end_value: float = 0.0) -> Schedule:
  """Linear warmup from 0 to ``peak_value``, then the decay named by ``kind``.

  Args:
    total_steps: optimizer steps of the whole run; the decay reaches
      ``end_value`` there (and stays).
    kind: "constant" (after warmup), "linear" or "cosine".
    peak_value: the lr after warmup.
    warmup_steps: steps of linear warmup (0 = start at the peak).
    end_value: the lr at ``total_steps``.
  """
  if kind not in SCHEDULES:
    raise ValueError(f"learning_rate_schedule.kind must be one of {SCHEDULES}, got {kind!r}")
  if total_steps <= 0:
    raise ValueError(f"learning_rate_schedule.total_steps must be > 0, got {total_steps}")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(
        f"learning_rate_schedule.warmup_steps={warmup_steps} must be in "
        f"[0, total_steps={total_steps}]")
  decay_steps = max(total_steps - warmup_steps, 1)
  if kind == "constant":
    decay = optax.constant_schedule(peak_value)
  elif kind == "linear":
    decay = optax.linear_schedule(peak_value, end_value, decay_steps)
  else:
    decay = optax.cosine_decay_schedule(
        peak_value, decay_steps, alpha=end_value / peak_value if peak_value else 0.0)
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak_value, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True where a parameter decays: everything but ``bias`` and ``scale`` leaves.

  >>> weight_decay_mask({"ln_1": {"scale": s, "bias": b}, "wte": {"embedding": e}})
  {"ln_1": {"scale": False, "bias": False}, "wte": {"embedding": True}}
  """
  def decays(path, _):
    # The last dict key names the leaf (boxed leaves add a trailing ".value").
    names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    return not names or names[-1] not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


@gin.configurable
def make_optimizer(learning_rate: Schedule = gin.REQUIRED,
                   b1: float = 0.9,
                   b2: float = 0.999,
                   eps: float = 1e-8,
                   weight_decay: float = 0.0,
                   clip_grad_norm: Optional[float] = None,
                   mu_dtype: Optional[str] = None) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay, masked), optionally after global-norm clipping.

  Args:
    learning_rate: a schedule (``@learning_rate_schedule()`` in gin) or a float.
    b1, b2, eps: Adam moments and epsilon (PyTorch / Hugging Face defaults).
    weight_decay: decoupled decay coefficient (Hugging Face default 0.0),
      applied as ``lr * weight_decay * param`` to the leaves
      ``weight_decay_mask`` selects.
    clip_grad_norm: clip gradients to this global norm; None = no clipping.
    mu_dtype: dtype of the first moment ("bfloat16" halves its memory).
  """
  if clip_grad_norm is not None and clip_grad_norm <= 0:
    raise ValueError(f"make_optimizer.clip_grad_norm must be > 0 or None, got {clip_grad_norm}")
  adamw = optax.adamw(
      learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      mask=weight_decay_mask, mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None)
  if clip_grad_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(clip_grad_norm), adamw)
