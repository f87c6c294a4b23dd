"""Transcript decoding from a speech prompt with a KV cache: greedy and beam search.

The prompt of row b is ``0 units <speech_end>`` (``prompt_lengths[b]`` tokens,
right-padded): the decoder inputs training feeds before the first text token
(``sld_jax.model_inputs``). It is prefilled into the cache in one pass; then one token per
row per step is generated until every row has emitted ``<text_end>`` or spent
its text budget. Only text ids can be emitted: PAD, <speech_end>, the units
and the rounding ids get ``-inf`` logits before the decoding softmax.

Example (greedy, ``max_decode_length=4``, <text_end>=1, PAD=0)::

  prompt_tokens   = [[12, 13, 10,  0],     prompt_lengths = [3, 4]
                     [14, 12, 15, 10]]
  step outputs        row 0: 7, 5, 1          -> done after 3 steps
                      row 1: 4, 4, 6, 9       -> budget spent after 4 steps
  tokens          = [[7, 5, 1, 0],
                     [4, 4, 6, 9]]
  lengths         = [3, 4]      (tokens up to and including <text_end>)
  ended           = [True, False]

Budgets: ``max_decode_length`` is the width of ``tokens``; ``budgets [B]``
(optional) lowers it per row, e.g. so that ``prompt_lengths[b] + budgets[b]``
stays within the cache. A row's result never depends on the other rows of
its batch.

The model is passed as two pure functions so that decoding does not depend
on the decoder's internals (``cached_fns`` binds the KV-cache decoder of
``sld_jax.model.decoder``; ``uncached_fns`` a naive reference that reruns the
full forward pass over the whole sequence at every step)::

  prefill_fn(cache, prompt_tokens [B, P], prompt_lengths [B]) -> (logits [B, V], cache)
  step_fn(cache, tokens [B]) -> (logits [B, V], cache)

``prefill_fn``'s logits are the next-token logits of each prompt (position
``prompt_lengths[b] - 1``); a prefill returning every position
``[B, P, V]`` is accepted too and read there (``next_token_logits``).

The loops carry the cache through ``jax.lax.while_loop`` with the model step
unconditional in the body (the first token comes from the prefill's logits),
so XLA updates the KV cache in place; wrapping the step in a ``lax.cond``
would copy every cache buffer at every step.

Beam search reorders cache rows at every step (a gather of the whole cache,
which XLA then copies back into the loop carry); ``cache_batch_axes`` (a pytree of ints
shaped like the cache, default 0 everywhere) says where each leaf keeps the
batch (``decoder_cache_batch_axes`` reads it from the decoder's logical axis
names, so scanned layers with a leading layer axis work too).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sld_jax.model import decoder as decoder_lib
from sld_jax.vocab import VocabLayout

PrefillFn = Callable[[Any, jax.Array, jax.Array], Tuple[jax.Array, Any]]
StepFn = Callable[[Any, jax.Array], Tuple[jax.Array, Any]]

NEG_INF = -jnp.inf
METHODS = ("greedy", "beam")


class DecodeResult(NamedTuple):
  """Decoded transcripts of a batch.

  Attributes:
    tokens: [B, max_decode_length] int32 text ids; <text_end> included where
      a row ended; PAD after ``lengths``.
    lengths: [B] tokens per row, <text_end> included.
    scores: [B] float32; greedy: the summed log-probabilities of the tokens
      under the text-only softmax; beam: that sum divided by
      ``length_penalty(lengths, alpha)``.
    ended: [B] bool, whether the row emitted <text_end> within its budget.
  """

  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  ended: jax.Array


def text_only_bias(layout: VocabLayout, vocab_size: int) -> jax.Array:
  """[V] additive bias: 0 on emittable ids (text ids but PAD), -inf elsewhere.

  ``VocabLayout(text_size=5, speech_size=3)``, V=128 ->
  ``[-inf, 0, 0, 0, 0, -inf, -inf, ...]`` (<text_end>=1, UNK=2, t3, t4).
  """
  ids = jnp.arange(vocab_size)
  allowed = (ids > layout.pad_id) & (ids < layout.text_size)
  return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)


def next_token_logits(logits: jax.Array, prompt_lengths: jax.Array) -> jax.Array:
  """A prefill's output as next-token logits ``[B, V]``.

  ``[B, V]`` (a prefill that projected the last prompt position only) is
  returned as is; ``[B, P, V]`` is read at ``prompt_lengths[b] - 1``.
  """
  if logits.ndim == 2:
    return logits
  if logits.ndim == 3:
    return decoder_lib.last_logits(logits, prompt_lengths)
  raise ValueError(f"prefill_fn must return logits [B, V] or [B, P, V], got {logits.shape}")


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT length normalisation ``((5 + length) / 6) ** alpha``; 1 when alpha == 0."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _row_budgets(budgets: Optional[jax.Array], batch: int, width: int) -> jax.Array:
  if budgets is None:
    return jnp.full((batch,), width, jnp.int32)
  return jnp.clip(jnp.asarray(budgets, jnp.int32), 0, width)


def _check_static(layout: VocabLayout, max_decode_length: int) -> None:
  if not isinstance(layout, VocabLayout):
    raise TypeError(f"layout must be a VocabLayout, got {type(layout).__name__}")
  if max_decode_length < 1:
    raise ValueError(f"max_decode_length must be >= 1, got {max_decode_length}")


def _first_max(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(jnp.argmax(x, -1), jnp.max(x, -1))`` for ``x [B, V]``: the first maximum.

  Two plain reductions (max, then the smallest index holding it): on CPU
  XLA's argmax (a variadic value-and-index reduction) takes 1.7-2.5x as long
  at V = 1,000-56,320. A row holding NaN gives index ``V - 1`` (argmax: the
  first NaN) and a NaN maximum.
  """
  best = jnp.max(x, axis=-1)
  ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
  index = jnp.min(jnp.where(x == best[:, None], ids, x.shape[-1] - 1), axis=-1)
  return index, best


