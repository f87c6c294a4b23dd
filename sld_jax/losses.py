"""The three ASR objectives: Loss Masking, Multimodal CE and SLD.

All of them read one next-token softmax over the shared vocabulary
(``sld_jax.vocab.VocabLayout``). Position ``i`` of ``logits`` predicts
``targets[i]`` (the seqio convention: ``decoder_target_tokens`` and
``decoder_loss_weights`` are already aligned with the logits).

Worked example, ``VocabLayout(text_size=5, speech_size=3)``::

  id:      0    1           2    3    4    5             6   7   8   9 .. 127
  meaning: PAD  <text_end>  UNK  t3   t4   <speech_end>  u0  u1  u2  rounding

  One unpacked row (units u0 u2 u1, then "t3 t4", then padding):

  targets            6  8  7  5  3  4  1  0
  weights            1  1  1  1  1  1  1  0
  text target        .  .  .  .  x  x  x  .    (text ids and <text_end>)
  speech target      x  x  x  x  .  .  .  .    (<speech_end> and the units)
  unit target        x  x  x  .  .  .  .  .    (the K unit ids only)
  reference class    0  2  1  0  0  0  0  .    (unit index, clamped to 0)

  A packed row holds several sequences; ``segment_ids`` numbers them:

  targets            6  7  5  3  1  8  5  4  1  0
  weights            1  1  1  1  1  1  1  1  1  0
  segment_ids        1  1  1  1  1  2  2  2  2  0    -> 2 sequences

Objectives (N_text, N_speech, N_unit count target tokens with weight > 0;
each per-token term is multiplied by its weight)::

  ce_text   = sum_{text targets}   w * (-log p(y)) / max(N_text, 1)
  ce_speech = sum_{speech targets} w * (-log p(y)) / max(N_speech, 1)
  loss_masking  = ce_text
  multimodal_ce = ce_text + ce_speech
  sld           = ce_text + ce_speech + alpha * kl_speech

``p`` is the softmax over the real vocabulary ``[0, real_size)``: rounding
ids never enter any softmax (they are sliced off by static layout info, which
is the same as adding -inf to their logits) and get zero gradient.

The KL uses the speech slice: the K unit ids ``[speech_offset, real_size)``;
``p_T = softmax(logits[slice] / T)``, renormalised over the units only
(``<speech_end>`` is not in the slice, as in the released code). Both KL
targets put one value ``a`` on the true unit ``y`` and one value ``b`` on the
other ``K - 1`` units, so with ``S = sum_k log p_T(k)`` (no one-hot needed)::

  KL(target || p_T) = a log a + (K-1) b log b  -  (a - b) log p_T(y)  -  b S

``kl_target="paper"`` (the paper's formula): the KL positions are the unit
targets, and::

  a = 1 - eps + eps/K,  b = eps/K                       (q' = smoothed one-hot)

``kl_target="reference"`` (what the released PyTorch code computes): the KL
positions are every real target (text and speech); non-unit targets use
unit class 0, and::

  target = softmax(q' / T):  a = 1 / (1 + (K-1) e^{-d}),  b = a e^{-d},
                             d = (1 - eps) / T

For K=6000, eps=0.1, T=1 the reference target has a = 4.10e-4, b = 1.67e-4:
nearly uniform, so it acts as heavy uniform label smoothing on the speech
slice.

``kl_normalization`` says what the summed KL is divided by::

  kl_speech = T^2 * sum_{KL positions} w * KL / D
  "sequence" (default, as released):  D = max(num_sequences, 1)
  "token":                            D = max(N_kl, 1)   (N_kl: KL positions)

``num_sequences`` is the number of rows with any weight (unpacked) or the
number of distinct non-zero segment ids with any weight, summed over rows
(packed): the released KLDivLoss(reduction="batchmean") divides by the batch
size, one utterance per row. The released alpha (0.008) was tuned under
"sequence".

Effective strength. Write the speech part of the loss per speech token as
``(1 / N_speech) * sum_i (CE_i + lambda * KL_i)``; with ``S`` speech targets
(units and <speech_end>) and ``P`` KL positions per sequence::

  kl_normalization  lambda (KL weight per speech token, relative to CE)
  "token"           alpha * S / P            (paper target: ~alpha)
  "sequence"        alpha * S                (the released normalisation)

With the paper target, ``CE + lambda * KL(q' || p_T)`` at a unit target is
about ``(1 + lambda)`` times the CE against a label smoothed by
``eps_eff = lambda * eps / (1 + lambda)`` over the units (exactly so up to a
constant if p_T were the full softmax; it is renormalised over the units).
At alpha = 0.008, eps = 0.1 (P = S - 1, the units, for the paper target; the
reference target's P also counts the text targets: P ~ 36 for S ~ 30 on the
digits corpus)::

  corpus (speech targets / sequence)     "token" lambda         "sequence" lambda
  embedded digits smoke (S ~ 30)         0.008 (eps_eff 8e-4)   0.24 (eps_eff 0.02)
  LibriSpeech, 1024-token rows (S ~ 300-900, not measured here)
                                         0.008 (eps_eff 8e-4)   2.4-7.2 (eps_eff 0.07-0.09)

so "token" is a near-null change from Multimodal CE, while "sequence" is a
real regulariser whose strength grows with the utterance length
(docs/paper-fidelity.md).

All loss math runs in float32 (or float64 if the logits are float64).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from sld_jax.vocab import VocabLayout

METHODS = ("loss_masking", "multimodal_ce", "sld")
KL_TARGETS = ("paper", "reference")
KL_NORMALIZATIONS = ("sequence", "token")


# ----------------------------------------------------------------------------
# Configuration and validation.
# ----------------------------------------------------------------------------


def check_hyperparameters(method: str, alpha: float, epsilon: float,
                          temperature: float, kl_target: str,
                          kl_normalization: str, where: str) -> None:
  """A clear ``ValueError`` naming ``where`` for any knob out of range."""
  if method not in METHODS:
    raise ValueError(f"{where}: unknown method {method!r}; choose one of {METHODS}")
  if kl_target not in KL_TARGETS:
    raise ValueError(
        f"{where}: unknown kl_target {kl_target!r}; choose one of {KL_TARGETS}")
  if kl_normalization not in KL_NORMALIZATIONS:
    raise ValueError(
        f"{where}: unknown kl_normalization {kl_normalization!r}; choose one of "
        f"{KL_NORMALIZATIONS}")
  for name, value in (("alpha", alpha), ("epsilon", epsilon),
                      ("temperature", temperature)):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating,
                                                         np.integer)):
      raise ValueError(
          f"{where}: {name} must be a Python number (it is a static "
          f"hyper-parameter), got {type(value).__name__}")
    if not math.isfinite(value):
      raise ValueError(f"{where}: {name} must be finite, got {value}")
  if alpha < 0:
    raise ValueError(f"{where}: alpha must be >= 0, got {alpha}")
  if not 0.0 <= epsilon <= 1.0:
    raise ValueError(f"{where}: epsilon must be in [0, 1], got {epsilon}")
  if temperature <= 0:
    raise ValueError(f"{where}: temperature must be > 0, got {temperature}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The objective and its knobs; hashable, so it can be a static jit arg.

  Attributes:
    method: "loss_masking", "multimodal_ce" or "sld".
    alpha: weight of the KL term (SLD only).
    epsilon: label smoothing of q' over the K units.
    temperature: distillation temperature T (the KL is multiplied by T^2).
    kl_target: "paper" (KL(q' || p_T) at unit targets) or "reference" (the
      released code: softmax(q'/T) target at every real target).
    kl_normalization: "sequence" (the summed KL divided by the number of
      sequences, as released; the default for both targets) or "token"
      (divided by the number of KL positions). See the module docstring for
      the effective per-token strength of each.
  """

  method: str = "sld"
  alpha: float = 0.008
  epsilon: float = 0.1
  temperature: float = 1.0
  kl_target: str = "paper"
  kl_normalization: str = "sequence"

  def __post_init__(self):
    check_hyperparameters(self.method, self.alpha, self.epsilon,
                          self.temperature, self.kl_target,
                          self.kl_normalization, "LossConfig")

  def knobs(self) -> dict[str, Any]:
    """The keyword arguments of ``compute_loss`` this config sets."""
    return dataclasses.asdict(self)


