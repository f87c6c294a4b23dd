"""The output projection and the loss in one pass, with the gradient made in it.

``losses.compute_loss_chunked`` never holds ``[B, L, V]`` logits, but its
backward pass recomputes each chunk's logits (``jax.checkpoint``): four
``[B, C, E] x [E, V]`` products per chunk (forward, recomputed forward, the
two gradient products). Here the gradient of each chunk is made while its
logits are alive, so the backward pass only scales what the forward pass left
(``jax.custom_vjp``): three products per chunk, and no logits in the backward
pass at all.

That works because the objective is linear in its per-token terms with
weights that do not depend on the parameters (``losses.loss_coefficients``)::

  objective = sum_i ce[i] * nll[i] + kl[i] * KL[i]

  d objective / d logits[i, v] = ce[i] * (p[i, v] - onehot(y_i)[v])
      + kl[i] / T * (sum(t) * p_T[i, v] - t[i, v])     (v a unit, SLD only)

(``p`` the softmax over the real vocabulary, ``p_T`` the tempered softmax
over the K units, ``t`` the two-valued KL target of ``losses``, ``sum(t)``
= 1). From ``dlogits`` the forward pass keeps ``dlogits @ table`` (``[B, L,
E]``, the gradient for the hidden states) and ``sum_chunks dlogits^T h``
(``[V, E]`` float32, the gradient for the output table); the backward pass
multiplies both by the objective's cotangent.

Only the objective carries a gradient: the per-token terms and the metrics
built from them come out of ``jax.lax.stop_gradient``. So whoever
differentiates must differentiate the returned loss, with the counts it
should be divided by passed in as ``denominators`` (a microbatch's share of
its batch: ``SpeechTextLM.microbatch_objective``), never a loss rebuilt from
the metrics.

Equal to ``compute_loss_chunked`` (and so to ``compute_loss``) in value and
gradient up to float rounding: tests/test_fused_paths.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sld_jax import losses
from sld_jax.model.decoder import LOGITS_AXES
from sld_jax.vocab import VocabLayout


@dataclasses.dataclass(frozen=True)
class _Pass:
  """What the pass needs besides arrays (static, hashable)."""

  layout: VocabLayout
  chunk_size: int
  temperature: float
  with_kl: bool
  p_true: float
  p_other: float
  logits_dtype: Any


def compute_loss_fused(hidden, table, targets, weights, segment_ids=None, *,
                       layout: VocabLayout, chunk_size: int, logits_dtype: Any = jnp.float32,
                       method: str = "sld", alpha: float = 0.008, epsilon: float = 0.1,
                       temperature: float = 1.0, kl_target: str = "paper",
                       kl_normalization: str = "sequence",
                       denominators: Optional[Mapping[str, Any]] = None
                       ) -> tuple[jax.Array, dict[str, Any]]:
  """``compute_loss_chunked`` with the gradient computed in the forward pass.

  Args:
    hidden: ``[B, L, E]`` final-norm outputs of the decoder.
    table: ``[V, E]`` output rows, ``V >= layout.real_size``
      (``decoder.vocab_table``; the whole table, ``layout.size`` rows, keeps
      the products' width a multiple of 128); logits are ``hidden @ table.T``
      in ``logits_dtype`` with float32 accumulation, as
      ``decoder.vocab_projection``. Rows from ``real_size`` on are left out
      of every softmax (``losses.token_terms``) and get a zero gradient.
    chunk_size: positions per chunk, > 0.
    (the rest as ``losses.compute_loss``).

  Returns:
    ``(loss, aux)`` as ``losses.compute_loss``; only ``loss`` has a gradient.
  """
  knobs = dict(method=method, alpha=alpha, epsilon=epsilon, temperature=temperature,
               kl_target=kl_target, kl_normalization=kl_normalization)
  losses.check_hyperparameters(**knobs, where="compute_loss_fused")
  losses.check_chunk_size(chunk_size, hidden, targets, "compute_loss_fused")
  if (table.ndim != 2 or table.shape[0] < layout.real_size
      or table.shape[1] != hidden.shape[-1]):
    raise ValueError(
        f"compute_loss_fused: table must be [V, E] with V >= real_size = "
        f"{layout.real_size} and E = {hidden.shape[-1]}, got {tuple(table.shape)}")
  p_true, p_other = losses.kl_target_probs(layout, epsilon, temperature, kl_target)
  spec = _Pass(layout=layout, chunk_size=chunk_size, temperature=float(temperature),
               with_kl=method == "sld", p_true=p_true, p_other=p_other,
               logits_dtype=jnp.dtype(logits_dtype))
  ce, kl, _ = losses.loss_coefficients(targets, weights, segment_ids, layout=layout,
                                       denominators=denominators, **knobs)
  loss, terms = _projected_objective(spec, hidden, table, jnp.asarray(targets, jnp.int32),
                                     ce, kl)
  _, aux = losses.objective_from_terms(jax.lax.stop_gradient(terms), targets, weights,
                                       segment_ids, layout=layout, **knobs)
  aux["loss"] = loss
  return loss, aux


def _logits_gradient(spec: _Pass, logits, targets, terms, ce, kl):
  """``d objective / d logits`` of one chunk (module docstring), float32 ``[B, C, V]``.

  One elementwise expression over the chunk's logits (columns told apart by
  an iota, not by slicing and updating the unit columns), so that it fuses
  into one pass that reads the logits once; the normalisers come from the
  terms: ``log sum exp = nll + logit(y)``, and over the K units at
  temperature T ``class_logit / T - log_p_class``. Columns from
  ``real_size`` on (the rounding ids) get zero.
  """
  layout, t = spec.layout, spec.temperature
  offset, num_units = layout.speech_offset, layout.speech_size
  safe_targets = jnp.clip(targets, 0, layout.real_size - 1)       # as token_terms reads them
  target_logit = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
  column = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  is_real_column = column < layout.real_size
  log_normalizer = terms["nll"] + target_logit
  dlogits = ce[..., None] * (
      jnp.exp(jnp.where(is_real_column, logits - log_normalizer[..., None], -jnp.inf))
      - ((column == targets[..., None]) & is_real_column))
  if not spec.with_kl:
    return dlogits
  is_unit_target = layout.is_unit(targets)
  class_logit = jnp.where(is_unit_target, target_logit, logits[..., offset])
  unit_log_normalizer = class_logit / t - terms["log_p_class"]
  is_unit_column = (column >= offset) & is_real_column
  p_units = jnp.exp(jnp.where(is_unit_column, logits / t - unit_log_normalizer[..., None],
                              -jnp.inf))
  # The two-valued target: p_true at the unit class (unit 0 off unit targets).
  class_column = jnp.where(is_unit_target, targets, offset)
  target = jnp.where(column == class_column[..., None], spec.p_true, spec.p_other)
  total = spec.p_true + (num_units - 1) * spec.p_other
  return dlogits + jnp.where(is_unit_column,
                             kl[..., None] / t * (total * p_units - target), 0.0)


def _pass(spec: _Pass, hidden, table, targets, ce, kl, with_gradient: bool):
  """The chunked pass: objective, per-token terms and (optionally) gradients."""
  layout, t, dtype = spec.layout, spec.temperature, spec.logits_dtype
  num_units = layout.speech_size
  length = targets.shape[1]
  table_in = table.astype(dtype)

  def chunk(table_gradient, inputs):
    h, y, ce_c, kl_c = inputs
    h_in = h.astype(dtype)
    logits = jnp.einsum("bce,ve->bcv", h_in, table_in, preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, LOGITS_AXES)
    terms = losses.token_terms(logits, y, layout, t, with_kl=spec.with_kl)
    value = jnp.sum(ce_c * terms["nll"])
    if spec.with_kl:
      kl_value = losses.two_valued_kl(terms["log_p_class"], terms["sum_log_p"], num_units,
                                      spec.p_true, spec.p_other)
      value = value + jnp.sum(kl_c * kl_value)
      terms["kl"] = kl_value
    if not with_gradient:
      return table_gradient, (value, terms)
    dlogits = _logits_gradient(spec, logits, y, terms, ce_c, kl_c).astype(dtype)
    d_hidden = jnp.einsum("bcv,ve->bce", dlogits, table_in,
                          preferred_element_type=jnp.float32).astype(h.dtype)
    table_gradient = table_gradient + jnp.einsum("bcv,bce->ve", dlogits, h_in,
                                                 preferred_element_type=jnp.float32)
    return table_gradient, (value, terms, d_hidden)

  chunked = tuple(losses.to_chunks(x, spec.chunk_size) for x in (hidden, targets, ce, kl))
  table_gradient, outputs = jax.lax.scan(
      chunk, jnp.zeros(table.shape, jnp.float32), chunked)
  objective = jnp.sum(outputs[0])
  terms = {name: losses.from_chunks(value, length) for name, value in outputs[1].items()}
  if not with_gradient:
    return objective, terms
  return objective, terms, losses.from_chunks(outputs[2], length), table_gradient


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _projected_objective(spec: _Pass, hidden, table, targets, ce, kl):
  """``(sum(ce * nll) + sum(kl * KL), per-token terms)`` from hidden states."""
  return _pass(spec, hidden, table, targets, ce, kl, with_gradient=False)


def _projected_objective_forward(spec, hidden, table, targets, ce, kl):
  objective, terms, d_hidden, d_table = _pass(spec, hidden, table, targets, ce, kl,
                                              with_gradient=True)
  kl_terms = terms.get("kl", jnp.zeros_like(terms["nll"]))
  residuals = (d_hidden, d_table.astype(table.dtype), terms["nll"], kl_terms)
  return (objective, terms), residuals


def _projected_objective_backward(spec, residuals, cotangents):
  """Scales the gradients made in the forward pass; the terms' cotangents are
  not used (``compute_loss_fused`` stops their gradient)."""
  del spec
  d_hidden, d_table, nll, kl_terms = residuals
  scale = cotangents[0]
  return (scale.astype(d_hidden.dtype) * d_hidden, scale.astype(d_table.dtype) * d_table,
          None, scale * nll, scale * kl_terms)


_projected_objective.defvjp(_projected_objective_forward, _projected_objective_backward)