class _GreedyState(NamedTuple):
  """The greedy loop's carry; ``token`` is the last emitted token per row."""

  step: jax.Array
  token: jax.Array
  tokens: jax.Array
  done: jax.Array
  lengths: jax.Array
  scores: jax.Array
  ended: jax.Array


def _greedy_emit(state: _GreedyState, logits: jax.Array, bias: jax.Array,
                 layout: VocabLayout, budgets: jax.Array) -> _GreedyState:
  """Picks each row's next token from ``logits [B, V]`` and writes it at ``step``.

  Rows already done emit PAD and keep their length, score and ``ended``.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) + bias)
  token, token_logp = _first_max(log_probs)
  done = state.done
  token = jnp.where(done, layout.pad_id, token)
  lengths = state.lengths + (~done).astype(jnp.int32)
  ended = state.ended | (~done & (token == layout.eos_id))
  return _GreedyState(
      step=state.step + 1, token=token,
      tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)),
      done=done | ended | (lengths >= budgets), lengths=lengths,
      scores=state.scores + jnp.where(done, 0.0, token_logp), ended=ended)


def greedy_decode(prefill_fn: PrefillFn, step_fn: StepFn, cache: Any,
                  prompt_tokens: jax.Array, prompt_lengths: jax.Array, *,
                  layout: VocabLayout, max_decode_length: int,
                  budgets: Optional[jax.Array] = None) -> DecodeResult:
  """Greedy decoding; jit-compatible (``layout``/``max_decode_length`` static).

  The first token comes from the prefill's logits; each loop iteration then
  runs the model step on the previous tokens and emits the next ones. The
  loop stops when every row is done (ended or out of budget), so the model
  step after the last token is never run, and no conditional surrounds the
  step: the cache is a plain loop carry that XLA updates in place (a
  ``lax.cond`` around the step would copy every cache buffer per step).
  Rows that are done while others go on still run the step (on PAD); their
  outputs are ignored.
  """
  _check_static(layout, max_decode_length)
  batch = prompt_tokens.shape[0]
  logits, cache = prefill_fn(cache, prompt_tokens, prompt_lengths)
  logits = next_token_logits(logits, prompt_lengths)
  bias = text_only_bias(layout, logits.shape[-1])
  budgets = _row_budgets(budgets, batch, max_decode_length)
  emit = functools.partial(_greedy_emit, bias=bias, layout=layout, budgets=budgets)

  state = _GreedyState(
      step=jnp.int32(0), token=jnp.zeros((batch,), jnp.int32),
      tokens=jnp.zeros((batch, max_decode_length), jnp.int32), done=budgets <= 0,
      lengths=jnp.zeros((batch,), jnp.int32), scores=jnp.zeros((batch,), jnp.float32),
      ended=jnp.zeros((batch,), bool))
  state = emit(state, logits)

  def cond(carry):
    state, _ = carry
    return (state.step < max_decode_length) & ~jnp.all(state.done)

  def body(carry):
    state, cache = carry
    logits, cache = step_fn(cache, state.token)
    return emit(state, logits), cache

  state, _ = jax.lax.while_loop(cond, body, (state, cache))
  return DecodeResult(state.tokens, state.lengths, state.scores, state.ended)


def _batch_axes(cache: Any, cache_batch_axes: Optional[Any]) -> Any:
  if cache_batch_axes is None:
    return jax.tree.map(lambda _: 0, cache)
  return cache_batch_axes


def _expand_beams(cache: Any, axes: Any, beams: int) -> Any:
  """Rows ``[b0, b1]`` -> ``[b0, b0, b0, b1, b1, b1]`` for 3 beams, per leaf axis."""
  return jax.tree.map(lambda x, axis: jnp.repeat(x, beams, axis=axis), cache, axes)


def _gather_beams(cache: Any, axes: Any, source_beam: jax.Array) -> Any:
  """Row ``b * W + w`` <- row ``b * W + source_beam[b, w]``; source_beam [B, W]."""
  batch, beams = source_beam.shape
  flat = (jnp.arange(batch)[:, None] * beams + source_beam).reshape(-1)
  return jax.tree.map(lambda x, axis: jnp.take(x, flat, axis=axis), cache, axes)


class _BeamState(NamedTuple):
  """The beam loop's carry (``B`` rows, ``W`` beams, ``N`` = max_decode_length).

  ``source_beam [B, W]`` and ``token [B, W]`` say how the next model step is
  fed: beam ``w`` of row ``b`` continues the cache of beam
  ``source_beam[b, w]`` with ``token[b, w]``.
  """

  step: jax.Array
  active: jax.Array              # [B] rows still searching
  alive_steps: jax.Array         # [B] tokens in each alive beam
  alive_seqs: jax.Array          # [B, W, N]
  alive_logp: jax.Array          # [B, W], sorted best first
  finished_seqs: jax.Array       # [B, W, N]
  finished_scores: jax.Array     # [B, W], sorted best first
  finished_lengths: jax.Array    # [B, W]
  source_beam: jax.Array         # [B, W]
  token: jax.Array               # [B, W]


def _beam_select(state: _BeamState, logits: jax.Array, *, bias: jax.Array,
                 layout: VocabLayout, alpha: float, budgets: jax.Array,
                 best_penalty: jax.Array) -> _BeamState:
  """One search step from the alive beams' next-token ``logits [B * W, V]``."""
  batch, beams = state.alive_logp.shape
  vocab = logits.shape[-1]
  step, active = state.step, state.active
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) + bias).reshape(batch, beams, vocab)
  candidates = (state.alive_logp[:, :, None] + log_probs).reshape(batch, beams * vocab)
  top_logp, top_index = jax.lax.top_k(candidates, 2 * beams)
  top_beam, top_token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
  top_seqs = jnp.take_along_axis(state.alive_seqs, top_beam[:, :, None], axis=1)
  top_seqs = top_seqs.at[:, :, step].set(top_token)
  is_eos = top_token == layout.eos_id
  in_first_w = jnp.arange(2 * beams) < beams

  # Finished: the best W of the old finished and this step's ranked EOS candidates.
  eos_scores = jnp.where(is_eos & in_first_w, top_logp / length_penalty(step + 1, alpha),
                         NEG_INF)
  all_scores = jnp.concatenate([state.finished_scores, eos_scores], axis=1)
  all_seqs = jnp.concatenate([state.finished_seqs, top_seqs], axis=1)
  all_lengths = jnp.concatenate(
      [state.finished_lengths, jnp.full((batch, 2 * beams), step + 1, jnp.int32)], axis=1)
  new_finished_scores, keep = jax.lax.top_k(all_scores, beams)
  new_finished_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)
  new_finished_lengths = jnp.take_along_axis(all_lengths, keep, axis=1)

  # Alive: the best W candidates that did not end.
  new_alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), beams)
  new_alive_seqs = jnp.take_along_axis(top_seqs, keep[:, :, None], axis=1)
  source_beam = jnp.take_along_axis(top_beam, keep, axis=1)
  token = jnp.take_along_axis(top_token, keep, axis=1)

  # Frozen rows (out of budget or unable to improve) keep their state.
  def merge(new, old):
    return jnp.where(active.reshape((batch,) + (1,) * (new.ndim - 1)), new, old)
  alive_logp = merge(new_alive_logp, state.alive_logp)
  finished_scores = merge(new_finished_scores, state.finished_scores)
  alive_steps = state.alive_steps + active.astype(jnp.int32)
  can_improve = alive_logp[:, 0] / best_penalty > finished_scores.min(axis=1)
  return _BeamState(
      step=step + 1,
      active=active & (alive_steps < budgets) & can_improve,
      alive_steps=alive_steps,
      alive_seqs=merge(new_alive_seqs, state.alive_seqs),
      alive_logp=alive_logp,
      finished_seqs=merge(new_finished_seqs, state.finished_seqs),
      finished_scores=finished_scores,
      finished_lengths=merge(new_finished_lengths, state.finished_lengths),
      source_beam=merge(source_beam, jnp.broadcast_to(jnp.arange(beams), (batch, beams))),
      token=merge(token, jnp.full_like(token, layout.pad_id)))