def _check_shapes(logits, targets, weights, segment_ids, layout) -> None:
  if not isinstance(layout, VocabLayout):
    raise ValueError(
        f"compute_loss: layout must be a VocabLayout, got {type(layout).__name__}")
  if logits.ndim != 3:
    raise ValueError(
        f"compute_loss: logits must have rank 3 [B, L, V], got shape {logits.shape}")
  batch_length = tuple(logits.shape[:2])
  arrays = (("targets", targets), ("weights", weights), ("segment_ids", segment_ids))
  for name, array in arrays:
    if array is not None and tuple(array.shape) != batch_length:
      raise ValueError(
          f"compute_loss: {name} has shape {tuple(array.shape)}, expected "
          f"[B, L] = {batch_length} to match logits {tuple(logits.shape)}")
  if logits.shape[-1] != layout.size:
    raise ValueError(
        f"compute_loss: logits has {logits.shape[-1]} classes (shape "
        f"{tuple(logits.shape)}), expected V = layout.size = {layout.size}")


# ----------------------------------------------------------------------------
# Closed-form two-valued targets.
# ----------------------------------------------------------------------------


def _xlogx(x: float) -> float:
  return x * math.log(x) if x > 0 else 0.0


def paper_target_probs(num_units: int, epsilon: float) -> tuple[float, float]:
  """q' = (1 - eps) * onehot + eps / K, as (value on y, value elsewhere)."""
  other = epsilon / num_units
  return 1.0 - epsilon + other, other


