"""Greedy and beam search: cached == naive full forward, beam 1 == greedy,
stopping, budgets and the text-only mask on hand-built models."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sld_jax import decoding
from sld_jax.model import decoder
from sld_jax.model.config import DecoderConfig
from sld_jax.vocab import VocabLayout

jax.config.update("jax_default_matmul_precision", "highest")

# ----------------------------------------------------------------------------
# A random decoder whose greedy outputs vary and sometimes end.
# ----------------------------------------------------------------------------

LAYOUT = VocabLayout(text_size=20, speech_size=50)   # <speech_end>=20, units 21..70
CONFIG = DecoderConfig(vocab_size=LAYOUT.size, num_layers=2, num_heads=4, embed_dim=32,
                       mlp_dim=64, max_length=48, dropout_rate=0.0)
BATCH, PROMPT, WIDTH = 4, 10, 12
PROMPT_LENGTHS = np.array([10, 3, 7, 1], np.int32)


def _random_params(config):
  """N(0, 0.8) matrices (chaotic, decisive logits), zero biases, unit norm
  scales; <text_end> made likely where 14 was. Built from the abstract init
  in numpy: compiling the real init takes longer than the tests."""
  shapes = jax.eval_shape(functools.partial(decoder.init_params, config), jax.random.key(0))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(leaf.shape, np.float32)
    if leaf.ndim - config.scan_layers >= 2:
      return rng.normal(0.0, 0.8, leaf.shape).astype(np.float32)
    return np.zeros(leaf.shape, np.float32)
  params = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))
  embedding = params["token_embedder"]["embedding"]
  embedding[LAYOUT.eos_id] = embedding[14] * 1.1
  return params


def _prompts():
  rng = np.random.default_rng(0)
  prompt = rng.integers(LAYOUT.speech_offset, LAYOUT.real_size, (BATCH, PROMPT)).astype(np.int32)
  prompt[np.arange(BATCH), PROMPT_LENGTHS - 1] = LAYOUT.speech_end_id
  prompt[np.arange(PROMPT)[None, :] >= PROMPT_LENGTHS[:, None]] = 0
  return prompt


def _run(config, cached, method, text_logits=False, **kwargs):
  """Decodes the test prompts; params are jit arguments (not baked-in constants).

  ``text_logits``: the cached model projects onto the text ids only.
  """
  module = decoder.Decoder(config)
  if cached:
    cache = decoder.init_cache(module, BATCH, PROMPT + WIDTH)
    if method == "beam":
      kwargs["cache_batch_axes"] = decoding.decoder_cache_batch_axes(
          module, BATCH, PROMPT + WIDTH)
  else:
    cache = decoding.init_uncached_state(BATCH, PROMPT + WIDTH)
  search = decoding.greedy_decode if method == "greedy" else decoding.beam_search

  @jax.jit
  def run(params, cache, prompt, lengths):
    if cached:
      fns = decoding.cached_fns(module, params, LAYOUT if text_logits else None)
    else:
      fns = decoding.uncached_fns(module, params)
    return search(*fns, cache, prompt, lengths, layout=LAYOUT, max_decode_length=WIDTH,
                  **kwargs)
  return jax.device_get(run(_random_params(config), cache, _prompts(), PROMPT_LENGTHS))


def _check_well_formed(result):
  for row, (tokens, length, ended) in enumerate(zip(result.tokens, result.lengths,
                                                    result.ended)):
    emitted = tokens[:length]
    assert np.all(LAYOUT.is_text(emitted)), (row, emitted)      # no PAD/speech/rounding
    assert np.all(tokens[length:] == LAYOUT.pad_id), (row, tokens)
    assert ended == (length > 0 and emitted[-1] == LAYOUT.eos_id)
    assert np.sum(emitted == LAYOUT.eos_id) == int(ended)


@pytest.mark.parametrize("config", [CONFIG, CONFIG.replace(position="rope", mlp="swiglu")],
                         ids=["gpt2", "rope"])
def test_cached_greedy_equals_naive_full_forward(config):
  cached = _run(config, True, "greedy")
  naive = _run(config, False, "greedy")
  np.testing.assert_array_equal(cached.tokens, naive.tokens)
  np.testing.assert_array_equal(cached.lengths, naive.lengths)
  np.testing.assert_allclose(cached.scores, naive.scores, rtol=1e-4, atol=1e-4)
  _check_well_formed(cached)
  # The test means something: some rows end early, some run out of budget,
  # and the outputs are not one token repeated.
  assert cached.ended.any() and not cached.ended.all()
  assert len(np.unique(cached.tokens[cached.tokens > 1])) > 3
  # Projecting onto the text ids only changes nothing.
  text = _run(config, True, "greedy", text_logits=True)
  np.testing.assert_array_equal(text.tokens, cached.tokens)
  np.testing.assert_array_equal(text.lengths, cached.lengths)
  np.testing.assert_allclose(text.scores, cached.scores, rtol=1e-5, atol=1e-5)


def test_cached_beam_search_equals_naive_with_scanned_layers():
  config = CONFIG.replace(scan_layers=True)
  cached = _run(config, True, "beam", beam_size=3, alpha=0.6)
  naive = _run(config, False, "beam", beam_size=3, alpha=0.6)
  np.testing.assert_array_equal(cached.tokens, naive.tokens)
  np.testing.assert_array_equal(cached.lengths, naive.lengths)
  np.testing.assert_allclose(cached.scores, naive.scores, rtol=1e-4, atol=1e-4)
  _check_well_formed(cached)
  text = _run(config, True, "beam", text_logits=True, beam_size=3, alpha=0.6)
  np.testing.assert_array_equal(text.tokens, cached.tokens)
  np.testing.assert_allclose(text.scores, cached.scores, rtol=1e-5, atol=1e-5)


def _cache_sized_instructions(hlo: str, cache_shape) -> list[str]:
  """The while loop body's cache-sized instructions: ``opcode``, plus
  " scatter" for the one-slot writes and " transposed" for a result in
  another axis order (e.g. ``["get-tuple-element", "fusion scatter"]``)."""
  body = re.search(r" while\(.*?body=%?([\w.\-]+)", hlo).group(1)
  lines = hlo.splitlines()
  start = next(i for i, line in enumerate(lines) if re.match(rf"%?{re.escape(body)} ", line))
  found = []
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    match = re.match(r"\s+(?:ROOT )?%?\S+ = f32\[([\d,]+)\]\S* (\S+?)\(", line)
    if not match:
      continue
    shape = tuple(map(int, match.group(1).split(",")))
    if sorted(shape) == sorted(cache_shape):
      found.append(match.group(2) + (" scatter" if "scatter" in line else "")
                   + ("" if shape == tuple(cache_shape) else " transposed"))
  return found


def test_greedy_loop_updates_the_cache_in_place():
  """No copy or transpose of a cache buffer per step: the loop body's only
  cache-sized results are the loop-carried buffers and their one-slot writes."""
  module = decoder.Decoder(CONFIG)
  cache = decoder.init_cache(module, BATCH, PROMPT + WIDTH)

  def run(params, cache, prompt, lengths):
    return decoding.greedy_decode(*decoding.cached_fns(module, params, LAYOUT), cache, prompt,
                                  lengths, layout=LAYOUT, max_decode_length=WIDTH)
  hlo = jax.jit(run).lower(_random_params(CONFIG), cache, _prompts(),
                           PROMPT_LENGTHS).compile().as_text()
  cache_shape = cache["layers_0"]["attention"]["cached_key"].shape   # [4, 22, 4, 8]
  found = _cache_sized_instructions(hlo, cache_shape)
  leaves = 2 * CONFIG.num_layers                                      # keys and values
  assert sorted(set(found)) == ["fusion scatter", "get-tuple-element"], found
  assert found.count("fusion scatter") == leaves, found


def test_beam_size_one_equals_greedy():
  budgets = np.array([12, 5, 2, 9], np.int32)
  greedy = _run(CONFIG, True, "greedy", budgets=budgets)
  beam = _run(CONFIG, True, "beam", beam_size=1, alpha=0.0, budgets=budgets)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_array_equal(beam.lengths, greedy.lengths)
  np.testing.assert_array_equal(beam.ended, greedy.ended)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5, atol=1e-5)
  assert np.all(greedy.lengths <= budgets)


def test_decoder_cache_batch_axes():
  plain = decoding.decoder_cache_batch_axes(decoder.Decoder(CONFIG), 2, 8)
  scanned = decoding.decoder_cache_batch_axes(decoder.Decoder(CONFIG.replace(scan_layers=True)),
                                              2, 8)
  assert set(jax.tree.leaves(plain)) == {0}
  assert scanned["cache_index"] == 0
  assert set(jax.tree.leaves(scanned["layers"])) == {1}


# ----------------------------------------------------------------------------
# A hand-built "model": the next-token distribution depends on the last token.
# ----------------------------------------------------------------------------

FAKE = VocabLayout(text_size=10, speech_size=20)   # text 3..9, <speech_end>=10, units 11..30
SE, UNIT = FAKE.speech_end_id, FAKE.speech_offset


def _table(transitions):
  """[V, V] log-probabilities: row = last token, {next: prob}; others log 1e-13."""
  table = np.full((FAKE.size, FAKE.size), -30.0, np.float32)
  for last, nexts in transitions.items():
    for token, prob in nexts.items():
      table[last, token] = np.log(prob)
  return jnp.asarray(table)


def _fake_fns(table, calls=None):
  """prefill/step over a cache that is just the last token of each row."""
  def prefill_fn(cache, prompt, lengths):
    del cache
    return table[prompt], decoder.last_logits(prompt[:, :, None], lengths)[:, 0]

  def step_fn(cache, tokens):
    del cache
    if calls is not None:
      jax.debug.callback(lambda: calls.append(1))
    return table[tokens], tokens
  return prefill_fn, step_fn


# After <speech_end> a unit and PAD are likelier than any text id: never emitted.
GREEDY_TABLE = _table({
    SE: {UNIT: 0.5, 0: 0.3, 3: 0.15, 4: 0.05},
    3: {4: 0.7, 1: 0.3},
    4: {1: 0.6, FAKE.size - 1: 0.4},          # a rounding id, never emitted
    UNIT + 1: {5: 0.9, 1: 0.1},
    5: {5: 0.8, SE: 0.2},                     # loops: only the budget stops it
})
FAKE_PROMPTS = np.array([[UNIT + 3, SE, 0], [UNIT, UNIT + 2, UNIT + 1]], np.int32)
FAKE_LENGTHS = np.array([2, 3], np.int32)


def test_greedy_stops_at_text_end_and_at_the_budget():
  prefill_fn, step_fn = _fake_fns(GREEDY_TABLE)
  result = decoding.greedy_decode(prefill_fn, step_fn, jnp.zeros(2, jnp.int32),
                                  FAKE_PROMPTS, FAKE_LENGTHS, layout=FAKE,
                                  max_decode_length=6)
  np.testing.assert_array_equal(result.tokens, [[3, 4, 1, 0, 0, 0], [5, 5, 5, 5, 5, 5]])
  np.testing.assert_array_equal(result.lengths, [3, 6])
  np.testing.assert_array_equal(result.ended, [True, False])
  text_logp = np.log([0.15 / 0.2, 0.7, 0.6 / 0.6])   # renormalised over text ids
  np.testing.assert_allclose(result.scores[0], text_logp.sum(), rtol=1e-5)

  budgeted = decoding.greedy_decode(prefill_fn, step_fn, jnp.zeros(2, jnp.int32),
                                    FAKE_PROMPTS, FAKE_LENGTHS, layout=FAKE,
                                    max_decode_length=6, budgets=np.array([2, 4]))
  np.testing.assert_array_equal(budgeted.tokens, [[3, 4, 0, 0, 0, 0], [5, 5, 5, 5, 0, 0]])
  np.testing.assert_array_equal(budgeted.lengths, [2, 4])
  np.testing.assert_array_equal(budgeted.ended, [False, False])


def test_greedy_loop_ends_when_all_rows_are_done():
  calls = []
  prefill_fn, step_fn = _fake_fns(GREEDY_TABLE, calls)
  decode = jax.jit(functools.partial(decoding.greedy_decode, prefill_fn, step_fn, layout=FAKE,
                                     max_decode_length=50))
  result = decode(jnp.zeros(2, jnp.int32), FAKE_PROMPTS[:1].repeat(2, 0),
                  FAKE_LENGTHS[:1].repeat(2))
  jax.effects_barrier()
  np.testing.assert_array_equal(result.lengths, [3, 3])
  assert len(calls) == 2   # after tokens 1 and 2; none after <text_end>


# Greedy takes A (0.6) then C: A C <text_end> = 0.33; B <text_end> = 0.36 is
# better; with alpha = 1 the longer A C <text_end> wins again.
A, B, C, D = 3, 4, 5, 6
BEAM_TABLE = _table({
    SE: {A: 0.6, B: 0.4},
    A: {C: 0.55, D: 0.45},
    B: {1: 0.9, C: 0.1},
    C: {1: 1.0},
    D: {1: 1.0},
})
BEAM_PROMPT = np.array([[UNIT, SE]], np.int32)


def _beam(beam_size, alpha):
  prefill_fn, step_fn = _fake_fns(BEAM_TABLE)
  return decoding.beam_search(prefill_fn, step_fn, jnp.zeros(1, jnp.int32), BEAM_PROMPT,
                              np.array([2]), layout=FAKE, max_decode_length=6,
                              beam_size=beam_size, alpha=alpha)


def test_beam_search_finds_the_better_hypothesis_and_applies_the_length_penalty():
  prefill_fn, step_fn = _fake_fns(BEAM_TABLE)
  greedy = decoding.greedy_decode(prefill_fn, step_fn, jnp.zeros(1, jnp.int32), BEAM_PROMPT,
                                  np.array([2]), layout=FAKE, max_decode_length=6)
  np.testing.assert_array_equal(greedy.tokens[0, :3], [A, C, 1])

  one = _beam(1, 0.0)
  np.testing.assert_array_equal(one.tokens, greedy.tokens)
  np.testing.assert_allclose(one.scores, np.log(0.33), rtol=1e-5)

  two = _beam(2, 0.0)
  np.testing.assert_array_equal(two.tokens[0], [B, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(two.lengths, [2])
  np.testing.assert_allclose(two.scores, np.log(0.36), rtol=1e-5)

  penalised = _beam(2, 1.0)
  np.testing.assert_array_equal(penalised.tokens[0, :3], [A, C, 1])
  np.testing.assert_allclose(penalised.scores, np.log(0.33) / (8 / 6), rtol=1e-5)


def test_beam_search_never_emits_non_text_ids_and_respects_budgets():
  prefill_fn, step_fn = _fake_fns(GREEDY_TABLE)
  result = decoding.beam_search(prefill_fn, step_fn, jnp.zeros(2, jnp.int32), FAKE_PROMPTS,
                                FAKE_LENGTHS, layout=FAKE, max_decode_length=6, beam_size=4,
                                budgets=np.array([6, 3]))
  np.testing.assert_array_equal(result.tokens[0, :3], [3, 4, 1])
  np.testing.assert_array_equal(result.tokens[1], [5, 5, 5, 0, 0, 0])
  np.testing.assert_array_equal(result.lengths, [3, 3])
  np.testing.assert_array_equal(result.ended, [True, False])


def test_first_max_is_argmax_with_the_first_of_ties():
  x = jnp.array([[1.0, 3.0, 3.0, -jnp.inf], [2.0, 0.0, 2.0, 2.0], [-jnp.inf, 0.5, -1.0, 0.5]])
  index, best = decoding._first_max(x)
  np.testing.assert_array_equal(index, [1, 0, 1])
  np.testing.assert_array_equal(index, jnp.argmax(x, axis=-1))
  np.testing.assert_array_equal(best, [3.0, 2.0, 0.5])


def test_bad_arguments_raise():
  prefill_fn, step_fn = _fake_fns(GREEDY_TABLE)
  with pytest.raises(ValueError, match="beam_size must be >= 1"):
    decoding.beam_search(prefill_fn, step_fn, jnp.zeros(2, jnp.int32), FAKE_PROMPTS,
                         FAKE_LENGTHS, layout=FAKE, max_decode_length=4, beam_size=0)
  with pytest.raises(ValueError, match="max_decode_length must be >= 1"):
    decoding.greedy_decode(prefill_fn, step_fn, jnp.zeros(2, jnp.int32), FAKE_PROMPTS,
                           FAKE_LENGTHS, layout=FAKE, max_decode_length=0)
  with pytest.raises(ValueError, match="method must be one of"):
    decoding.decode(prefill_fn, step_fn, jnp.zeros(2, jnp.int32), FAKE_PROMPTS, FAKE_LENGTHS,
                    layout=FAKE, max_decode_length=4, method="sampling")