def beam_search(prefill_fn: PrefillFn, step_fn: StepFn, cache: Any,
                prompt_tokens: jax.Array, prompt_lengths: jax.Array, *,
                layout: VocabLayout, max_decode_length: int, beam_size: int,
                alpha: float = 0.0, budgets: Optional[jax.Array] = None,
                cache_batch_axes: Optional[Any] = None) -> DecodeResult:
  """Beam search with the GNMT length penalty; jit-compatible.

  ``cache`` holds ``batch`` rows: the prompts are prefilled once and the
  cache rows are then repeated into ``batch * beam_size`` beams. At each step
  every alive beam proposes its best continuations and the ``2W`` best
  candidates of a row are ranked (``W = beam_size``). As in fairseq, a
  candidate ending in <text_end> is finished only if it ranks among the
  first ``W``; its score is ``log p / length_penalty(length, alpha)``. The
  ``W`` best candidates that did not end stay alive. So with ``W = 1`` and
  ``alpha = 0`` this is exactly greedy decoding.

  A row stops (and is frozen) when its budget is spent or when no alive beam
  can still beat the worst of its ``W`` finished hypotheses (scored
  optimistically at the budget). The result is the best finished
  hypothesis, unless the budget stopped the row and its best alive
  (unfinished) beam scores higher, as greedy decoding would return it.

  As in ``greedy_decode``, the first step ranks the prefill's logits and
  each loop iteration reorders the cache rows, runs the model step
  (unconditionally: frozen rows feed PAD to their unchanged beams) and
  ranks again; the loop ends before a step whose logits nobody would use.
  """
  _check_static(layout, max_decode_length)
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  batch = prompt_tokens.shape[0]
  beams, width = beam_size, max_decode_length
  logits, cache = prefill_fn(cache, prompt_tokens, prompt_lengths)
  logits = next_token_logits(logits, prompt_lengths)
  bias = text_only_bias(layout, logits.shape[-1])
  axes = _batch_axes(cache, cache_batch_axes)
  cache = _expand_beams(cache, axes, beams)
  budgets = _row_budgets(budgets, batch, width)
  select = functools.partial(_beam_select, bias=bias, layout=layout, alpha=alpha,
                             budgets=budgets, best_penalty=length_penalty(budgets, alpha))

  state = _BeamState(
      step=jnp.int32(0), active=budgets > 0, alive_steps=jnp.zeros((batch,), jnp.int32),
      alive_seqs=jnp.zeros((batch, beams, width), jnp.int32),
      alive_logp=jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1), jnp.float32),
                          (batch, 1)),
      finished_seqs=jnp.zeros((batch, beams, width), jnp.int32),
      finished_scores=jnp.full((batch, beams), NEG_INF, jnp.float32),
      finished_lengths=jnp.zeros((batch, beams), jnp.int32),
      source_beam=jnp.zeros((batch, beams), jnp.int32),
      token=jnp.zeros((batch, beams), jnp.int32))
  state = select(state, jnp.repeat(logits, beams, axis=0))

  def cond(carry):
    state, _ = carry
    return (state.step < width) & jnp.any(state.active)

  def body(carry):
    state, cache = carry
    cache = _gather_beams(cache, axes, state.source_beam)
    logits, cache = step_fn(cache, state.token.reshape(-1))
    return select(state, logits), cache

  state, _ = jax.lax.while_loop(cond, body, (state, cache))

  # A row frozen because it could not improve has alive_score < its finished
  # scores, so the alive beam only wins where the budget cut the search short.
  alive_score = state.alive_logp[:, 0] / length_penalty(state.alive_steps, alpha)
  best_finished = state.finished_scores[:, 0]
  ended = (best_finished > NEG_INF) & (best_finished >= alive_score)
  tokens = jnp.where(ended[:, None], state.finished_seqs[:, 0], state.alive_seqs[:, 0])
  lengths = jnp.where(ended, state.finished_lengths[:, 0], state.alive_steps)
  scores = jnp.where(ended, best_finished, alive_score)
  return DecodeResult(tokens, lengths, scores, ended)