def reference_target_probs(num_units: int, epsilon: float,
                           temperature: float) -> tuple[float, float]:
  """softmax(q' / T) as used by the released code: (value on y, elsewhere).

  >>> a, b = reference_target_probs(6000, 0.1, 1.0)   # a ~ 4.10e-4, b ~ 1.67e-4
  """
  gap = math.exp(-(1.0 - epsilon) / temperature)
  true = 1.0 / (1.0 + (num_units - 1) * gap)
  return true, true * gap


def _two_valued_neg_entropy(num_units: int, p_true: float, p_other: float) -> float:
  """sum_k t_k log t_k for a target with p_true on y and p_other elsewhere."""
  return _xlogx(p_true) + (num_units - 1) * _xlogx(p_other)


def two_valued_kl(log_p_true, sum_log_p, num_units, p_true, p_other):
  """KL(t || p) per position from log p(y) and sum_k log p(k); see module doc."""
  neg_entropy = _two_valued_neg_entropy(num_units, p_true, p_other)
  return neg_entropy - (p_true - p_other) * log_p_true - p_other * sum_log_p


def count_sequences(has_weight, segment_ids):
  """Rows (or distinct non-zero segment ids per row) with any weight > 0.

  segment_ids [[1 1 1 2 2 0], [1 1 1 1 1 1]], all weighted  ->  2 + 1 = 3.
  """
  if segment_ids is None:
    segment_ids = jnp.ones(has_weight.shape, jnp.int32)
  segments = jnp.sort(jnp.where(has_weight, segment_ids, 0), axis=-1)
  previous = jnp.pad(segments[:, :-1], ((0, 0), (1, 0)))
  return jnp.sum((segments != 0) & (segments != previous))


def combine(method: str, alpha: float, ce_text, ce_speech, kl_speech):
  """The objective from its three means (module docstring)."""
  if method == "loss_masking":
    return ce_text
  if method == "multimodal_ce":
    return ce_text + ce_speech
  return ce_text + ce_speech + alpha * kl_speech


def kl_count_name(kl_normalization: str) -> str:
  """The count the summed KL is divided by: "num_sequences" or "num_kl_positions"."""
  return "num_sequences" if kl_normalization == "sequence" else "num_kl_positions"