def decode(prefill_fn: PrefillFn, step_fn: StepFn, cache: Any, prompt_tokens: jax.Array,
           prompt_lengths: jax.Array, *, layout: VocabLayout, max_decode_length: int,
           method: str = "greedy", beam_size: int = 4, alpha: float = 0.0,
           budgets: Optional[jax.Array] = None,
           cache_batch_axes: Optional[Any] = None) -> DecodeResult:
  """``greedy_decode`` or ``beam_search`` by name (``method`` in ``METHODS``)."""
  if method == "greedy":
    return greedy_decode(prefill_fn, step_fn, cache, prompt_tokens, prompt_lengths,
                         layout=layout, max_decode_length=max_decode_length, budgets=budgets)
  if method == "beam":
    return beam_search(prefill_fn, step_fn, cache, prompt_tokens, prompt_lengths,
                       layout=layout, max_decode_length=max_decode_length,
                       beam_size=beam_size, alpha=alpha, budgets=budgets,
                       cache_batch_axes=cache_batch_axes)
  raise ValueError(f"decoding method must be one of {METHODS}, got {method!r}")


# ----------------------------------------------------------------------------
# Model-bound prefill/step functions.
# ----------------------------------------------------------------------------


def cached_fns(module: decoder_lib.Decoder, params: Any,
               layout: Optional[VocabLayout] = None) -> tuple[PrefillFn, StepFn]:
  """The KV-cache decoder: prefill once, then one token per step.

  The prefill projects the last prompt position only (``logits="last"``).
  With ``layout``, the logits cover the text ids ``[0, layout.text_size)``
  only: decoding never emits another id (``text_only_bias``), so tokens and
  scores are the same, and the steps run ``decoder.restrict_vocab``'s
  decoder, whose output projection has ``text_size`` rows (a third of
  ``VocabLayout(1000, 2000)``'s 3,072; 89% of the paper's 56,320). Call it
  outside the decoding loop (as ``greedy_decode`` and ``beam_search`` are
  called), so that the embedding is sliced once.

  The cache comes from ``decoder.init_cache(module, batch, cache_length)``;
  ``cache_length`` must cover ``prompt_lengths + budgets``.
  """
  step_module, step_params = module, params
  if layout is not None:
    step_module, step_params = decoder_lib.restrict_vocab(module, params, layout.text_size)
  vocab = step_module.config.vocab_size

  def prefill_fn(cache, prompt_tokens, prompt_lengths):
    logits, cache = decoder_lib.prefill(module, params, cache, prompt_tokens, prompt_lengths,
                                        logits="last")
    return logits[:, :vocab], cache

  def step_fn(cache, tokens):
    return decoder_lib.decode_step(step_module, step_params, cache, tokens)
  return prefill_fn, step_fn