def kl_positions(targets, layout: VocabLayout, kl_target: str):
  """[B, L] bool: the targets the KL is applied at (before weights).

  "paper": the unit targets; "reference": every text and speech target (as
  released; non-unit targets use unit class 0).
  """
  if kl_target == "paper":
    return layout.is_unit(targets)
  return layout.is_text(targets) | layout.is_speech(targets)


def _masked_mean(values, weights, mask, count):
  return jnp.sum(jnp.where(mask, weights * values, 0.0)) / jnp.maximum(count, 1)


# ----------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------


def compute_loss(logits, targets, weights, segment_ids=None, *,
                 layout: VocabLayout, method: str = "sld", alpha: float = 0.008,
                 epsilon: float = 0.1, temperature: float = 1.0,
                 kl_target: str = "paper", kl_normalization: str = "sequence",
                 denominators: Optional[Mapping[str, Any]] = None
                 ) -> tuple[jax.Array, dict[str, Any]]:
  """Loss of one batch for the chosen objective; pure and jit-able.

  Hyper-parameters and ``layout`` are static (Python values): jit with
  ``static_argnames=("layout", "method", "alpha", "epsilon", "temperature",
  "kl_target", "kl_normalization")`` or close over them. See the module
  docstring for the masks and the formulas.

  Args:
    logits: [B, L, V] next-token logits, V == layout.size; any float dtype.
    targets: [B, L] int ids, ``logits[:, i]`` predicts ``targets[:, i]``.
    weights: [B, L] ``decoder_loss_weights``; tokens with weight 0 (padding)
      contribute nothing, others contribute ``weight * term``.
    segment_ids: [B, L] ``decoder_segment_ids`` of packed rows (0 = padding),
      or None for unpacked rows. Only used to count sequences.
    layout: the vocabulary layout.
    method: "loss_masking", "multimodal_ce" or "sld".
    alpha: KL weight (SLD).
    epsilon: label smoothing of the KL target, in [0, 1].
    temperature: T > 0; the KL is multiplied by T^2.
    kl_target: "paper" or "reference".
    kl_normalization: "sequence" or "token" (what the summed KL is divided by).
    denominators: None (the mean over this batch), or the counts to divide
      the summed terms by (``loss_coefficients``): a microbatch's share of a
      larger batch's objective. The means in ``aux`` are this batch's either
      way.

  Returns:
    (loss, aux): scalar float32 loss and a dict of scalars: ``loss``,
    ``ce_text``, ``ce_speech``, ``kl_speech`` (0 unless method == "sld"),
    ``num_text_tokens``, ``num_speech_tokens``, ``num_unit_tokens``,
    ``num_kl_positions`` (unit targets for "paper", all real targets for
    "reference"), ``num_sequences`` (int32 counts), ``accuracy_text``, ``accuracy_speech``
    (argmax over the real vocabulary).
  """
  check_hyperparameters(method, alpha, epsilon, temperature, kl_target,
                        kl_normalization, "compute_loss")
  _check_shapes(logits, targets, weights, segment_ids, layout)

  # token_terms leaves the rounding ids out of every softmax.
  terms = token_terms(logits, targets, layout, temperature, with_kl=method == "sld")
  return objective_from_terms(terms, targets, weights, segment_ids, layout=layout,
                              method=method, alpha=alpha, epsilon=epsilon,
                              temperature=temperature, kl_target=kl_target,
                              kl_normalization=kl_normalization, denominators=denominators)