def decoder_cache_batch_axes(module: decoder_lib.Decoder, batch_size: int,
                             max_length: int) -> Any:
  """Per cache leaf, the axis named 'cache_batch' (1 for scanned layers, else 0)."""
  boxed = decoder_lib.abstract_cache(module, batch_size, max_length)
  return jax.tree.map(lambda box: box.names.index("cache_batch"), boxed,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


class UncachedState(NamedTuple):
  """The whole sequence so far: tokens [B, M] (0-padded) and lengths [B]."""

  tokens: jax.Array
  lengths: jax.Array


def init_uncached_state(batch_size: int, max_length: int) -> UncachedState:
  return UncachedState(jnp.zeros((batch_size, max_length), jnp.int32),
                       jnp.zeros((batch_size,), jnp.int32))


def uncached_fns(module: decoder_lib.Decoder, params: Any) -> tuple[PrefillFn, StepFn]:
  """Naive reference decoding: every step reruns the full forward pass.

  The "cache" is an ``UncachedState`` of ``M`` tokens per row (make it with
  ``init_uncached_state``); each step writes the new token at ``lengths[b]``
  and runs the decoder over all ``M`` positions (causal attention makes the
  padding after ``lengths[b]`` irrelevant), so a step costs a full forward
  pass instead of one position.
  """
  def forward(tokens):
    return module.apply({"params": params}, tokens)

  def prefill_fn(state, prompt_tokens, prompt_lengths):
    prompt_length = prompt_tokens.shape[1]
    real = jnp.arange(prompt_length)[None, :] < prompt_lengths[:, None]
    tokens = state.tokens.at[:, :prompt_length].set(jnp.where(real, prompt_tokens, 0))
    return forward(tokens), UncachedState(tokens, prompt_lengths.astype(jnp.int32))

  def step_fn(state, tokens):
    rows = jnp.arange(tokens.shape[0])
    sequence = state.tokens.at[rows, state.lengths].set(tokens, mode="drop")
    lengths = state.lengths + 1
    return decoder_lib.last_logits(forward(sequence), lengths), UncachedState(sequence, lengths)
  return prefill_fn, step_fn