@jax.custom_jvp
def softmax_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(logsumexp, max, first argmax)`` over the last axis::

    x = [[1.0, 3.0, 3.0, 0.0]]  ->  (3 + log(e^-2 + 1 + 1 + e^-3), 3.0, 1)

  Compiled for a GPU, in one pass over ``x`` (``one_pass_softmax_statistics``);
  elsewhere as XLA's ``logsumexp``, ``max`` and ``argmax``
  (``two_pass_softmax_statistics``), which XLA:CPU runs 3x faster than the
  one-pass reduction. Differentiable in ``x`` through the logsumexp
  (``softmax(x)``) and the maximum (its first argmax's tangent).
  """
  return jax.lax.platform_dependent(x, cuda=one_pass_softmax_statistics,
                                    default=two_pass_softmax_statistics)


def one_pass_softmax_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``softmax_statistics`` as one variadic reduction (the online softmax).

  Each row keeps its running maximum ``m``, the sum ``s`` of ``exp(x - m)``
  and the first index of ``m``: ``logsumexp = m + log(s)``. XLA's
  ``logsumexp`` reads the row twice (its maximum, then the sum of
  exponentials): over gpt2_medium's ``[4096, 50260]`` float32 chunks of text
  logits, 0.8 GB per chunk more (XLA:GPU, H200 compile: -3.7 GB moved per
  step).
  """
  positions = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  maximum, total, argmax = jax.lax.reduce(
      (x, jnp.ones_like(x), positions),
      (jnp.array(-jnp.inf, x.dtype), jnp.array(0, x.dtype),
       jnp.array(np.iinfo(np.int32).max, jnp.int32)),
      _online_softmax_step, (x.ndim - 1,))
  return maximum + jnp.log(total), maximum, argmax


def two_pass_softmax_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``softmax_statistics`` as XLA's own reductions."""
  return jax.nn.logsumexp(x, axis=-1), jnp.max(x, axis=-1), jnp.argmax(x, axis=-1)


def _online_softmax_step(left, right):
  """Joins two partial ``(max, sum of exp(x - max), first argmax)``: the sum
  at the smaller maximum is rescaled, with one exponential."""
  (max_l, sum_l, arg_l), (max_r, sum_r, arg_r) = left, right
  high, low = jnp.maximum(max_l, max_r), jnp.minimum(max_l, max_r)
  shrink = jnp.exp(jnp.where(low == -jnp.inf, -jnp.inf, low - high))
  total = jnp.where(max_l >= max_r, sum_l + sum_r * shrink, sum_l * shrink + sum_r)
  argmax = jnp.where(max_l > max_r, arg_l,
                     jnp.where(max_r > max_l, arg_r, jnp.minimum(arg_l, arg_r)))
  return high, total, argmax


@softmax_statistics.defjvp
def _softmax_statistics_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  lse, maximum, argmax = softmax_statistics(x)
  d_lse = jnp.sum(jnp.exp(x - lse[..., None]) * dx, axis=-1)
  d_max = jnp.take_along_axis(dx, argmax[..., None], axis=-1)[..., 0]
  return (lse, maximum, argmax), (d_lse, d_max, np.zeros(argmax.shape, jax.dtypes.float0))


def token_terms(logits, targets, layout: VocabLayout, temperature: float = 1.0,
                with_kl: bool = True) -> dict[str, jax.Array]:
  """The per-token quantities every objective is made of, ``[B, L]`` each.

  ``logits [B, L, V]`` with ``V >= layout.real_size``: columns from
  ``real_size`` on (the rounding ids) are left out of every softmax, so a
  chunked pass may project onto the whole table, whose row count is a
  multiple of 128 (``layout.size``), rather than slice it to an odd width::

    nll          -log p(y) under the softmax over the real vocabulary
    correct      argmax over the real vocabulary == y (no gradient)
    log_p_class  log p_T(class) over the K units: class = y at unit
                 targets, unit 0 elsewhere (with_kl only)
    sum_log_p    sum_k log p_T(k) over the K units (with_kl only)

  Nothing here reads the weights, so the terms of a row can be computed in
  chunks of positions (``compute_loss_chunked``) and joined.
  """
  if logits.shape[-1] < layout.real_size:
    raise ValueError(f"token_terms: logits have {logits.shape[-1]} columns, fewer than the "
                     f"real vocabulary's {layout.real_size}")
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logits = logits.astype(dtype)
  offset, num_units = layout.speech_offset, layout.speech_size
  text_logits, unit_logits = logits[..., :offset], logits[..., offset:layout.real_size]
  # Every reduction is over the text part or the unit part (one pass over
  # each, softmax_statistics); the unit part serves the KL.
  lse_text, max_text, argmax_text = softmax_statistics(text_logits)       # [B, L]
  lse_units, max_units, argmax_units = softmax_statistics(unit_logits)
  lse = jnp.logaddexp(lse_text, lse_units)
  safe_targets = jnp.clip(targets, 0, layout.real_size - 1).astype(jnp.int32)
  target_logit = jnp.take_along_axis(
      logits, safe_targets[..., None], axis=-1)[..., 0]           # [B, L]
  # argmax over the real vocabulary (the first of equal maxima: text first).
  argmax = jnp.where(max_units > max_text, offset + argmax_units, argmax_text)
  terms = {
      "nll": lse - target_logit,
      "correct": jax.lax.stop_gradient(argmax == targets),
  }
  if with_kl:
    t = float(temperature)
    scaled_lse = lse_units if t == 1.0 else jax.nn.logsumexp(unit_logits / t, axis=-1)
    terms["sum_log_p"] = jnp.sum(unit_logits, axis=-1) / t - num_units * scaled_lse
    # Unit targets read their own logit; others use unit class 0 (reference).
    class_logit = jnp.where(layout.is_unit(targets), target_logit, logits[..., offset])
    terms["log_p_class"] = class_logit / t - scaled_lse
  return terms


def token_counts(targets, weights, segment_ids=None, *, layout: VocabLayout,
                 kl_target: str) -> dict[str, jax.Array]:
  """int32 counts of the targets with weight > 0 (the module docstring's
  N_text, N_speech, N_unit, N_kl) and of the sequences they belong to."""
  has_weight = weights > 0
  return {
      "num_text_tokens": jnp.sum(has_weight & layout.is_text(targets)),
      "num_speech_tokens": jnp.sum(has_weight & layout.is_speech(targets)),
      "num_unit_tokens": jnp.sum(has_weight & layout.is_unit(targets)),
      "num_kl_positions": jnp.sum(has_weight & kl_positions(targets, layout, kl_target)),
      "num_sequences": count_sequences(has_weight, segment_ids),
  }


def loss_coefficients(targets, weights, segment_ids=None, *, layout: VocabLayout,
                      method: str, alpha: float, epsilon: float, temperature: float,
                      kl_target: str, kl_normalization: str,
                      denominators: Optional[Mapping[str, Any]] = None,
                      dtype: Any = jnp.float32):
  """The objective as per-position weights of its two per-token terms.

  Every objective is ``sum(ce * nll) + sum(kl * KL)`` over the positions
  (``nll`` and the per-token ``KL`` as in the module docstring)::

    ce[i] = w[i] * (c_text / D_text  if target i is text
                    c_speech / D_speech  if target i is speech)
    kl[i] = w[i] * alpha * T^2 / D_kl  at the KL positions (SLD only)

  with ``c_text = 1`` and ``c_speech = 0`` (loss masking) or 1. Example, the
  first row of the module docstring (N_text = 3, N_speech = 4, one sequence),
  SLD, paper target, "sequence" normalisation, T = 1::

    targets   6    8    7    5    3    4    1    0
    ce        1/4  1/4  1/4  1/4  1/3  1/3  1/3  0
    kl        a    a    a    0    0    0    0    0      (a = alpha / 1)

  Args:
    targets, weights, segment_ids: as ``compute_loss``.
    layout, method, ...: as ``compute_loss``.
    denominators: the counts ``D`` to divide by, keyed like ``counts``
      (``num_text_tokens``, ``num_speech_tokens`` and ``num_sequences`` or
      ``num_kl_positions``); None: this batch's own counts (the mean
      objective). A microbatch passes the whole batch's counts so that the
      objectives of its microbatches add up to the batch's.
    dtype: of the coefficients (the loss math's: float32, or float64).

  Returns:
    ``(ce, kl, counts)``: ``[B, L]`` of ``dtype`` twice, and this batch's
    ``token_counts``.
  """
  weights = weights.astype(dtype)
  has_weight = weights > 0
  text_mask = has_weight & layout.is_text(targets)
  speech_mask = has_weight & layout.is_speech(targets)
  kl_mask = has_weight & kl_positions(targets, layout, kl_target)
  counts = token_counts(targets, weights, segment_ids, layout=layout, kl_target=kl_target)
  denominators = counts if denominators is None else denominators

  def per_unit(name):
    return 1.0 / jnp.maximum(denominators[name], 1).astype(dtype)

  speech_scale = 0.0 if method == "loss_masking" else per_unit("num_speech_tokens")
  ce = weights * (jnp.where(text_mask, per_unit("num_text_tokens"), 0.0)
                  + jnp.where(speech_mask, speech_scale, 0.0))
  if method == "sld":
    t = float(temperature)
    kl = weights * jnp.where(kl_mask, alpha * t * t * per_unit(kl_count_name(kl_normalization)),
                             0.0)
  else:
    kl = jnp.zeros_like(weights)
  return ce, kl, counts


def kl_target_probs(layout: VocabLayout, epsilon: float, temperature: float,
                    kl_target: str) -> tuple[float, float]:
  """The KL target's (value on the true unit, value on each other unit)."""
  if kl_target == "paper":
    return paper_target_probs(layout.speech_size, epsilon)
  return reference_target_probs(layout.speech_size, epsilon, temperature)


def token_kl(terms, layout: VocabLayout, epsilon: float, temperature: float,
             kl_target: str) -> jax.Array:
  """``[B, L]`` KL(target || p_T) from ``token_terms`` (without the T^2)."""
  p_true, p_other = kl_target_probs(layout, epsilon, temperature, kl_target)
  return two_valued_kl(terms["log_p_class"], terms["sum_log_p"], layout.speech_size,
                        p_true, p_other)


def objective_from_terms(terms, targets, weights, segment_ids, *, layout: VocabLayout,
                         method: str, alpha: float, epsilon: float, temperature: float,
                         kl_target: str, kl_normalization: str, denominators=None):
  """``compute_loss``'s result from ``token_terms`` (masks, counts, means).

  ``loss`` is ``loss_coefficients``' weighted sum of the terms; the means in
  aux are this batch's whatever ``denominators`` say.
  """
  dtype = terms["nll"].dtype
  knobs = dict(layout=layout, method=method, alpha=alpha, epsilon=epsilon,
               temperature=temperature, kl_target=kl_target,
               kl_normalization=kl_normalization)
  ce, kl_weight, counts = loss_coefficients(targets, weights, segment_ids,
                                            denominators=denominators, dtype=dtype, **knobs)
  weights = weights.astype(dtype)
  has_weight = weights > 0
  text_mask = has_weight & layout.is_text(targets)
  speech_mask = has_weight & layout.is_speech(targets)
  num_text, num_speech = counts["num_text_tokens"], counts["num_speech_tokens"]

  ce_text = _masked_mean(terms["nll"], weights, text_mask, num_text)
  ce_speech = _masked_mean(terms["nll"], weights, speech_mask, num_speech)
  loss = jnp.sum(ce * terms["nll"])
  if method == "sld":
    t = float(temperature)
    kl = token_kl(terms, layout, epsilon, t, kl_target)
    kl_mask = has_weight & kl_positions(targets, layout, kl_target)
    kl_speech = t * t * _masked_mean(kl, weights, kl_mask,
                                     counts[kl_count_name(kl_normalization)])
    loss = loss + jnp.sum(kl_weight * kl)
  else:
    kl_speech = jnp.zeros((), dtype)

  correct = terms["correct"].astype(dtype)
  aux = {
      "loss": loss,
      "ce_text": ce_text,
      "ce_speech": ce_speech,
      "kl_speech": kl_speech,
      **counts,
      "accuracy_text": _masked_mean(correct, 1.0, text_mask, num_text),
      "accuracy_speech": _masked_mean(correct, 1.0, speech_mask, num_speech),
  }
  return loss, aux


def check_chunk_size(chunk_size, hidden, targets, where: str) -> None:
  """A clear ``ValueError`` for a bad chunk size or hidden-state shape."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"{where}: chunk_size must be a positive int, got {chunk_size!r}")
  if hidden.ndim != 3 or tuple(hidden.shape[:2]) != tuple(targets.shape):
    raise ValueError(
        f"{where}: hidden must be [B, L, E] matching targets {tuple(targets.shape)}, "
        f"got {tuple(hidden.shape)}")


def to_chunks(x, chunk_size: int):
  """``[B, L, ...] -> [chunks, B, C, ...]``, zero-padded to whole chunks.

  ``L = 5``, ``C = 2``: positions ``[0 1] [2 3] [4 pad]``. Rows are never
  split across the batch axis, so a data-sharded batch stays sharded.
  """
  batch, length = x.shape[:2]
  chunks = -(-length // chunk_size)
  x = jnp.pad(x, [(0, 0), (0, chunks * chunk_size - length)] + [(0, 0)] * (x.ndim - 2))
  return jnp.swapaxes(x.reshape((batch, chunks, chunk_size) + x.shape[2:]), 0, 1)


def from_chunks(x, length: int):
  """``[chunks, B, C, ...] -> [B, length, ...]`` (``to_chunks``' padding dropped)."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


def compute_loss_chunked(hidden, project: Callable[[jax.Array], jax.Array], targets, weights,
                         segment_ids=None, *, layout: VocabLayout, chunk_size: int,
                         method: str = "sld", alpha: float = 0.008, epsilon: float = 0.1,
                         temperature: float = 1.0, kl_target: str = "paper",
                         kl_normalization: str = "sequence",
                         denominators: Optional[Mapping[str, Any]] = None
                         ) -> tuple[jax.Array, dict[str, Any]]:
  """``compute_loss`` from the last hidden states, never holding ``[B, L, V]`` logits.

  The positions of every row are cut into chunks of ``chunk_size``; each
  chunk is projected (``project(h [B, C, E]) -> float32 [B, C, V]``, ``V >=
  real_size``; the rounding ids are left out as in ``token_terms``),
  reduced to its ``token_terms`` and dropped. The chunk function is
  rematerialised (``jax.checkpoint``), so the backward pass recomputes one
  chunk's logits at a time too: peak logits memory is ``B x C x V`` instead
  of ``B x L x V``, at the cost of a second projection in the backward pass
  (``fused_loss.compute_loss_fused`` makes the gradient in the forward pass
  instead). Chunks as ``to_chunks``. Equal to
  ``compute_loss(project(hidden), ...)`` up to float rounding
  (tests/test_fused_paths.py).

  Args:
    hidden: ``[B, L, E]`` final-norm outputs of the decoder.
    project: the output layer, e.g. ``decoder.vocab_projection(config,
      params, layout.size)`` (the whole table: its row count is a multiple of
      128, which GEMMs tile well; ``layout.real_size`` rows work too).
    chunk_size: positions per chunk, > 0.
    (the rest as ``compute_loss``).
  """
  check_hyperparameters(method, alpha, epsilon, temperature, kl_target,
                        kl_normalization, "compute_loss_chunked")
  check_chunk_size(chunk_size, hidden, targets, "compute_loss_chunked")
  length = targets.shape[1]

  @jax.checkpoint
  def chunk_terms(hidden_chunk, target_chunk):
    return token_terms(project(hidden_chunk), target_chunk, layout, temperature,
                       with_kl=method == "sld")

  terms = jax.lax.map(lambda args: chunk_terms(*args),
                      (to_chunks(hidden, chunk_size), to_chunks(targets, chunk_size)))
  terms = {name: from_chunks(value, length) for name, value in terms.items()}
  return objective_from_terms(terms, targets, weights, segment_ids, layout=layout,
                              method=method, alpha=alpha, epsilon=epsilon,
                              temperature=temperature, kl_target=kl_target,
                              kl_normalization=kl_normalization, denominators=denominators)


def compute_loss_from_config(logits, batch_targets, weights,
                             segment_ids: Optional[Any], layout: VocabLayout,
                             config: LossConfig):
  """``compute_loss`` with the knobs taken from a ``LossConfig``."""
  if not isinstance(config, LossConfig):
    raise ValueError(
        f"compute_loss_from_config: config must be a LossConfig, got "
        f"{type(config).__name__}")
  return compute_loss(logits, batch_targets, weights, segment_ids, layout=layout,
                      **config.knobs())
